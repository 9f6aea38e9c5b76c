"""The benchmark workload, defined once so that its numbers compare.

`tinyllm-trio bench http` sends it to a server over HTTP; `tinyllm-trio bench engine` runs the
same requests through an in-process Engine, so "HTTP keeps N% of the Engine" compares like with
like: the same prompts (15 words, 16 tokens with BOS on TinyLLM's tokenizer), the same number of
output tokens with EOS ignored, the same number of requests per concurrency level, each level a
closed loop of that many concurrent clients.
"""

from __future__ import annotations

PROMPT_WORDS = 15
MAX_TOKENS = 128

_STORY = (
    "once upon a time there was a little girl named lily . she liked to play with her "
    "dog in the big green park every day and the sun was warm"
)
_WORDS = tuple(_STORY.split())


def prompt_text(index: int, words: int = PROMPT_WORDS) -> str:
    """A short story prompt; rotated by `index` so no two consecutive requests share it."""
    start = index % len(_WORDS)
    return " ".join((_WORDS * (2 + words // len(_WORDS)))[start : start + words])


def requests_per_level(concurrency: int) -> int:
    """Requests sent at one concurrency level: enough that each client sends several."""
    return max(16, 4 * concurrency)


def corpus_text() -> str:
    """Every word the prompts use (for a stand-in vocabulary when no model is packaged)."""
    return _STORY

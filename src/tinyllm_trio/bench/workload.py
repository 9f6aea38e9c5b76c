"""The benchmark workload, defined once so that its numbers compare.

`tinyllm-trio bench http` sends it to a server over HTTP; `tinyllm-trio bench engine` runs the
same requests through an in-process Engine, so "HTTP keeps N% of the Engine" compares like with
like: the same prompts (15 words, 16 tokens with BOS on TinyLLM's tokenizer), the same number of
output tokens with EOS ignored, the same number of requests per concurrency level, each level a
closed loop of that many concurrent clients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tinyllm_trio.engine import Engine

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


def parse_levels(text: str, flag: str) -> list[int]:
    """A benchmark flag's comma-separated levels (concurrency, workers, batch sizes), each
    >= 1; ValueError naming `flag` otherwise."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag}: values must be >= 1, got {text!r}")
    return values


def requests_per_level(concurrency: int) -> int:
    """Requests sent at one concurrency level: enough that each client sends several."""
    return max(16, 4 * concurrency)


def corpus_text() -> str:
    """Every word the prompts use (for a stand-in vocabulary when no model is packaged)."""
    return _STORY


async def run_on_engine(
    engine: Engine, concurrency: int, requests: int, max_tokens: int, prompt_words: int
) -> int:
    """`requests` generations of `max_tokens` tokens (greedy, EOS ignored) through an Engine,
    `concurrency` client tasks each taking the next request as its last one ends; returns the
    tokens generated (RuntimeError if any generation failed). The in-process twin of one
    `bench http` level."""
    import trio

    from tinyllm_trio.model.sampling import SamplingParams
    from tinyllm_trio.protocol import DoneEvent, TokenEvent

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    indices = iter(range(requests))
    counts: list[int] = []

    async def client() -> None:
        for index in indices:  # shared: each client takes the next request
            n = 0
            async with engine.generate(prompt_text(index, prompt_words), params) as events:
                async for event in events:
                    if isinstance(event, TokenEvent):
                        n += len(event.token_ids)
                    elif not isinstance(event, DoneEvent):
                        raise RuntimeError(f"generation failed: {event}")
            counts.append(n)

    async with trio.open_nursery() as nursery:
        for _ in range(min(concurrency, requests)):
            nursery.start_soon(client)
    return sum(counts)

"""The benchmark workload, defined once so that its numbers compare.

`tinyllm-trio bench http` sends it to a server over HTTP; `tinyllm-trio bench engine` runs the
same requests through an in-process Engine, so "HTTP keeps N% of the Engine" compares like with
like: the same prompts (15 words, 16 tokens with BOS on TinyLLM's tokenizer), the same number of
output tokens with EOS ignored, the same number of requests per concurrency level, each level a
closed loop of that many concurrent clients.

With `shared_prefix_words` N > 0 every prompt is the same N words (an application's long
instructions, a chat's history) followed by the usual short prompt as a distinct tail: the
load the prefix cache is for.
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
# The shared prefix: instructions an application puts before every prompt, in words that are
# one token each on TinyLLM's vocabulary (62 words, 63 tokens with BOS), so N words are ~N
# tokens and a 380-word prefix plus its tail fits the 512-token context with room to generate.
_INSTRUCTIONS = (
    "you are a kind friend who tells a story . tell a short and happy story for a little "
    "child . use simple words and short lines . the story should have a good end and a nice "
    "friend who can help . every day the sun was warm and the girl liked to play in the green "
    "park with her mother"
)
_PREFIX_WORDS = tuple(_INSTRUCTIONS.split())


def prompt_text(index: int, words: int = PROMPT_WORDS, shared_prefix_words: int = 0) -> str:
    """A short story prompt; rotated by `index` so no two consecutive requests share it. With
    `shared_prefix_words`, that many words (the same for every index) come first."""
    start = index % len(_WORDS)
    tail = " ".join((_WORDS * (2 + words // len(_WORDS)))[start : start + words])
    if not shared_prefix_words:
        return tail
    return shared_prefix(shared_prefix_words) + " " + tail


# Token-id prompts (`bench http --prompt-tokens`, `bench compare`): <BOS> (id 2) and then word
# ids from this range, which every TinyLLM vocabulary has (six specials, then words by
# frequency). A server that takes ids as given (ours, llama-server) runs exactly these tokens,
# so two servers with different tokenizers get the same prompt.
PROMPT_BOS = 2
_PROMPT_ID_RANGE = (6, 1006)


def prompt_ids(index: int, tokens: int) -> list[int]:
    """`tokens` token ids, <BOS> first, distinct per `index` (the ids rotate by index, so no
    two consecutive requests share more than <BOS> and no prefix cache serves one)."""
    low, high = _PROMPT_ID_RANGE
    span = high - low
    return [PROMPT_BOS] + [low + (index * 37 + 7 * k) % span for k in range(tokens - 1)]


def shared_prefix(words: int) -> str:
    """The first `words` words of the instructions, repeated as needed: every request's
    prefix."""
    return " ".join((_PREFIX_WORDS * (1 + words // len(_PREFIX_WORDS)))[:words])


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
    return _STORY + " " + _INSTRUCTIONS


async def run_on_engine(
    engine: Engine,
    concurrency: int,
    requests: int,
    max_tokens: int,
    prompt_words: int,
    *,
    shared_prefix_words: int = 0,
    ttfts: list[float] | None = None,
    sink: bool = False,
) -> int:
    """`requests` generations of `max_tokens` tokens (greedy, EOS ignored) through an Engine,
    `concurrency` client tasks each taking the next request as its last one ends; returns the
    tokens generated (RuntimeError if any generation failed), and appends each request's time
    to its first token (seconds, from its `generate` call) to `ttfts` if given. The in-process
    twin of one `bench http` level.

    Each client iterates its generation (a task switch per token), or with `sink` counts the
    tokens after the first in a token sink (`Generation.set_token_sink`), as the HTTP server
    consumes them."""
    import trio

    from tinyllm_trio.model.sampling import SamplingParams
    from tinyllm_trio.protocol import DoneEvent, TokenEvent

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    indices = iter(range(requests))
    counts: list[int] = []

    async def client() -> None:
        for index in indices:  # shared: each client takes the next request
            n = [0]  # tokens so far, counted here or by the sink

            def count(event: TokenEvent, n: list[int] = n) -> None:
                n[0] += len(event.token_ids)

            prompt = prompt_text(index, prompt_words, shared_prefix_words)
            start = trio.current_time()
            async with engine.generate(prompt, params) as events:
                async for event in events:
                    if isinstance(event, TokenEvent):
                        if not n[0]:
                            if ttfts is not None:
                                ttfts.append(trio.current_time() - start)
                            if sink:
                                events.set_token_sink(count)
                        count(event)
                    elif not isinstance(event, DoneEvent):
                        raise RuntimeError(f"generation failed: {event}")
            counts.append(n[0])

    async with trio.open_nursery() as nursery:
        for _ in range(min(concurrency, requests)):
            nursery.start_soon(client)
    return sum(counts)

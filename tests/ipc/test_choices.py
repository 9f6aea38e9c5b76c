"""A request's n choices through real worker processes: one prefill, seeds derived from the
seed, every row freed on cancel (the batcher's side is in test_prefix_cache.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tinyllm_trio import InvalidParameterError, SamplingParams, open_engine
from tinyllm_trio.engine import choice_params
from tinyllm_trio.model.batching import TokenEvent

pytestmark = pytest.mark.slow  # real worker processes

# 25 tokens with BOS on the test checkpoints' vocabulary: more than one prefix-cache block
PROMPT = "once upon a time there was a little girl named lily and she liked to play with her dog"


def test_choice_seeds_follow_vllms_rule_and_n_is_validated() -> None:
    base = SamplingParams(seed=40)
    assert [p.seed for p in choice_params(base, 3)] == [40, 41, 42]
    assert choice_params(SamplingParams(), 2) == [SamplingParams()] * 2
    for bad in (0, 9, True, 2.0, "2"):
        with pytest.raises(InvalidParameterError) as info:
            choice_params(base, bad)  # type: ignore[arg-type]
        assert info.value.param == "n"


async def test_n_choices_prefill_once_differ_and_reproduce(tiny_checkpoint: Path) -> None:
    async with open_engine(tiny_checkpoint, workers=2, max_batch=4, pin_workers=False) as engine:
        params = SamplingParams(max_tokens=12, temperature=1.5, seed=123)
        prompt_tokens = len(engine.encode_prompt(PROMPT))
        got = await engine.complete_choices(PROMPT, params, n=4)
        assert [c.prompt_tokens for c in got] == [prompt_tokens] * 4
        assert len({tuple(c.token_ids) for c in got}) == 4  # the samples differ
        stats = engine.stats()["prefix_cache"]
        # one choice computed the prompt; the 3 others forked its row (all of it reused)
        assert (stats["queries"], stats["hits"]) == (4 * prompt_tokens, 3 * prompt_tokens)
        assert sorted(w["prefix_cache"]["queries"] for w in engine.stats()["workers"]) == [
            0,
            4 * prompt_tokens,
        ]  # all on one worker
        again = await engine.complete_choices(PROMPT, params, n=4)
        assert [c.token_ids for c in again] == [c.token_ids for c in got]  # the seed's set
        alone = await engine.complete(PROMPT, params)
        assert alone.token_ids == got[0].token_ids  # choice 0 is what n=1 gives
        with pytest.raises(InvalidParameterError) as info:
            engine.generate_choices(PROMPT, params, n=9)
        assert info.value.param == "n"


async def test_n_choices_without_the_cache_still_prefill_once(tiny_checkpoint: Path) -> None:
    """With the prefix cache off the n choices still share one prefill: a spy-free check is
    the time to first token of each choice, equal, as all come from one admission step."""
    async with open_engine(
        tiny_checkpoint, workers=1, max_batch=4, pin_workers=False, prefix_cache=False
    ) as engine:
        params = SamplingParams(max_tokens=3, temperature=0)
        got = await engine.complete_choices(PROMPT, params, n=3)
        assert len({c.timings["prefill_ms"] for c in got}) == 1  # admitted in one step
        assert len({tuple(c.token_ids) for c in got}) == 1  # greedy: identical, as OpenAI's
        assert [c.cached_tokens for c in got] == [0, 0, 0]


async def test_cancelling_the_choices_frees_every_row(long_checkpoint: Path) -> None:
    async with open_engine(long_checkpoint, workers=1, max_batch=4, pin_workers=False) as engine:
        params = SamplingParams(max_tokens=400, temperature=1.0, ignore_eos=True)
        seen: set[int] = set()
        async with engine.generate_choices(PROMPT, params, n=3) as events:
            async for event in events:
                if isinstance(event, TokenEvent) and event.token_ids:
                    seen.add(events.index(event.request_id))
                if len(seen) == 3:
                    break
            assert engine.stats()["running"] == 3
        with trio.fail_after(5):
            while engine.stats()["running"]:
                await trio.sleep(0.01)
        # the rows are free: a full batch of new requests is admitted at once
        done = await engine.complete_choices(PROMPT, SamplingParams(max_tokens=2), n=4)
        assert len(done) == 4


async def test_more_choices_than_the_batch_wait_and_reuse_the_prompt(tiny_checkpoint) -> None:
    async with open_engine(tiny_checkpoint, workers=1, max_batch=2, pin_workers=False) as engine:
        params = SamplingParams(max_tokens=3, temperature=1.0, seed=9, ignore_eos=True)
        got = await engine.complete_choices(PROMPT, params, n=4)
        p = len(engine.encode_prompt(PROMPT))
        stats = engine.stats()["prefix_cache"]
    assert [c.completion_tokens for c in got] == [3] * 4
    # two admitted together (one prefill, one fork); when both end, the other two together:
    # one takes all but the last token from the cache, the other forks it
    assert (stats["queries"], stats["hits"]) == (4 * p, p + (p - 1) + p)
    assert sorted(c.cached_tokens for c in got) == [0, p - 1, p, p]

"""The prefix cache: same greedy output with it on and off, reuse counts, LRU, active rows win;
forks of one prompt (n choices) and prompt logprobs (echo)."""

from __future__ import annotations

import numpy as np
import pytest

from tinyllm_trio.model import batching
from tinyllm_trio.model.batching import ContinuousBatcher, DoneEvent, Event, TokenEvent
from tinyllm_trio.model.prefix_cache import BLOCK_TOKENS, block_hashes
from tinyllm_trio.model.sampling import SamplingParams, log_softmax
from tinyllm_trio.model.tokenizer import HybridTokenizer, build_vocab
from tinyllm_trio.model.transformer import ModelConfig, Transformer

TEXT = "once upon a time there was a little cat. the cat liked to play in the sun, and the dog ran!"
GREEDY = SamplingParams(max_tokens=6, temperature=0)


@pytest.fixture(scope="module")
def tokenizer() -> HybridTokenizer:
    return build_vocab([TEXT], n_words=20, n_chars=30)


@pytest.fixture(scope="module")
def model(tokenizer: HybridTokenizer) -> Transformer:
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, n_embd=32, n_head=2, n_layer=2, max_context=128
    )
    return Transformer.random(config, seed=5, std=0.2)


def _ids(n: int, seed: int, vocab: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


def _run(batcher: ContinuousBatcher) -> dict[int, list[Event]]:
    out: dict[int, list[Event]] = {}
    for _ in range(10_000):
        if batcher.idle:
            return out
        for event in batcher.step():
            out.setdefault(event.request_id, []).append(event)
    raise AssertionError("the batcher never went idle")


def _one(batcher: ContinuousBatcher, rid: int, ids: list[int], params=GREEDY):
    batcher.submit(rid, ids, params)
    events = _run(batcher)[rid]
    done = events[-1]
    assert isinstance(done, DoneEvent), done
    return [t for e in events if isinstance(e, TokenEvent) for t in e.token_ids], done


def test_block_hashes_chain_over_whole_blocks() -> None:
    a = list(range(40))
    assert len(block_hashes(a)) == 40 // BLOCK_TOKENS
    assert block_hashes(a)[:1] == block_hashes(a[:20])
    b = [99, *a[1:]]  # the first block differs: every later hash differs too (a chain)
    assert all(x != y for x, y in zip(block_hashes(a), block_hashes(b), strict=True))


def test_greedy_output_is_the_same_with_the_cache_on_and_off(model, tokenizer) -> None:
    V = model.config.vocab_size
    base = _ids(37, 1, V)
    prompts = [
        base,  # cold
        base,  # entirely cached: all but the last token reused
        base[:20] + _ids(9, 2, V),  # shares 20 tokens: a prefix ending mid-block
        base + _ids(5, 3, V),  # extends the first prompt (and part of its output)
        _ids(30, 4, V),  # nothing shared
        base[:16],  # exactly one block, entirely cached
    ]
    on = ContinuousBatcher(model, tokenizer, max_batch=4)
    off = ContinuousBatcher(model, tokenizer, max_batch=4, prefix_cache=False)
    cached = []
    for i, ids in enumerate(prompts):
        tokens_on, done_on = _one(on, i, ids)
        tokens_off, done_off = _one(off, i, ids)
        assert tokens_on == tokens_off, i
        assert done_off.cached_tokens == 0
        cached.append(done_on.cached_tokens)
    assert cached == [0, 36, 20, 37, 0, 15]
    stats = on.prefix_stats()
    assert stats["queries"] == sum(len(p) for p in prompts)
    assert stats["hits"] == sum(cached)
    assert off.prefix_stats() is None


def test_a_later_arrival_copies_a_running_sequences_prompt(model, tokenizer) -> None:
    V = model.config.vocab_size
    shared = _ids(32, 6, V)
    batcher = ContinuousBatcher(model, tokenizer, max_batch=4)
    batcher.submit(0, [*shared, 5], SamplingParams(max_tokens=40, temperature=0))
    batcher.step()  # 0 is running
    tokens, done = _one(batcher, 1, [*shared, 7])
    assert done.cached_tokens == 32
    alone = ContinuousBatcher(model, tokenizer, max_batch=1, prefix_cache=False)
    assert tokens == _one(alone, 1, [*shared, 7])[0]


def test_identical_prompts_admitted_together_are_prefilled_once(
    model, tokenizer, monkeypatch
) -> None:
    passes: list[list[int]] = []
    real = model.prefill_many

    def spy(cache, prompts):
        passes.append([len(ids) for _, ids in prompts])
        return real(cache, prompts)

    monkeypatch.setattr(model, "prefill_many", spy)
    ids = _ids(25, 7, model.config.vocab_size)
    batcher = ContinuousBatcher(model, tokenizer, max_batch=4, prefix_cache=False)
    for i in range(3):
        batcher.submit(i, ids, SamplingParams(max_tokens=8, temperature=1.0, seed=10 + i))
    got = _run(batcher)
    assert passes == [[25]]
    outs = [[t for e in got[i] if isinstance(e, TokenEvent) for t in e.token_ids] for i in range(3)]
    assert len({tuple(o) for o in outs}) == 3  # forks sample independently
    monkeypatch.setattr(model, "prefill_many", real)
    again = ContinuousBatcher(model, tokenizer, max_batch=1, prefix_cache=False)
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=11)
    assert _one(again, 1, ids, params)[0] == outs[1]  # a fork is what it would be alone


def test_a_groups_forks_are_admitted_together_past_the_token_budget(
    model, tokenizer, monkeypatch
) -> None:
    """The per-pass prompt budget counts a prompt once: n choices of a prompt that fills it
    are still admitted in one step, and prefilled once."""
    monkeypatch.setattr(batching, "PREFILL_TOKENS_PER_PASS", 30)
    passes: list[list[int]] = []
    real = model.prefill_many

    def spy(cache, prompts, **kw):
        passes.append([len(ids) for _, ids in prompts])
        return real(cache, prompts, **kw)

    monkeypatch.setattr(model, "prefill_many", spy)
    ids = _ids(25, 7, model.config.vocab_size)
    batcher = ContinuousBatcher(model, tokenizer, max_batch=4, prefix_cache=False)
    for i in range(4):
        batcher.submit(i, ids, SamplingParams(max_tokens=4, temperature=1.0, seed=i))
    batcher.step()
    assert batcher.active == 4 and passes == [[25]]


def test_prompt_logprobs_are_the_prefills_own(model, tokenizer) -> None:
    """Entry j is log p(prompt[j] | prompt[:j]) from the model's raw distribution (the bias
    does not touch it), the first is None, and they come before the first token; a prompt
    the cache holds is still scored in full, with the same greedy output."""
    V = model.config.vocab_size
    ids = _ids(30, 3, V)
    expected = log_softmax(model.forward(ids))
    batcher = ContinuousBatcher(model, tokenizer, max_batch=2)
    plain = SamplingParams(max_tokens=5, temperature=0)
    batcher.submit(0, ids, plain)
    first = [t for e in _run(batcher)[0] if isinstance(e, TokenEvent) for t in e.token_ids]
    scored = SamplingParams(max_tokens=5, temperature=0, prompt_logprobs=2, logit_bias={5: 50})
    for rid in (1, 2):  # 1 is scored with the prompt cached, 2 forks 1 (admitted together)
        batcher.submit(rid, ids, scored)
    got = _run(batcher)
    for rid in (1, 2):
        head = got[rid][0]
        assert isinstance(head, TokenEvent) and head.token_ids == [] and head.text == ""
        entries = head.logprobs
        assert [e["id"] for e in entries] == ids
        assert entries[0]["logprob"] is None and entries[0]["top_logprobs"] == []
        for j in range(1, len(ids)):
            assert entries[j]["logprob"] == pytest.approx(expected[j - 1, ids[j]], abs=1e-4)
            assert len(entries[j]["top_logprobs"]) == 2
    unbiased = SamplingParams(max_tokens=5, temperature=0, prompt_logprobs=0)
    batcher.submit(3, ids, unbiased)
    events = _run(batcher)[3]
    assert [t for e in events if isinstance(e, TokenEvent) for t in e.token_ids] == first


def test_eviction_is_least_recently_used(model, tokenizer) -> None:
    V = model.config.vocab_size
    a, b, c, d = (_ids(20, 20 + i, V) for i in range(4))
    batcher = ContinuousBatcher(model, tokenizer, max_batch=3)
    for rid, ids in enumerate((a, b, a, c, d)):  # a is used again after b: b is older
        _one(batcher, rid, ids)
    assert batcher.prefix.lookup(a)[1] == 19
    assert batcher.prefix.lookup(b)[1] == 0  # evicted to give d a row
    assert batcher.prefix.lookup(c)[1] == 19 and batcher.prefix.lookup(d)[1] == 19
    assert batcher.prefix_stats()["entries"] == 3


def test_active_sequences_always_get_a_row(model, tokenizer) -> None:
    V = model.config.vocab_size
    batcher = ContinuousBatcher(model, tokenizer, max_batch=2)
    for rid in range(2):
        _one(batcher, rid, _ids(20, 30 + rid, V))
    assert batcher.prefix_stats()["entries"] == 2  # every row is parked
    long = SamplingParams(max_tokens=20, temperature=0)
    batcher.submit(10, _ids(18, 40, V), long)
    batcher.submit(11, _ids(18, 41, V), long)
    batcher.step()
    assert batcher.active == 2  # both admitted at once: the cache made room
    assert batcher.prefix_stats()["entries"] == 0
    _run(batcher)


def test_cache_prompt_false_neither_reuses_nor_keeps(model, tokenizer) -> None:
    V = model.config.vocab_size
    ids = _ids(30, 50, V)
    batcher = ContinuousBatcher(model, tokenizer, max_batch=2)
    first, _ = _one(batcher, 0, ids)
    bypass = SamplingParams(max_tokens=6, temperature=0, cache_prompt=False)
    tokens, done = _one(batcher, 1, ids, bypass)
    assert (tokens, done.cached_tokens) == (first, 0)
    other = _ids(30, 51, V)
    _one(batcher, 2, other, bypass)
    assert batcher.prefix.lookup(other)[1] == 0
    assert batcher.prefix_stats()["queries"] == 30  # a bypassed request is no query


def test_kv_cache_claim_copies_the_prefix_and_extend_matches_prefill(model) -> None:
    V = model.config.vocab_size
    ids = _ids(40, 60, V)
    cache = model.new_cache(3)
    full = model.prefill(cache, "a", ids)
    cache.park("a", "entry", 40)
    assert len(cache) == 0 and cache.parked_length("entry") == 40
    assert cache.claim("b", "entry", 23) == 23
    assert cache.parked_length("entry") == 40  # it sat in the new row: moved to a free one
    got = model.extend_many(cache, [("b", ids)])[0]
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="whole prompt"):
        model.extend_many(cache, [("b", ids)])

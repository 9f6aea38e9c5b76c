"""Continuous batching: outputs independent of batch company, finish reasons, cancel, stops."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tinyllm_trio.model.batching import ContinuousBatcher, DoneEvent, Event, TokenEvent
from tinyllm_trio.model.sampling import SamplingParams
from tinyllm_trio.model.tokenizer import EOS, HybridTokenizer, build_vocab
from tinyllm_trio.model.transformer import ContextLengthError, ModelConfig, Transformer

TEXT = (
    "once upon a time there was a little cat. the cat liked to play in the sun, "
    "and the dog liked to run! one day the cat and the dog went to the park together. "
    "they saw a big tree; it was very tall. 'look,' said the cat, 'a bird!' "
)


@pytest.fixture(scope="module")
def tokenizer() -> HybridTokenizer:
    return build_vocab([TEXT], n_words=40, n_chars=30)


@pytest.fixture(scope="module")
def model(tokenizer: HybridTokenizer) -> Transformer:
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, n_embd=32, n_head=2, n_layer=2, max_context=48
    )
    return Transformer.random(config, seed=3)


def _run(batcher: ContinuousBatcher) -> dict[int, list[Event]]:
    out: dict[int, list[Event]] = {}
    for _ in range(10_000):
        if batcher.idle:
            return out
        for event in batcher.step():
            out.setdefault(event.request_id, []).append(event)
    raise AssertionError("the batcher never went idle")


def _tokens(events: list[Event]) -> list[int]:
    return [t for e in events if isinstance(e, TokenEvent) for t in e.token_ids]


def _text(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, TokenEvent))


def _done(events: list[Event]) -> DoneEvent:
    assert isinstance(events[-1], DoneEvent), events[-1]
    return events[-1]


PROMPTS = ["once upon a time", "the dog", "a bird said look", "they saw the big tall tree"]


def test_greedy_output_does_not_depend_on_batch_company(model, tokenizer) -> None:
    greedy = SamplingParams(max_tokens=12, temperature=0)
    alone = {}
    for i, prompt in enumerate(PROMPTS):
        batcher = ContinuousBatcher(model, tokenizer, max_batch=1)
        batcher.submit(i, prompt, greedy)
        alone[i] = _tokens(_run(batcher)[i])
    # Together, with only 3 slots: requests join and leave between steps, and a longer
    # neighbour (request 9) overlaps all of them.
    batcher = ContinuousBatcher(model, tokenizer, max_batch=3)
    batcher.submit(9, "the cat liked to play", SamplingParams(max_tokens=30, temperature=0))
    for i, prompt in enumerate(PROMPTS):
        batcher.submit(i, prompt, greedy)
    together = _run(batcher)
    for i in range(len(PROMPTS)):
        assert _tokens(together[i]) == alone[i]
        assert _done(together[i]).finish_reason == "length"


def test_a_burst_is_prefilled_in_passes_of_bounded_size(model, tokenizer, monkeypatch) -> None:
    """Arrivals of one step are prefilled together, split into passes of at most
    PREFILL_TOKENS_PER_PASS prompt tokens (one longer prompt alone), and come out exactly as
    when each runs alone."""
    from tinyllm_trio.model import batching

    monkeypatch.setattr(batching, "PREFILL_TOKENS_PER_PASS", 12)
    passes: list[list[int]] = []
    real = model.prefill_many

    def spy(cache, prompts):
        passes.append([len(ids) for _, ids in prompts])
        return real(cache, prompts)

    monkeypatch.setattr(model, "prefill_many", spy)
    greedy = SamplingParams(max_tokens=5, temperature=0)
    prompts = [
        tokenizer.encode(p)
        for p in ("the cat", "the dog liked", "once upon a time there was a little", "a bird")
    ]
    prompts.append(list(range(2, 17)))  # 15 tokens: over the cap, a pass of its own
    batcher = ContinuousBatcher(model, tokenizer, max_batch=8)
    for i, ids in enumerate(prompts):
        batcher.submit(i, ids, greedy)
    got = _run(batcher)
    assert sorted(n for p in passes for n in p) == sorted(len(ids) for ids in prompts)
    assert all(sum(p) <= 12 or len(p) == 1 for p in passes) and len(passes) > 1
    assert any(len(p) > 1 for p in passes)  # short ones did share a pass
    monkeypatch.setattr(model, "prefill_many", real)
    for i, ids in enumerate(prompts):
        alone = ContinuousBatcher(model, tokenizer, max_batch=1)
        alone.submit(0, ids, greedy)
        assert _tokens(got[i]) == _tokens(_run(alone)[0])


def test_seeded_sampling_is_reproducible_in_any_batch(model, tokenizer) -> None:
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=42)
    first = ContinuousBatcher(model, tokenizer, max_batch=4)
    first.submit(1, "the cat", params)
    second = ContinuousBatcher(model, tokenizer, max_batch=4)
    second.submit(5, "the dog", SamplingParams(max_tokens=20, temperature=1.0))
    second.submit(1, "the cat", params)
    assert _tokens(_run(first)[1]) == _tokens(_run(second)[1])


def test_greedy_and_sampled_sequences_share_a_step(model, tokenizer) -> None:
    """A step whose rows mix greedy picks and sampled ones gives each row its own token."""
    sampled = SamplingParams(max_tokens=12, temperature=1.0, seed=7)
    greedy = SamplingParams(max_tokens=12, temperature=0)
    mixed = ContinuousBatcher(model, tokenizer, max_batch=4)
    mixed.submit(1, "the cat", sampled)
    mixed.submit(2, "the dog liked", greedy)
    mixed.submit(3, "once upon", sampled)
    got = _run(mixed)
    for request_id, prompt, params in [(1, "the cat", sampled), (2, "the dog liked", greedy)]:
        alone = ContinuousBatcher(model, tokenizer, max_batch=1)
        alone.submit(request_id, prompt, params)
        assert _tokens(got[request_id]) == _tokens(_run(alone)[request_id])


def test_usage_and_text_match_the_tokens(model, tokenizer) -> None:
    batcher = ContinuousBatcher(model, tokenizer)
    batcher.submit(1, "once upon a time", SamplingParams(max_tokens=7, temperature=0))
    events = _run(batcher)[1]
    done = _done(events)
    assert done.prompt_tokens == len(tokenizer.encode("once upon a time"))
    assert done.completion_tokens == 7 == len(_tokens(events))
    prompt = tokenizer.encode("once upon a time")
    # The text continues the prompt, leading space included.
    assert tokenizer.decode(prompt) + _text(events) == tokenizer.decode(prompt + _tokens(events))
    assert [e.finish_reason for e in events[:-1]] == [None] * 6 + ["length"]
    assert set(done.timings) == {"queue_ms", "prefill_ms", "decode_ms"}


def test_generation_stops_at_the_context_limit(model, tokenizer) -> None:
    context = model.config.max_context
    prompt = list(range(6, 6 + context - 5))
    batcher = ContinuousBatcher(model, tokenizer)
    batcher.submit(1, prompt, SamplingParams(max_tokens=100, temperature=0))
    events = _run(batcher)[1]
    assert _done(events).finish_reason == "length"
    assert len(prompt) + _done(events).completion_tokens == context


def test_bad_prompts_are_refused_at_submit(model, tokenizer) -> None:
    batcher = ContinuousBatcher(model, tokenizer)
    context = model.config.max_context
    with pytest.raises(ContextLengthError):
        batcher.submit(1, [7] * context, SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        batcher.submit(1, [model.config.vocab_size], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        batcher.submit(1, [], SamplingParams())
    batcher.submit(1, "the cat", SamplingParams())
    with pytest.raises(ValueError, match="already in use"):
        batcher.submit(1, "the dog", SamplingParams())


def test_cancel_frees_the_slot_within_one_step(model, tokenizer) -> None:
    batcher = ContinuousBatcher(model, tokenizer, max_batch=1)
    batcher.submit(1, "the cat", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    batcher.submit(2, "the dog", SamplingParams(max_tokens=3, temperature=0))
    batcher.step()
    assert (batcher.active, batcher.waiting) == (1, 1)
    batcher.cancel(1)
    events = batcher.step()
    assert any(isinstance(e, DoneEvent) and e.finish_reason == "cancelled" for e in events)
    assert any(isinstance(e, TokenEvent) and e.request_id == 2 for e in events)
    rest = _run(batcher)
    assert _done(rest[2]).finish_reason == "length"
    assert 1 not in rest


def test_cancel_while_waiting(model, tokenizer) -> None:
    batcher = ContinuousBatcher(model, tokenizer, max_batch=1)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    batcher.submit(1, "the cat", params)
    batcher.submit(2, "the dog", params)
    batcher.cancel(2)
    events = _run(batcher)
    assert _done(events[2]).finish_reason == "cancelled"
    assert _done(events[2]).completion_tokens == 0
    assert _done(events[1]).finish_reason == "length"


def test_stop_string_ends_generation_and_is_not_emitted(model, tokenizer) -> None:
    batcher = ContinuousBatcher(model, tokenizer)
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    batcher.submit(1, "once upon", greedy)
    full = _text(_run(batcher)[1])
    assert len(full) > 6
    stop = full[3:6]
    expected = full[: full.index(stop)]
    batcher.submit(2, "once upon", SamplingParams(**{**greedy.to_dict(), "stop": (stop,)}))
    events = _run(batcher)[2]
    assert _text(events) == expected
    assert _done(events).finish_reason == "stop"


@pytest.fixture(scope="module")
def eos_model(model: Transformer) -> Transformer:
    """The same model with its head rigged so EOS always wins."""
    weights = model.weights()
    weights["ln_f.bias"] = np.ones_like(weights["ln_f.bias"])
    weights["ln_f.weight"] = np.zeros_like(weights["ln_f.weight"])
    weights["lm_head.weight"] = np.zeros_like(weights["lm_head.weight"])
    weights["lm_head.weight"][EOS] = 1.0
    return Transformer(model.config, weights)


def test_eos_stops_without_text(eos_model, tokenizer) -> None:
    batcher = ContinuousBatcher(eos_model, tokenizer)
    batcher.submit(1, "the cat", SamplingParams(max_tokens=10, temperature=0))
    events = _run(batcher)[1]
    assert events == [_done(events)]
    assert (events[0].finish_reason, events[0].completion_tokens) == ("stop", 1)


def test_ignore_eos_generates_to_max_tokens(eos_model, tokenizer) -> None:
    batcher = ContinuousBatcher(eos_model, tokenizer)
    batcher.submit(1, "the cat", SamplingParams(max_tokens=6, temperature=0.7, ignore_eos=True))
    events = _run(batcher)[1]
    assert EOS not in _tokens(events)
    assert _done(events).completion_tokens == 6


def test_logprobs_on_request(model, tokenizer) -> None:
    batcher = ContinuousBatcher(model, tokenizer)
    batcher.submit(1, "the cat", SamplingParams(max_tokens=3, temperature=0, logprobs=2))
    batcher.submit(2, "the cat", SamplingParams(max_tokens=3, temperature=0))
    events = _run(batcher)
    for event in events[1][:-1]:
        (entry,) = event.logprobs
        assert entry["id"] == event.token_ids[0]
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["id"] == entry["id"]  # greedy picks the best
        assert entry["logprob"] <= 0.0
    assert all(e.logprobs is None for e in events[2] if isinstance(e, TokenEvent))


def _ngrams(ids: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]


def test_no_repeat_ngram_size_bans_repeats_and_off_changes_nothing(model, tokenizer) -> None:
    off = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    ban = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, no_repeat_ngram_size=3)
    batcher = ContinuousBatcher(model, tokenizer, max_batch=8)
    for i, prompt in enumerate(PROMPTS):
        batcher.submit(i, prompt, off)
        batcher.submit(10 + i, prompt, ban)
    out = _run(batcher)
    looped = 0
    for i, prompt in enumerate(PROMPTS):
        ids = tokenizer.encode(prompt)
        plain = ids + _tokens(out[i])
        banned = ids + _tokens(out[10 + i])
        grams = _ngrams(banned, 3)
        assert len(grams) == len(set(grams)), prompt  # no 3-gram of prompt + output twice
        looped += len(set(_ngrams(plain, 3))) < len(_ngrams(plain, 3))
        # off: the same tokens as a batch of one with the default parameters
        alone = ContinuousBatcher(model, tokenizer, max_batch=1)
        alone.submit(0, prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
        assert _tokens(_run(alone)[0]) == _tokens(out[i])
    assert looped  # the random model loops without the ban, so the ban was tested


def test_text_detokenize_mode_reaches_the_stream(model, tokenizer) -> None:
    batcher = ContinuousBatcher(model, tokenizer, max_batch=2)
    batcher.submit(0, "once upon a time", SamplingParams(max_tokens=20, temperature=0))
    text = SamplingParams(max_tokens=20, temperature=0, detokenize="text")
    batcher.submit(1, "once upon a time", text)
    out = _run(batcher)
    assert _tokens(out[0]) == _tokens(out[1])
    ids = tokenizer.encode("once upon a time")
    full = tokenizer.decode(ids + _tokens(out[1]), mode="text")
    assert full == tokenizer.decode(ids, mode="text") + _text(out[1])


def test_stop_token_ids_end_with_stop_and_min_tokens_holds_them_off(model, tokenizer) -> None:
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    batcher = ContinuousBatcher(model, tokenizer, max_batch=2)
    batcher.submit(1, "the cat", greedy)
    free = _tokens(_run(batcher)[1])
    stop_at = free[2]
    first = free.index(stop_at)
    batcher.submit(2, "the cat", dataclasses.replace(greedy, stop_token_ids=[stop_at]))
    events = _run(batcher)[2]
    assert _done(events).finish_reason == "stop"
    assert _tokens(events) == free[:first]  # the stop token itself is not emitted
    held = dataclasses.replace(greedy, stop_token_ids=[free[0]], min_tokens=1)
    batcher.submit(3, "the cat", held)
    assert _tokens(_run(batcher)[3])[:1] != [free[0]]  # banned for the first token

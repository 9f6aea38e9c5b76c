"""Sampling parameters, the samplers' filters and penalties, and stop-string matching."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinyllm_trio.model.batching import StopMatcher
from tinyllm_trio.model.sampling import (
    InvalidParameterError,
    Sampler,
    SamplingParams,
    log_softmax,
    top_logprobs,
)

V = 50


def _logits(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=V).astype(np.float32) * 3


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": -0.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"seed": 1.5}, "seed"),
        ({"stop": ["a", ""]}, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_invalid_parameters_name_the_field(kwargs: dict, param: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param
    assert str(info.value)


def test_params_round_trip_through_json_dict() -> None:
    params = SamplingParams(max_tokens=7, temperature=0.5, stop="END", seed=3, logprobs=2)
    assert params.stop == ("END",)
    assert SamplingParams.from_dict(params.to_dict()) == params
    assert SamplingParams.from_dict({**params.to_dict(), "unknown": 1}) == params


def test_greedy_is_argmax() -> None:
    logits = _logits()
    assert Sampler(SamplingParams(temperature=0), V).sample(logits) == int(np.argmax(logits))


@pytest.mark.parametrize("extra", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}])
def test_narrow_filters_reduce_to_greedy(extra: dict) -> None:
    logits = _logits(1)
    sampler = Sampler(SamplingParams(temperature=1.5, seed=0, **extra), V)
    assert {sampler.sample(logits) for _ in range(50)} == {int(np.argmax(logits))}


def test_top_k_only_draws_from_the_k_best() -> None:
    logits = np.zeros(V, dtype=np.float32)
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=3, seed=1), V)
    logits[[4, 9, 17]] = 0.5
    assert {sampler.sample(logits) for _ in range(300)} == {4, 9, 17}


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = np.full(V, 0.1 / (V - 2))
    probs[[3, 8]] = [0.6, 0.3]
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.85, seed=2), V)
    draws = {sampler.sample(np.log(probs).astype(np.float32)) for _ in range(300)}
    assert draws == {3, 8}


def test_seed_makes_sampling_reproducible() -> None:
    logits = _logits(2)

    def run(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed), V)
        return [sampler.sample(logits) for _ in range(40)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_temperature_sampling_follows_the_softmax() -> None:
    logits = np.array([2.0, 1.0, 0.0, -1.0], dtype=np.float32)
    sampler = Sampler(SamplingParams(temperature=1.0, seed=0), 4)
    draws = np.bincount([sampler.sample(logits) for _ in range(20000)], minlength=4) / 20000
    expected = np.exp(log_softmax(logits))
    assert np.abs(draws - expected).max() < 0.02


def test_repetition_penalty_discourages_prompt_tokens() -> None:
    logits = np.zeros(V, dtype=np.float32)
    logits[5], logits[6] = 2.0, 1.9
    plain = Sampler(SamplingParams(temperature=0), V, prompt_ids=[5])
    penalised = Sampler(SamplingParams(temperature=0, repetition_penalty=1.3), V, prompt_ids=[5])
    assert plain.sample(logits) == 5
    assert penalised.sample(logits) == 6


@pytest.mark.parametrize("kind", ["presence_penalty", "frequency_penalty"])
def test_output_penalties_apply_to_generated_tokens(kind: str) -> None:
    logits = np.zeros(V, dtype=np.float32)
    logits[5], logits[6] = 2.0, 1.5
    sampler = Sampler(SamplingParams(temperature=0, **{kind: 1.0}), V, prompt_ids=[5])
    assert sampler.sample(logits) == 5  # the prompt does not count for these penalties
    sampler.observe(5)
    assert sampler.sample(logits) == 6


def test_ignore_eos_never_picks_eos() -> None:
    logits = np.zeros(V, dtype=np.float32)
    logits[3] = 10.0
    sampler = Sampler(SamplingParams(temperature=0, ignore_eos=True), V, eos_id=3)
    assert sampler.sample(logits) != 3


def test_top_logprobs_are_sorted_and_exact() -> None:
    logits = _logits(3)
    lp = log_softmax(logits)
    entry = top_logprobs(lp, 7, 5, str)
    assert entry["id"] == 7 and entry["token"] == "7"
    assert entry["logprob"] == pytest.approx(float(lp[7]))
    ranked = [t["logprob"] for t in entry["top_logprobs"]]
    assert ranked == sorted(ranked, reverse=True) and len(ranked) == 5
    assert entry["top_logprobs"][0]["id"] == int(np.argmax(logits))
    assert math.isclose(np.exp(lp).sum(), 1.0, rel_tol=1e-9)


@given(
    pieces=st.lists(st.text(alphabet="abc\n", max_size=4), max_size=12),
    stops=st.lists(st.text(alphabet="abc\n", min_size=1, max_size=3), max_size=3),
)
def test_stop_matcher_emits_exactly_the_text_before_the_first_stop(
    pieces: list[str], stops: list[str]
) -> None:
    matcher = StopMatcher(stops)
    emitted, stopped = "", False
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        emitted += text
        if stopped:
            break
    if not stopped:
        emitted += matcher.flush()
    # Oracle: after each piece, look for any stop in everything so far; the first piece that
    # completes one ends generation, cut at the earliest occurrence (stops may straddle pieces).
    so_far = ""
    for piece in pieces:
        so_far += piece
        hits = [i for i in (so_far.find(s) for s in stops) if i >= 0]
        if hits:
            assert stopped
            assert emitted == so_far[: min(hits)]
            return
    assert not stopped
    assert emitted == so_far


def test_logit_bias_shifts_and_minus_100_bans() -> None:
    logits = np.zeros(V, dtype=np.float32)
    logits[4] = 5.0
    assert Sampler(SamplingParams(temperature=0, logit_bias={"9": 6}), V).sample(logits) == 9
    banned = Sampler(SamplingParams(temperature=1.0, seed=1, logit_bias={4: -100}), V)
    assert all(banned.sample(logits) != 4 for _ in range(200))
    assert not banned.argmax_greedy  # the batch's plain argmax must not skip the bias
    assert SamplingParams(logit_bias={"3": 1, 2: -1}).logit_bias == ((2, -1.0), (3, 1.0))


def test_min_tokens_bans_eos_and_stop_ids_until_reached() -> None:
    logits = np.zeros(V, dtype=np.float32)
    logits[3], logits[8] = 10.0, 9.0  # EOS (3) first, stop id 8 second
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[8])
    sampler = Sampler(params, V, eos_id=3)
    for _ in range(2):
        assert sampler.sample(logits) not in (3, 8)
        sampler.observe(0)
    assert sampler.sample(logits) == 3  # reached: EOS is allowed again


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"logit_bias": {"1": 100.5}}, "logit_bias"),
        ({"logit_bias": {"-1": 1}}, "logit_bias"),
        ({"logit_bias": "x"}, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"stop_token_ids": "3"}, "stop_token_ids"),
        ({"stop_token_ids": [True]}, "stop_token_ids"),
        ({"cache_prompt": 1}, "cache_prompt"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ],
)
def test_issue_14_fields_are_validated(kwargs: dict, param: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param


@given(
    rows=st.lists(st.lists(st.integers(0, 4), min_size=8, max_size=8), min_size=1, max_size=12),
    ignore_eos=st.booleans(),
    min_tokens=st.integers(0, 4),
    stop_ids=st.lists(st.integers(0, 7), max_size=2),
    ngram=st.sampled_from([0, 2, 3]),
)
def test_a_batch_argmax_chooses_what_the_full_sampler_would(
    rows, ignore_eos, min_tokens, stop_ids, ngram
) -> None:
    """Greedy with bans only: the batch's one argmax, checked against the bans, picks the
    token `sample` picks after setting the banned ids to -inf, step after step. Small integer
    logits over 8 ids make ties and banned maxima common."""
    params = SamplingParams(
        temperature=0,
        ignore_eos=ignore_eos,
        min_tokens=min(min_tokens, 16),
        max_tokens=16,
        stop_token_ids=stop_ids,
        no_repeat_ngram_size=ngram,
    )
    fast, full = (Sampler(params, 8, [1, 2, 1], eos_id=3) for _ in range(2))
    assert fast.argmax_greedy
    for row in rows:
        logits = np.asarray(row, dtype=np.float32)
        token = fast.choose(logits, int(logits.argmax()))
        assert token == full.sample(logits)
        fast.observe(token)
        full.observe(token)

"""The numpy transformer: the forward pass against an independent slow implementation, the KV
cache (prefill + decode == full forward), batch independence under continuous batching
(sequences of different lengths joining and leaving), context limits and input validation.

Small configs keep this fast; `std=0.2` random weights give peaked attention, so masking or
position bugs change the logits visibly instead of hiding in near-uniform softmaxes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinyllm_trio.model.kernels import attend_one_token, layernorm
from tinyllm_trio.model.transformer import (
    CacheFullError,
    ContextLengthError,
    KVCache,
    ModelConfig,
    Transformer,
    expected_shapes,
    gelu_,
    round_to_bfloat16,
    sinusoidal_positions,
)

SMALL = ModelConfig(vocab_size=300, n_embd=64, n_head=4, n_layer=2, max_context=64)
TOL = 1e-4


@pytest.fixture(scope="module")
def model() -> Transformer:
    return Transformer.random(SMALL, seed=1, std=0.2)


def _ids(n: int, seed: int = 0, vocab: int = SMALL.vocab_size) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


# ---- an independent, obviously-correct implementation ------------------------------------


def reference_logits(weights: dict[str, np.ndarray], cfg: ModelConfig, ids: list[int]):
    """Straight from the architecture description: float64, per-head and per-position loops,
    math.erf, the causal mask as a loop bound. Shares no code with the module under test."""
    W = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    C, H, hs, T = cfg.n_embd, cfg.n_head, cfg.n_embd // cfg.n_head, len(ids)
    scale = 1 / math.sqrt(hs) if cfg.attention_scale == "head" else 1 / math.sqrt(C)

    def layernorm(x, w, b):
        out = np.empty_like(x)
        for t in range(x.shape[0]):
            mean = sum(x[t]) / C
            var = sum((v - mean) ** 2 for v in x[t]) / C
            out[t] = (x[t] - mean) / math.sqrt(var + 1e-5) * w + b
        return out

    x = np.array([W["token_embedding.weight"][i] for i in ids])
    for p in range(T):
        for i in range(C // 2):
            x[p, 2 * i] += math.sin(p / 10000 ** (2 * i / C))
            x[p, 2 * i + 1] += math.cos(p / 10000 ** (2 * i / C))
    for layer in range(cfg.n_layer):
        pre = f"blocks.{layer}."
        h = layernorm(x, W[pre + "ln1.weight"], W[pre + "ln1.bias"])
        heads = []
        for head in range(H):
            q = h @ W[f"{pre}sa.heads.{head}.query.weight"].T
            k = h @ W[f"{pre}sa.heads.{head}.key.weight"].T
            v = h @ W[f"{pre}sa.heads.{head}.value.weight"].T
            out = np.zeros((T, hs))
            for t in range(T):
                scores = [float(q[t] @ k[s]) * scale for s in range(t + 1)]
                top = max(scores)
                e = [math.exp(s - top) for s in scores]
                for s in range(t + 1):
                    out[t] += e[s] / sum(e) * v[s]
            heads.append(out)
        x = x + np.concatenate(heads, axis=1) @ W[pre + "sa.proj.weight"].T
        h = layernorm(x, W[pre + "ln2.weight"], W[pre + "ln2.bias"])
        f = h @ W[pre + "ffwd.net.0.weight"].T
        f = np.vectorize(lambda z: 0.5 * z * (1 + math.erf(z / math.sqrt(2))))(f)
        x = x + f @ W[pre + "ffwd.net.2.weight"].T
    x = layernorm(x, W["ln_f.weight"], W["ln_f.bias"])
    return x @ W["lm_head.weight"].T


@pytest.mark.parametrize("scale", ["head", "embd"])
def test_forward_matches_the_reference_implementation(scale):
    cfg = ModelConfig(vocab_size=97, n_embd=32, n_head=4, n_layer=2, max_context=32)
    cfg = ModelConfig(**{**cfg.to_dict(), "attention_scale": scale})
    m = Transformer.random(cfg, seed=3, std=0.3)
    ids = _ids(17, seed=4, vocab=cfg.vocab_size)
    ref = reference_logits(m.weights(), cfg, ids)
    got = m.forward(ids)
    assert got.dtype == np.float32 and got.shape == (17, cfg.vocab_size)
    assert np.abs(ref).max() > 1.0  # the comparison is not between two near-zero arrays
    assert np.abs(got - ref).max() < TOL


def test_the_attention_scale_changes_the_logits():
    head = Transformer.random(SMALL, seed=2, std=0.2)
    embd_cfg = ModelConfig(**{**SMALL.to_dict(), "attention_scale": "embd"})
    embd = Transformer(embd_cfg, head.weights())
    assert head.config.scale == pytest.approx(1 / math.sqrt(16))
    assert embd.config.scale == pytest.approx(1 / math.sqrt(64))
    ids = _ids(20, seed=5)
    assert np.abs(head.forward(ids) - embd.forward(ids)).max() > 1e-2


def test_positions_are_the_sinusoidal_formula():
    pe = sinusoidal_positions(512, 192)
    for p, i in [(0, 0), (1, 0), (7, 5), (300, 40), (511, 95)]:
        assert pe[p, 2 * i] == pytest.approx(math.sin(p / 10000 ** (2 * i / 192)), abs=1e-6)
        assert pe[p, 2 * i + 1] == pytest.approx(math.cos(p / 10000 ** (2 * i / 192)), abs=1e-6)


def test_gelu_is_the_exact_erf_gelu():
    x = np.linspace(-10, 10, 20001, dtype=np.float32)
    got = gelu_(x.copy(), *(np.empty_like(x) for _ in range(3)))
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(float)])
    assert np.abs(got - exact).max() < 1e-6
    # the tanh approximation differs by ~1e-3 here: the test tells them apart
    tanh = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    assert np.abs(tanh - exact).max() > 1e-4


def test_default_config_is_the_seed_model():
    shapes = expected_shapes(ModelConfig())
    assert len(shapes) == 154
    assert sum(math.prod(s) for s in shapes.values()) == 3_913_344
    assert shapes["blocks.5.sa.heads.5.query.weight"] == (32, 192)
    assert shapes["blocks.0.ffwd.net.0.weight"] == (768, 192)


# ---- KV cache: incremental == full -----------------------------------------------------


def test_prefill_then_decode_matches_the_full_forward(model):
    ids = _ids(40, seed=6)
    full = model.forward(ids)
    cache = model.new_cache(2)
    last = model.prefill(cache, "s", ids[:9])
    assert last.shape == (SMALL.vocab_size,)
    assert np.abs(last - full[8]).max() < TOL
    worst = 0.0
    for t in range(9, 40):
        logits = model.decode_step(cache, ["s"], [ids[t]])
        assert logits.shape == (1, SMALL.vocab_size)
        worst = max(worst, float(np.abs(logits[0] - full[t]).max()))
        assert cache.length("s") == t + 1
    assert worst < TOL


def test_prefill_of_one_token_then_decode(model):
    ids = _ids(12, seed=7)
    full = model.forward(ids)
    cache = model.new_cache(1)
    assert np.abs(model.prefill(cache, 0, ids[:1]) - full[0]).max() < TOL
    for t in range(1, 12):
        assert np.abs(model.decode_step(cache, [0], [ids[t]])[0] - full[t]).max() < TOL


def test_prefill_many_equals_one_prefill_each(model):
    """Prompts of different lengths prefilled in one pass give each one's own last logits, and
    each continues exactly as its full forward pass (its K/V landed in its own row)."""
    prompts = {"a": _ids(3, seed=20), "b": _ids(17, seed=21), "c": _ids(1, seed=22)}
    cache = model.new_cache(4)
    model.prefill(cache, "old", _ids(5, seed=23))  # an existing row is left alone
    logits = model.prefill_many(cache, list(prompts.items()))
    assert logits.shape == (3, SMALL.vocab_size)
    for row, (name, ids) in zip(logits, prompts.items(), strict=True):
        assert cache.length(name) == len(ids)
        assert np.abs(row - model.forward(ids)[-1]).max() < TOL
    nxt = {name: _ids(1, seed=30 + i)[0] for i, name in enumerate(prompts)}
    stepped = model.decode_step(cache, list(prompts), list(nxt.values()))
    for row, (name, ids) in zip(stepped, prompts.items(), strict=True):
        assert np.abs(row - model.forward([*ids, nxt[name]])[-1]).max() < TOL
    assert cache.length("old") == 5


def test_prefill_many_validates_before_changing_anything(model):
    cache = model.new_cache(3)
    model.prefill(cache, "x", _ids(4))
    with pytest.raises(ValueError, match="same sequence twice"):
        model.prefill_many(cache, [("a", [1]), ("a", [2])])
    with pytest.raises(CacheFullError):
        model.prefill_many(cache, [("a", [1]), ("b", [2]), ("c", [3])])
    with pytest.raises(ValueError, match="out of range"):
        model.prefill_many(cache, [("a", [1]), ("b", [SMALL.vocab_size])])
    with pytest.raises(ValueError, match="already in the KV cache"):
        model.prefill_many(cache, [("a", [1]), ("x", [2])])
    assert cache.seq_ids == ("x",) and cache.length("x") == 4
    assert model.prefill_many(cache, []).shape == (0, SMALL.vocab_size)


# ---- batch independence (continuous batching) --------------------------------------------


def _solo_greedy(model, prompt, steps):
    """Greedy generation of one sequence alone in its cache: (tokens, logits per step)."""
    cache = model.new_cache(1)
    logits = model.prefill(cache, "solo", prompt)
    tokens, rows = [], [logits]
    for _ in range(steps):
        tokens.append(int(np.argmax(rows[-1])))
        rows.append(model.decode_step(cache, ["solo"], [tokens[-1]])[0])
    return tokens, rows


def test_a_sequence_does_not_depend_on_its_batch(model):
    """Sequences of different lengths share a cache, join and leave between steps, are listed in
    shifting orders, one is dropped and re-added under the same id; every logits row equals the
    same sequence run alone, and so do the greedy tokens."""
    prompts = {"a": _ids(5, 10), "b": _ids(23, 11), "c": _ids(2, 12), "d": _ids(14, 13)}
    steps = 12
    solo = {s: _solo_greedy(model, p, steps) for s, p in prompts.items()}
    cache = model.new_cache(3)
    rng = np.random.default_rng(0)
    joins = {"a": 0, "b": 0, "c": 3, "d": 6}  # d joins after a leaves (capacity 3)
    leave = {"a": 5}
    state: dict[str, dict] = {}  # seq -> {"step": i, "tokens": [...]}
    worst = 0.0
    finished = []
    for step in range(40):
        for s, at in joins.items():
            if at == step and s not in state:
                first = model.prefill(cache, s, prompts[s])
                worst = max(worst, float(np.abs(first - solo[s][1][0]).max()))
                state[s] = {"i": 0, "tokens": [int(np.argmax(first))]}
        for s, at in leave.items():
            if at == step and s in state:
                cache.drop(s)
                del state[s]
        active = [s for s in state if state[s]["i"] < steps]
        if not active:
            break
        order = list(rng.permutation(active))
        logits = model.decode_step(cache, order, [state[s]["tokens"][-1] for s in order])
        for row, s in zip(logits, order, strict=True):
            st = state[s]
            st["i"] += 1
            worst = max(worst, float(np.abs(row - solo[s][1][st["i"]]).max()))
            st["tokens"].append(int(np.argmax(row)))
        for s in [s for s in state if state[s]["i"] >= steps]:
            assert state[s]["tokens"] == solo[s][0] + [int(np.argmax(solo[s][1][-1]))]
            cache.drop(s)
            del state[s]
            finished.append(s)
            if (
                s == "b" and finished.count("b") == 1
            ):  # re-added under the same id after its drop: a fresh sequence
                joins["b"] = step + 1
                prompts["b"] = prompts["b"][:7]
                solo["b"] = _solo_greedy(model, prompts["b"], steps)
    assert worst < TOL
    assert sorted(finished) == ["b", "b", "c", "d"]  # a left early; b ran twice
    assert len(cache) == 0


def test_decoding_a_subset_of_the_cache(model):
    """Listing only some sequences advances those only; the others are untouched and still
    decode correctly afterwards (the cache moves rows as needed)."""
    prompts = [_ids(n, 20 + n) for n in (3, 9, 6, 12)]
    full = [model.forward(p + _ids(4, 99)) for p in prompts]
    cache = model.new_cache(4)
    for i, p in enumerate(prompts):
        model.prefill(cache, i, p)
    extra = _ids(4, 99)
    out = model.decode_step(cache, [3, 1], [extra[0], extra[0]])
    assert np.abs(out[0] - full[3][12]).max() < TOL
    assert np.abs(out[1] - full[1][9]).max() < TOL
    assert [cache.length(i) for i in range(4)] == [3, 10, 6, 13]
    out = model.decode_step(cache, [2, 0], [extra[0], extra[0]])
    assert np.abs(out[0] - full[2][6]).max() < TOL
    assert np.abs(out[1] - full[0][3]).max() < TOL
    out = model.decode_step(cache, [0, 1, 2, 3], [extra[1]] * 4)
    for i, n in enumerate((3, 9, 6, 12)):
        assert np.abs(out[i] - full[i][n + 1]).max() < TOL


def test_rows_follow_the_order_given(model):
    cache = model.new_cache(3)
    for s, n in (("x", 4), ("y", 7), ("z", 2)):
        model.prefill(cache, s, _ids(n, n))
    a = model.decode_step(cache, ["z", "x", "y"], [5, 6, 7])
    alone = {}
    for s, n, tok in (("x", 4, 6), ("y", 7, 7), ("z", 2, 5)):
        c = model.new_cache(1)
        model.prefill(c, s, _ids(n, n))
        alone[s] = model.decode_step(c, [s], [tok])[0]
    for row, s in zip(a, ["z", "x", "y"], strict=True):
        assert np.abs(row - alone[s]).max() < TOL


# ---- context limits and errors ---------------------------------------------------------


def test_prompt_longer_than_the_context(model):
    cache = model.new_cache(2)
    too_long = _ids(SMALL.max_context + 1)
    with pytest.raises(ContextLengthError, match=r"65 tokens.*context of 64"):
        model.prefill(cache, "s", too_long)
    with pytest.raises(ContextLengthError):
        model.forward(too_long)
    assert len(cache) == 0 and "s" not in cache
    assert issubclass(ContextLengthError, ValueError)


def test_decode_past_the_context(model):
    cache = model.new_cache(2)
    model.prefill(cache, "full", _ids(SMALL.max_context - 1))
    model.prefill(cache, "short", _ids(5))
    model.decode_step(cache, ["full", "short"], [1, 1])  # fills the last position
    assert cache.length("full") == SMALL.max_context
    with pytest.raises(ContextLengthError, match="'full'"):
        model.decode_step(cache, ["short", "full"], [2, 2])
    # nothing moved: the failed step did not advance the other sequence
    assert cache.length("short") == 6 and cache.length("full") == SMALL.max_context
    model.decode_step(cache, ["short"], [2])
    assert cache.length("short") == 7


def test_a_prompt_of_exactly_the_context_fits(model):
    cache = model.new_cache(1)
    ids = _ids(SMALL.max_context, seed=3)
    logits = model.prefill(cache, 0, ids)
    assert np.abs(logits - model.forward(ids)[-1]).max() < TOL
    with pytest.raises(ContextLengthError):
        model.decode_step(cache, [0], [1])


def test_cache_capacity_and_slots(model):
    cache = model.new_cache(2)
    model.prefill(cache, "a", [1, 2])
    model.prefill(cache, "b", [3])
    with pytest.raises(CacheFullError):
        model.prefill(cache, "c", [4])
    assert issubclass(CacheFullError, RuntimeError)
    assert len(cache) == 2 and "c" not in cache
    cache.drop("a")
    cache.drop("a")  # no-op
    cache.drop("never")
    assert len(cache) == 1 and "a" not in cache and cache.length("b") == 1
    model.prefill(cache, "c", [4, 5, 6])
    assert cache.length("c") == 3 and cache.capacity == 2


def test_invalid_inputs(model):
    cache = model.new_cache(2)
    with pytest.raises(ValueError, match="non-empty"):
        model.prefill(cache, "s", [])
    with pytest.raises(ValueError, match="out of range"):
        model.prefill(cache, "s", [1, SMALL.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        model.forward([-1])
    assert len(cache) == 0
    model.prefill(cache, "s", [1, 2])
    with pytest.raises(ValueError, match="already"):
        model.prefill(cache, "s", [1])
    with pytest.raises(KeyError, match="nope"):
        model.decode_step(cache, ["nope"], [1])
    with pytest.raises(ValueError, match="twice"):
        model.decode_step(cache, ["s", "s"], [1, 1])
    with pytest.raises(ValueError, match="1 sequences but 2 tokens"):
        model.decode_step(cache, ["s"], [1, 2])
    with pytest.raises(ValueError, match="out of range"):
        model.decode_step(cache, ["s"], [SMALL.vocab_size])
    assert cache.length("s") == 2
    assert model.decode_step(cache, [], []).shape == (0, SMALL.vocab_size)
    other = Transformer.random(ModelConfig(vocab_size=300, n_embd=32, n_head=4, n_layer=2))
    with pytest.raises(ValueError, match="different dimensions"):
        other.decode_step(cache, ["s"], [1])


def test_logits_are_fresh_arrays(model):
    cache = model.new_cache(1)
    model.prefill(cache, 0, [1, 2, 3])
    first = model.decode_step(cache, [0], [4])
    kept = first.copy()
    model.decode_step(cache, [0], [5])
    assert np.array_equal(first, kept)


# ---- weights and config ----------------------------------------------------------------


def test_weights_round_trip(model):
    w = model.weights()
    assert set(w) == set(expected_shapes(SMALL))
    assert all(v.dtype == np.float32 for v in w.values())
    again = Transformer(SMALL, w)
    ids = _ids(10)
    assert np.array_equal(again.forward(ids), model.forward(ids))


def test_wrong_weights_are_rejected(model):
    w = dict(model.weights())
    del w["blocks.1.ln2.bias"]
    with pytest.raises(ValueError, match=r"missing \['blocks.1.ln2.bias'\]"):
        Transformer(SMALL, w)
    w = dict(model.weights())
    w["lm_head.weight"] = np.zeros((SMALL.vocab_size, 63), np.float32)
    with pytest.raises(ValueError, match=r"lm_head.weight: expected shape \(300, 64\)"):
        Transformer(SMALL, w)


def test_model_config_validation_and_round_trip():
    assert ModelConfig.from_dict(SMALL.to_dict()) == SMALL
    assert ModelConfig().head_size == 32
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(n_embd=64, n_head=5)
    with pytest.raises(ValueError, match="attention_scale"):
        ModelConfig(attention_scale="sqrt")
    with pytest.raises(ValueError, match="positive"):
        ModelConfig(n_layer=0)
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({**SMALL.to_dict(), "n_embed": 3})


def test_kv_cache_repr_state():
    cache = KVCache(SMALL, 3)
    assert len(cache) == 0 and cache.seq_ids == ()
    with pytest.raises(KeyError):
        cache.length("x")


# ---- decode-step numerics -----------------------------------------------------------------


def test_gelu_stays_exact_far_out():
    """Past |x| = 10 the erfc term vanishes: gelu(x) -> x and -> 0 without overflow or NaN."""
    x = np.concatenate([np.linspace(-60, 60, 12001), [-1e15, -1e6, 1e6, 1e15]]).astype(np.float32)
    got = gelu_(x.copy(), *(np.empty_like(x) for _ in range(3)))
    exact = np.array([0.5 * v * math.erfc(-v / math.sqrt(2)) for v in x.astype(float)])
    assert np.isfinite(got).all()
    assert np.abs(got - exact).max() <= 1e-6 * np.maximum(1.0, np.abs(exact)).max()
    assert np.abs(got - exact).max(initial=0.0, where=np.abs(x) <= 10) < 1e-6


@pytest.mark.parametrize("offset", [0.0, 1e3, -1e3])  # rows far from zero, as residuals get
def test_layernorm_kernel_matches_float64(offset):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((7, 96)) * 3 + offset).astype(np.float32)
    w, b = rng.standard_normal((2, 96)).astype(np.float32)
    out = np.empty_like(x)
    layernorm(x, w, b, out)
    x64 = x.astype(np.float64)
    centred = x64 - x64.mean(axis=1, keepdims=True)
    want = centred / np.sqrt((centred**2).mean(axis=1, keepdims=True) + 1e-5) * w + b
    assert np.abs(out - want).max() < 2e-5 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("offset", [0.0, 120.0, -120.0])  # in range, huge, tiny scores
def test_attention_kernel_matches_a_float64_softmax(offset):
    """The compiled decode attention: stores each row's new key and value at its position,
    attends over exactly positions 0..length (stale data beyond is never read: it is NaN
    here), and its softmax stays exact where exp of the raw scores would overflow or
    underflow float32."""
    rng = np.random.default_rng(0)
    B, H, T, hs = 5, 3, 16, 8
    C = H * hs
    lengths = np.array([0, 3, 15, 7, 1], dtype=np.int64)  # ragged; row 2 fills the context
    qkv = rng.standard_normal((B, 3 * C)).astype(np.float32)
    q = qkv[:, :C].reshape(B, H, 1, hs)
    shift = offset * q / (q * q).sum(axis=-1, keepdims=True)  # adds `offset` to every score
    kv = np.full((B + 2, 2, H, T, hs), np.nan, dtype=np.float32)
    for b, n in enumerate(lengths):
        kv[b, :, :, :n] = rng.standard_normal((2, H, n, hs))
        kv[b, 0, :, :n] += shift[b]
    qkv[:, C : 2 * C] += shift.reshape(B, C)
    y = np.empty((B, C), np.float32)
    attend_one_token(
        qkv, kv, lengths, y, np.empty((H, T), np.float32), np.empty((H, hs), np.float32)
    )
    for b, p in enumerate(lengths):
        q, k_new, v_new = qkv[b].reshape(3, H, hs).astype(np.float64)
        assert np.array_equal(kv[b, 0, :, p], k_new) and np.array_equal(kv[b, 1, :, p], v_new)
        k, v = kv[b, 0, :, : p + 1].astype(np.float64), kv[b, 1, :, : p + 1].astype(np.float64)
        s = np.einsum("hd,htd->ht", q, k)
        w = np.exp(s - s.max(axis=1, keepdims=True))
        want = np.einsum("ht,htd->hd", w / w.sum(axis=1, keepdims=True), v).reshape(C)
        assert np.isfinite(y[b]).all()
        assert np.abs(y[b] - want).max() < 1e-5
    assert np.isnan(kv[B:]).all()  # rows past the batch untouched


def test_decode_matches_forward_with_huge_attention_scores():
    """Large weights give scores whose exp overflows float32: decode must still agree with
    the float64 reference (scores this large make float32 results differ by ~1e-4 with the
    order of summation, so two float32 paths are each held to the exact answer, not to
    each other)."""
    m = Transformer.random(SMALL, seed=5, std=1.5)
    ids = _ids(30, seed=8)
    full = reference_logits(m.weights(), SMALL, ids)
    assert np.abs(m.forward(ids) - full).max() < TOL * np.abs(full).max()
    cache = m.new_cache(3)
    m.prefill(cache, "a", ids[:5])
    m.prefill(cache, "b", ids[:11])
    for t in range(11, 30):
        out = m.decode_step(cache, ["a", "b"], [ids[t - 6], ids[t]])
        scale = np.abs(full[t]).max()
        assert np.abs(out[1] - full[t]).max() < TOL * max(1.0, scale)
        assert np.abs(out[0] - full[t - 6]).max() < TOL * max(1.0, np.abs(full[t - 6]).max())


# ---- the compiled small-batch decode step against the numpy reference path ---------------


def _decode_both_paths(model: Transformer, lengths: list[int], steps: int, monkeypatch):
    """Greedy-decode `steps` tokens for len(lengths) sequences on the compiled path and on the
    numpy path, from the same prompts; returns both paths' logits [steps, B, V]."""
    from tinyllm_trio.model import kernels

    calls = []
    compiled = kernels.decode_small_batch
    monkeypatch.setattr(kernels, "decode_small_batch", lambda *a: calls.append(1) or compiled(*a))
    vocab, before = model.config.vocab_size, model.fused_max_batch
    out = {}
    for path, up_to in (("compiled", len(lengths)), ("numpy", 0)):
        model.fused_max_batch = up_to
        try:
            cache = model.new_cache(len(lengths) + 2)
            seqs = list(range(len(lengths)))
            model.prefill_many(
                cache,
                [(s, _ids(n, seed=s, vocab=vocab)) for s, n in zip(seqs, lengths, strict=True)],
            )
            tokens, steps_logits = [1] * len(seqs), []
            for _ in range(steps):
                logits = model.decode_step(cache, seqs, tokens)
                steps_logits.append(logits)
                tokens = logits.argmax(axis=1).tolist()
            out[path] = np.stack(steps_logits)
        finally:
            model.fused_max_batch = before
        if path == "compiled":
            assert len(calls) == steps  # the compiled step ran every step
            calls.clear()
    assert not calls  # and the reference never touched it
    return out["compiled"], out["numpy"]


# batch sizes that take each of the compiled matvec's passes over a tile (1, 2, 3 and 4 rows),
# and a second pass over the same tile (6, 7)
@pytest.mark.parametrize(
    "lengths",
    [[5], [1, 30], [8, 2, 21], [7, 3, 40, 12], [4, 11, 2, 30, 6, 19], [2, 9, 33, 1, 18, 40, 4]],
)
def test_compiled_decode_step_gives_the_numpy_paths_logits(model, lengths, monkeypatch):
    compiled, reference = _decode_both_paths(model, lengths, 20, monkeypatch)
    scale = np.abs(reference).max()
    np.testing.assert_allclose(compiled, reference, rtol=0, atol=1e-5 * max(scale, 1.0))
    assert (compiled.argmax(-1) == reference.argmax(-1)).all()  # the same greedy tokens


def test_compiled_decode_step_on_the_packaged_model(monkeypatch):
    """The shipped weights at the real shapes (C=192, 6 heads): logits within 1e-4, the same
    greedy continuation, at every batch size the compiled step serves."""
    from tinyllm_trio.model.checkpoint import load_model
    from tinyllm_trio.model.transformer import FUSED_MAX_BATCH

    packaged = load_model().transformer
    assert packaged.fused_max_batch == FUSED_MAX_BATCH >= 1
    lengths = [3, 60, 17, 250, 9, 33, 120, 5, 80, 1, 44, 300, 12, 7, 150, 26][:FUSED_MAX_BATCH]
    compiled, reference = _decode_both_paths(packaged, lengths, 24, monkeypatch)
    np.testing.assert_allclose(compiled, reference, rtol=0, atol=1e-4)
    assert (compiled.argmax(-1) == reference.argmax(-1)).all()


def test_compiled_exp_is_float32_exact_where_gelu_needs_it():
    import numba

    from tinyllm_trio.model import kernels

    @numba.njit
    def exp_all(a, out):
        for i in range(a.shape[0]):
            out[i] = kernels._exp_nonpositive(a[i])

    x = -np.concatenate([np.linspace(0, 104, 400_001), [0.0, 1e-30, 87.0, 88.0, 1e4]])
    x = x.astype(np.float32)
    got = np.empty_like(x)
    exp_all(x, got)
    want = np.exp(x.astype(np.float64))
    inside = x >= -87  # below, exp is under 1.7e-38 and GELU's term it scales is nil
    assert np.all(np.abs(got[inside] - want[inside]) <= 5e-7 * want[inside])
    assert np.all(got[~inside] <= 1.7e-38) and np.all(got >= 0)


def test_compiled_gelu_matches_the_numpy_gelu():
    import numba

    from tinyllm_trio.model import kernels
    from tinyllm_trio.model.transformer import _AS_B, _AS_C, _AS_P

    @numba.njit(error_model="numpy")
    def gelu(f, p, cp, b1, b2, b3, b4):
        kernels._gelu_rows(f, p, cp, b1, b2, b3, b4)

    far = [-1e15, -1e6, -60.0, 60.0, 1e6, 1e15]
    x = np.concatenate([np.linspace(-12, 12, 3 * 4000), far]).astype(np.float32).reshape(3, -1)
    want = gelu_(x.copy(), *(np.empty_like(x) for _ in range(3)))
    got = x.copy()
    consts = np.array([_AS_P, _AS_C / _AS_P, *_AS_B], dtype=np.float32)
    gelu(got, *consts)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    in_model = x.copy()
    kernels.gelu(in_model, consts)  # the entry point the model calls
    np.testing.assert_allclose(in_model, want, rtol=1e-6, atol=1e-7)


# ---- bfloat16 weights (`weights_format="bfloat16"`, serve --weights bfloat16) --------------


# below bfloat16's largest value (3.39e38), where a float32 may round up to infinity
@given(st.floats(width=32, allow_nan=False, allow_infinity=False).filter(lambda v: abs(v) < 3.3e38))
def test_round_to_bfloat16_is_the_nearest_bfloat16_ties_to_even(value: float) -> None:
    x = np.float32(value)
    r = round_to_bfloat16(np.array([x]))[0]
    bits = int(np.array([r]).view(np.uint32)[0])
    assert bits & 0xFFFF == 0  # representable: its upper half is the bfloat16
    # the two bfloat16 neighbours of x (truncation, and one step away from zero)
    low = np.array([int(np.array([x]).view(np.uint32)[0]) & 0xFFFF0000], np.uint32).view(
        np.float32
    )[0]
    high = np.array([int(np.array([low]).view(np.uint32)[0]) + 0x10000], np.uint32).view(
        np.float32
    )[0]
    d_low, d_high = abs(float(x) - float(low)), abs(float(high) - float(x))
    if d_low != d_high:
        assert r == (low if d_low < d_high else high)
    else:  # a tie: the even one (lowest bit of the bfloat16 clear)
        assert (bits >> 16) & 1 == 0
    assert round_to_bfloat16(np.array([r]))[0] == r  # rounding twice changes nothing


def test_round_to_bfloat16_refuses_what_it_cannot_represent() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        round_to_bfloat16(np.array([1.0, np.nan], np.float32))
    with pytest.raises(ValueError, match="range"):
        round_to_bfloat16(np.array([np.finfo(np.float32).max], np.float32))


def test_tiles_of_bfloat16_need_rounded_weights() -> None:
    from tinyllm_trio.model.kernels import tile_weights

    w = np.random.default_rng(0).standard_normal((70, 16)).astype(np.float32)
    with pytest.raises(ValueError, match="rounded to bfloat16"):
        tile_weights(w, bfloat16=True)
    halves = tile_weights(round_to_bfloat16(w), bfloat16=True)
    assert halves.dtype == np.uint16 and halves.size == 128 * 16  # 70 rows padded to 2 tiles
    widened = (halves.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(widened, tile_weights(round_to_bfloat16(w)))


@pytest.mark.parametrize("lengths", [[5], [8, 2, 21], [4, 11, 2, 30, 6, 19]])
def test_bfloat16_model_compiled_step_gives_the_numpy_paths_logits(lengths, monkeypatch) -> None:
    """The compiled step reads 16-bit tiles; the numpy path the same rounded values in float32:
    the same logits and greedy tokens, and every weight the model holds is a bfloat16."""
    model = Transformer.random(SMALL, seed=1, std=0.2, weights_format="bfloat16")
    assert model.weights_format == "bfloat16"
    for w in model.weights().values():
        assert not (w.view(np.uint32) & 0xFFFF).any()
    assert model._fused_weights[4].dtype == np.uint16  # the QKV tiles
    compiled, reference = _decode_both_paths(model, lengths, 12, monkeypatch)
    scale = np.abs(reference).max()
    np.testing.assert_allclose(compiled, reference, rtol=0, atol=1e-5 * max(scale, 1.0))
    assert (compiled.argmax(-1) == reference.argmax(-1)).all()


def test_bfloat16_model_stays_close_to_the_float32_model() -> None:
    ids = _ids(40, seed=3)
    full = Transformer.random(SMALL, seed=2).forward(ids)
    half = Transformer.random(SMALL, seed=2, weights_format="bfloat16").forward(ids)
    assert not np.array_equal(full, half)  # the rounding did happen
    np.testing.assert_allclose(half, full, rtol=0, atol=0.02 * np.abs(full).max())


def test_unknown_weights_format_is_refused() -> None:
    with pytest.raises(ValueError, match="weights_format"):
        Transformer.random(SMALL, weights_format="int4")

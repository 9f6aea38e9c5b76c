"""`bench gguf`: the GGUF llama-server loads is TinyLLM, tensor for tensor.

Two checks: the file read back with gguf's own reader has llama.cpp GPT-2's names, shapes,
dtypes and metadata; and a GPT-2 forward pass written the way llama.cpp computes it (positions
added from `position_embd`, fused QKV, 1/sqrt(head size), zero biases) over the exported
tensors gives our Transformer's logits, for both attention scales, so a transposed, misordered
or unscaled tensor fails here rather than as slightly different tokens in a benchmark.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tinyllm_trio.bench.gguf_export import gguf_tensors, token_strings, write_gguf
from tinyllm_trio.model.checkpoint import load_model
from tinyllm_trio.model.transformer import ModelConfig, Transformer

gguf = pytest.importorskip("gguf")


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * w + b


def _gelu(x: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _gpt2_forward(t: dict[str, np.ndarray], ids: list[int], n_layer: int, n_head: int):
    """llama.cpp's build_gpt2, in float64 numpy ([out, in] weights, so x @ W.T)."""
    w = {k: v.astype(np.float64) for k, v in t.items()}
    T = len(ids)
    x = w["token_embd.weight"][ids] + w["position_embd.weight"][:T]
    C = x.shape[1]
    hs = C // n_head
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(n_layer):
        b = f"blk.{i}"
        h = _layer_norm(x, w[f"{b}.attn_norm.weight"], w[f"{b}.attn_norm.bias"])
        qkv = h @ w[f"{b}.attn_qkv.weight"].T + w[f"{b}.attn_qkv.bias"]
        q, k, v = (qkv[:, j * C : (j + 1) * C].reshape(T, n_head, hs) for j in range(3))
        s = np.einsum("thd,uhd->htu", q, k) / math.sqrt(hs) + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        y = np.einsum("htu,uhd->thd", p, v).reshape(T, C)
        x = x + y @ w[f"{b}.attn_output.weight"].T + w[f"{b}.attn_output.bias"]
        h = _layer_norm(x, w[f"{b}.ffn_norm.weight"], w[f"{b}.ffn_norm.bias"])
        f = _gelu(h @ w[f"{b}.ffn_up.weight"].T + w[f"{b}.ffn_up.bias"])
        x = x + f @ w[f"{b}.ffn_down.weight"].T + w[f"{b}.ffn_down.bias"]
    x = _layer_norm(x, w["output_norm.weight"], w["output_norm.bias"])
    return x @ w["output.weight"].T


@pytest.mark.parametrize("scale", ["head", "embd"])
def test_exported_tensors_compute_our_logits_as_gpt2(scale: str) -> None:
    config = ModelConfig(
        vocab_size=50, n_embd=32, n_head=4, n_layer=2, max_context=16, attention_scale=scale
    )
    model = Transformer.random(config, seed=3, std=0.2)
    tensors = gguf_tensors(model.weights(), config)
    ids = [2, 7, 11, 3, 40, 9]
    ours = model.forward(ids)
    theirs = _gpt2_forward(tensors, ids, config.n_layer, config.n_head)
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=1e-4)
    assert all(a.dtype == np.float32 for a in tensors.values())
    for name in ("attn_qkv", "attn_output", "ffn_up", "ffn_down"):
        assert not tensors[f"blk.1.{name}.bias"].any()  # TinyLLM's linears have no bias


def test_written_file_reads_back_as_llama_cpp_gpt2(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf")
    loaded = load_model()
    config = loaded.transformer.config
    reader = gguf.GGUFReader(str(path))

    def field(key: str):  # scalar or string value of a metadata key
        return reader.fields[key].contents()

    assert field("general.architecture") == "gpt2"
    assert field("gpt2.context_length") == config.max_context == 512
    assert field("gpt2.embedding_length") == config.n_embd == 192
    assert field("gpt2.feed_forward_length") == 4 * config.n_embd
    assert field("gpt2.block_count") == config.n_layer == 6
    assert field("gpt2.attention.head_count") == config.n_head == 6
    assert field("gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert field("tokenizer.ggml.model") == "gpt2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == len(set(tokens)) == config.vocab_size == 3266
    assert tokens == token_strings(loaded.tokenizer)
    assert len(field("tokenizer.ggml.merges")) == 1  # required key; GGUF has no empty array
    assert field("tokenizer.ggml.token_type")[2] == gguf.TokenType.CONTROL  # <BOS>
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")) == (2, 3)
    assert field("tokenizer.ggml.add_bos_token") is False

    by_name = {t.name: t for t in reader.tensors}
    expected = gguf_tensors(loaded.transformer.weights(), config)
    assert set(by_name) == set(expected)
    assert len(by_name) == 5 + 12 * config.n_layer
    C, V = config.n_embd, config.vocab_size
    # GGUF shapes are llama.cpp's ne order: {in, out}, what its loader asks for
    ne = {name: tuple(int(d) for d in t.shape) for name, t in by_name.items()}
    assert ne["token_embd.weight"] == (C, V)
    assert ne["position_embd.weight"] == (C, config.max_context)
    assert ne["output.weight"] == (C, V)
    assert ne["blk.0.attn_qkv.weight"] == (C, 3 * C)
    assert ne["blk.0.ffn_up.weight"] == (C, 4 * C)
    assert ne["blk.0.ffn_down.weight"] == (4 * C, C)
    for name, t in by_name.items():
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        np.testing.assert_array_equal(
            np.asarray(t.data).reshape(expected[name].shape), expected[name]
        )

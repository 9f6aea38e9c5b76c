"""`tinyllm-trio bench gguf`: TinyLLM as a GGUF file that llama.cpp's llama-server loads.

The side-by-side (`bench compare`) needs llama-server to run the same model, not just one of
the same size, so its outputs are comparable in kind and every step does the same arithmetic.
TinyLLM is a GPT-2-shaped network, so it is written as llama.cpp's "gpt2" architecture, fp32:

- ``token_embd`` (V, C); ``position_embd`` (T, C) holds our sinusoidal table, which GPT-2 adds
  to the token embedding exactly where TinyLLM adds its fixed positions;
- per block ``attn_norm`` / ``ffn_norm`` (LayerNorm weight and bias), ``attn_qkv`` (the heads'
  query, key and value rows stacked, head h at rows h*hs.. of each third), ``attn_output``,
  ``ffn_up``, ``ffn_down``; TinyLLM's linear layers have no bias, llama.cpp's GPT-2 requires
  one, so they are zeros;
- ``output_norm`` and the untied ``output`` head.

Tensors are written in PyTorch's [out, in] layout: GGUF reverses the axes, which gives the
{in, out} shape llama.cpp's loader asks for. llama.cpp scales q.k by 1/sqrt(head size); a
checkpoint trained with the "embd" scale has the difference folded into its query rows.
Its GELU is the tanh approximation where ours is exact erf, a difference of at most ~1e-3 per
activation: the same work, near-identical logits, not bit-identical tokens.

The tokenizer: llama.cpp's "gpt2" tokenizer model needs ``tokenizer.ggml.tokens`` (unique
strings) and ``tokenizer.ggml.merges`` (GGUF has no empty array, so one merge), and takes token
types and the BOS/EOS ids when given. Our hybrid word+character vocabulary is not BPE, so text
prompts would tokenize differently there; the benchmarks send token ids, which llama-server
takes as given. A character token that spells the same string as a word gets a marker so the
strings stay unique (the loader asserts that).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from tinyllm_trio.model.tokenizer import BOS, EOS, HybridTokenizer
from tinyllm_trio.model.transformer import ModelConfig, sinusoidal_positions

ARCH = "gpt2"
LAYER_NORM_EPS = 1e-5
# gguf.TokenType values (kept here so the module's constants need no gguf import)
_TOKEN_NORMAL, _TOKEN_CONTROL = 1, 3
_N_SPECIAL = 6  # <PAD> <UNK> <BOS> <EOS> <CHAR_START> <CHAR_END>


def gguf_tensors(weights: dict[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
    """llama.cpp GPT-2 tensor names -> float32 arrays in [out, in] layout, from TinyLLM's
    canonical weights (`Transformer.weights()`)."""
    C, H, hs, V = config.n_embd, config.n_head, config.head_size, config.vocab_size
    f32 = np.float32
    # llama.cpp applies 1/sqrt(hs); fold any other scale into the query rows (no query bias)
    q_factor = f32(config.scale * math.sqrt(hs))
    out: dict[str, np.ndarray] = {
        "token_embd.weight": weights["token_embedding.weight"].astype(f32),
        "position_embd.weight": sinusoidal_positions(config.max_context, C),
        "output_norm.weight": weights["ln_f.weight"].astype(f32),
        "output_norm.bias": weights["ln_f.bias"].astype(f32),
        "output.weight": weights["lm_head.weight"].astype(f32),
    }
    assert out["output.weight"].shape == (V, C)
    for i in range(config.n_layer):
        p, b = f"blocks.{i}", f"blk.{i}"

        def rows(kind: str, p: str = p) -> np.ndarray:
            return np.concatenate([weights[f"{p}.sa.heads.{h}.{kind}.weight"] for h in range(H)])

        qkv = np.concatenate([rows("query") * q_factor, rows("key"), rows("value")])
        out.update(
            {
                f"{b}.attn_norm.weight": weights[f"{p}.ln1.weight"].astype(f32),
                f"{b}.attn_norm.bias": weights[f"{p}.ln1.bias"].astype(f32),
                f"{b}.attn_qkv.weight": qkv.astype(f32),  # (3C, C)
                f"{b}.attn_qkv.bias": np.zeros(3 * C, f32),
                f"{b}.attn_output.weight": weights[f"{p}.sa.proj.weight"].astype(f32),
                f"{b}.attn_output.bias": np.zeros(C, f32),
                f"{b}.ffn_norm.weight": weights[f"{p}.ln2.weight"].astype(f32),
                f"{b}.ffn_norm.bias": weights[f"{p}.ln2.bias"].astype(f32),
                f"{b}.ffn_up.weight": weights[f"{p}.ffwd.net.0.weight"].astype(f32),  # (4C, C)
                f"{b}.ffn_up.bias": np.zeros(4 * C, f32),
                f"{b}.ffn_down.weight": weights[f"{p}.ffwd.net.2.weight"].astype(f32),  # (C, 4C)
                f"{b}.ffn_down.bias": np.zeros(C, f32),
            }
        )
    return {name: np.ascontiguousarray(a) for name, a in out.items()}


def token_strings(tokenizer: HybridTokenizer) -> list[str]:
    """One unique string per token id (llama.cpp asserts uniqueness): words, then characters;
    a character that is also a word is written as ``<c:X>``."""
    texts = [tokenizer.token_text(i) for i in range(tokenizer.vocab_size)]
    seen: set[str] = set()
    unique = []
    for i, text in enumerate(texts):
        if text in seen or not text:
            text = f"<c:{text}:{i}>"
        seen.add(text)
        unique.append(text)
    return unique


def write_gguf(path: str | Path, model: str | Path | None = None) -> Path:
    """Write the checkpoint `model` (default: the packaged one) as a GGUF at `path`; returns
    the path."""
    import gguf

    from tinyllm_trio.model.checkpoint import load_model

    loaded = load_model(model)
    config = loaded.transformer.config
    tensors = gguf_tensors(loaded.transformer.weights(), config)
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_name("TinyLLM")
    writer.add_context_length(config.max_context)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(LAYER_NORM_EPS)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = token_strings(loaded.tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [_TOKEN_CONTROL if i < _N_SPECIAL else _TOKEN_NORMAL for i in range(len(tokens))]
    )
    # GGUF cannot store an empty array and the loader requires the key: one harmless merge
    writer.add_token_merges([f"{tokens[_N_SPECIAL]} {tokens[_N_SPECIAL + 1]}"])
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_add_bos_token(False)  # prompts are token ids and carry their own <BOS>
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="the GGUF file to write")
    parser.add_argument(
        "--model", default=None, help="checkpoint to convert (default: the packaged model)"
    )


def run_cli(args: argparse.Namespace) -> int:
    try:
        import gguf  # noqa: F401
    except ImportError:
        print("bench gguf: needs the gguf package (pip install -e '.[bench]')", file=sys.stderr)
        return 2
    path = write_gguf(args.out, args.model)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, fp32, llama.cpp arch {ARCH})")
    return 0

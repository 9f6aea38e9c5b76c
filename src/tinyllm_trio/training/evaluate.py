"""`tinyllm-trio eval`: held-out loss and perplexity of a checkpoint, and n-gram baselines.

Everything here is numpy (no torch), so the numbers in the model card can be checked from the base
install:

    tinyllm-trio corpus --out data
    tinyllm-trio eval --data data --json

How each number is computed (the model card quotes these definitions):

- Token stream: every chapter of a split is encoded with the checkpoint's tokenizer as
  ``BOS ... EOS`` and the chapters are concatenated (exactly as training does). Every token of the
  held-out stream except the first is a prediction target, once, for all three models.
- Model: the stream is cut into consecutive, non-overlapping windows of ``max_context + 1``
  tokens that share their boundary token (window k is ``stream[kT : kT + T + 1]``, T =
  max_context); the numpy `Transformer.forward` runs on the first T tokens of each window and is
  scored on the next-token targets. A target therefore sees between 1 and T tokens of context
  (T/2 on average). Loss is the mean negative log-likelihood in nats; perplexity is exp(loss).
- Unigram: token frequencies of the training stream with add-one smoothing over the whole
  vocabulary, p(w) = (c(w) + 1) / (N + V).
- Bigram: interpolated Witten-Bell, parameter free, backing off to that unigram:
  p(w | v) = (c(v, w) + T(v) p_uni(w)) / (c(v) + T(v)), where T(v) is the number of distinct
  tokens seen after v in training (p_uni(w) alone when v was never seen).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tinyllm_trio.model.tokenizer import EOS, HybridTokenizer
from tinyllm_trio.training.corpus import read_documents


def encode_stream(tok: HybridTokenizer, docs: list[str]) -> np.ndarray:
    """Each document as BOS ... EOS, concatenated into one int64 stream."""
    out: list[int] = []
    for d in docs:
        out.extend(tok.encode(d, bos=True))
        out.append(EOS)
    return np.asarray(out, dtype=np.int64)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def model_nll(transformer: Any, stream: np.ndarray, window: int | None = None) -> tuple[float, int]:
    """Total NLL (nats) of stream[1:] under the model, in non-overlapping windows; (sum, count)."""
    window = window or transformer.config.max_context
    total, count = 0.0, 0
    for start in range(0, len(stream) - 1, window):
        chunk = stream[start : start + window + 1]
        logp = _log_softmax(transformer.forward(chunk[:-1].tolist()))
        targets = chunk[1:]
        total -= float(logp[np.arange(len(targets)), targets].sum())
        count += len(targets)
    return total, count


def unigram_logprobs(train: np.ndarray, vocab_size: int) -> np.ndarray:
    """log p(w) with add-one smoothing over the vocabulary."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64)
    return np.log((counts + 1.0) / (counts.sum() + vocab_size))


def unigram_nll(train: np.ndarray, heldout: np.ndarray, vocab_size: int) -> tuple[float, int]:
    """Total NLL of heldout[1:] under the add-one unigram model; (sum, count)."""
    logp = unigram_logprobs(train, vocab_size)
    targets = heldout[1:]
    return -float(logp[targets].sum()), len(targets)


def bigram_nll(train: np.ndarray, heldout: np.ndarray, vocab_size: int) -> tuple[float, int]:
    """Total NLL of heldout[1:] under the Witten-Bell bigram model; (sum, count)."""
    p_uni = np.exp(unigram_logprobs(train, vocab_size))
    keys, pair_counts = np.unique(train[:-1] * vocab_size + train[1:], return_counts=True)
    prev_of_key = keys // vocab_size
    context_counts = np.bincount(prev_of_key, weights=pair_counts, minlength=vocab_size)
    distinct_followers = np.bincount(prev_of_key, minlength=vocab_size).astype(np.float64)

    prev, nxt = heldout[:-1], heldout[1:]
    hk = prev * vocab_size + nxt
    idx = np.minimum(np.searchsorted(keys, hk), len(keys) - 1)
    c_pair = np.where(keys[idx] == hk, pair_counts[idx], 0).astype(np.float64)
    c_ctx = context_counts[prev]
    t_ctx = distinct_followers[prev]
    seen = c_ctx > 0
    p = np.where(
        seen,
        (c_pair + t_ctx * p_uni[nxt]) / np.where(seen, c_ctx + t_ctx, 1.0),
        p_uni[nxt],
    )
    return -float(np.log(p).sum()), len(nxt)


def evaluate(
    model_path: str | None,
    data: str | Path,
    attention_scale: str | None = None,
    weights: str = "float32",
) -> dict:
    """All four numbers (plus token counts and timing) for a checkpoint and a corpus directory;
    `weights` "bfloat16" evaluates the model as `serve --weights bfloat16` runs it."""
    from tinyllm_trio.model.checkpoint import load_model

    data = Path(data)
    loaded = load_model(model_path, attention_scale=attention_scale, weights_format=weights)
    tok, transformer = loaded.tokenizer, loaded.transformer
    train = encode_stream(tok, read_documents(data / "train.txt"))
    heldout = encode_stream(tok, read_documents(data / "heldout.txt"))
    t0 = time.perf_counter()
    nll, n = model_nll(transformer, heldout)
    seconds = time.perf_counter() - t0
    u_nll, u_n = unigram_nll(train, heldout, tok.vocab_size)
    b_nll, b_n = bigram_nll(train, heldout, tok.vocab_size)
    loss = nll / n
    return {
        "heldout_loss": round(loss, 4),
        "heldout_ppl": round(math.exp(loss), 2),
        "unigram_ppl": round(math.exp(u_nll / u_n), 2),
        "bigram_ppl": round(math.exp(b_nll / b_n), 2),
        "heldout_tokens": n,
        "train_tokens": len(train),
        "window": transformer.config.max_context,
        "model_seconds": round(seconds, 1),
        "model": str(loaded.path) if loaded.path else "(default)",
    }


def run_cli(args: Any) -> int:
    data = Path(args.data)
    for name in ("train.txt", "heldout.txt"):
        if not (data / name).exists():
            print(
                f"error: {data / name} not found; fetch the corpus first: "
                f"tinyllm-trio corpus --out {data}",
                file=sys.stderr,
            )
            return 1
    r = evaluate(
        args.model,
        data,
        getattr(args, "attention_scale", None),
        getattr(args, "weights", "float32"),
    )
    if args.json:
        keys = ("heldout_loss", "heldout_ppl", "unigram_ppl", "bigram_ppl")
        print(json.dumps({k: r[k] for k in keys}))
        return 0
    print(f"model: {r['model']}  (windows of {r['window']} tokens)")
    print(f"held-out tokens: {r['heldout_tokens']:,}   train tokens: {r['train_tokens']:,}")
    print(f"{'model':<28}{'loss':>8}{'ppl':>10}")
    print(f"{'transformer':<28}{r['heldout_loss']:>8.4f}{r['heldout_ppl']:>10.2f}")
    for name, key in (("unigram (add-one)", "unigram_ppl"), ("bigram (Witten-Bell)", "bigram_ppl")):
        print(f"{name:<28}{math.log(r[key]):>8.4f}{r[key]:>10.2f}")
    print(f"(transformer pass: {r['model_seconds']}s)")
    return 0

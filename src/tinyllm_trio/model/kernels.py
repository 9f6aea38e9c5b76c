"""Compiled kernels (numba) for the parts of a decode step numpy does badly: attention, LayerNorm.

Why a kernel: a batch-32 decode step reads every sequence's keys and values, ~2.4 MB per layer
at 48 tokens of context, from memory (the weights and the rest of the cache have pushed them
out since the last step). numpy's stacked matmuls read them as one BLAS call per (sequence,
head) block, one block after the other, so each block's first cache misses are waited for
alone, far below what a streaming read gets. `attend_one_token` walks a sequence's heads
together, position by position, so six blocks stream from memory at once, and it fuses what
was five numpy passes (store the new key and value, scores, exact softmax, product with V,
normalisation) into that one walk. The README quotes what it gained, with the command.

`layernorm` is here for a different reason: numpy needs ~9 passes for a LayerNorm over rows
of 192, and at small batches their per-call overhead is a visible share of a step; one
compiled call does all rows.

The loops are plain Python over float32 arrays; numba compiles them once per machine (cached
on disk next to this file, or in numba's user cache directory when that is read-only) when this
module is first imported, which a worker does while it loads the model, before it says ready.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types as nt

__all__ = ["LN_EPS", "attend_one_token", "layernorm"]

LN_EPS = 1e-5

# No 'nnan'/'ninf': a NaN or inf from bad weights must come out as one, not as garbage; only
# reassociation (to vectorise the dot products) and fused multiply-adds are allowed.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}

_F32 = nt.float32
_ROWS = nt.Array(_F32, 2, "C")
_PARAM = nt.Array(_F32, 1, "C", readonly=True)  # weights are read-only views
_CACHE_LAYER = nt.Array(_F32, 5, "C")
_LENGTHS = nt.Array(nt.int64, 1, "C")


@numba.njit(
    nt.void(_ROWS, _PARAM, _PARAM, _ROWS),
    cache=True,
    nogil=True,
    boundscheck=False,
    fastmath=_FASTMATH,
)
def layernorm(x, w, b, out):  # pragma: no cover - compiled
    """LayerNorm of each row of x [N, C] into out [N, C] (eps LN_EPS, biased variance).

    One call for all rows instead of ~9 numpy passes over short rows, whose per-call overhead
    dominates at small batches (13 LayerNorms a step)."""
    n, c = x.shape
    for r in range(n):  # row statistics in float64, as exact as numpy's pairwise sums or more
        total = 0.0
        for i in range(c):
            total += x[r, i]
        mean = total / c
        sq = 0.0
        for i in range(c):
            d = x[r, i] - mean
            sq += d * d
        rstd = np.float32(1.0 / np.sqrt(sq / c + LN_EPS))
        mean32 = np.float32(mean)
        for i in range(c):
            out[r, i] = (x[r, i] - mean32) * rstd * w[i] + b[i]


@numba.njit(
    nt.void(_ROWS, _CACHE_LAYER, _LENGTHS, _ROWS, _ROWS, _ROWS),
    cache=True,
    nogil=True,
    boundscheck=False,
    fastmath=_FASTMATH,
)
def attend_one_token(qkv, kv, lengths, y, scores, acc):  # pragma: no cover - compiled
    """Causal attention of one new token for each of rows 0..B-1 of a KV cache layer.

    qkv     [B, 3C]  the new tokens' queries (already scaled), keys and values, heads in order
    kv      [rows, 2, H, T, hs]  one layer of the cache (keys [:, 0], values [:, 1])
    lengths [B]      tokens row b holds before this one: the new token's position
    y       [B, C]   out: softmax(q k^T) v of each head, heads concatenated
    scores  [H, T], acc [H, hs]  scratch

    Stores each row's new key and value at its position first, so the token attends to itself.
    Row b attends to positions 0..lengths[b] only; nothing beyond is read.
    """
    B = lengths.shape[0]
    H = kv.shape[2]
    hs = kv.shape[4]
    C = H * hs
    inv = np.empty(H, dtype=np.float32)  # 1 / softmax denominator, per head
    for b in range(B):
        p = lengths[b]
        n = p + 1
        for h in range(H):
            for d in range(hs):
                kv[b, 0, h, p, d] = qkv[b, C + h * hs + d]
                kv[b, 1, h, p, d] = qkv[b, 2 * C + h * hs + d]
        for t in range(n):  # heads inside positions: H blocks stream from memory at once
            for h in range(H):
                s = np.float32(0.0)
                for d in range(hs):
                    s += kv[b, 0, h, t, d] * qkv[b, h * hs + d]
                scores[h, t] = s
        for h in range(H):
            m = scores[h, 0]
            for t in range(1, n):
                m = max(m, scores[h, t])
            total = np.float32(0.0)
            for t in range(n):
                e = np.exp(scores[h, t] - m)
                scores[h, t] = e
                total += e
            inv[h] = np.float32(1.0) / total
            acc[h, :] = 0.0
        for t in range(n):
            for h in range(H):
                e = scores[h, t]
                for d in range(hs):
                    acc[h, d] += e * kv[b, 1, h, t, d]
        for h in range(H):
            for d in range(hs):
                y[b, h * hs + d] = acc[h, d] * inv[h]

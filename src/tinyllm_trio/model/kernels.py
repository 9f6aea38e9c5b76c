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
from llvmlite import ir
from numba import types as nt
from numba.extending import intrinsic

__all__ = ["LN_EPS", "attend_one_token", "decode_small_batch", "gelu", "layernorm"]

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


# ---- the whole decode step of a small batch ------------------------------------------------------

_WEIGHT_ROWS = nt.Array(_F32, 2, "C", readonly=True)  # one matrix, a row per output
_LAYER_ROWS = nt.Array(_F32, 3, "C", readonly=True)  # [n_layer, out, in]
_LAYER_PARAMS = nt.Array(_F32, 2, "C", readonly=True)  # [n_layer, C]
_KV_CACHE = nt.Array(_F32, 6, "C")
_TOKENS = nt.Array(nt.int64, 1, "C")


_ROW_GROUP = 16  # weight rows per pass: 16 running dot products fill the vector registers


@numba.njit(nogil=True, boundscheck=False, fastmath=_FASTMATH, error_model="numpy", inline="always")
def _rows_matvec(x, w, out):  # pragma: no cover - compiled
    """out[b, o] = x[b] . w[o] for x [B, K], w [N, K].

    The weights are taken 16 rows (12 KiB at K=192) at a time, and each group is used by every
    batch row while it is in L1: blocks of 4 batch rows x 4 weight rows, then a pair of batch
    rows x 8 weight rows, then a lone row against all 16. Each block keeps 16 running dot
    products, the most the 32 vector registers hold with their operands. At batch 1 the weights
    come from L3 (13 MB for the default model), and 16 rows in flight stream them ~15% faster
    than 4 did; at batch 2 the pair block reads them once instead of twice (~1.5x). The stores
    are one statement per element: a tuple assigned to a slice compiles to a slower loop."""
    B, K = x.shape
    N = w.shape[0]
    full = B - B % 4
    pair = B - B % 2
    o = 0
    while o + _ROW_GROUP <= N:
        for b in range(0, full, 4):
            for q in range(o, o + _ROW_GROUP, 4):
                _block4x4(x, w, out, b, q)
        for b in range(full, pair, 2):
            _block2x8(x, w, out, b, o)
            _block2x8(x, w, out, b, o + 8)
        if pair < B:
            _row16(x, w, out, B - 1, o)
        o += _ROW_GROUP
    for r in range(o, N):  # the last N % 16 rows (2 of the 3,266 in the head)
        for b in range(B):
            s = np.float32(0.0)
            for i in range(K):
                s += x[b, i] * w[r, i]
            out[b, r] = s


@numba.njit(nogil=True, boundscheck=False, fastmath=_FASTMATH, error_model="numpy", inline="always")
def _block4x4(x, w, out, b, o):  # pragma: no cover - compiled
    """out[b:b+4, o:o+4]: 8 loads feed 16 multiply-adds."""
    K = x.shape[1]
    s00 = s01 = s02 = s03 = np.float32(0.0)
    s10 = s11 = s12 = s13 = np.float32(0.0)
    s20 = s21 = s22 = s23 = np.float32(0.0)
    s30 = s31 = s32 = s33 = np.float32(0.0)
    for i in range(K):
        x0 = x[b, i]
        x1 = x[b + 1, i]
        x2 = x[b + 2, i]
        x3 = x[b + 3, i]
        w0 = w[o, i]
        s00 += x0 * w0
        s10 += x1 * w0
        s20 += x2 * w0
        s30 += x3 * w0
        w1 = w[o + 1, i]
        s01 += x0 * w1
        s11 += x1 * w1
        s21 += x2 * w1
        s31 += x3 * w1
        w2 = w[o + 2, i]
        s02 += x0 * w2
        s12 += x1 * w2
        s22 += x2 * w2
        s32 += x3 * w2
        w3 = w[o + 3, i]
        s03 += x0 * w3
        s13 += x1 * w3
        s23 += x2 * w3
        s33 += x3 * w3
    out[b, o] = s00
    out[b, o + 1] = s01
    out[b, o + 2] = s02
    out[b, o + 3] = s03
    out[b + 1, o] = s10
    out[b + 1, o + 1] = s11
    out[b + 1, o + 2] = s12
    out[b + 1, o + 3] = s13
    out[b + 2, o] = s20
    out[b + 2, o + 1] = s21
    out[b + 2, o + 2] = s22
    out[b + 2, o + 3] = s23
    out[b + 3, o] = s30
    out[b + 3, o + 1] = s31
    out[b + 3, o + 2] = s32
    out[b + 3, o + 3] = s33


@numba.njit(nogil=True, boundscheck=False, fastmath=_FASTMATH, error_model="numpy", inline="always")
def _block2x8(x, w, out, b, o):  # pragma: no cover - compiled
    """out[b:b+2, o:o+8]: each weight load feeds both batch rows."""
    K = x.shape[1]
    s00 = s01 = s02 = s03 = s04 = s05 = s06 = s07 = np.float32(0.0)
    s10 = s11 = s12 = s13 = s14 = s15 = s16 = s17 = np.float32(0.0)
    for i in range(K):
        x0 = x[b, i]
        x1 = x[b + 1, i]
        w0 = w[o, i]
        s00 += x0 * w0
        s10 += x1 * w0
        w1 = w[o + 1, i]
        s01 += x0 * w1
        s11 += x1 * w1
        w2 = w[o + 2, i]
        s02 += x0 * w2
        s12 += x1 * w2
        w3 = w[o + 3, i]
        s03 += x0 * w3
        s13 += x1 * w3
        w4 = w[o + 4, i]
        s04 += x0 * w4
        s14 += x1 * w4
        w5 = w[o + 5, i]
        s05 += x0 * w5
        s15 += x1 * w5
        w6 = w[o + 6, i]
        s06 += x0 * w6
        s16 += x1 * w6
        w7 = w[o + 7, i]
        s07 += x0 * w7
        s17 += x1 * w7
    out[b, o] = s00
    out[b, o + 1] = s01
    out[b, o + 2] = s02
    out[b, o + 3] = s03
    out[b, o + 4] = s04
    out[b, o + 5] = s05
    out[b, o + 6] = s06
    out[b, o + 7] = s07
    out[b + 1, o] = s10
    out[b + 1, o + 1] = s11
    out[b + 1, o + 2] = s12
    out[b + 1, o + 3] = s13
    out[b + 1, o + 4] = s14
    out[b + 1, o + 5] = s15
    out[b + 1, o + 6] = s16
    out[b + 1, o + 7] = s17


@numba.njit(nogil=True, boundscheck=False, fastmath=_FASTMATH, error_model="numpy", inline="always")
def _row16(x, w, out, b, o):  # pragma: no cover - compiled
    """out[b, o:o+16]: one batch row against 16 weight rows."""
    K = x.shape[1]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = s8 = s9 = s10 = s11 = s12 = s13 = s14 = s15 = (
        np.float32(0.0)
    )
    for i in range(K):
        xi = x[b, i]
        s0 += xi * w[o + 0, i]
        s1 += xi * w[o + 1, i]
        s2 += xi * w[o + 2, i]
        s3 += xi * w[o + 3, i]
        s4 += xi * w[o + 4, i]
        s5 += xi * w[o + 5, i]
        s6 += xi * w[o + 6, i]
        s7 += xi * w[o + 7, i]
        s8 += xi * w[o + 8, i]
        s9 += xi * w[o + 9, i]
        s10 += xi * w[o + 10, i]
        s11 += xi * w[o + 11, i]
        s12 += xi * w[o + 12, i]
        s13 += xi * w[o + 13, i]
        s14 += xi * w[o + 14, i]
        s15 += xi * w[o + 15, i]
    out[b, o] = s0
    out[b, o + 1] = s1
    out[b, o + 2] = s2
    out[b, o + 3] = s3
    out[b, o + 4] = s4
    out[b, o + 5] = s5
    out[b, o + 6] = s6
    out[b, o + 7] = s7
    out[b, o + 8] = s8
    out[b, o + 9] = s9
    out[b, o + 10] = s10
    out[b, o + 11] = s11
    out[b, o + 12] = s12
    out[b, o + 13] = s13
    out[b, o + 14] = s14
    out[b, o + 15] = s15


@intrinsic
def _f32_from_bits(typingctx, bits):
    """The low 32 bits of an integer, reinterpreted as a float32 (an LLVM bitcast, which
    vectorises, unlike a call)."""
    if not isinstance(bits, nt.Integer):
        return None

    def codegen(context, builder, signature, args):
        low = builder.trunc(args[0], ir.IntType(32)) if bits.bitwidth > 32 else args[0]
        return builder.bitcast(low, ir.FloatType())

    return nt.float32(bits), codegen


_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 split so that n * _LN2_HI is exact (Cody & Waite)
_LN2_LO = np.float32(-2.12194440e-4)


@numba.njit(nogil=True, boundscheck=False, fastmath=_FASTMATH, error_model="numpy", inline="always")
def _exp_nonpositive(x):  # pragma: no cover - compiled
    """exp(x) for x <= 0 in float32 (relative error ~1e-7; 0 below -87), written so that a
    loop of it vectorises: numba calls libm's scalar expf for np.exp without Intel's SVML."""
    x = max(x, np.float32(-87.0))
    n = np.floor(x * _LOG2E + np.float32(0.5))
    r = x - n * _LN2_HI - n * _LN2_LO  # |r| <= ln2 / 2
    p = np.float32(1.9875691500e-4)  # Cephes expf's minimax polynomial
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * _f32_from_bits((np.int32(n) + 127) << 23)


@numba.njit(nogil=True, boundscheck=False, fastmath=_FASTMATH, error_model="numpy", inline="always")
def _gelu_rows(f, p, c_over_p, b1, b2, b3, b4):  # pragma: no cover - compiled
    """Exact-erf GELU in place, by the same Abramowitz & Stegun evaluation as the numpy
    reference (`transformer.gelu_`), so both paths agree to float32 rounding."""
    n, m = f.shape
    for r in range(n):
        for i in range(m):
            x = f[r, i]
            u = abs(x)
            t = c_over_p / (u + np.float32(1.0) / p)
            acc = ((((t + b4) * t + b3) * t + b2) * t + b1) * t
            acc *= _exp_nonpositive(np.float32(-0.5) * x * x) * u
            f[r, i] = (x + u) * np.float32(0.5) - acc


@numba.njit(
    nt.void(_ROWS, nt.float32[:]),
    cache=True,
    nogil=True,
    boundscheck=False,
    fastmath=_FASTMATH,
    error_model="numpy",
)
def gelu(f, consts):  # pragma: no cover - compiled
    """Exact-erf GELU of every row of f [N, 4C] in place, in one vectorised pass (numpy
    needs 19: `transformer.gelu_`); consts = p, c/p, b1..b4 of that evaluation."""
    _gelu_rows(f, consts[0], consts[1], consts[2], consts[3], consts[4], consts[5])


@numba.njit(
    nt.void(
        _TOKENS,  # tokens [B]
        _LENGTHS,  # lengths [B]: each row's position
        _WEIGHT_ROWS,  # wte [V, C]
        _WEIGHT_ROWS,  # pe [T, C]
        _LAYER_PARAMS,  # ln1_w
        _LAYER_PARAMS,  # ln1_b
        _LAYER_ROWS,  # w_qkv [L, 3C, C], queries pre-scaled
        _LAYER_ROWS,  # w_proj [L, C, C]
        _LAYER_PARAMS,  # ln2_w
        _LAYER_PARAMS,  # ln2_b
        _LAYER_ROWS,  # w_fc [L, 4C, C]
        _LAYER_ROWS,  # w_out [L, C, 4C]
        _PARAM,  # ln_f_w
        _PARAM,  # ln_f_b
        _WEIGHT_ROWS,  # w_head [V, C]
        nt.float32[:],  # GELU constants: p, c/p, b1, b2, b3, b4
        _KV_CACHE,  # kv [L, rows, 2, H, T, hs]
        _ROWS,  # x [B, C]
        _ROWS,  # h [B, C]
        _ROWS,  # qkv [B, 3C]
        _ROWS,  # y [B, C]
        _ROWS,  # f [B, 4C]
        _ROWS,  # scores [H, T]
        _ROWS,  # head_acc [H, hs]
        _ROWS,  # logits [B, V] (out)
    ),
    cache=True,
    nogil=True,
    boundscheck=False,
    fastmath=_FASTMATH,
    error_model="numpy",  # no ZeroDivisionError branch per division: those stop vectorising
)
def decode_small_batch(
    tokens, lengths, wte, pe, ln1_w, ln1_b, w_qkv, w_proj, ln2_w, ln2_b, w_fc, w_out,
    ln_f_w, ln_f_b, w_head, gelu_consts, kv, x, h, qkv, y, f, scores, head_acc, logits,
):  # pragma: no cover - compiled  # fmt: skip
    """One decode step for cache rows 0..B-1, every layer in one compiled call.

    At small batches the step is ~90 numpy and BLAS calls on vectors of 192 to 768 floats;
    their dispatch is a large share of it, and BLAS's small-matrix paths do not stream the
    weights at the rate a plain loop over weight rows does. The numpy path in
    `Transformer._decode_rows` stays the reference (and the path for larger batches)."""
    B = tokens.shape[0]
    n_layer = w_qkv.shape[0]
    p, c_over_p = gelu_consts[0], gelu_consts[1]
    b1, b2, b3, b4 = gelu_consts[2], gelu_consts[3], gelu_consts[4], gelu_consts[5]
    for b in range(B):
        tok, at = tokens[b], lengths[b]
        for i in range(x.shape[1]):
            x[b, i] = wte[tok, i] + pe[at, i]
    for layer in range(n_layer):
        layernorm(x, ln1_w[layer], ln1_b[layer], h)
        _rows_matvec(h, w_qkv[layer], qkv)
        attend_one_token(qkv, kv[layer], lengths, y, scores, head_acc)
        _rows_matvec(y, w_proj[layer], h)
        x += h
        layernorm(x, ln2_w[layer], ln2_b[layer], h)
        _rows_matvec(h, w_fc[layer], f)
        _gelu_rows(f, p, c_over_p, b1, b2, b3, b4)
        _rows_matvec(f, w_out[layer], h)
        x += h
    layernorm(x, ln_f_w, ln_f_b, h)
    _rows_matvec(h, w_head, logits)

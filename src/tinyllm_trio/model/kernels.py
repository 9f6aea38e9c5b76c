"""Compiled kernels (numba) for the parts of a decode step numpy does badly: attention, LayerNorm,
GELU, and the whole decode step of up to 64 sequences (`decode_small_batch`, whose products
with the weights are written as LLVM IR over weight tiles: `tile_weights`, `_tile_pass`).

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

__all__ = [
    "LN_EPS",
    "TILE",
    "TILE_ROWS",
    "attend_one_token",
    "decode_small_batch",
    "gelu",
    "layernorm",
    "tile_weights",
]

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
_LAYER_PARAMS = nt.Array(_F32, 2, "C", readonly=True)  # [n_layer, C]
_KV_CACHE = nt.Array(_F32, 6, "C")
_TOKENS = nt.Array(nt.int64, 1, "C")


TILE = 64  # outputs per weight tile: four 16-float vectors
_TILE_VECTORS = TILE // 16
TILE_ROWS = 4  # batch rows per pass over a tile: 4 x 4 vector accumulators


def tile_weights(w: np.ndarray, *, bfloat16: bool = False) -> np.ndarray:
    """A matrix [N, K] (a row per output) as the compiled step reads it: tiles of 64 outputs,
    each [K, 64] (input i's 64 weights side by side), flattened; N padded with zero rows to a
    multiple of 64. Every tile is one sequential stream of K x 256 bytes.

    With `bfloat16`, each weight as the upper 16 bits of its float32 (uint16; half the bytes
    to stream): exact only for values already rounded to bfloat16, which is checked."""
    n, k = w.shape
    padded = np.zeros((-(-n // TILE) * TILE, k), dtype=np.float32)
    padded[:n] = w
    tiles = np.ascontiguousarray(padded.reshape(-1, TILE, k).swapaxes(1, 2)).reshape(-1)
    if not bfloat16:
        return tiles
    bits = tiles.view(np.uint32)
    if (bits & 0xFFFF).any():
        raise ValueError("tile_weights(bfloat16=True) needs weights rounded to bfloat16")
    return (bits >> 16).astype(np.uint16)


def _tile_pass(rows: int):
    """An LLVM-level kernel for `rows` batch rows against one weight tile (see `_tiles_matvec`).

    Written as IR because numba does not vectorise this loop itself: its vectoriser turns
    every running sum into a horizontal reduction over the inputs instead. Each step of the
    loop loads the tile's 64 weights of input i (four 64-byte loads), broadcasts x[b, i] of
    each row, and issues rows x 4 fused multiply-adds into accumulators that stay in
    registers; nothing is reduced across lanes, and the tile streams in order. Plain fma, no
    fast-math flags: the float32 rounding of every product and sum is IEEE's. Tiles of uint16
    hold bfloat16 weights: each vector load is 32 bytes, widened to float32 by a shift (the
    bfloat16 is the float32's upper half), so the same arithmetic gives the same sums."""

    def contiguous(t: nt.Type, ndim: int, dtypes: tuple) -> bool:
        return isinstance(t, nt.Array) and t.ndim == ndim and t.layout == "C" and t.dtype in dtypes

    @intrinsic
    def tile_pass(typingctx, w, x, b0, tile, out):
        # the IR below indexes raw pointers: anything but these layouts is a typing error
        if not (
            contiguous(w, 1, (nt.float32, nt.uint16))
            and contiguous(x, 2, (nt.float32,))
            and contiguous(out, 2, (nt.float32,))
        ):
            return None
        sig = nt.void(w, x, b0, tile, out)

        def codegen(context, builder, signature, args):
            w_arr = context.make_array(signature.args[0])(context, builder, args[0])
            x_arr = context.make_array(signature.args[1])(context, builder, args[1])
            o_arr = context.make_array(signature.args[4])(context, builder, args[4])
            i64, i32 = ir.IntType(64), ir.IntType(32)
            v16 = ir.VectorType(ir.FloatType(), 16)

            def c(n):
                return ir.Constant(i64, n)

            k = builder.extract_value(x_arr.shape, 1)
            wbase = builder.gep(w_arr.data, [builder.mul(builder.mul(args[3], k), c(TILE))])
            xbase = builder.gep(x_arr.data, [builder.mul(args[2], k)])
            fma = builder.module.globals.get("llvm.fma.v16f32") or ir.Function(
                builder.module, ir.FunctionType(v16, [v16] * 3), "llvm.fma.v16f32"
            )
            zero = ir.Constant(v16, [0.0] * 16)
            broadcast = ir.Constant(ir.VectorType(i32, 16), [0] * 16)
            entry = builder.basic_block  # the loop runs at least once: K >= 1 (n_embd >= 2)
            loop = builder.append_basic_block("tile_loop")
            done = builder.append_basic_block("tile_done")
            builder.branch(loop)
            builder.position_at_end(loop)
            i = builder.phi(i64)
            i.add_incoming(c(0), entry)
            acc = [[builder.phi(v16) for _ in range(_TILE_VECTORS)] for _ in range(rows)]
            for phi in (p for r in acc for p in r):
                phi.add_incoming(zero, entry)
            at = builder.gep(wbase, [builder.mul(i, c(TILE))])
            if signature.args[0].dtype == nt.uint16:  # bfloat16 tiles
                halves, words = ir.VectorType(ir.IntType(16), 16), ir.VectorType(i32, 16)
                shift = ir.Constant(words, [16] * 16)
                wv = []
                for a in range(_TILE_VECTORS):
                    ptr = builder.bitcast(builder.gep(at, [c(16 * a)]), halves.as_pointer())
                    wide = builder.shl(builder.zext(builder.load(ptr, align=2), words), shift)
                    wv.append(builder.bitcast(wide, v16))
            else:
                wv = [
                    builder.load(
                        builder.bitcast(builder.gep(at, [c(16 * a)]), v16.as_pointer()), align=4
                    )
                    for a in range(_TILE_VECTORS)
                ]
            summed = []
            for r in range(rows):
                xi = builder.load(builder.gep(xbase, [builder.add(builder.mul(c(r), k), i)]))
                xv = builder.insert_element(ir.Constant(v16, ir.Undefined), xi, ir.Constant(i32, 0))
                xv = builder.shuffle_vector(xv, ir.Constant(v16, ir.Undefined), broadcast)
                summed.append(
                    [builder.call(fma, [wv[a], xv, acc[r][a]]) for a in range(_TILE_VECTORS)]
                )
            following = builder.add(i, c(1))
            i.add_incoming(following, loop)
            for r in range(rows):
                for a in range(_TILE_VECTORS):
                    acc[r][a].add_incoming(summed[r][a], loop)
            builder.cbranch(builder.icmp_unsigned("<", following, k), loop, done)
            builder.position_at_end(done)
            for r in range(rows):
                for a in range(_TILE_VECTORS):
                    dst = builder.gep(o_arr.data, [c(r * TILE + 16 * a)])
                    builder.store(summed[r][a], builder.bitcast(dst, v16.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile_pass


_tile_pass1, _tile_pass2, _tile_pass3, _tile_pass4 = (_tile_pass(r) for r in range(1, 5))


@numba.njit(nogil=True, boundscheck=False, error_model="numpy", inline="always")
def _tiles_matvec(x, tiles, out, scratch):  # pragma: no cover - compiled
    """out[b, o] = x[b] . w[o] for x [B, K] and w [N, K] given as `tile_weights(w)`.

    Batch rows go over each tile four at a time (16 accumulators), so a tile is read from
    memory once and from L1/L2 again only for the fifth row on; the results land in
    `scratch` [4, 64] and are copied out (a tile may run past N). At batch 1 this streams the
    13 MB of the default model's weights ~25% faster than dot products of weight rows did
    (which end in a horizontal sum per output), and 1.4-2x faster at batches 2 to 8."""
    B = x.shape[0]
    N = out.shape[1]
    for t in range(-(-N // TILE)):
        width = min(TILE, N - t * TILE)
        b = 0
        while b < B:
            rows = min(TILE_ROWS, B - b)
            if rows == 4:
                _tile_pass4(tiles, x, b, t, scratch)
            elif rows == 3:
                _tile_pass3(tiles, x, b, t, scratch)
            elif rows == 2:
                _tile_pass2(tiles, x, b, t, scratch)
            else:
                _tile_pass1(tiles, x, b, t, scratch)
            for r in range(rows):
                for j in range(width):
                    out[b + r, t * TILE + j] = scratch[r, j]
            b += rows


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


def _decode_signature(tile: nt.Type):
    """decode_small_batch's signature with weight tiles of `tile` (float32, or uint16 for
    bfloat16: see `tile_weights`)."""
    layer_tiles = nt.Array(tile, 2, "C", readonly=True)  # [n_layer, tile_weights(w)]
    tiles = nt.Array(tile, 1, "C", readonly=True)
    return nt.void(
        _TOKENS,  # tokens [B]
        _LENGTHS,  # lengths [B]: each row's position
        _WEIGHT_ROWS,  # wte [V, C]
        _WEIGHT_ROWS,  # pe [T, C]
        _LAYER_PARAMS,  # ln1_w
        _LAYER_PARAMS,  # ln1_b
        layer_tiles,  # w_qkv [L, tiles of 3C x C], queries pre-scaled
        layer_tiles,  # w_proj [L, tiles of C x C]
        _LAYER_PARAMS,  # ln2_w
        _LAYER_PARAMS,  # ln2_b
        layer_tiles,  # w_fc [L, tiles of 4C x C]
        layer_tiles,  # w_out [L, tiles of C x 4C]
        _PARAM,  # ln_f_w
        _PARAM,  # ln_f_b
        tiles,  # w_head: tiles of V x C
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
        _ROWS,  # matvec scratch [4, TILE]
    )


@numba.njit(
    [_decode_signature(_F32), _decode_signature(nt.uint16)],
    cache=True,
    nogil=True,
    boundscheck=False,
    fastmath=_FASTMATH,
    error_model="numpy",  # no ZeroDivisionError branch per division: those stop vectorising
)
def decode_small_batch(
    tokens, lengths, wte, pe, ln1_w, ln1_b, w_qkv, w_proj, ln2_w, ln2_b, w_fc, w_out,
    ln_f_w, ln_f_b, w_head, gelu_consts, kv, x, h, qkv, y, f, scores, head_acc, logits, scratch,
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
        _tiles_matvec(h, w_qkv[layer], qkv, scratch)
        attend_one_token(qkv, kv[layer], lengths, y, scores, head_acc)
        _tiles_matvec(y, w_proj[layer], h, scratch)
        x += h
        layernorm(x, ln2_w[layer], ln2_b[layer], h)
        _tiles_matvec(h, w_fc[layer], f, scratch)
        _gelu_rows(f, p, c_over_p, b1, b2, b3, b4)
        _tiles_matvec(f, w_out[layer], h, scratch)
        x += h
    layernorm(x, ln_f_w, ln_f_b, h)
    _tiles_matvec(h, w_head, logits, scratch)

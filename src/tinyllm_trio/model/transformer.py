"""TinyLLM in numpy: the seed's decoder-only transformer, a KV cache, and batched decoding.

The architecture is exactly the original project's (so its released weights load unchanged):

    x = token_embedding[ids] + pe[positions]              # sinusoidal, absolute positions
    for each of n_layer blocks (pre-LayerNorm):
        x = x + proj(concat_h softmax(q_h k_h^T * scale + causal_mask) v_h)   # on ln1(x)
        x = x + W2 gelu(W1 ln2(x))                       # exact (erf) GELU, 4x expansion
    logits = lm_head(ln_f(x))                            # untied head

No linear layer has a bias; LayerNorms have weight and bias, eps 1e-5. Everything is float32.

The attention scale is part of the config: "head" is the textbook 1/sqrt(head_size); "embd" is
1/sqrt(n_embd), which is what the original weights were trained with (its C++ server used
1/sqrt(head_size), which does not match its own training; we let a checkpoint say which it needs).

Serving shape (continuous batching, see model/batching.py): a worker owns one `KVCache` with a
fixed number of slots. `prefill` adds a sequence and runs its prompt in one pass; `decode_step`
advances every listed sequence by one token in one batched call, whatever their lengths;
`KVCache.drop` frees a slot. Sequences join and leave between steps.

How the decode step stays cheap (llama2.c's "run state" idea, in numpy):
- the cache and every activation buffer are allocated once, in `KVCache`, for `capacity` rows
  (the cache on transparent huge pages: a step reads every sequence's keys and values);
- active sequences are kept compacted in cache rows 0..n-1, so a step over all of them reads the
  cache through slices (views), never a gathered copy; dropping a sequence moves the last row
  into the hole (one copy of its used positions, once per finished sequence, not per step);
- Q, K and V of all heads come from one [C, 3C] matmul (the scale is folded into W_q);
  attention for the new token of every sequence is one compiled pass (`model/kernels.py`,
  numba): it stores the token's key and value, reads each sequence's cached keys and values
  only up to its own length (no padding, no mask) with all heads streaming from memory at once,
  and applies an exact softmax (numpy's stacked matmuls waited on one (sequence, head) block
  of the cache at a time);
- LayerNorm is one compiled call over all rows (numpy took ~9 passes over short rows), and so
  is the exact-erf GELU (`kernels.gelu`: one vectorised pass where numpy needs 19, see
  `gelu_`, kept as its reference); a batch-32 step is
  dominated by the weight matmuls, then by reading the KV cache from memory;
- the LM head is one matmul. BLAS threads are the caller's business (a worker runs one per core;
  set OPENBLAS_NUM_THREADS=1 before numpy is imported, as the worker and the bench do).

Up to `FUSED_MAX_BATCH` sequences (64), a step is instead one compiled call for all layers
(`kernels.decode_small_batch`, over copies of the matrices in tiles of 64 outputs,
`kernels.tile_weights`): at small batches the ~90 numpy and BLAS calls of the step above cost
more in dispatch and in BLAS's small-matrix paths than the arithmetic, and its hand-written
vector products beat BLAS up to about 48 sequences. The numpy path stays the reference the
tests hold it to (`fused_max_batch = 0` selects it on a model). With `weights_format`
"bfloat16" the weights are rounded once and the compiled step reads 16-bit tiles.
"""

from __future__ import annotations

import math
import mmap
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np

from tinyllm_trio.errors import ContextLengthError

__all__ = [
    "CacheFullError",
    "ContextLengthError",
    "KVCache",
    "ModelConfig",
    "Transformer",
    "expected_shapes",
]

_F32 = np.float32
# Decode steps of up to this many sequences run as one compiled call
# (`kernels.decode_small_batch`); larger ones as BLAS matmuls around compiled kernels. Its
# tiled matvecs beat BLAS by 1.6x at 12 sequences, 1.2x at 32 and break even at 64
# (`tinyllm-trio bench model --compare-numpy --batches ...` measures both).
FUSED_MAX_BATCH = 64


class CacheFullError(RuntimeError):
    """`prefill` found no free slot in the KV cache (drop a finished sequence first)."""


@dataclass(frozen=True)
class ModelConfig:
    """Dimensions of the model; the defaults are the seed's TinyLLM (3,913,344 parameters)."""

    vocab_size: int = 3266
    n_embd: int = 192
    n_head: int = 6
    n_layer: int = 6
    max_context: int = 512
    attention_scale: str = "head"  # "head" -> 1/sqrt(n_embd/n_head), "embd" -> 1/sqrt(n_embd)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_embd", "n_head", "n_layer", "max_context"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"ModelConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.n_embd % 2:
            raise ValueError(f"ModelConfig.n_embd must be even (sin/cos pairs), got {self.n_embd}")
        if self.attention_scale not in ("head", "embd"):
            raise ValueError(
                f"ModelConfig.attention_scale must be 'head' or 'embd', "
                f"got {self.attention_scale!r}"
            )

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def scale(self) -> float:
        """The factor applied to q.k before the softmax."""
        dim = self.head_size if self.attention_scale == "head" else self.n_embd
        return 1.0 / math.sqrt(dim)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> ModelConfig:
        """Build from `to_dict()` output; unknown keys are an error (a typo must not pass)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {unknown} (known: {sorted(known)})")
        return cls(**dict(d))


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical tensor names and shapes (PyTorch [out, in] layout), as the original release."""
    V, C, H, hs = config.vocab_size, config.n_embd, config.n_head, config.head_size
    shapes: dict[str, tuple[int, ...]] = {"token_embedding.weight": (V, C)}
    for layer in range(config.n_layer):
        p = f"blocks.{layer}"
        for h in range(H):
            for kind in ("key", "query", "value"):
                shapes[f"{p}.sa.heads.{h}.{kind}.weight"] = (hs, C)
        shapes[f"{p}.sa.proj.weight"] = (C, C)
        shapes[f"{p}.ffwd.net.0.weight"] = (4 * C, C)
        shapes[f"{p}.ffwd.net.2.weight"] = (C, 4 * C)
        for ln in ("ln1", "ln2"):
            shapes[f"{p}.{ln}.weight"] = (C,)
            shapes[f"{p}.{ln}.bias"] = (C,)
    shapes["ln_f.weight"] = (C,)
    shapes["ln_f.bias"] = (C,)
    shapes["lm_head.weight"] = (V, C)
    return shapes


def sinusoidal_positions(max_context: int, n_embd: int) -> np.ndarray:
    """pe[p, 2i] = sin(p / 10000^(2i/C)), pe[p, 2i+1] = cos(same); [T, C] float32."""
    pos = np.arange(max_context, dtype=np.float64)[:, None]  # (T, 1)
    inv_freq = 10000.0 ** (-np.arange(0, n_embd, 2, dtype=np.float64) / n_embd)  # (C/2,)
    pe = np.empty((max_context, n_embd), dtype=np.float64)
    pe[:, 0::2] = np.sin(pos * inv_freq)
    pe[:, 1::2] = np.cos(pos * inv_freq)
    return pe.astype(_F32)


# Exact-erf GELU without scipy: gelu(x) = x * Phi(x) = relu(x) - |x|/2 * erfc(|x|/sqrt(2)).
# erfc(s) for s >= 0 by Abramowitz & Stegun 7.1.26: t = 1/(1 + p s),
# erfc(s) = t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-s^2), absolute error <= 1.5e-7,
# i.e. below float32 resolution of Phi. Evaluated as: the 1/2 folded into the coefficients; t
# scaled by c = a5^(1/5), tc = c t = (c/p') / (1/p' + |x|) with p' = p/sqrt2 (two passes), so
# that the polynomial in tc is monic (one pass fewer): a_i t^i = (a_i / c^i) tc^i.
_AS_P = 0.3275911 / math.sqrt(2.0)  # applied to |x| rather than |x|/sqrt(2)
_AS_A = tuple(0.5 * a for a in (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429))
_AS_C = _AS_A[4] ** 0.2
_AS_B = tuple(a / _AS_C ** (i + 1) for i, a in enumerate(_AS_A[:4]))  # b1..b4, b5 = 1


def gelu_(x: np.ndarray, t: np.ndarray, u: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU of `x` in place; t, u, acc are scratch arrays of x's shape. The
    reference for the compiled `kernels.gelu`, which the model runs (the same evaluation in
    one vectorised pass).

    Every step is one in-place numpy pass over the FFN hidden layer (B x 4C per layer, the
    largest elementwise work of a decode step), so the pass count and each pass's cost matter:
    19 passes; 1/t is a np.divide (np.reciprocal has no SIMD float32 loop in numpy's builds)
    and relu(x) is (x + |x|) / 2, exact in float32, instead of np.maximum(x, 0), which is
    slower than an add."""
    b1, b2, b3, b4 = _AS_B
    np.abs(x, out=u)  # |x|
    np.add(u, 1.0 / _AS_P, out=t)
    np.divide(_AS_C / _AS_P, t, out=t)  # tc = c / (1 + p |x|/sqrt2)
    np.add(t, b4, out=acc)
    acc *= t
    acc += b3
    acc *= t
    acc += b2
    acc *= t
    acc += b1
    acc *= t  # erfc(|x|/sqrt2) / 2 without the exp factor
    np.multiply(x, -0.5, out=t)
    t *= x
    np.exp(t, out=t)  # exp(-x^2/2)
    acc *= t
    acc *= u  # |x|/2 * erfc(|x|/sqrt2)
    x += u
    x *= 0.5  # relu(x), exactly
    x -= acc
    return x


def _linear(x: np.ndarray, w: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """x @ w (into `out`): a function of its own so that a profile (`bench model --breakdown`)
    can tell the weight matmuls apart, np.matmul being a ufunc, which profilers do not see."""
    return np.matmul(x, w, out=out)


def _softmax_(a: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Softmax over the last axis of `a`, in place; m is scratch of shape a.shape[:-1] + (1,).
    Rows may hold -inf (masked), never only -inf."""
    np.max(a, axis=-1, keepdims=True, out=m)
    a -= m
    np.exp(a, out=a)
    np.add.reduce(a, axis=-1, keepdims=True, out=m)
    a /= m
    return a


WEIGHTS_FORMATS = ("float32", "bfloat16")


def round_to_bfloat16(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), as float32: the upper 16
    bits of each are its bfloat16. Raises ValueError for a value that is not finite before or
    after (a weight beyond bfloat16's range)."""
    a = np.ascontiguousarray(a, dtype=_F32)
    if not np.isfinite(a).all():
        raise ValueError("cannot round non-finite weights to bfloat16")
    bits = a.view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    out = bits.astype(np.uint32).view(_F32).reshape(a.shape)
    if not np.isfinite(out).all():
        raise ValueError("a weight is beyond bfloat16's range")
    return out


def _zeros_hugepages(shape: tuple[int, ...]) -> np.ndarray:
    """A zeroed float32 array in its own anonymous mapping, with transparent huge pages asked
    for: the decode step reads the KV cache of every sequence every step, and 2 MiB pages cut
    its TLB misses. Pages are still committed lazily by the kernel, as with np.zeros."""
    nbytes = max(int(np.prod(shape)) * 4, 1)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(buf, dtype=_F32, count=int(np.prod(shape))).reshape(shape)


def _hugepage_copies(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Read-only copies of `arrays` (each keeps its dtype), all in one mapping with transparent
    huge pages asked for. Every decode step reads every weight (13 MB for the default model),
    which in 4 KiB pages is ~3,300 pages, more than the TLB holds, so each step walks page
    tables again (nested ones in a VM); in 2 MiB pages it is 7."""
    offsets, total = {}, 0
    for name, a in arrays.items():
        offsets[name] = total
        total += -(-a.nbytes // 64) * 64  # each array starts on a 64-byte boundary
    arena = _zeros_hugepages((max(total // 4, 1),)).view(np.uint8)
    out = {}
    for name, a in arrays.items():
        a = np.asarray(a)
        view = arena[offsets[name] : offsets[name] + a.nbytes].view(a.dtype).reshape(a.shape)
        view[...] = a
        view.flags.writeable = False
        out[name] = view
    return out


class _Layer:
    """One block's weights, fused and transposed for x @ W (rows of x are positions)."""

    __slots__ = (
        "ln1_b",
        "ln1_w",
        "ln2_b",
        "ln2_w",
        "w_fc",
        "w_out",
        "w_out_rows",
        "w_proj",
        "w_qkv",
    )

    DERIVED = ("w_qkv", "w_proj", "w_fc", "w_out")  # built here from the canonical weights

    def __init__(self, weights: Mapping[str, np.ndarray], layer: int, config: ModelConfig):
        p = f"blocks.{layer}"
        H = config.n_head

        def heads(kind: str) -> np.ndarray:  # H x [hs, C] -> [C, H*hs], head h in columns h*hs..
            return np.concatenate([weights[f"{p}.sa.heads.{h}.{kind}.weight"] for h in range(H)]).T

        q = heads("query") * _F32(config.scale)  # the attention scale folded into W_q
        self.w_qkv = np.ascontiguousarray(np.concatenate([q, heads("key"), heads("value")], axis=1))
        self.w_proj = np.ascontiguousarray(weights[f"{p}.sa.proj.weight"].T)  # (C, C)
        self.w_fc = np.ascontiguousarray(weights[f"{p}.ffwd.net.0.weight"].T)  # (C, 4C)
        self.w_out = np.ascontiguousarray(weights[f"{p}.ffwd.net.2.weight"].T)  # (4C, C)
        # the canonical (C, 4C) array, no copy: for one row, BLAS's gemv runs the down
        # projection faster from this layout (f @ w_out_rows.T)
        self.w_out_rows = weights[f"{p}.ffwd.net.2.weight"]
        self.ln1_w, self.ln1_b = weights[f"{p}.ln1.weight"], weights[f"{p}.ln1.bias"]
        self.ln2_w, self.ln2_b = weights[f"{p}.ln2.weight"], weights[f"{p}.ln2.bias"]


class KVCache:
    """Keys/values and decode run state for up to `capacity` sequences, allocated once.

    kv: [n_layer, capacity, 2, n_head, max_context, head_size] (k and v are views of its keys
    and values), so one row's keys and values of a layer are contiguous. Active sequences
    occupy rows 0..len-1 (compacted); `_rows[seq_id]` is a sequence's row and `lengths[row]`
    its token count. Positions at or beyond a row's length hold stale data and are never read.

    Rows no active sequence uses may be *parked*: they keep the keys and values of a finished
    sequence's first tokens under a key (the prefix cache, `model/prefix_cache.py`), in LRU
    order. Parked rows never cost an active sequence its row: adding one takes row len(self)
    as always, moving the entry parked there to a free row or, with none free, evicting the
    least recently used entry.
    Memory: 4.7 MB per slot for the default model (capacity 32 -> 151 MB), committed by the
    kernel as slots are first used.
    """

    def __init__(self, config: ModelConfig, capacity: int):
        if capacity < 1:
            raise ValueError(f"KVCache capacity must be >= 1, got {capacity}")
        L, H, T, hs, C = (
            config.n_layer,
            config.n_head,
            config.max_context,
            config.head_size,
            config.n_embd,
        )
        self.config = config
        self.capacity = capacity
        self.kv = _zeros_hugepages((L, capacity, 2, H, T, hs))  # keys [:, :, 0], values [:, :, 1]
        self.k, self.v = self.kv[:, :, 0], self.kv[:, :, 1]  # views
        self.lengths = np.zeros(capacity, dtype=np.int64)
        self._rows: dict[Hashable, int] = {}
        self._ids: list[Hashable] = []  # row -> seq_id, rows 0..len-1
        self._parked: OrderedDict[Hashable, int] = OrderedDict()  # key -> row, LRU first
        self._parked_at: dict[int, Hashable] = {}  # row -> key
        # decode run state (rows 0..B-1 used in a step of B sequences)
        self.x = np.zeros((capacity, C), dtype=_F32)  # residual stream
        self.h = np.zeros((capacity, C), dtype=_F32)  # LayerNorm output
        self.qkv = np.zeros((capacity, 3 * C), dtype=_F32)
        self.y = np.zeros((capacity, C), dtype=_F32)  # attention output, heads concatenated
        self.ff = np.zeros((capacity, 4 * C), dtype=_F32)  # FFN hidden layer
        self.scores = np.zeros((H, T), dtype=_F32)  # attention kernel scratch
        self.head_acc = np.zeros((H, hs), dtype=_F32)
        from tinyllm_trio.model.kernels import TILE, TILE_ROWS  # numba: model processes only

        self.tiles_out = np.zeros((TILE_ROWS, TILE), dtype=_F32)  # the compiled matvec's scratch

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._rows

    @property
    def seq_ids(self) -> tuple[Hashable, ...]:
        """Active sequences, in cache-row order."""
        return tuple(self._ids)

    def length(self, seq_id: Hashable) -> int:
        """Tokens held for `seq_id` (prompt + decoded); KeyError if it is not in the cache."""
        return int(self.lengths[self._row(seq_id)])

    def drop(self, seq_id: Hashable) -> None:
        """Free the slot of `seq_id` (no-op if absent); the last row moves into the hole."""
        row = self._rows.pop(seq_id, None)
        if row is None:
            return
        last = len(self._ids) - 1
        if row != last:
            self._copy_row(last, row)
            moved = self._ids[last]
            self._ids[row] = moved
            self._rows[moved] = row
        self._ids.pop()
        self.lengths[last] = 0

    def park(self, seq_id: Hashable, key: Hashable, keep: int) -> None:
        """End `seq_id` like `drop`, but keep its first `keep` tokens in a row no active
        sequence uses, under `key` (most recently used). The number of active rows shrinks
        by one, so a row is always there for it: no entry is evicted by parking."""
        row = self._row(seq_id)
        keep = min(int(keep), int(self.lengths[row]))
        if key in self._parked or key in self._rows:
            raise ValueError(f"key {key!r} is already in the KV cache")
        if keep < 1:
            self.drop(seq_id)
            return
        last = len(self._ids) - 1
        if row != last:
            free = self._free_row()
            if free is not None:
                self._copy_prefix(row, free, keep)
                self.drop(seq_id)
                self._set_parked(key, free, keep)
                return
            self._swap_rows(row, last)
        self._rows.pop(seq_id)
        self._ids.pop()
        self._set_parked(key, last, keep)

    def parked_length(self, key: Hashable) -> int | None:
        """Tokens parked under `key`, or None if it is not (or no longer) parked."""
        row = self._parked.get(key)
        return None if row is None else int(self.lengths[row])

    @property
    def parked_keys(self) -> tuple[Hashable, ...]:
        """Parked entries, least recently used first."""
        return tuple(self._parked)

    def evict(self, key: Hashable) -> None:
        """Forget a parked entry (no-op if absent); its row is free again."""
        row = self._parked.pop(key, None)
        if row is not None:
            del self._parked_at[row]
            self.lengths[row] = 0

    def claim(self, seq_id: Hashable, source: Hashable | None = None, length: int = 0) -> int:
        """Add `seq_id` holding the first `length` tokens of `source` (an active sequence or
        a parked key; it becomes the most recently used); returns the tokens held (0 when
        there is no such source). Only a prefix the source holds may be asked for."""
        src: int | None = None
        if source is not None and length > 0:
            if source in self._rows:
                src = self._rows[source]
            elif source in self._parked:
                self._parked.move_to_end(source)
                src = self._parked[source]
        if src is not None and length > int(self.lengths[src]):
            raise ValueError(f"{source!r} holds {int(self.lengths[src])} tokens, not {length}")
        # A source parked where the new row goes is moved away by `_add` (or, the only entry
        # with no free row, evicted); its tokens stay in place, so nothing is copied back.
        in_place = src is not None and src == len(self._ids)
        row = self._add(seq_id)
        if src is None:
            return 0
        if in_place:
            self.lengths[row] = length
        else:
            self._copy_prefix(self._rows.get(source, self._parked.get(source)), row, length)
        return length

    def _set_parked(self, key: Hashable, row: int, length: int) -> None:
        self._parked[key] = row
        self._parked_at[row] = key
        self.lengths[row] = length

    def _free_row(self) -> int | None:
        """A row neither active nor parked, if there is one."""
        for row in range(len(self._ids), self.capacity):
            if row not in self._parked_at:
                return row
        return None

    def _vacate(self, row: int) -> None:
        """Make the (inactive) `row` free for a new active sequence: its parked entry moves
        to a free row, or over the least recently used entry, which is evicted."""
        key = self._parked_at.get(row)
        if key is None:
            return
        dst = self._free_row()
        if dst is None:
            victim = next(iter(self._parked))
            if victim == key:
                self.evict(key)
                return
            dst = self._parked[victim]
            self.evict(victim)
        n = int(self.lengths[row])
        self._copy_prefix(row, dst, n)
        del self._parked_at[row]
        self._parked[key] = dst
        self._parked_at[dst] = key
        self.lengths[dst] = n
        self.lengths[row] = 0

    def _copy_prefix(self, src: int, dst: int, n: int) -> None:
        self.kv[:, dst, :, :, :n] = self.kv[:, src, :, :, :n]
        self.lengths[dst] = n

    def _row(self, seq_id: Hashable) -> int:
        try:
            return self._rows[seq_id]
        except KeyError:
            raise KeyError(f"sequence {seq_id!r} is not in the KV cache") from None

    def _add(self, seq_id: Hashable) -> int:
        if seq_id in self._rows:
            raise ValueError(f"sequence {seq_id!r} is already in the KV cache")
        if len(self._ids) >= self.capacity:
            raise CacheFullError(
                f"KV cache is full ({self.capacity} sequences); drop one before adding another"
            )
        row = len(self._ids)
        self._vacate(row)
        self._ids.append(seq_id)
        self._rows[seq_id] = row
        self.lengths[row] = 0
        return row

    def _copy_row(self, src: int, dst: int) -> None:
        n = int(self.lengths[src])
        self.kv[:, dst, :, :, :n] = self.kv[:, src, :, :, :n]
        self.lengths[dst] = n

    def _swap_rows(self, a: int, b: int) -> None:
        n = int(max(self.lengths[a], self.lengths[b]))
        tmp = self.kv[:, a, :, :, :n].copy()
        self.kv[:, a, :, :, :n] = self.kv[:, b, :, :, :n]
        self.kv[:, b, :, :, :n] = tmp
        self.lengths[[a, b]] = self.lengths[[b, a]]
        sa, sb = self._ids[a], self._ids[b]
        self._ids[a], self._ids[b] = sb, sa
        self._rows[sa], self._rows[sb] = b, a


class Transformer:
    """The TinyLLM forward pass: full-sequence (`forward`, `prefill`) and batched one-token
    (`decode_step`) over a `KVCache`."""

    def __init__(
        self,
        config: ModelConfig,
        weights: Mapping[str, np.ndarray],
        *,
        weights_format: str = "float32",
    ):
        """`weights_format` "bfloat16" rounds every weight to bfloat16 first (`round_to_bfloat16`)
        and has the compiled step read its matrices as 16-bit tiles: half the bytes a step
        streams, for the same arithmetic on the rounded values on every path."""
        if weights_format not in WEIGHTS_FORMATS:
            raise ValueError(
                f"weights_format must be one of {WEIGHTS_FORMATS}, got {weights_format!r}"
            )
        expected = expected_shapes(config)
        missing = [n for n in expected if n not in weights]
        extra = sorted(set(weights) - set(expected))
        if missing or extra:
            raise ValueError(f"weights do not match the config: missing {missing}, extra {extra}")
        for name, shape in expected.items():
            if (got := np.shape(weights[name])) != shape:
                raise ValueError(f"weight {name}: expected shape {shape}, got {got}")
        # Imported here, not at the top: the server process imports this module for ModelConfig
        # and the errors; only processes that run the model load numba (seconds, tens of MB).
        from tinyllm_trio.model import kernels

        self._kernels = kernels
        # our own float32 copies, in huge pages like everything a decode step reads
        bf16 = weights_format == "bfloat16"
        own = {name: np.asarray(weights[name], dtype=_F32) for name in expected}
        canonical = _hugepage_copies(
            {n: round_to_bfloat16(w) for n, w in own.items()} if bf16 else own
        )
        self.weights_format = weights_format
        self.config = config
        self._canonical = canonical
        self.wte = canonical["token_embedding.weight"]  # (V, C)
        self.layers = [_Layer(canonical, i, config) for i in range(config.n_layer)]
        self.ln_f_w, self.ln_f_b = canonical["ln_f.weight"], canonical["ln_f.bias"]
        derived = {"pe": sinusoidal_positions(config.max_context, config.n_embd)}  # (T, C)
        derived["w_head"] = canonical["lm_head.weight"].T  # (C, V)
        for i, layer in enumerate(self.layers):
            derived.update({f"{i}.{n}": getattr(layer, n) for n in _Layer.DERIVED})
        if bf16:  # the query weights with the attention scale folded in: rounded again
            derived = {n: w if n == "pe" else round_to_bfloat16(w) for n, w in derived.items()}
        derived = _hugepage_copies(derived)  # C-contiguous copies, as x @ W wants them
        self.pe, self.w_head = derived["pe"], derived["w_head"]
        for i, layer in enumerate(self.layers):
            for n in _Layer.DERIVED:
                setattr(layer, n, derived[f"{i}.{n}"])

        # the compiled small-batch step reads each matrix in tiles of 64 outputs
        # (`kernels.tile_weights`), layers stacked
        def tiles(w: np.ndarray) -> np.ndarray:
            return kernels.tile_weights(w, bfloat16=bf16)

        stacked = {
            "ln1_w": [layer.ln1_w for layer in self.layers],
            "ln1_b": [layer.ln1_b for layer in self.layers],
            "w_qkv": [tiles(layer.w_qkv.T) for layer in self.layers],
            "w_proj": [tiles(layer.w_proj.T) for layer in self.layers],
            "ln2_w": [layer.ln2_w for layer in self.layers],
            "ln2_b": [layer.ln2_b for layer in self.layers],
            "w_fc": [tiles(layer.w_fc.T) for layer in self.layers],
            "w_out": [tiles(layer.w_out_rows) for layer in self.layers],
        }
        rows = _hugepage_copies(
            {**{n: np.stack(a) for n, a in stacked.items()}, "w_head": tiles(self.w_head.T)}
        )
        self._gelu_consts = np.array([_AS_P, _AS_C / _AS_P, *_AS_B], dtype=_F32)
        # decode_small_batch's arguments after the tokens and positions, in its order
        self._fused_weights = (
            self.wte, self.pe, rows["ln1_w"], rows["ln1_b"], rows["w_qkv"], rows["w_proj"],
            rows["ln2_w"], rows["ln2_b"], rows["w_fc"], rows["w_out"], self.ln_f_w, self.ln_f_b,
            rows["w_head"], self._gelu_consts,
        )  # fmt: skip
        self.fused_max_batch = FUSED_MAX_BATCH

    @classmethod
    def random(
        cls,
        config: ModelConfig,
        seed: int = 0,
        *,
        std: float = 0.02,
        weights_format: str = "float32",
    ) -> Transformer:
        """Random weights (normal(0, std) matrices, LayerNorms near identity), for tests and
        benchmarks. A larger `std` (e.g. 0.2) gives peaked attention, which tests prefer."""
        rng = np.random.default_rng(seed)
        weights = {}
        for name, shape in expected_shapes(config).items():
            if name.endswith(".bias"):
                w = 0.1 * rng.standard_normal(shape)
            elif len(shape) == 1:  # LayerNorm weight
                w = 1.0 + 0.1 * rng.standard_normal(shape)
            else:
                w = std * rng.standard_normal(shape)
            weights[name] = w.astype(_F32)
        return cls(config, weights, weights_format=weights_format)

    def weights(self) -> dict[str, np.ndarray]:
        """The canonical tensors (original names, [out, in] layout), read-only float32."""
        return dict(self._canonical)

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.config, capacity)

    # ---- full sequence: forward() and prefill() -------------------------------------------

    def forward(self, ids: Sequence[int]) -> np.ndarray:
        """Logits [T, V] for every position of `ids`, without a cache (causal)."""
        ids = self._check_ids(ids)
        cfg = self.config
        k = np.empty((cfg.n_layer, cfg.n_head, len(ids), cfg.head_size), dtype=_F32)
        v = np.empty_like(k)
        return self._run_sequences(ids, [(0, len(ids))], [k], [v], last_only=False)

    def prefill(self, cache: KVCache, seq_id: Hashable, ids: Sequence[int]) -> np.ndarray:
        """Add `seq_id` to `cache`, run its prompt in one pass, return the last logits [V]."""
        return self.prefill_many(cache, [(seq_id, ids)])[0]

    def prefill_many(
        self,
        cache: KVCache,
        prompts: Sequence[tuple[Hashable, Sequence[int]]],
        *,
        every_position: bool = False,
    ) -> np.ndarray:
        """Add several sequences to `cache` and run all their prompts in one pass; returns each
        one's last logits [len(prompts), V], in the order given, or with `every_position` the
        logits of every prompt position, concatenated [sum of lengths, V] (what prompt
        logprobs are computed from: the prefill's own logits, no second pass).

        The linear layers (most of the work) run once over every prompt's tokens together,
        which is much faster than one pass per short prompt; attention stays per sequence.
        Validation happens before any state changes; if the pass fails, none is added.
        """
        self._check_cache(cache)
        checked = [(seq_id, self._check_ids(ids)) for seq_id, ids in prompts]
        new_ids = [seq_id for seq_id, _ in checked]
        if len(set(new_ids)) != len(new_ids):
            raise ValueError("prefill_many got the same sequence twice")
        if len(cache) + len(checked) > cache.capacity:
            raise CacheFullError(
                f"KV cache is full ({cache.capacity} sequences); drop one before adding another"
            )
        if not checked:
            return np.empty((0, self.config.vocab_size), dtype=_F32)
        added: list[Hashable] = []
        try:
            for seq_id in new_ids:
                cache._add(seq_id)
                added.append(seq_id)
            return self._extend(cache, checked, last_only=not every_position)
        except BaseException:
            for seq_id in added:
                cache.drop(seq_id)
            raise

    def extend_many(
        self, cache: KVCache, prompts: Sequence[tuple[Hashable, Sequence[int]]]
    ) -> np.ndarray:
        """Like `prefill_many`, for sequences already in `cache` holding the first tokens of
        their prompt (`KVCache.claim` copied a cached prefix): only the rest is computed, with
        attention over the held part. Returns each one's last logits. At least the prompt's
        last token must be left to compute (its logits are the answer). If the pass fails,
        the sequences are left holding what they held before."""
        self._check_cache(cache)
        checked = [(seq_id, self._check_ids(ids)) for seq_id, ids in prompts]
        for seq_id, ids in checked:
            if cache.length(seq_id) >= len(ids):
                raise ValueError(f"sequence {seq_id!r} already holds its whole prompt")
        if len({seq_id for seq_id, _ in checked}) != len(checked):
            raise ValueError("extend_many got the same sequence twice")
        if not checked:
            return np.empty((0, self.config.vocab_size), dtype=_F32)
        return self._extend(cache, checked)

    def _extend(
        self,
        cache: KVCache,
        checked: Sequence[tuple[Hashable, np.ndarray]],
        *,
        last_only: bool = True,
    ) -> np.ndarray:
        rows = [cache._row(seq_id) for seq_id, _ in checked]
        past = [int(cache.lengths[r]) for r in rows]
        totals = [len(ids) for _, ids in checked]
        new = [t - p for t, p in zip(totals, past, strict=True)]
        ends = np.cumsum(new).tolist()
        bounds = [(end - n, end) for end, n in zip(ends, new, strict=True)]
        logits = self._run_sequences(
            np.concatenate([ids[p:] for (_, ids), p in zip(checked, past, strict=True)]),
            bounds,
            [cache.k[:, r, :, :t] for r, t in zip(rows, totals, strict=True)],
            [cache.v[:, r, :, :t] for r, t in zip(rows, totals, strict=True)],
            last_only=last_only,
            past=past,
        )
        for r, t in zip(rows, totals, strict=True):
            cache.lengths[r] = t
        return logits

    def _run_sequences(
        self,
        ids: np.ndarray,
        bounds: Sequence[tuple[int, int]],
        k_out: Sequence[np.ndarray],
        v_out: Sequence[np.ndarray],
        *,
        last_only: bool,
        past: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Causal pass over sequences given concatenated (`ids`, each at bounds[j] = (start,
        end)); writes sequence j's K, V [n_layer, H, T_j, hs] into k_out[j], v_out[j]. Returns
        logits for every position, or (last_only) for each sequence's last one. With `past`,
        sequence j's first past[j] keys and values are already in k_out[j], v_out[j] (which
        then span past[j] + T_j positions) and its ids start at position past[j]."""
        cfg, kern = self.config, self._kernels
        N, C, H, hs = len(ids), cfg.n_embd, cfg.n_head, cfg.head_size
        if past is None:
            past = [0] * len(bounds)
        positions = np.concatenate(
            [np.arange(p, p + end - start) for (start, end), p in zip(bounds, past, strict=True)]
        )
        x = self.wte[ids] + self.pe[positions]  # (N, C)
        h, y = np.empty_like(x), np.empty_like(x)
        longest = max(end - start for start, end in bounds)
        att_max = np.empty((H, longest, 1), dtype=_F32)
        ff = np.empty((N, 4 * C), dtype=_F32)
        span = max(end - start + p for (start, end), p in zip(bounds, past, strict=True))
        causal = np.triu(np.full((span, span), -np.inf, dtype=_F32), k=1)
        for i, layer in enumerate(self.layers):
            kern.layernorm(x, layer.ln1_w, layer.ln1_b, h)
            qkv = (h @ layer.w_qkv).reshape(N, 3, H, hs)
            for (start, end), p, k, v in zip(bounds, past, k_out, v_out, strict=True):
                T = end - start
                q = qkv[start:end, 0].transpose(1, 0, 2)  # (H, T, hs), already scaled
                k[i, :, p:] = qkv[start:end, 1].transpose(1, 0, 2)
                v[i, :, p:] = qkv[start:end, 2].transpose(1, 0, 2)
                att = q @ k[i].transpose(0, 2, 1)  # (H, T, p + T)
                att += causal[p : p + T, : p + T]
                _softmax_(att, att_max[:, :T])
                y[start:end] = (att @ v[i]).transpose(1, 0, 2).reshape(T, C)
            x += y @ layer.w_proj
            kern.layernorm(x, layer.ln2_w, layer.ln2_b, h)
            f = np.matmul(h, layer.w_fc, out=ff)  # (N, 4C)
            kern.gelu(f, self._gelu_consts)
            x += f @ layer.w_out
        if last_only:
            last = [end - 1 for _, end in bounds]
            x, h = x[last], h[: len(last)]
        kern.layernorm(x, self.ln_f_w, self.ln_f_b, h)
        return h @ self.w_head  # (N or len(bounds), V)

    # ---- one token for each of a batch of sequences ----------------------------------------

    def decode_step(
        self, cache: KVCache, seq_ids: Sequence[Hashable], token_ids: Sequence[int]
    ) -> np.ndarray:
        """Append token_ids[i] to sequence seq_ids[i] for every i, in one batched pass.

        Returns fresh logits [len(seq_ids), V] for the position after each appended token, rows
        in the order given. Validation happens before any state changes: unknown sequence ->
        KeyError, duplicate sequence / bad token id / length mismatch -> ValueError, a sequence
        already holding max_context tokens -> ContextLengthError. Listing every active sequence
        (in any order) is the fast path; a subset is fine but first moves rows so the listed
        ones occupy the leading rows (a copy of those rows' used cache, only when the set changes).
        """
        self._check_cache(cache)
        B = len(seq_ids)
        if len(token_ids) != B:
            raise ValueError(f"decode_step got {B} sequences but {len(token_ids)} tokens")
        V = self.config.vocab_size
        if B == 0:
            return np.empty((0, V), dtype=_F32)
        rows = [cache._row(s) for s in seq_ids]
        if len(set(rows)) != B:
            raise ValueError("decode_step got the same sequence twice")
        tokens = np.asarray(token_ids)
        if tokens.dtype.kind not in "iu" or tokens.ndim != 1:
            raise ValueError("token ids must be a sequence of ints")
        # plain Python over a few items: numpy's reductions cost microseconds a call, a visible
        # share of a one-sequence step
        small = B <= 16
        lo, hi = (min(token_ids), max(token_ids)) if small else (tokens.min(), tokens.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"token id out of range [0, {V}): {tokens.tolist()}")
        limit, lengths = self.config.max_context, cache.lengths
        if small:
            full = [s for s, r in zip(seq_ids, rows, strict=True) if lengths[r] >= limit]
        else:
            at_limit = lengths[rows] >= limit
            full = [s for s, hit in zip(seq_ids, at_limit, strict=True) if hit]
        if full:
            raise ContextLengthError(
                f"sequence {full[0]!r} already holds max_context={self.config.max_context} tokens"
            )
        if max(rows) >= B:  # bring the listed sequences into rows 0..B-1
            taken = set(rows)
            free = iter([r for r in range(B) if r not in taken])  # unlisted rows in front
            for i, r in enumerate(rows):
                if r >= B:
                    dst = next(free)
                    cache._swap_rows(r, dst)
                    rows[i] = dst
        if rows == list(range(B)):
            return self._decode_rows(cache, tokens)
        by_row = np.empty_like(tokens)
        by_row[rows] = tokens
        return self._decode_rows(cache, by_row)[rows]

    def _decode_rows(self, cache: KVCache, tokens: np.ndarray) -> np.ndarray:
        """One token for each of cache rows 0..B-1 (tokens in row order); logits [B, V]."""
        B, kern = len(tokens), self._kernels
        pos = cache.lengths[:B]  # (B,) position of the new token = tokens held so far
        x, h, qkv, y = cache.x[:B], cache.h[:B], cache.qkv[:B], cache.y[:B]
        f = cache.ff[:B]
        if self.fused_max_batch >= B:
            logits = np.empty((B, self.config.vocab_size), dtype=_F32)
            kern.decode_small_batch(
                np.ascontiguousarray(tokens, dtype=np.int64), pos, *self._fused_weights,
                cache.kv, x, h, qkv, y, f, cache.scores, cache.head_acc, logits, cache.tiles_out,
            )  # fmt: skip
            cache.lengths[:B] += 1
            return logits
        np.take(self.wte, tokens, axis=0, out=x)
        x += self.pe[pos]
        for i, layer in enumerate(self.layers):
            kern.layernorm(x, layer.ln1_w, layer.ln1_b, h)
            _linear(h, layer.w_qkv, qkv)  # (B, 3C)
            # stores this token's keys and values in the cache, y = attention output (B, C)
            kern.attend_one_token(qkv, cache.kv[i], pos, y, cache.scores, cache.head_acc)
            x += _linear(y, layer.w_proj, h)
            kern.layernorm(x, layer.ln2_w, layer.ln2_b, h)
            _linear(h, layer.w_fc, f)  # (B, 4C)
            kern.gelu(f, self._gelu_consts)
            x += _linear(f, layer.w_out if B > 1 else layer.w_out_rows.T, h)
        cache.lengths[:B] += 1
        kern.layernorm(x, self.ln_f_w, self.ln_f_b, h)
        return _linear(h, self.w_head, None)  # (B, V), a fresh array the caller may keep

    # ---- validation --------------------------------------------------------------------------

    def _check_ids(self, ids: Sequence[int]) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError("a prompt must be a non-empty sequence of token ids")
        if arr.dtype.kind not in "iu":
            raise ValueError(f"token ids must be ints, got dtype {arr.dtype}")
        n, V = arr.size, self.config.vocab_size
        if n > self.config.max_context:
            raise ContextLengthError(
                f"prompt has {n} tokens, more than the model's context of {self.config.max_context}"
            )
        if arr.min() < 0 or arr.max() >= V:
            bad = arr[(arr < 0) | (arr >= V)][0]
            raise ValueError(f"token id {int(bad)} out of range [0, {V})")
        return arr.astype(np.intp, copy=False)

    def _check_cache(self, cache: KVCache) -> None:
        c, m = cache.config, self.config
        if c is m:  # made by this model's new_cache
            return
        dims = ("n_embd", "n_head", "n_layer", "max_context")
        if any(getattr(c, d) != getattr(m, d) for d in dims):
            raise ValueError("this KV cache was made for a model of different dimensions")

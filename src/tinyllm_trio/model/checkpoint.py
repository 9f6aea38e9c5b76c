"""Checkpoints: our format and the original TinyLLM release, both read and written.

Our format, a directory:
    config.json         ModelConfig.to_dict() plus {"format": "tinyllm-trio/1"}
    model.safetensors   the 154 canonical tensors (original names, PyTorch [out, in] layout),
                        float16 (default, half the size) or float32 on disk; loaded as float32
    tokenizer.json      the HybridTokenizer vocabulary (the seed's JSON format)

The original release, the `model/` directory of entropicemergence/tiny_llm_server:
    tinystories_tokenizer_vocab.json
    weights/metadata.txt       one line per tensor: `name d0 [d1] float32 size` (size = elements)
    weights/<name with . -> _>.bin   raw little-endian float32, PyTorch [out, in] layout
It carries no config: dimensions are inferred from the tensors (max_context is 512) and the
attention scale is "embd" (1/sqrt(n_embd)), what its weights were trained with. A caller's
`attention_scale` overrides the scale of either format ("head" reproduces the original C++
server, which used 1/sqrt(head_size)).

Every load is validated before a Transformer is built: missing, extra or mis-shaped tensors,
truncated .bin files, non-finite values and a tokenizer whose vocabulary does not match the
embedding raise CheckpointError naming the file or tensor and what was expected.

`read_checkpoint` is the light half of `load_model`, for a process that serves the model but
never runs it (the HTTP server: its workers load the weights): it reads the config and the
tokenizer and checks the tensors' names and shapes from the file headers, without reading the
weights or building a Transformer, so numba and the weights never enter that process.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinyllm_trio.errors import CheckpointError
from tinyllm_trio.model.tokenizer import HybridTokenizer
from tinyllm_trio.model.transformer import ModelConfig, Transformer, expected_shapes

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "LoadedModel",
    "default_model_path",
    "load_model",
    "read_checkpoint",
    "save_checkpoint",
    "save_original",
]

FORMAT = "tinyllm-trio/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
ORIGINAL_VOCAB_FILE = "tinystories_tokenizer_vocab.json"
ORIGINAL_WEIGHTS_DIR = "weights"
ORIGINAL_METADATA_FILE = "metadata.txt"
ORIGINAL_MAX_CONTEXT = 512
ORIGINAL_ATTENTION_SCALE = "embd"

# what the two formats' loaders read, before a Transformer is built from it
_Loaded = tuple[ModelConfig, dict[str, np.ndarray], HybridTokenizer]


@dataclass
class LoadedModel:
    transformer: Transformer
    tokenizer: HybridTokenizer
    path: Path | None


@dataclass
class CheckpointInfo:
    """What a checkpoint says about its model, without its weights (`read_checkpoint`)."""

    config: ModelConfig
    tokenizer: HybridTokenizer
    path: Path


def default_model_path() -> Path:
    """Where the packaged (trained) checkpoint lives: src/tinyllm_trio/model/default."""
    return Path(__file__).resolve().parent / "default"


def load_model(
    path: str | Path | None = None,
    *,
    attention_scale: str | None = None,
    weights_format: str = "float32",
) -> LoadedModel:
    """Load our format or the original release from `path` (None: the packaged default).

    `attention_scale` ("head" or "embd") overrides what the checkpoint says; `weights_format`
    "bfloat16" runs the model on its weights rounded to bfloat16 (see `Transformer`).
    """
    path, original = _locate(path, attention_scale)
    load = _load_original if original else _load_ours
    config, weights, tokenizer = load(path, attention_scale)
    return LoadedModel(Transformer(config, weights, weights_format=weights_format), tokenizer, path)


def read_checkpoint(
    path: str | Path | None = None, *, attention_scale: str | None = None
) -> CheckpointInfo:
    """The config and tokenizer of the checkpoint at `path`, its tensors' names and shapes
    checked from the file headers; the weights are not read (their values are checked where
    they are loaded). Raises CheckpointError as `load_model` does for the same faults."""
    path, original = _locate(path, attention_scale)
    if original:
        tokenizer = _read_tokenizer(path / ORIGINAL_VOCAB_FILE)
        weights_dir = path / ORIGINAL_WEIGHTS_DIR
        shapes = {name: dims for name, (dims, _) in _original_entries(weights_dir).items()}
        config = _infer_config(shapes, weights_dir, attention_scale or ORIGINAL_ATTENTION_SCALE)
        where = weights_dir
    else:
        config, tokenizer = _read_config_and_tokenizer(path, attention_scale)
        where = path / WEIGHTS_FILE
        shapes = _safetensors_shapes(where)
    _check_shapes(shapes, config, where)
    _check_vocab(tokenizer, config)
    return CheckpointInfo(config, tokenizer, path)


def _locate(path: str | Path | None, attention_scale: str | None) -> tuple[Path, bool]:
    """The checkpoint directory `path` names (None: the packaged default), and whether it is
    the original release's format."""
    if attention_scale not in (None, "head", "embd"):
        raise CheckpointError(f"attention_scale must be 'head' or 'embd', got {attention_scale!r}")
    if path is None:
        path = default_model_path()
        if not (path / CONFIG_FILE).is_file():
            raise CheckpointError(
                f"the packaged default model is missing ({path} has no {CONFIG_FILE}); "
                "pass a checkpoint directory with --model"
            )
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a checkpoint directory)")
    if (path / CONFIG_FILE).exists():
        return path, False
    if (path / ORIGINAL_WEIGHTS_DIR / ORIGINAL_METADATA_FILE).exists() or (
        path / ORIGINAL_VOCAB_FILE
    ).exists():
        return path, True
    if (path / "model" / ORIGINAL_VOCAB_FILE).exists():  # the release's top-level directory
        return _locate(path / "model", attention_scale)
    raise CheckpointError(
        f"{path}: not a checkpoint: expected {CONFIG_FILE} + {WEIGHTS_FILE} + "
        f"{TOKENIZER_FILE} (ours) or {ORIGINAL_VOCAB_FILE} + "
        f"{ORIGINAL_WEIGHTS_DIR}/{ORIGINAL_METADATA_FILE} (the original release)"
    )


# ---- our format ----------------------------------------------------------------------------


def save_checkpoint(
    path: str | Path,
    transformer: Transformer,
    tokenizer: HybridTokenizer,
    *,
    dtype: str = "float16",
) -> None:
    """Write our format into directory `path` (created if needed). dtype: float16 | float32."""
    from safetensors.numpy import save_file

    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    _check_vocab(tokenizer, transformer.config)
    tensors = {}
    for name, w in transformer.weights().items():
        w = np.ascontiguousarray(w, dtype=dtype)
        if not np.isfinite(w).all():
            raise ValueError(f"tensor {name} does not fit in {dtype} (non-finite after conversion)")
        tensors[name] = w
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / WEIGHTS_FILE, metadata={"format": FORMAT})
    config = {"format": FORMAT, **transformer.config.to_dict()}
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tokenizer.save(path / TOKENIZER_FILE)


def _load_ours(path: Path, attention_scale: str | None) -> _Loaded:
    config, tokenizer = _read_config_and_tokenizer(path, attention_scale)
    weights = _read_safetensors(path / WEIGHTS_FILE)
    _validate(weights, config, path / WEIGHTS_FILE)
    _check_vocab(tokenizer, config)
    return config, weights, tokenizer


def _read_config_and_tokenizer(
    path: Path, attention_scale: str | None
) -> tuple[ModelConfig, HybridTokenizer]:
    config = _read_config(path / CONFIG_FILE)
    if attention_scale is not None:
        config = dataclasses.replace(config, attention_scale=attention_scale)
    return config, _read_tokenizer(path / TOKENIZER_FILE)


def _read_config(file: Path) -> ModelConfig:
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: cannot read JSON: {e}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    if d.get("format") != FORMAT:
        raise CheckpointError(f"{file}: 'format' must be {FORMAT!r}, got {d.get('format')!r}")
    d = {k: v for k, v in d.items() if k != "format"}
    missing = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in d]
    if missing:
        raise CheckpointError(f"{file}: missing keys {missing}")
    try:
        return ModelConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: {e}") from None


def _read_tokenizer(file: Path) -> HybridTokenizer:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (the vocabulary)")
    try:
        return HybridTokenizer.from_file(file)
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{file}: invalid vocabulary: {e}") from None


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    if not file.is_file():
        raise CheckpointError(f"{file}: missing (the weights)")
    try:
        tensors = load_file(file)
    except Exception as e:  # safetensors raises its own error types for a corrupt file
        raise CheckpointError(f"{file}: cannot read safetensors: {e}") from None
    out = {}
    for name, w in tensors.items():
        if w.dtype not in (np.float16, np.float32, np.float64):
            raise CheckpointError(f"{file}: tensor {name} has dtype {w.dtype}, expected float")
        out[name] = w.astype(np.float32)
    return out


def _safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the safetensors header alone (no tensor data is read)."""
    from safetensors import safe_open

    if not file.is_file():
        raise CheckpointError(f"{file}: missing (the weights)")
    try:
        with safe_open(file, framework="numpy") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types for a corrupt file
        raise CheckpointError(f"{file}: cannot read safetensors: {e}") from None


# ---- the original release ------------------------------------------------------------------


def save_original(path: str | Path, transformer: Transformer, tokenizer: HybridTokenizer) -> None:
    """Write the original release layout into directory `path` (its `model/` directory).

    The format has no place for the attention scale: a model trained with "head" saved this
    way loads back with "embd" unless the loader overrides it.
    """
    _check_vocab(tokenizer, transformer.config)
    path = Path(path)
    weights_dir = path / ORIGINAL_WEIGHTS_DIR
    weights_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, w in transformer.weights().items():
        dims = " ".join(str(d) for d in w.shape)
        lines.append(f"{name} {dims} float32 {w.size}")
        (weights_dir / _bin_name(name)).write_bytes(np.asarray(w, dtype="<f4").tobytes())
    (weights_dir / ORIGINAL_METADATA_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer.save(path / ORIGINAL_VOCAB_FILE)


def _bin_name(name: str) -> str:
    return name.replace(".", "_") + ".bin"


_METADATA_LINE = re.compile(r"^(\S+)((?:\s+\d+){1,2})\s+(\S+)\s+(\d+)\s*$")


def _load_original(path: Path, attention_scale: str | None) -> _Loaded:
    tokenizer = _read_tokenizer(path / ORIGINAL_VOCAB_FILE)
    weights_dir = path / ORIGINAL_WEIGHTS_DIR
    weights = _read_original_weights(weights_dir)
    shapes = {name: w.shape for name, w in weights.items()}
    config = _infer_config(shapes, weights_dir, attention_scale or ORIGINAL_ATTENTION_SCALE)
    _validate(weights, config, weights_dir)
    _check_vocab(tokenizer, config)
    return config, weights, tokenizer


def _read_original_weights(weights_dir: Path) -> dict[str, np.ndarray]:
    weights = {}
    for name, (dims, size) in _original_entries(weights_dir).items():
        file = weights_dir / _bin_name(name)
        try:
            raw = file.read_bytes()
        except OSError as e:
            raise CheckpointError(f"{file}: cannot read tensor {name}: {e}") from None
        _check_bin_size(file, name, size, len(raw))
        weights[name] = np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(dims)
    return weights


def _original_entries(weights_dir: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """metadata.txt as {name: (shape, size)}, each tensor's .bin file checked for its size."""
    meta = weights_dir / ORIGINAL_METADATA_FILE
    try:
        text = meta.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta}: cannot read: {e}") from None
    entries: dict[str, tuple[tuple[int, ...], int]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _METADATA_LINE.match(line)
        if not m:
            raise CheckpointError(
                f"{meta}:{lineno}: malformed line {line!r} (expected 'name d0 [d1] float32 size')"
            )
        name, dims, dtype, size = m[1], tuple(int(d) for d in m[2].split()), m[3], int(m[4])
        if dtype != "float32":
            raise CheckpointError(f"{meta}:{lineno}: {name}: dtype {dtype!r}, expected float32")
        if size != int(np.prod(dims)):
            raise CheckpointError(
                f"{meta}:{lineno}: {name}: size {size} does not match shape {list(dims)}"
            )
        if name in entries:
            raise CheckpointError(f"{meta}:{lineno}: tensor {name} listed twice")
        file = weights_dir / _bin_name(name)
        try:
            _check_bin_size(file, name, size, file.stat().st_size)
        except OSError as e:
            raise CheckpointError(f"{file}: cannot read tensor {name}: {e}") from None
        entries[name] = (dims, size)
    return entries


def _check_bin_size(file: Path, name: str, size: int, got: int) -> None:
    if got != 4 * size:
        raise CheckpointError(
            f"{file}: tensor {name} needs {4 * size} bytes ({size} float32), the file has {got}"
        )


def _infer_config(shapes: dict[str, tuple[int, ...]], where: Path, scale: str) -> ModelConfig:
    """Dimensions from the tensors' shapes (the format stores no config)."""
    emb = shapes.get("token_embedding.weight")
    if emb is None or len(emb) != 2:
        raise CheckpointError(f"{where}: token_embedding.weight is missing or not 2-D")
    n_layer = 1 + max(
        (int(m[1]) for n in shapes if (m := re.match(r"blocks\.(\d+)\.", n))), default=-1
    )
    n_head = 1 + max(
        (int(m[1]) for n in shapes if (m := re.match(r"blocks\.0\.sa\.heads\.(\d+)\.", n))),
        default=-1,
    )
    if n_layer < 1 or n_head < 1:
        raise CheckpointError(f"{where}: no transformer blocks / attention heads found")
    vocab_size, n_embd = emb
    try:
        return ModelConfig(
            vocab_size=vocab_size,
            n_embd=n_embd,
            n_head=n_head,
            n_layer=n_layer,
            max_context=ORIGINAL_MAX_CONTEXT,
            attention_scale=scale,
        )
    except ValueError as e:
        raise CheckpointError(f"{where}: inferred dimensions are invalid: {e}") from None


# ---- validation shared by both formats -----------------------------------------------------


def _validate(weights: dict[str, np.ndarray], config: ModelConfig, where: Path) -> None:
    _check_shapes({name: w.shape for name, w in weights.items()}, config, where)
    for name in expected_shapes(config):
        if not np.isfinite(weights[name]).all():
            raise CheckpointError(f"{where}: tensor {name} holds NaN or infinite values")


def _check_shapes(shapes: dict[str, tuple[int, ...]], config: ModelConfig, where: Path) -> None:
    expected = expected_shapes(config)
    missing = [n for n in expected if n not in shapes]
    extra = sorted(n for n in shapes if n not in expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {_some(missing)}")
        if extra:
            parts.append(f"unexpected {len(extra)} tensor(s): {_some(extra)}")
        raise CheckpointError(f"{where}: {'; '.join(parts)} (for {config})")
    for name, shape in expected.items():
        got = tuple(shapes[name])
        if got != shape:
            raise CheckpointError(
                f"{where}: tensor {name} has shape {list(got)}, expected {list(shape)}"
            )


def _check_vocab(tokenizer: HybridTokenizer, config: ModelConfig) -> None:
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(
            f"vocabulary mismatch: the tokenizer has {tokenizer.vocab_size} tokens "
            f"({tokenizer.n_words} words + {tokenizer.vocab_size - tokenizer.n_words} "
            f"characters) but the model's vocab_size is {config.vocab_size}"
        )


def _some(names: list[str], n: int = 5) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names) - n} more)" if len(names) > n else "")

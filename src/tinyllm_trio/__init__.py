"""TinyLLM on Trio, h11 and numpy: shared-memory workers, continuous batching, streaming HTTP.

The public names are imported lazily (PEP 562), so ``import tinyllm_trio`` stays cheap and a
worker process (``python -m tinyllm_trio.ipc.worker``) or ``tinyllm-trio generate`` never pays
for Trio or the HTTP stack it does not use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tinyllm_trio.version import __version__ as __version__

_EXPORTS = {
    "Engine": "tinyllm_trio.engine",
    "Generation": "tinyllm_trio.engine",
    "Choices": "tinyllm_trio.engine",
    "Completion": "tinyllm_trio.engine",
    "open_engine": "tinyllm_trio.engine",
    "open_inprocess_engine": "tinyllm_trio.engine",
    "EngineError": "tinyllm_trio.errors",
    "OverloadedError": "tinyllm_trio.errors",
    "WorkerDiedError": "tinyllm_trio.errors",
    "ShuttingDownError": "tinyllm_trio.errors",
    "WorkerStartError": "tinyllm_trio.errors",
    "InvalidParameterError": "tinyllm_trio.errors",
    "ContextLengthError": "tinyllm_trio.errors",
    "SamplingParams": "tinyllm_trio.model.sampling",
    "HybridTokenizer": "tinyllm_trio.model.tokenizer",
    "TokenEvent": "tinyllm_trio.protocol",
    "DoneEvent": "tinyllm_trio.protocol",
    "ErrorEvent": "tinyllm_trio.protocol",
    "FinishReason": "tinyllm_trio.protocol",
    "ErrorKind": "tinyllm_trio.protocol",
    "serve": "tinyllm_trio.http.server",
}

__all__ = [
    "Choices",
    "Completion",
    "ContextLengthError",
    "DoneEvent",
    "Engine",
    "EngineError",
    "ErrorEvent",
    "ErrorKind",
    "FinishReason",
    "Generation",
    "HybridTokenizer",
    "InvalidParameterError",
    "OverloadedError",
    "SamplingParams",
    "ShuttingDownError",
    "TokenEvent",
    "WorkerDiedError",
    "WorkerStartError",
    "open_engine",
    "open_inprocess_engine",
    "serve",
]

if TYPE_CHECKING:
    from tinyllm_trio.engine import (
        Choices,
        Completion,
        Engine,
        Generation,
        open_engine,
        open_inprocess_engine,
    )
    from tinyllm_trio.errors import (
        ContextLengthError,
        EngineError,
        InvalidParameterError,
        OverloadedError,
        ShuttingDownError,
        WorkerDiedError,
        WorkerStartError,
    )
    from tinyllm_trio.http.server import serve
    from tinyllm_trio.model.sampling import SamplingParams
    from tinyllm_trio.model.tokenizer import HybridTokenizer
    from tinyllm_trio.protocol import DoneEvent, ErrorEvent, ErrorKind, FinishReason, TokenEvent


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tinyllm_trio' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

"""TinyLLM on Trio, h11 and numpy: shared-memory workers, continuous batching, streaming HTTP.

The public names are imported lazily (PEP 562), so ``import tinyllm_trio`` stays cheap and a
worker process (``python -m tinyllm_trio.ipc.worker``) or ``tinyllm-trio generate`` never pays
for Trio or the HTTP stack it does not use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Engine": "tinyllm_trio.engine",
    "Generation": "tinyllm_trio.engine",
    "Choices": "tinyllm_trio.engine",
    "Completion": "tinyllm_trio.engine",
    "open_engine": "tinyllm_trio.engine",
    "EngineError": "tinyllm_trio.engine",
    "OverloadedError": "tinyllm_trio.engine",
    "WorkerDiedError": "tinyllm_trio.engine",
    "ShuttingDownError": "tinyllm_trio.engine",
    "WorkerStartError": "tinyllm_trio.engine",
    "SamplingParams": "tinyllm_trio.model.sampling",
    "InvalidParameterError": "tinyllm_trio.model.sampling",
    "ContextLengthError": "tinyllm_trio.model.transformer",
    "HybridTokenizer": "tinyllm_trio.model.tokenizer",
    "TokenEvent": "tinyllm_trio.model.batching",
    "DoneEvent": "tinyllm_trio.model.batching",
    "ErrorEvent": "tinyllm_trio.model.batching",
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
    "serve",
]

if TYPE_CHECKING:
    from tinyllm_trio.engine import (
        Choices,
        Completion,
        Engine,
        EngineError,
        Generation,
        OverloadedError,
        ShuttingDownError,
        WorkerDiedError,
        WorkerStartError,
        open_engine,
    )
    from tinyllm_trio.http.server import serve
    from tinyllm_trio.model.batching import DoneEvent, ErrorEvent, TokenEvent
    from tinyllm_trio.model.sampling import InvalidParameterError, SamplingParams
    from tinyllm_trio.model.tokenizer import HybridTokenizer
    from tinyllm_trio.model.transformer import ContextLengthError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tinyllm_trio' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

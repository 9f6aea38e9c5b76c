"""Every exception a caller of the engine can meet, and the one mapping between exceptions and
`ErrorKind`s.

A failure crosses processes as an `ErrorEvent` with a kind (`kind_of` in the worker, where an
exception becomes an event) and becomes an exception again where a caller wants one
(`exception_for`, in `Engine.complete`); the HTTP layer maps kinds to status codes in its own
table (`tinyllm_trio.http.errors`). Adding a kind means adding it to `ErrorKind`, here, and
there; the tests check that every kind has both.
"""

from __future__ import annotations

from tinyllm_trio.protocol import ErrorKind

__all__ = [
    "CheckpointError",
    "ContextLengthError",
    "EngineError",
    "InvalidParameterError",
    "OverloadedError",
    "ShuttingDownError",
    "WorkerDiedError",
    "WorkerStartError",
    "exception_for",
    "kind_of",
]


class InvalidParameterError(ValueError):
    """A request asked for something impossible; `param` names the field (HTTP 400)."""

    kind = ErrorKind.INVALID_REQUEST

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthError(ValueError):
    """A prompt longer than the model's context, or a sequence already at its context limit."""

    kind = ErrorKind.CONTEXT_LENGTH


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says which file or tensor and why."""

    kind = ErrorKind.LOAD_FAILED


class EngineError(Exception):
    """A request (or the engine) failed; `kind` names why, as in `ErrorEvent.kind`."""

    kind: str = ErrorKind.INTERNAL

    def __init__(self, message: str, *, kind: str | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class OverloadedError(EngineError):
    """Every worker is busy and the admission queue is full: retry after `retry_after` s."""

    kind = ErrorKind.OVERLOADED
    retry_after = 1


class WorkerDiedError(EngineError):
    """The worker running this request crashed; the pool has started a replacement."""

    kind = ErrorKind.WORKER_DIED


class ShuttingDownError(EngineError):
    """The engine is draining or stopped and accepts no new requests."""

    kind = ErrorKind.SHUTTING_DOWN


class WorkerStartError(EngineError):
    """A worker could not start (e.g. the checkpoint does not load); raised by open_engine."""

    kind = ErrorKind.START_FAILED


_KINDS = frozenset(ErrorKind)

# kind -> the exception that stands for it; a kind not here is an EngineError of that kind
_EXCEPTIONS: dict[str, type[Exception]] = {
    cls.kind: cls
    for cls in (
        ContextLengthError,
        OverloadedError,
        WorkerDiedError,
        ShuttingDownError,
        WorkerStartError,
    )
}


def kind_of(exc: BaseException) -> ErrorKind:
    """The kind of failure `exc` stands for: its class's `kind`; any other ValueError is a bad
    request (token ids, an undecodable message), anything else internal."""
    kind = getattr(exc, "kind", None)
    if kind in _KINDS:
        return ErrorKind(kind)
    return ErrorKind.INVALID_REQUEST if isinstance(exc, ValueError) else ErrorKind.INTERNAL


def exception_for(kind: str, message: str) -> Exception:
    """The exception to raise for an `ErrorEvent` of `kind` (`Engine.complete`)."""
    cls = _EXCEPTIONS.get(kind)
    return cls(message) if cls is not None else EngineError(message, kind=kind)

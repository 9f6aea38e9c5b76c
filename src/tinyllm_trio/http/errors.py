"""How the HTTP layer answers a failed generation: one table from `ErrorKind` to status, code
and `Retry-After`, used for an exception `engine.generate` raises and for an `ErrorEvent`
alike (before the response head: that status; after it: the same error object inside the
stream).

| kind            | status | code                    | Retry-After |
|-----------------|--------|-------------------------|-------------|
| invalid_request | 400    | invalid_parameter       |             |
| context_length  | 400    | context_length_exceeded |             |
| overloaded      | 429    | overloaded              | 1 s (or the engine's hint) |
| shutting_down   | 503    | shutting_down           | 1 s         |
| worker_died     | 503    | worker_died             | 1 s         |
| start_failed, load_failed, internal | 500 | the kind (internal: internal_error) | |
"""

from __future__ import annotations

from dataclasses import dataclass

from tinyllm_trio.errors import InvalidParameterError, kind_of
from tinyllm_trio.http.connection import HTTPError
from tinyllm_trio.protocol import ErrorEvent, ErrorKind

SHUTDOWN_MESSAGE = "the server is shutting down; this generation was cancelled"


@dataclass(frozen=True)
class _Answer:
    status: int
    code: str
    retry: bool  # send Retry-After: the same request may well succeed soon
    default_message: str  # for an exception that carries none
    names_prompt: bool = False  # `param` names the prompt field (the request's own fault)


ANSWERS: dict[str, _Answer] = {
    ErrorKind.INVALID_REQUEST: _Answer(400, "invalid_parameter", False, "invalid request", True),
    ErrorKind.CONTEXT_LENGTH: _Answer(
        400, "context_length_exceeded", False, "the prompt does not fit the context", True
    ),
    ErrorKind.OVERLOADED: _Answer(429, "overloaded", True, "the server is overloaded; retry later"),
    ErrorKind.SHUTTING_DOWN: _Answer(503, "shutting_down", True, SHUTDOWN_MESSAGE),
    ErrorKind.WORKER_DIED: _Answer(503, "worker_died", True, "the worker died"),
    ErrorKind.START_FAILED: _Answer(500, "start_failed", False, "a worker could not start"),
    ErrorKind.LOAD_FAILED: _Answer(500, "load_failed", False, "a worker could not load the model"),
    ErrorKind.INTERNAL: _Answer(500, "internal_error", False, "internal error"),
}


def http_error(
    kind: str, message: str = "", *, param: str | None = None, retry_after: float = 1
) -> HTTPError:
    """The answer for a failure of `kind` (a kind the table lacks is a 500 with that code)."""
    answer = ANSWERS.get(kind) or _Answer(500, kind, False, "internal error")
    headers = []
    if answer.retry:
        headers.append((b"Retry-After", str(max(1, round(retry_after))).encode("ascii")))
    return HTTPError(
        answer.status,
        message or answer.default_message,
        code=answer.code,
        param=param,
        headers=headers,
    )


def engine_error(exc: BaseException, prompt_param: str = "prompt") -> HTTPError:
    """The HTTP answer for an exception `engine.generate` raised."""
    kind = kind_of(exc)
    if isinstance(exc, InvalidParameterError):
        param: str | None = exc.param
    else:
        param = prompt_param if ANSWERS[kind].names_prompt else None
    # An exception of no kind of ours is a bug: its text is for the log, not the client.
    message = f"internal error: {type(exc).__name__}" if _foreign(exc, kind) else str(exc)
    return http_error(kind, message, param=param, retry_after=getattr(exc, "retry_after", 1))


def error_event(event: ErrorEvent, prompt_param: str = "prompt") -> HTTPError:
    """The HTTP answer for an engine `ErrorEvent` (before or after the head)."""
    answer = ANSWERS.get(event.kind)
    param = prompt_param if answer is not None and answer.names_prompt else None
    return http_error(event.kind, event.message, param=param)


def _foreign(exc: BaseException, kind: ErrorKind) -> bool:
    return kind is ErrorKind.INTERNAL and getattr(exc, "kind", None) is None

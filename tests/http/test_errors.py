"""The one mapping between failures and their names, and the one table from names to HTTP."""

from __future__ import annotations

import pytest

from tinyllm_trio.errors import (
    CheckpointError,
    ContextLengthError,
    EngineError,
    InvalidParameterError,
    OverloadedError,
    ShuttingDownError,
    WorkerDiedError,
    WorkerStartError,
    exception_for,
    kind_of,
)
from tinyllm_trio.http.errors import ANSWERS, engine_error, error_event
from tinyllm_trio.protocol import ErrorEvent, ErrorKind

RAISED_BY_KIND = [
    ContextLengthError,
    OverloadedError,
    WorkerDiedError,
    ShuttingDownError,
    WorkerStartError,
]


def test_every_kind_has_an_http_answer() -> None:
    assert set(ANSWERS) == set(ErrorKind)


@pytest.mark.parametrize("cls", RAISED_BY_KIND)
def test_an_exception_and_its_kind_map_to_each_other(cls: type[Exception]) -> None:
    kind = kind_of(cls("boom"))
    again = exception_for(kind, "boom")
    assert type(again) is cls and str(again) == "boom"


def test_kinds_of_the_other_exceptions() -> None:
    assert kind_of(InvalidParameterError("top_p", "bad")) is ErrorKind.INVALID_REQUEST
    assert kind_of(ValueError("token id 9999 is outside the vocabulary")) == "invalid_request"
    assert kind_of(CheckpointError("no weights")) is ErrorKind.LOAD_FAILED
    assert kind_of(RuntimeError("a bug")) is ErrorKind.INTERNAL
    assert kind_of(EngineError("odd", kind="worker_died")) is ErrorKind.WORKER_DIED
    unknown = exception_for("something_new", "what")
    assert type(unknown) is EngineError and unknown.kind == "something_new"


def test_http_answers_for_exceptions() -> None:
    bad = engine_error(InvalidParameterError("top_p", "top_p must be in (0, 1]"))
    assert (bad.status, bad.param, bad.code) == (400, "top_p", "invalid_parameter")
    long = engine_error(ContextLengthError("too long"), prompt_param="messages")
    assert (long.status, long.param, long.code) == (400, "messages", "context_length_exceeded")
    busy = OverloadedError("queue full")
    busy.retry_after = 2.6
    answer = engine_error(busy)
    assert answer.status == 429 and (b"Retry-After", b"3") in answer.headers
    assert engine_error(ShuttingDownError("")).message.startswith("the server is shutting down")
    bug = engine_error(RuntimeError("secret detail"))
    assert (bug.status, bug.code, bug.message) == (
        500,
        "internal_error",
        "internal error: RuntimeError",
    )


def test_http_answers_for_error_events() -> None:
    died = error_event(ErrorEvent(1, "worker 0 died", ErrorKind.WORKER_DIED))
    assert (died.status, died.code, died.param) == (503, "worker_died", None)
    assert (b"Retry-After", b"1") in died.headers
    refused = error_event(ErrorEvent(1, "no room", "context_length"), prompt_param="message")
    assert (refused.status, refused.param) == (400, "message")
    odd = error_event(ErrorEvent(1, "?", "something_new"))
    assert (odd.status, odd.code) == (500, "something_new")

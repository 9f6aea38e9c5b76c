"""Issue 11, finding 7: every field of every JSON endpoint, fuzzed with arbitrary JSON values
through a real socket into the live app: the answer is never a 5xx, and nothing is logged as
an error (an unexpected exception in a handler is logged before its 500).

The app runs once for the module, in a thread of its own with its own Trio loop, so that
hypothesis drives plain blocking HTTP requests at it (a server per example would cost more
than the examples). The engine is the scripted `FakeEngine`, which validates prompts and
parameters as the real Engine does. Bounded: a few hundred examples per endpoint, all of them
in well under 15 s.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import queue
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from http_fixtures import FakeEngine, fast_config
from tinyllm_trio.http.generation import SAMPLING_FIELDS
from tinyllm_trio.http.server import HTTPServer

EXAMPLES = int(os.environ.get("TINYLLM_FUZZ_EXAMPLES", "250"))  # more for a deeper run

# ---- arbitrary JSON --------------------------------------------------------------------------

_ANY_CHAR = st.characters(exclude_categories=())  # surrogates too: they cross as \ud800 escapes
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-3, 80)  # in and around every valid range, so the checks behind pass too
    | st.integers()
    | st.sampled_from([2**63, -(2**63) - 1, 10**40, -(10**400)])
    | st.floats(-3, 3)
    | st.floats(allow_nan=True, allow_infinity=True)  # Python's json reads NaN and Infinity
    | st.text(_ANY_CHAR, max_size=12)
    | st.sampled_from(["", "text", "user", "<|endoftext|>", "\ud800"])
)
JSON = st.recursive(
    _SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(_ANY_CHAR, max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)

_GENERATION_FIELDS = (
    "max_tokens",
    "temperature",
    "stream",
    "stream_options",
    "logprobs",
    "n",
    "best_of",
    "echo",
    "tools",
    "response_format",
    "model",
    "user",
    "parse_special",
    *SAMPLING_FIELDS,
)


def _message() -> st.SearchStrategy[Any]:
    part = st.fixed_dictionaries({"type": st.just("text") | JSON, "text": JSON})
    return st.fixed_dictionaries(
        {},
        optional={
            "role": st.sampled_from(["system", "user", "assistant", "tool"]) | JSON,
            "content": JSON | st.lists(part | JSON, max_size=3),
            "name": JSON,
        },
    )


_MESSAGES = st.lists(_message() | JSON, max_size=4) | JSON


def _body(base: dict[str, Any], fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy:
    """`base` with any subset of `fields` overridden; now and then any JSON value at all."""
    overrides = st.fixed_dictionaries({}, optional=fields)
    return st.builds(lambda o: {**base, **o}, overrides) | JSON


def _fields(names: tuple[str, ...], **special: st.SearchStrategy[Any]) -> dict[str, Any]:
    return {name: special.get(name, JSON) for name in names}


BODIES: dict[str, st.SearchStrategy[Any]] = {
    "/v1/completions": _body(
        {"prompt": "lily and tom", "max_tokens": 2},
        _fields(("prompt", *_GENERATION_FIELDS)),
    ),
    "/v1/chat/completions": _body(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        _fields(
            ("messages", "max_completion_tokens", "top_logprobs", *_GENERATION_FIELDS),
            messages=_MESSAGES,
        ),
    ),
    "/process": _body(
        {"message": "lily and tom", "max_tokens": 2},
        _fields(("message", "max_tokens", "temperature", "parse_special", *SAMPLING_FIELDS)),
    ),
    "/tokenize": _body(
        {"prompt": "lily and tom"},
        _fields(
            ("prompt", "content", "messages", "add_special", "with_pieces", "parse_special"),
            messages=_MESSAGES,
        ),
    ),
    "/detokenize": _body(
        {"tokens": [2, 7, 8]},
        _fields(("tokens",), tokens=st.lists(st.integers(-2, 80) | JSON, max_size=5) | JSON),
    ),
}


# ---- the live app, in a thread ---------------------------------------------------------------


class _ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def live_port() -> Iterator[int]:
    ports: queue.Queue[int] = queue.Queue()
    stop = threading.Event()

    async def main() -> None:
        engine = FakeEngine()
        server = HTTPServer(engine, fast_config(max_connections=64))
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            ports.put(await nursery.start(server.run))
            await trio.to_thread.run_sync(stop.wait)
            nursery.cancel_scope.cancel()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    try:
        yield ports.get(timeout=10)
    finally:
        stop.set()
        thread.join(timeout=10)


@pytest.fixture
def error_log() -> Iterator[_ErrorLog]:
    handler = _ErrorLog()
    logger = logging.getLogger("tinyllm_trio")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


class _Client:
    """Keep-alive requests over one connection, reconnecting when the server closed it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: http.client.HTTPConnection | None = None

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                self.conn.request("POST", path, body, {"Content-Type": "application/json"})
                response = self.conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, ConnectionError, http.client.BadStatusLine):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
                continue
            if response.will_close:
                self.conn.close()
                self.conn = None
            return response.status, data
        raise AssertionError("unreachable")


def _encode(value: Any) -> bytes:
    # ensure_ascii: a lone surrogate goes as its \ud800 escape, as a hostile client sends it
    return json.dumps(value, allow_nan=True).encode("ascii")


@pytest.mark.parametrize("path", sorted(BODIES))
def test_no_json_value_in_any_field_gets_a_5xx(path, live_port, error_log) -> None:
    client = _Client(live_port)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(BODIES[path])
    def one(body: Any) -> None:
        status, data = client.post(path, _encode(body))
        assert status < 500, (body, data[:300])
        assert not error_log.records, [r.getMessage() for r in error_log.records]

    one()


def test_the_fuzz_reaches_past_validation(live_port) -> None:
    """Not only 400s: a valid body through the same client is served (the harness works)."""
    client = _Client(live_port)
    for path, body in {
        "/v1/completions": {"prompt": "lily", "max_tokens": 2, "temperature": math.pi / 4},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "stream": True},
        "/process": {"message": "lily", "max_tokens": 2},
        "/tokenize": {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]},
        "/detokenize": {"tokens": [2, 7]},
    }.items():
        assert client.post(path, _encode(body))[0] == 200, path

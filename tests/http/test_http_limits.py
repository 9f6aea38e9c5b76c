"""Hostile and unusual clients over real sockets: each is answered, nothing else is disturbed.

Every test ends by checking the server still answers /ping, and that no slow or malformed
client ever reached the engine (it holds no worker slot).
"""

from __future__ import annotations

import hmac
import json
import re

import pytest
import trio

from http_fixtures import (
    FakeEngine,
    dechunk,
    fast_config,
    get,
    post,
    raw_request,
    read_until,
    running_server,
    split_response,
)
from tinyllm_trio.bench.client import sse_events
from tinyllm_trio.engine import open_engine
from tinyllm_trio.http.connection import ClientGone, HTTPConnection


async def _still_serving(port: int) -> None:
    raw = await raw_request(port, get("/ping"))
    assert split_response(raw)[0] == 200


async def test_unknown_path_is_404_json() -> None:
    async with running_server(FakeEngine()) as (_, port):
        status, headers, body = split_response(await raw_request(port, get("/nope")))
        assert status == 404
        assert headers["content-type"] == "application/json"
        error = json.loads(body)["error"]
        assert error["type"] == "not_found_error" and "Endpoint not found" in error["message"]
        assert set(error) == {"message", "type", "param", "code"}
        await _still_serving(port)


async def test_wrong_method_is_405_with_allow() -> None:
    async with running_server(FakeEngine()) as (_, port):
        status, headers, _ = split_response(await raw_request(port, get("/process")))
        assert (status, headers["allow"]) == (405, "POST")
        status, headers, _ = split_response(await raw_request(port, post("/ping", b"{}")))
        assert (status, headers["allow"]) == (405, "GET")
        status, headers, _ = split_response(await raw_request(port, post("/v1/models", b"{}")))
        assert (status, headers["allow"]) == (405, "GET")


async def test_declared_oversized_body_is_413_before_reading_it() -> None:
    engine = FakeEngine()
    async with running_server(engine, max_body_size=1000) as (_, port):
        head = (
            b"POST /process HTTP/1.1\r\nHost: t\r\nContent-Length: 100000000\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        with trio.fail_after(2):  # answered at once: the server does not wait for the body
            raw = await raw_request(port, head + b"x" * 5000)
        assert b"100 Continue" not in raw
        status, headers, body = split_response(raw)
        assert status == 413 and headers["connection"] == "close"
        assert "over the limit" in json.loads(body)["error"]["message"]
        await _still_serving(port)
    assert engine.calls == []


async def test_chunked_body_over_the_limit_is_413() -> None:
    async with running_server(FakeEngine(), max_body_size=1000) as (_, port):
        chunk = b"400\r\n" + b"a" * 1024 + b"\r\n"
        head = b"POST /process HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        raw = await raw_request(port, head + chunk * 3 + b"0\r\n\r\n")
        assert split_response(raw)[0] == 413
        await _still_serving(port)


async def test_oversized_headers_are_431() -> None:
    async with running_server(FakeEngine(), max_header_size=4096) as (_, port):
        raw = await raw_request(port, get("/ping", extra=f"X-Big: {'a' * 8000}\r\n"))
        status, headers, _ = split_response(raw)
        assert status == 431 and headers["connection"] == "close"
        await _still_serving(port)


async def test_malformed_request_is_400_and_closed() -> None:
    async with running_server(FakeEngine()) as (_, port):
        for garbage in (
            b"GARBAGE\r\n\r\n",
            b"GET /ping HTTP/1.1\r\nHost: t\r\nContent-Length: nope\r\n\r\n",
            b"GET /ping HTTP/1.1\r\nBad Header\r\n\r\n",
        ):
            raw = await raw_request(port, garbage)  # returns when the server closes
            status, headers, body = split_response(raw)
            assert status == 400 and headers["connection"] == "close"
            assert json.loads(body)["error"]["type"] == "invalid_request_error"
        await _still_serving(port)


async def test_slow_headers_are_408_without_touching_the_engine() -> None:
    engine = FakeEngine()
    async with running_server(engine, header_timeout=0.3) as (_, port):
        start = trio.current_time()
        raw = await raw_request(port, b"POST /process HTTP/1.1\r\nHost: t\r\n")
        assert 0.25 < trio.current_time() - start < 2.5
        status, headers, _ = split_response(raw)
        assert status == 408 and headers["connection"] == "close"
        await _still_serving(port)
    assert engine.calls == []


async def test_slow_body_is_408_without_touching_the_engine() -> None:
    engine = FakeEngine()
    async with running_server(engine, body_timeout=0.3) as (_, port):
        raw = await raw_request(port, post("/process", b'{"message": "hi"}')[:-5])
        status, _, _ = split_response(raw)
        assert status == 408
        await _still_serving(port)
    assert engine.calls == []


async def test_idle_keep_alive_connection_is_closed_silently() -> None:
    async with running_server(FakeEngine(), keep_alive_timeout=0.3) as (_, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(get("/ping", close=False))
            await read_until(stream, b'{"status": "ok"}')
            with trio.fail_after(2):
                assert await stream.receive_some(100) == b""  # EOF, no 408 for an idle client


async def test_connection_cap_answers_503_and_recovers() -> None:
    async with running_server(FakeEngine(), max_connections=2, header_timeout=30.0) as (
        server,
        port,
    ):
        held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        for stream in held:  # busy reading a head, so not idle: nothing to evict
            await stream.send_all(b"GET /ping HTTP/1.1\r\n")
        with trio.fail_after(2):
            while server.connection_count < 2:
                await trio.sleep(0.01)
        raw = await raw_request(port, get("/v1/models"))
        status, headers, body = split_response(raw)
        assert status == 503 and headers["retry-after"] == "1"
        assert headers["connection"] == "close"
        assert json.loads(body)["error"]["message"] == "Max connections reached"
        for stream in held:
            await stream.aclose()
        with trio.fail_after(2):
            while server.connection_count:
                await trio.sleep(0.01)
        await _still_serving(port)


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with running_server(FakeEngine()) as (_, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            body = b'{"message": "a", "max_tokens": 2}'
            await stream.send_all(
                post("/process", body, close=False) + get("/ping", close=False) + get("/nope")
            )
            raw = await read_until(stream, b"Endpoint not found")
        first = raw.index(b'{"chunk": "a"')
        second = raw.index(b'{"status": "ok"}')
        assert first < second < raw.index(b"404 Not Found")


async def test_expect_100_continue_gets_100_then_the_answer() -> None:
    async with running_server(FakeEngine()) as (_, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            body = b'{"message": "hi", "max_tokens": 1}'
            head = post("/process", body, extra="Expect: 100-continue\r\n")[: -len(body)]
            await stream.send_all(head)
            assert (await read_until(stream, b"\r\n\r\n")).startswith(b"HTTP/1.1 100 ")
            await stream.send_all(body)
            raw = await read_until(stream, b"0\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200 OK")


async def test_request_id_is_echoed_or_generated() -> None:
    async with running_server(FakeEngine()) as (_, port):
        raw = await raw_request(port, get("/ping", extra="X-Request-Id: abc-123\r\n"))
        assert split_response(raw)[1]["x-request-id"] == "abc-123"
        raw = await raw_request(port, get("/ping"))
        generated = split_response(raw)[1]["x-request-id"]
        assert len(generated) == 32 and int(generated, 16) >= 0
        raw = await raw_request(port, get("/ping", extra="X-Request-Id: bad id\x7f\r\n"))
        assert split_response(raw)[1]["x-request-id"] != "bad id\x7f"


async def test_api_key_guards_generation_endpoints_only(monkeypatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    constant_time = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return constant_time(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # the key is checked in constant time
    engine = FakeEngine()
    async with running_server(engine, api_key="sekrit") as (_, port):
        body = b'{"message": "hi", "max_tokens": 1}'
        for extra in ("", "Authorization: Bearer wrong\r\n", "Authorization: Basic sekrit\r\n"):
            status, headers, payload = split_response(
                await raw_request(port, post("/process", body, extra=extra))
            )
            assert status == 401 and headers["www-authenticate"] == "Bearer"
            assert json.loads(payload)["error"]["type"] == "authentication_error"
        assert engine.calls == []
        assert len(compared) == 1  # the Basic scheme is refused before any comparison
        ok = await raw_request(
            port, post("/process", body, extra="Authorization: Bearer sekrit\r\n")
        )
        assert split_response(ok)[0] == 200
        for path in ("/v1/models", "/v1/models/tinyllm"):
            assert split_response(await raw_request(port, get(path)))[0] == 401
        for path in ("/ping", "/health", "/metrics"):
            assert split_response(await raw_request(port, get(path)))[0] == 200


async def test_http_10_client_gets_a_close_delimited_answer() -> None:
    async with running_server(FakeEngine()) as (_, port):
        body = b'{"message": "hi", "max_tokens": 2}'
        raw = await raw_request(
            port,
            b"POST /process HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
        )
        status, headers, payload = split_response(raw)
        assert status == 200 and "transfer-encoding" not in headers
        assert payload == (
            b'{"chunk": "hi", "is_last": false}{"chunk": " worried", "is_last": false}'
            b'{"chunk": " worried", "is_last": true}'
        )


async def test_client_that_stops_reading_is_dropped_and_its_generation_cancelled() -> None:
    engine = FakeEngine(words=("x" * 2000,), max_context=10**6)
    async with running_server(engine, send_timeout=0.3) as (_, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:  # sends, never reads
            await stream.send_all(post("/process", b'{"message": "hi", "max_tokens": 1000000}'))
            with trio.fail_after(10):
                while not engine.cancelled:
                    await trio.sleep(0.05)
        assert engine.running == 0 and engine.finished == 0
        await _still_serving(port)


async def test_a_write_the_socket_cannot_take_now_is_finished_in_order_by_the_next() -> None:
    """The token sink's non-waiting write: what the socket did not take is sent first by the
    next waiting write (nothing lost, nothing reordered); a dead peer makes it ClientGone."""
    ours, theirs = trio.socket.socketpair()
    ours.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, 4096)
    theirs.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    connection = HTTPConnection(trio.SocketStream(ours), fast_config(send_timeout=5.0))
    peer = trio.SocketStream(theirs)
    written = []
    while True:  # nobody reads yet: the socket fills up
        piece = b"%08d" % len(written) * 64
        written.append(piece)
        if not connection.try_send_bytes(piece):
            break
    assert len(written) > 1
    written.append(b"after")
    assert not connection.try_send_bytes(b"after")  # kept behind the unsent tail, not written
    expected = b"".join(written) + b"end"
    received = bytearray()

    async def read_all() -> None:
        while len(received) < len(expected):
            received.extend(await peer.receive_some(65536))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            await connection.send_bytes(b"end")
    assert bytes(received) == expected
    assert connection.try_send_bytes(b"!")  # room again: written at once

    await peer.aclose()
    while connection.try_send_bytes(b"x" * 4096):  # until the reset is seen
        await trio.sleep(0.01)
    with pytest.raises(ClientGone):
        await connection.send_bytes(b"more")


class DirectWrites:
    """Small socket buffers on the server side, and a record of every non-waiting write the
    token sink made (True: the socket took it whole); `full` is set by the first refusal."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.results: list[bool] = []
        self.full = trio.Event()
        original_init, original_try = HTTPConnection.__init__, HTTPConnection.try_send_bytes
        record = self

        def with_small_send_buffer(self, stream, *args, **kwargs) -> None:
            stream.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, 4096)
            original_init(self, stream, *args, **kwargs)

        def recorded(self, data: bytes) -> bool:
            record.results.append(original_try(self, data))
            if not record.results[-1]:
                record.full.set()
            return record.results[-1]

        monkeypatch.setattr(HTTPConnection, "__init__", with_small_send_buffer)
        monkeypatch.setattr(HTTPConnection, "try_send_bytes", recorded)


async def _slow_reader_socket(port: int) -> trio.SocketStream:
    sock = trio.socket.socket()
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def test_a_client_that_stalls_briefly_gets_its_tokens_written_directly_again(
    long_checkpoint, monkeypatch
) -> None:
    """A full socket makes the token sink step aside; once the waiting write drains it, the
    stream goes back to direct writes, and the client gets every token in order."""
    writes = DirectWrites(monkeypatch)
    body = json.dumps(
        {
            "prompt": "once upon a time",
            "max_tokens": 490,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
        }
    ).encode()
    async with (
        open_engine(long_checkpoint, workers=1, max_batch=4) as engine,
        running_server(engine, send_timeout=5.0) as (_, port),
    ):
        received = bytearray()
        async with await _slow_reader_socket(port) as stream:
            await stream.send_all(post("/v1/completions", body))
            with trio.fail_after(20):
                # read until the sink writes directly (on a loaded machine the first tokens can
                # queue before it is attached, and those go out as waiting writes) ...
                while True not in writes.results:
                    received.extend(await stream.receive_some(65536))
                await writes.full.wait()  # ... then stop until the sink meets a full socket
                while not received.endswith(b"0\r\n\r\n"):
                    received.extend(await stream.receive_some(65536))
        alone = await engine.complete(
            "once upon a time", max_tokens=490, ignore_eos=True, temperature=0, detokenize="text"
        )
    first_full = writes.results.index(False)
    assert True in writes.results[first_full + 1 :]  # direct writes resumed after the stall
    status, _, chunked = split_response(bytes(received))
    events = sse_events(bytearray(), b"".join(dechunk(chunked)))
    assert status == 200 and events[-1] == "[DONE]"
    choices = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert choices[-1]["finish_reason"] == "length"
    assert "".join(c["text"] for c in choices) == alone.text  # every token, in order


async def test_a_client_that_stops_reading_mid_stream_of_a_real_engine_is_dropped(
    long_checkpoint, monkeypatch
) -> None:
    """Tokens written until the socket is full, then the waiting writes under send_timeout:
    the stalled client is dropped, its generation cancelled, and the server keeps serving.
    The socket usually fills on a write of the engine's delivery task (the token sink); on a
    loaded machine enough tokens can queue before the sink is installed to fill it from the
    waiting writes alone (the test above holds the sink's own path)."""
    writes = DirectWrites(monkeypatch)
    body = json.dumps(
        {"prompt": "once upon a time", "max_tokens": 490, "ignore_eos": True, "stream": True}
    ).encode()
    async with (
        open_engine(long_checkpoint, workers=1, max_batch=4) as engine,
        running_server(engine, send_timeout=0.5) as (_, port),
    ):
        async with await _slow_reader_socket(port) as stream:  # sends, then never reads
            await stream.send_all(post("/v1/completions", body))
            cancelled = re.compile(
                r'^tinyllm_request_success_total\{finished_reason="cancelled"\} 1\.0$', re.M
            )
            with trio.fail_after(20):  # dropped once a write has waited send_timeout
                while not cancelled.search((await raw_request(port, get("/metrics"))).decode()):
                    await trio.sleep(0.05)
        assert not writes.results or writes.results[-1] is False  # a sink stopped at a full socket
        assert engine.stats()["running"] == 0
        await _still_serving(port)

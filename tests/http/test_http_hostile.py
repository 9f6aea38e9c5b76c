"""Issue 11, the HTTP findings: hostile input gets a 4xx, never a 5xx or a dead server."""

from __future__ import annotations

import json

import pytest
import trio

from http_fixtures import (
    FakeEngine,
    get,
    post,
    raw_request,
    read_until,
    running_server,
    split_response,
)

GENERATION = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 3}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
    ("/process", {"message": "hi", "max_tokens": 3}),
]
SURROGATE = '"\\ud800"'


@pytest.mark.parametrize(("path", "body"), GENERATION)
@pytest.mark.parametrize("field", ["stop", "text"])
async def test_a_lone_surrogate_is_a_400_with_param(path, body, field) -> None:
    engine = FakeEngine()
    text_field = {"/v1/completions": "prompt", "/process": "message"}.get(path)
    raw_body = json.dumps(body)
    if field == "stop":
        raw_body = raw_body[:-1] + ', "stop": ' + SURROGATE + "}"
        param = "stop"
    elif text_field is not None:
        raw_body = raw_body.replace('"hi"', SURROGATE)
        param = text_field
    else:
        raw_body = raw_body.replace('"hi"', SURROGATE)
        param = "messages[0].content"
    async with running_server(engine) as (_, port):
        raw = await raw_request(port, post(path, raw_body.encode()))
        status, _, payload = split_response(raw)
        assert status == 400, raw
        assert json.loads(payload)["error"]["param"] == param
        # the server is still up and serving
        status, _, _ = split_response(await raw_request(port, get("/ping")))
        assert status == 200
    assert engine.calls == []


async def test_tokenize_refuses_a_lone_surrogate() -> None:
    async with running_server(FakeEngine()) as (_, port):
        raw = await raw_request(port, post("/tokenize", b'{"prompt": "a\\udfff"}'))
    status, _, payload = split_response(raw)
    assert status == 400 and json.loads(payload)["error"]["param"] == "prompt"


async def test_a_valid_surrogate_pair_is_text() -> None:
    async with running_server(FakeEngine()) as (_, port):
        raw = await raw_request(port, post("/tokenize", b'{"prompt": "a \\ud83d\\ude00"}'))
    assert split_response(raw)[0] == 200


@pytest.mark.parametrize(
    "path", ["/v1/completions", "/v1/chat/completions", "/process", "/tokenize"]
)
async def test_deeply_nested_json_is_a_400(path) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    async with running_server(FakeEngine(), max_body_size=1 << 20) as (_, port):
        raw = await raw_request(port, post(path, deep))
    assert split_response(raw)[0] == 400, raw[:200]


@pytest.mark.parametrize("role", [{"a": 1}, ["user"], 3, None])
async def test_a_wrong_typed_role_is_a_400(role) -> None:
    body = json.dumps({"messages": [{"role": role, "content": "hi"}]}).encode()
    async with running_server(FakeEngine()) as (_, port):
        raw = await raw_request(port, post("/v1/chat/completions", body))
    status, _, payload = split_response(raw)
    assert status == 400 and json.loads(payload)["error"]["param"] == "messages[0]"


async def test_content_length_with_transfer_encoding_is_400_and_closes() -> None:
    smuggled = b"GET /ping HTTP/1.1\r\nHost: t\r\n\r\n"
    chunked = b"%x\r\n%b\r\n0\r\n\r\n" % (2, b"{}")
    request = (
        (
            b"POST /tokenize HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(chunked)
        )
        + chunked
        + smuggled
    )
    async with running_server(FakeEngine()) as (_, port):
        raw = await raw_request(port, request, timeout=10.0)
    assert raw.count(b"HTTP/1.1 ") == 1, raw  # the smuggled request is not served
    status, headers, _ = split_response(raw)
    assert status == 400 and headers["connection"] == "close"


async def test_head_is_answered_like_get_without_a_body() -> None:
    async with running_server(FakeEngine()) as (_, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"HEAD /ping HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            raw = b""
            with trio.fail_after(10):
                while chunk := await stream.receive_some(65536):
                    raw += chunk
        status, headers, body = split_response(raw)
        assert status == 200 and headers["content-length"] == str(len(b'{"status": "ok"}'))
        assert body == b""
        raw = await raw_request(
            port, b"HEAD /tokenize HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        status, headers, _ = split_response(raw)
        assert status == 405 and headers["allow"] == "POST"


async def _busy_connections(port: int, n: int, host: str = "127.0.0.1") -> list:
    """`n` connections each in the middle of sending a head: busy, so never evicted."""
    streams = []
    for _ in range(n):
        stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=host)
        await stream.send_all(b"GET /ping HTTP/1.1\r\nHost: t\r\n")
        streams.append(stream)
    return streams


async def _wait_for_connections(server, n: int) -> None:
    with trio.fail_after(5):
        while server.connection_count < n:
            await trio.sleep(0.01)


@pytest.mark.slow
async def test_the_connection_cap_is_exact() -> None:
    cap, extra = 3, 3
    async with running_server(FakeEngine(), max_connections=cap, header_timeout=30.0) as (
        server,
        port,
    ):
        held = await _busy_connections(port, cap + extra)
        await _wait_for_connections(server, cap)
        refused = 0
        for stream in held:
            with trio.move_on_after(3.0):
                data = await stream.receive_some(65536)
                refused += data.startswith(b"HTTP/1.1 503")
        assert refused == extra
        assert server.connection_count == cap
        for stream in held:
            await stream.aclose()


# ---- finding 5: one client must not exhaust the connection cap --------------------------------


async def test_a_connection_that_never_speaks_is_closed_after_the_header_timeout() -> None:
    async with running_server(FakeEngine(), header_timeout=0.3, keep_alive_timeout=30.0) as (
        server,
        port,
    ):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            start = trio.current_time()
            with trio.fail_after(3):
                assert await stream.receive_some(100) == b""  # closed, silently
            assert trio.current_time() - start > 0.25
        with trio.fail_after(2):
            while server.connection_count:
                await trio.sleep(0.01)


async def test_the_first_head_must_arrive_within_the_header_timeout_of_the_accept() -> None:
    """Trickling a byte at a time does not re-arm the clock for a first request."""
    async with running_server(FakeEngine(), header_timeout=1.0) as (_, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        start = trio.current_time()
        async with stream:
            await trio.sleep(0.9)
            await stream.send_all(b"G")
            raw = await read_all(stream, timeout=3)
        assert trio.current_time() - start < 1.6  # not 0.9 + 1.0: the clock was not re-armed
        status, _, _ = split_response(raw)
        assert status == 408


async def read_all(stream: trio.SocketStream, *, timeout: float) -> bytes:
    raw = b""
    with trio.fail_after(timeout):
        while chunk := await stream.receive_some(65536):
            raw += chunk
    return raw


async def test_silent_sockets_cannot_lock_out_a_client_or_health() -> None:
    """Many more silent sockets than the cap: each new one evicts the oldest idle one, so a
    real client and /health are served at once (before: 503 until the sockets timed out)."""
    engine = FakeEngine()
    cap = 8
    async with running_server(
        engine, max_connections=cap, header_timeout=30.0, keep_alive_timeout=30.0
    ) as (server, port):
        silent = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(cap)]
        await _wait_for_connections(server, cap)
        await trio.sleep(1.1)  # idle long enough to be taken for silent (not a new client)
        silent += [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(4 * cap)]
        await trio.sleep(1.1)
        with trio.fail_after(5):
            raw = await raw_request(port, post("/v1/completions", b'{"prompt": "hi"}'))
            assert split_response(raw)[0] == 200, raw
            raw = await raw_request(port, get("/health"))
            assert split_response(raw)[0] == 200, raw
        assert server.connection_count <= cap
        assert server.app.metrics.connections_evicted._value.get() >= 1
        for stream in silent:
            await stream.aclose()


async def test_an_idle_keep_alive_connection_makes_room_and_its_client_sees_a_close() -> None:
    async with running_server(FakeEngine(), max_connections=1, keep_alive_timeout=30.0) as (
        _,
        port,
    ):
        idle = await trio.open_tcp_stream("127.0.0.1", port)
        async with idle:
            await idle.send_all(get("/ping", close=False))
            await read_until(idle, b'{"status": "ok"}')
            await trio.sleep(1.1)
            raw = await raw_request(port, get("/v1/models"))
            assert split_response(raw)[0] == 200
            with trio.fail_after(2):
                assert await idle.receive_some(100) == b""


@pytest.mark.parametrize("path", ["/health", "/v1/health", "/ping"])
async def test_probes_are_answered_over_the_cap_and_everything_else_is_503(path) -> None:
    async with running_server(FakeEngine(), max_connections=2, header_timeout=30.0) as (
        server,
        port,
    ):
        held = await _busy_connections(port, 2)
        await _wait_for_connections(server, 2)
        with trio.fail_after(5):
            status, headers, body = split_response(await raw_request(port, get(path)))
            assert status == 200 and json.loads(body) == {"status": "ok"}
            assert headers["connection"] == "close"
            raw = await raw_request(port, post("/v1/completions", b'{"prompt": "hi"}'))
            status, headers, _ = split_response(raw)
            assert status == 503 and headers["retry-after"] == "1"
            # one that sends nothing is answered too, and never left hanging
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                assert (await read_all(stream, timeout=4)).startswith(b"HTTP/1.1 503")
        for stream in held:
            await stream.aclose()


async def test_max_connections_per_ip_limits_one_address_only() -> None:
    async with running_server(
        FakeEngine(), max_connections=100, max_connections_per_ip=2, header_timeout=30.0
    ) as (server, port):
        held = await _busy_connections(port, 2, host="127.0.0.2")
        await _wait_for_connections(server, 2)
        with trio.fail_after(5):
            other = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.2")
            async with other:
                await other.send_all(get("/v1/models"))
                status, headers, _ = split_response(await read_all(other, timeout=4))
                assert status == 503 and headers["retry-after"] == "1"
            # another address is served as usual
            raw = await raw_request(port, get("/v1/models"))
            assert split_response(raw)[0] == 200
        for stream in held:
            await stream.aclose()


async def test_at_the_per_ip_cap_that_address_evicts_its_own_idle_connection() -> None:
    async with running_server(
        FakeEngine(), max_connections=100, max_connections_per_ip=1, keep_alive_timeout=30.0
    ) as (_, port):
        mine = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.2")
        theirs = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.3")
        async with mine, theirs:
            for stream in (mine, theirs):
                await stream.send_all(get("/ping", close=False))
                await read_until(stream, b'{"status": "ok"}')
            await trio.sleep(1.1)
            again = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.2")
            async with again:
                await again.send_all(get("/v1/models"))
                assert split_response(await read_all(again, timeout=4))[0] == 200
            with trio.fail_after(2):
                assert await mine.receive_some(100) == b""  # evicted: same address
            await theirs.send_all(get("/ping"))  # another address's connection is untouched
            assert split_response(await read_all(theirs, timeout=4))[0] == 200


def test_max_connections_per_ip_is_a_flag_and_an_env_var() -> None:
    import argparse

    from tinyllm_trio.config import ServerConfig, add_server_arguments

    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    args = parser.parse_args(["--max-connections-per-ip", "4"])
    assert ServerConfig.from_args(args, env={}).max_connections_per_ip == 4
    empty = parser.parse_args([])
    env = {"TINYLLM_MAX_CONNECTIONS_PER_IP": "7"}
    assert ServerConfig.from_args(empty, env=env).max_connections_per_ip == 7
    assert ServerConfig().max_connections_per_ip == 0
    with pytest.raises(ValueError, match="max_connections_per_ip"):
        ServerConfig(max_connections_per_ip=-1)


# ---- finding 6: prompts are bounded before they are tokenized, and off the event loop ---------

MEGABYTE = "lily and tom " * 80_000  # about 1 MB, 240k words


def _with_prompt(path: str, text: str) -> dict:
    return {
        "/v1/completions": {"prompt": text, "max_tokens": 2},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": text}], "max_tokens": 2},
        "/process": {"message": text, "max_tokens": 2},
        "/tokenize": {"prompt": text},
    }[path]


@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("/v1/completions", "prompt"),
        ("/v1/chat/completions", "messages"),
        ("/process", "message"),
        ("/tokenize", "prompt"),
    ],
)
async def test_a_megabyte_prompt_is_a_400_before_any_tokenizing(path, param) -> None:
    engine = FakeEngine(max_context=512)
    body = json.dumps(_with_prompt(path, MEGABYTE)).encode()
    async with running_server(engine, max_body_size=2 << 20) as (_, port):
        raw = await raw_request(port, post(path, body))
    status, _, payload = split_response(raw)
    error = json.loads(payload)["error"]
    assert status == 400 and error["param"] == param and error["code"] == "prompt_too_long"
    assert "16384" in error["message"]  # 32 characters per token of the 512-token context
    assert engine.encode_threads == [] and engine.calls == []


async def test_a_long_prompt_is_encoded_in_a_thread_and_only_as_far_as_the_context() -> None:
    engine = FakeEngine(max_context=512)
    text = "lily and tom " * 1000  # 13,000 characters: under the cap, over the context
    async with running_server(engine) as (_, port):
        raw = await raw_request(
            port, post("/v1/completions", json.dumps({"prompt": text}).encode())
        )
        status, _, payload = split_response(raw)
        assert status == 400
        error = json.loads(payload)["error"]
        assert error["code"] == "context_length_exceeded" and "more than 511" in error["message"]
        assert engine.encode_threads == [False]  # not on the event loop's thread
        raw = await raw_request(port, post("/tokenize", json.dumps({"prompt": text}).encode()))
        status, _, payload = split_response(raw)
        assert status == 200 and json.loads(payload)["count"] == 3001  # all of it, BOS first
        short = json.dumps({"prompt": "lily and tom", "max_tokens": 2}).encode()
        raw = await raw_request(port, post("/v1/completions", short))
        assert split_response(raw)[0] == 200
        assert engine.calls[-1][0] == "lily and tom"  # short text: the engine encodes it inline


async def test_small_requests_are_served_while_huge_prompts_are_refused() -> None:
    engine = FakeEngine(max_context=512)
    huge = post("/v1/completions", json.dumps({"prompt": MEGABYTE}).encode())
    near = post("/v1/completions", json.dumps({"prompt": MEGABYTE[:16000]}).encode())
    small = post("/v1/completions", b'{"prompt": "lily", "max_tokens": 2}')
    statuses: list[int] = []
    latencies: list[float] = []

    async def one(request: bytes, timed: bool) -> None:
        start = trio.current_time()
        statuses.append(split_response(await raw_request(port, request))[0])
        if timed:
            latencies.append(trio.current_time() - start)

    async with (
        running_server(engine, max_body_size=2 << 20) as (_, port),
        trio.open_nursery() as nursery,
    ):
        for _ in range(4):
            nursery.start_soon(one, huge, False)
            nursery.start_soon(one, near, False)
        for _ in range(20):
            nursery.start_soon(one, small, True)
    assert sorted(statuses) == [200] * 20 + [400] * 8
    assert max(latencies) < 2.0


# ---- finding 8: <|endoftext|> in user text is text unless the client asks for special parsing --

EOT = "lily<|endoftext|>tom"


async def test_chat_does_not_parse_special_text_by_default_and_can_be_asked_to() -> None:
    from tinyllm_trio.model.tokenizer import EOS

    engine = FakeEngine()
    messages = [{"role": "user", "content": EOT}]
    async with running_server(engine) as (_, port):
        for extra in ({}, {"parse_special": True}):
            body = json.dumps({"messages": messages, "max_tokens": 1, **extra}).encode()
            raw = await raw_request(port, post("/v1/chat/completions", body))
            assert split_response(raw)[0] == 200
        raw = await raw_request(
            port, post("/v1/chat/completions", b'{"messages": [], "parse_special": 1}')
        )
        status, _, payload = split_response(raw)
    default, parsed = (engine.encode_prompt(p) for p, _ in engine.calls)
    assert EOS not in default and EOS in parsed
    assert status == 400 and json.loads(payload)["error"]["param"] in ("messages", "parse_special")


@pytest.mark.parametrize("path", ["/v1/completions", "/process"])
async def test_completions_and_process_parse_special_text_by_default(path) -> None:
    from tinyllm_trio.model.tokenizer import EOS

    engine = FakeEngine()
    async with running_server(engine) as (_, port):
        for extra in ({}, {"parse_special": False}):
            body = {**_with_prompt(path, EOT), "max_tokens": 1, **extra}
            raw = await raw_request(port, post(path, json.dumps(body).encode()))
            assert split_response(raw)[0] == 200
    default, plain = (engine.encode_prompt(p) for p, _ in engine.calls)
    assert EOS in default and EOS not in plain


async def test_tokenize_counts_as_generation_would() -> None:
    from tinyllm_trio.model.tokenizer import EOS

    async def tokens(port: int, body: dict) -> list[int]:
        raw = await raw_request(port, post("/tokenize", json.dumps(body).encode()))
        return json.loads(split_response(raw)[2])["tokens"]

    async with running_server(FakeEngine()) as (_, port):
        assert EOS in await tokens(port, {"prompt": EOT})
        assert EOS not in await tokens(port, {"prompt": EOT, "parse_special": False})
        assert EOS not in await tokens(port, {"messages": [{"role": "user", "content": EOT}]})

"""Issue 11, the HTTP findings: hostile input gets a 4xx, never a 5xx or a dead server."""

from __future__ import annotations

import json

import pytest
import trio

from http_fixtures import FakeEngine, get, post, raw_request, running_server, split_response

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


async def test_the_connection_cap_is_exact() -> None:
    cap, extra = 3, 3  # extra <= cap: beyond that many refusals at once, a close
    async with running_server(FakeEngine(), max_connections=cap, keep_alive_timeout=30.0) as (
        server,
        port,
    ):
        streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(cap + extra)]
        refused = 0
        for stream in streams:
            with trio.move_on_after(2.0):
                data = await stream.receive_some(65536)
                refused += data.startswith(b"HTTP/1.1 503")
        assert refused == extra
        assert server.connection_count == cap
        for stream in streams:
            await stream.aclose()

"""The seed's API over real sockets: /ping and /process bytes exactly as the original wrote them.

Uses the scripted fake engine, so the expected bytes are known in advance; the real engine's
/process is exercised in test_http_integration.py.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import trio

from http_fixtures import (
    FakeEngine,
    dechunk,
    get,
    post,
    raw_decode_all,
    raw_request,
    read_until,
    running_server,
    split_response,
)
from tinyllm_trio.http.process_api import DEFAULT_MAX_TOKENS, chunk


async def test_ping_bytes() -> None:
    async with running_server(FakeEngine()) as (_, port):
        raw = await raw_request(port, get("/ping"))
    assert raw.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
    _, headers, body = split_response(raw)
    assert body == b'{"status": "ok"}'
    assert headers["content-length"] == str(len(body))


async def test_process_bytes_match_the_original_capture() -> None:
    """The ORIGINAL.md capture: `Lily and Tom`, max_tokens 5, five ` worried` tokens."""
    async with running_server(FakeEngine()) as (_, port):
        request = post("/process", b'{"message": "Lily and Tom", "max_tokens": 5}', close=False)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            raw = await read_until(stream, b"\r\n0\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    # Same status line and headers as the original (h11 writes Transfer-Encoding last;
    # header order carries no meaning in HTTP), plus our X-Request-Id.
    assert head.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
    lines = head.split(b"\r\n")[1:]
    assert b"Transfer-Encoding: chunked" in lines
    assert b"Connection: keep-alive" in lines
    assert sum(line.startswith(b"X-Request-Id: ") for line in lines) == 1
    assert len(lines) == 4
    expected = (
        b'2b\r\n{"chunk": "Lily and Tom", "is_last": false}\r\n'
        + b'27\r\n{"chunk": " worried", "is_last": false}\r\n' * 4
        + b'26\r\n{"chunk": " worried", "is_last": true}\r\n'
        + b"0\r\n\r\n"
    )
    assert body == expected


async def test_process_eos_stop_ends_with_an_empty_last_chunk() -> None:
    engine = FakeEngine(words=(" the", " cat"), eos_after=3)
    async with running_server(engine) as (_, port):
        raw = await raw_request(port, post("/process", b'{"message": "hi", "max_tokens": 10}'))
    _, _, body = split_response(raw)
    chunks = dechunk(body)
    assert [json.loads(c) for c in chunks] == [
        {"chunk": "hi", "is_last": False},
        {"chunk": " the", "is_last": False},
        {"chunk": " cat", "is_last": False},
        {"chunk": " the", "is_last": False},
        {"chunk": "", "is_last": True},
    ]
    # One JSON object per chunk, no separators: the original clients' raw_decode parses it.
    objects = raw_decode_all(b"".join(chunks))
    assert "".join(o["chunk"] for o in objects[1:]) == " the cat the"
    assert objects[-1]["is_last"] is True


async def test_process_non_ascii_prompt_is_raw_utf8() -> None:
    message = 'Lily é 🐈 "quoted"'
    async with running_server(FakeEngine()) as (_, port):
        body = json.dumps({"message": message, "max_tokens": 1}).encode()
        raw = await raw_request(port, post("/process", body))
    chunks = dechunk(split_response(raw)[2])
    assert chunks[0] == chunk(message, False)
    assert (
        chunks[0] == json.dumps({"chunk": message, "is_last": False}, ensure_ascii=False).encode()
    )
    assert "é 🐈".encode() in chunks[0]


async def test_process_default_max_tokens_and_greedy_default() -> None:
    engine = FakeEngine()
    async with running_server(engine) as (_, port):
        raw = await raw_request(port, post("/process", b'{"message": "hi"}'))
    chunks = dechunk(split_response(raw)[2])
    assert len(chunks) == 1 + DEFAULT_MAX_TOKENS
    prompt, params = engine.calls[0]
    assert prompt == "hi"
    assert params.max_tokens == DEFAULT_MAX_TOKENS and params.temperature == 0.0


async def test_process_sampling_fields_reach_the_engine() -> None:
    engine = FakeEngine()
    body = {
        "message": "hi",
        "max_tokens": 2,
        "temperature": 0.7,
        "top_k": 5,
        "top_p": 0.9,
        "seed": 3,
        "stop": ["."],
    }
    async with running_server(engine) as (_, port):
        await raw_request(port, post("/process", json.dumps(body).encode()))
    params = engine.calls[0][1]
    assert (params.temperature, params.top_k, params.top_p, params.seed, params.stop) == (
        0.7,
        5,
        0.9,
        3,
        (".",),
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"max_tokens": 5}', "message"),
        (b'{"message": "", "max_tokens": 5}', "message"),
        (b'{"message": "   ", "max_tokens": 5}', "message"),
        (b'{"message": 12, "max_tokens": 5}', "message"),
        (b'{"message": "hi", "max_tokens": 0}', "max_tokens"),
        (b'{"message": "hi", "max_tokens": -3}', "max_tokens"),
        (b'{"message": "hi", "max_tokens": "5"}', "max_tokens"),
        (b'{"message": "hi", "max_tokens": 2.5}', "max_tokens"),
        (b'{"message": "hi", "max_tokens": true}', "max_tokens"),
        (b'{"message": "hi", "max_tokens": 65}', "max_tokens"),  # context is 64
        (b'{"message": "hi", "temperature": -1}', "temperature"),
        (b'["message"]', ""),
        (b'{"message": "hi"', None),  # invalid JSON
        (b'{"message": "\xff\xfe"}', None),  # not UTF-8
    ],
)
async def test_process_bad_requests_are_400(body: bytes, param: str | None) -> None:
    engine = FakeEngine()
    async with running_server(engine) as (_, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(post("/process", body, close=False))
            raw = await read_until(stream, b"}}")
            status, headers, payload = split_response(raw)
            assert status == 400
            assert headers["content-type"] == "application/json"
            error = json.loads(payload)["error"]
            assert error["message"] and error["type"] == "invalid_request_error"
            if param is not None:
                assert error["param"] == param
            # The connection stays usable (keep-alive) after a 400 for a bad body.
            await stream.send_all(get("/ping", close=False))
            assert b'{"status": "ok"}' in await read_until(stream, b'{"status": "ok"}')
    assert engine.calls == []


async def test_process_keep_alive_serves_several_requests_on_one_connection() -> None:
    async with running_server(FakeEngine()) as (_, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            for i in range(3):
                body = json.dumps({"message": f"m{i}", "max_tokens": 2}).encode()
                await stream.send_all(post("/process", body, close=False))
                raw = await read_until(stream, b"\r\n0\r\n\r\n")
                chunks = dechunk(split_response(raw)[2])
                assert json.loads(chunks[0]) == {"chunk": f"m{i}", "is_last": False}
                assert json.loads(chunks[-1])["is_last"] is True


async def test_process_prompt_too_long_is_400_context_length_exceeded() -> None:
    async with running_server(FakeEngine()) as (_, port):
        body = json.dumps({"message": "the cat " * 40, "max_tokens": 5}).encode()
        raw = await raw_request(port, post("/process", body))
    status, _, payload = split_response(raw)
    assert status == 400
    error = json.loads(payload)["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "message"


async def test_process_overload_is_429_with_retry_after() -> None:
    async with running_server(FakeEngine(overloaded=True)) as (_, port):
        raw = await raw_request(port, post("/process", b'{"message": "hi"}'))
    status, headers, payload = split_response(raw)
    assert status == 429
    assert int(headers["retry-after"]) >= 1
    assert json.loads(payload)["error"]["type"] == "rate_limit_error"


async def test_process_error_mid_stream_is_a_final_error_chunk() -> None:
    async with running_server(FakeEngine(fail_after=2)) as (_, port):
        raw = await raw_request(port, post("/process", b'{"message": "hi", "max_tokens": 9}'))
    status, _, body = split_response(raw)
    assert status == 200
    objects = [json.loads(c) for c in dechunk(body)]
    assert [o["chunk"] for o in objects[:3]] == ["hi", " worried", " worried"]
    assert objects[-1] == {"chunk": "", "is_last": True, "error": "the worker died"}
    assert body.endswith(b"0\r\n\r\n")


async def test_process_while_loading_is_503() -> None:
    async with running_server(None) as (_, port):
        raw = await raw_request(port, post("/process", b'{"message": "hi"}'))
    status, headers, payload = split_response(raw)
    assert status == 503 and headers["retry-after"] == "1"
    assert json.loads(payload)["error"]["code"] == "loading"


async def _curl_arrivals(args: list[str]) -> list[tuple[float, bytes]]:
    """Run curl --no-buffer; return (seconds since start, bytes) for each read of its stdout."""
    start = trio.current_time()
    arrivals: list[tuple[float, bytes]] = []
    proc = await trio.lowlevel.open_process(
        ["curl", "--no-buffer", "-sS", *args], stdout=subprocess.PIPE
    )
    try:
        with trio.fail_after(10):
            while data := await proc.stdout.receive_some(65536):
                arrivals.append((trio.current_time() - start, data))
            assert await proc.wait() == 0
    finally:
        proc.kill()
        await proc.wait()
        await proc.stdout.aclose()
    return arrivals


async def test_curl_sees_process_chunks_as_they_are_generated() -> None:
    """Tokens 0.1 s apart: curl must get each one about 0.1 s after the previous one."""
    engine = FakeEngine(delay=0.1)
    async with running_server(engine) as (_, port):
        arrivals = await _curl_arrivals(
            [
                "-H",
                "Content-Type: application/json",
                "-d",
                '{"message": "Lily", "max_tokens": 6}',
                f"http://127.0.0.1:{port}/process",
            ]
        )
    objects = raw_decode_all(b"".join(data for _, data in arrivals))
    assert [o["chunk"] for o in objects] == ["Lily"] + [" worried"] * 6
    assert len(arrivals) >= 5  # not one burst at the end
    first_token = next(t for t, data in arrivals if b"worried" in data)
    assert arrivals[-1][0] - first_token >= 0.4  # five 0.1 s gaps after the first token


async def test_curl_sees_sse_events_as_they_are_generated() -> None:
    engine = FakeEngine(delay=0.1)
    async with running_server(engine) as (_, port):
        arrivals = await _curl_arrivals(
            [
                "-H",
                "Content-Type: application/json",
                "-d",
                '{"prompt": "Lily", "max_tokens": 5, "stream": true}',
                f"http://127.0.0.1:{port}/v1/completions",
            ]
        )
    assert len(arrivals) >= 4
    assert arrivals[-1][1].endswith(b"data: [DONE]\n\n")
    assert arrivals[-1][0] - arrivals[0][0] >= 0.3


async def test_no_repeat_ngram_and_detokenize_defaults_by_surface() -> None:
    engine = FakeEngine()
    completion = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    async with running_server(engine) as (_, port):
        await raw_request(port, post("/process", b'{"message": "hi", "max_tokens": 2}'))
        await raw_request(port, post("/v1/completions", completion))
        explicit = {"message": "hi", "max_tokens": 2, "no_repeat_ngram_size": 0}
        await raw_request(port, post("/process", json.dumps(explicit).encode()))
        raw = await raw_request(
            port, post("/process", b'{"message": "hi", "no_repeat_ngram_size": -1}')
        )
    assert [p.no_repeat_ngram_size for _, p in engine.calls] == [3, 0, 0]
    assert {p.detokenize for _, p in engine.calls} == {"text"}
    assert split_response(raw)[0] == 400 and b"no_repeat_ngram_size" in raw
    async with running_server(engine, no_repeat_ngram_size=2, detokenize="plain") as (_, port):
        await raw_request(port, post("/process", b'{"message": "hi", "max_tokens": 2}'))
    assert (engine.calls[-1][1].no_repeat_ngram_size, engine.calls[-1][1].detokenize) == (
        2,
        "plain",
    )

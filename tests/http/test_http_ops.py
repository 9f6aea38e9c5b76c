"""Operations endpoints (/health, /metrics, /tokenize, /detokenize), embedding and shutdown.

In-process servers with the scripted fake engine: readiness, Prometheus text, disconnect
cancelling a generation (queued or running), the graceful drain and its grace period.
"""

from __future__ import annotations

import io
import json
import logging
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
from tinyllm_trio.bench.client import HTTPClient, sse_events
from tinyllm_trio.http.server import configure_logging, serve


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if labels else "") + r" (\S+)"
    match = re.search(r"^" + pattern + "$", text, re.M)
    assert match, f"{name}{{{want}}} not in metrics"
    return float(match.group(1))


async def _metrics(port: int) -> str:
    raw = await raw_request(port, get("/metrics"))
    status, headers, body = split_response(raw)
    assert status == 200 and headers["content-type"].startswith("text/plain")
    return body.decode()


async def test_health_follows_loading_and_readiness() -> None:
    async with running_server(None) as (server, port):
        status, _, body = split_response(await raw_request(port, get("/health")))
        assert status == 503 and json.loads(body)["error"]["message"] == "Loading model"
        # liveness and metrics answer while loading
        assert split_response(await raw_request(port, get("/ping")))[0] == 200
        assert "tinyllm_num_requests_running 0.0" in await _metrics(port)
        engine = FakeEngine(ready=False)
        server.attach_engine(engine)
        assert split_response(await raw_request(port, get("/health")))[0] == 503
        engine.ready = True
        status, _, body = split_response(await raw_request(port, get("/v1/health")))
        assert (status, body) == (200, b'{"status": "ok"}')


async def test_metrics_count_requests_tokens_and_latencies() -> None:
    engine = FakeEngine()
    async with running_server(engine) as (_, port):
        await raw_request(port, post("/process", b'{"message": "hi", "max_tokens": 5}'))
        await raw_request(port, get("/nope"))
        engine.running, engine.waiting = 3, 2  # engine.stats() is exported at scrape time
        text = await _metrics(port)
        # a second server has its own registry
        async with running_server(FakeEngine()) as (_, other):
            other_text = await _metrics(other)
    requests = "tinyllm_http_requests_total"
    assert _metric(text, requests, endpoint="/process", method="POST", status="200") == 1
    assert _metric(text, requests, endpoint="other", method="GET", status="404") == 1
    assert _metric(text, "tinyllm_generation_tokens_total") == 5
    assert _metric(text, "tinyllm_prompt_tokens_total") == len(engine.tokenizer.encode("hi"))
    assert _metric(text, "tinyllm_request_success_total", finished_reason="length") == 1
    assert _metric(text, "tinyllm_time_to_first_token_seconds_count") == 1
    assert _metric(text, "tinyllm_inter_token_latency_seconds_count") == 4
    assert _metric(text, "tinyllm_e2e_request_latency_seconds_count") == 1
    assert _metric(text, "tinyllm_request_queue_time_seconds_sum") == 0.002
    assert _metric(text, "tinyllm_num_requests_running") == 3
    assert _metric(text, "tinyllm_num_requests_waiting") == 2
    assert _metric(text, "tinyllm_http_generations_active") == 0
    assert "/process" not in other_text


async def test_tokenize_and_detokenize_round_trip() -> None:
    engine = FakeEngine()
    async with running_server(engine) as (_, port):
        raw = await raw_request(port, post("/tokenize", b'{"prompt": "Lily and Tom"}'))
        body = json.loads(split_response(raw)[2])
        ids = engine.tokenizer.encode("Lily and Tom")
        assert body == {"tokens": ids, "count": len(ids), "max_model_len": 64}
        raw = await raw_request(
            port,
            post("/tokenize", b'{"content": "tom", "add_special": false, "with_pieces": true}'),
        )
        pieces = json.loads(split_response(raw)[2])["tokens"]
        assert [p["id"] for p in pieces] == engine.tokenizer.encode("tom", bos=False)
        raw = await raw_request(port, post("/detokenize", json.dumps({"tokens": ids}).encode()))
        body = json.loads(split_response(raw)[2])
        assert body["content"] == body["prompt"] == engine.tokenizer.decode(ids)
        raw = await raw_request(port, post("/detokenize", b'{"tokens": [1, 99999]}'))
        status, _, payload = split_response(raw)
        assert status == 400 and json.loads(payload)["error"]["param"] == "tokens"


async def test_serve_embeds_in_a_nursery_and_reports_its_port() -> None:
    stop = trio.Event()
    engine = FakeEngine()
    async with trio.open_nursery() as engine_nursery:  # the engine's task, as open_engine's
        await engine_nursery.start(engine.run)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                lambda task_status: serve(
                    engine, fast_config(), shutdown_trigger=stop.wait, task_status=task_status
                )
            )
            assert split_response(await raw_request(port, get("/ping")))[0] == 200
            stop.set()  # graceful: serve returns by itself
        engine_nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, FakeEngine(), "127.0.0.1", 0)
        assert isinstance(port, int) and port > 0
        nursery.cancel_scope.cancel()


async def test_client_disconnect_mid_stream_cancels_the_generation() -> None:
    engine = FakeEngine(delay=0.05)
    async with running_server(engine) as (_, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(post("/process", b'{"message": "hi", "max_tokens": 60}'))
        await read_until(stream, b'" worried", "is_last": false}\r\n')
        assert engine.running == 1
        await stream.aclose()
        with trio.fail_after(1):
            while engine.running:
                await trio.sleep(0.01)
        assert engine.cancelled == 1 and engine.finished == 0
        text = await _metrics(port)
        assert _metric(text, "tinyllm_http_generations_active") == 0
        assert _metric(text, "tinyllm_request_success_total", finished_reason="cancelled") == 1


async def test_client_disconnect_while_queued_cancels_the_request() -> None:
    engine = FakeEngine(first_delay=30)  # never gets a slot while the client is there
    async with running_server(engine) as (_, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(
            post("/v1/completions", b'{"prompt": "x", "stream": true}', close=False)
        )
        with trio.fail_after(1):
            while not engine.running:
                await trio.sleep(0.01)
        await stream.aclose()
        with trio.fail_after(1):
            while engine.running:
                await trio.sleep(0.01)
        assert engine.cancelled == 1


async def test_sse_ping_while_waiting_for_the_first_token() -> None:
    engine = FakeEngine(first_delay=0.35)
    async with (
        running_server(engine, sse_ping_interval=0.1) as (_, port),
        await HTTPClient.connect("127.0.0.1", port) as client,
    ):
        response = await client.request(
            "POST", "/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True}
        )
        assert response.status == 200
        raw = b"".join([c async for c in response.chunks()])
    assert raw.startswith(b": ping\n\n: ping\n\n")
    events = sse_events(bytearray(), raw)
    assert events[-1] == "[DONE]" and len(events) == 3


async def test_drain_refuses_connections_closes_idle_ones_and_serves_open_ones() -> None:
    engine = FakeEngine(delay=0.02)
    async with running_server(engine, shutdown_grace=5.0) as (server, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(post("/process", b'{"message": "hi", "max_tokens": 25}', close=False))
        first = await read_until(stream, b"worried")
        idle = await trio.open_tcp_stream("127.0.0.1", port)
        await idle.send_all(get("/ping", close=False))
        await read_until(idle, b'"ok"}')
        opened = await trio.open_tcp_stream("127.0.0.1", port)  # no request on it yet
        with trio.fail_after(2):
            while server.connection_count < 3:
                await trio.sleep(0.01)
        server.shutdown()
        with trio.fail_after(1):  # the idle keep-alive connection is closed at once
            while await idle.receive_some(100):
                pass
        with pytest.raises(OSError):  # the listener is closed: a proxy fails over at connect
            await trio.open_tcp_stream("127.0.0.1", port)
        # a request on a connection that was already open is served, and told to close
        await opened.send_all(post("/process", b'{"message": "hi", "max_tokens": 3}', close=False))
        status, headers, body = split_response(await read_until(opened, b"\r\n0\r\n\r\n"))
        assert status == 200 and headers["connection"] == "close"
        assert json.loads(dechunk(body)[-1])["is_last"] is True
        with trio.fail_after(2):  # and then closed by the server
            while await opened.receive_some(100):
                pass
        rest = await read_until(stream, b"\r\n0\r\n\r\n")
        chunks = [json.loads(c) for c in dechunk(split_response(first + rest)[2])]
        assert len(chunks) == 26 and chunks[-1] == {"chunk": " worried", "is_last": True}
        with trio.fail_after(2):
            await server.stopped.wait()
        assert engine.finished == 2 and engine.cancelled == 0
        await stream.aclose()


async def test_drain_delay_reports_unready_while_serving_then_drains() -> None:
    engine = FakeEngine()
    async with running_server(engine, drain_delay=0.5) as (server, port):
        server.shutdown()
        started = trio.current_time()
        status, _, body = split_response(await raw_request(port, get("/health")))
        assert status == 503 and json.loads(body)["error"]["code"] == "shutting_down"
        raw = await raw_request(port, post("/process", b'{"message": "hi", "max_tokens": 2}'))
        status, _, _ = split_response(raw)
        assert status == 200 and not server.app.draining  # served as usual: still in the delay
        with trio.fail_after(5):
            await server.stopped.wait()
        assert trio.current_time() - started >= 0.5
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)


async def test_grace_period_over_ends_streams_with_an_error_event() -> None:
    engine = FakeEngine(delay=0.05)
    async with running_server(engine, shutdown_grace=0.3) as (server, port):
        process = await trio.open_tcp_stream("127.0.0.1", port)
        await process.send_all(post("/process", b'{"message": "hi", "max_tokens": 60}'))
        sse = await trio.open_tcp_stream("127.0.0.1", port)
        await sse.send_all(
            post(
                "/v1/chat/completions",
                json.dumps(
                    {
                        "messages": [{"role": "user", "content": "x"}],
                        "stream": True,
                        "max_tokens": 60,
                    }
                ).encode(),
            )
        )
        await read_until(process, b"worried")
        await read_until(sse, b"worried")
        start = trio.current_time()
        server.shutdown()
        process_raw = await read_until(process, b"\r\n0\r\n\r\n")
        sse_raw = await read_until(sse, b"[DONE]\n\n\r\n0\r\n\r\n")
        with trio.fail_after(2):
            await server.stopped.wait()
        assert trio.current_time() - start < 1.5
    last = process_raw[: -len(b"\r\n0\r\n\r\n")].rsplit(b"\r\n", 1)[-1]
    final = json.loads(last)
    assert final["is_last"] is True and "shutting down" in final["error"]
    assert b'data: {"error":' in sse_raw
    assert sse_raw.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert engine.cancelled == 2


async def _access_log(requests: list[bytes], **overrides: object) -> list[dict]:
    """The JSON access-log entries a server with `overrides` writes for `requests`."""
    stream = io.StringIO()
    logger = logging.getLogger("tinyllm_trio")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    configure_logging(fast_config(log_format="json"), stream)
    try:
        async with running_server(FakeEngine(), access_log=True, **overrides) as (_, port):
            for request in requests:
                await raw_request(port, request)
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [e for e in lines if e["logger"] == "tinyllm_trio.access"]


async def test_json_access_log_carries_the_request_id() -> None:
    request = get("/ping", extra="X-Request-Id: trace-42\r\n")
    access = await _access_log([request], access_log_skip="")
    assert access[0]["request_id"] == "trace-42" and access[0]["status"] == 200
    assert access[0]["path"] == "/ping" and access[0]["level"] == "info"


async def test_access_log_skips_health_probes_by_default() -> None:
    access = await _access_log([get(p) for p in ("/health", "/ping", "/metrics", "/nowhere")])
    assert [e["path"] for e in access] == ["/metrics", "/nowhere"]
    with pytest.raises(ValueError, match="access_log_skip"):
        fast_config(access_log_skip="health")


def test_fast_histogram_observer_counts_like_observe() -> None:
    """The per-token observer must export exactly what prometheus-client's observe would."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from tinyllm_trio.http.metrics import fast_observer

    values = [0.0, 0.0005, 0.001, 0.0011, 0.025, 0.1, 0.9999, 1.0, 2.5, 7.0, 1e9]
    exported = []
    for fast in (False, True):
        registry = CollectorRegistry()
        hist = Histogram("t_seconds", "t", buckets=(0.001, 0.025, 0.1, 1.0, 2.5), registry=registry)
        observe = fast_observer(hist) if fast else hist.observe
        for value in values:
            observe(value)
        text = generate_latest(registry).decode()  # minus the creation timestamp
        exported.append("\n".join(x for x in text.splitlines() if "_created" not in x))
    assert exported[0] == exported[1]
    assert 't_seconds_bucket{le="0.001"} 3.0' in exported[1]


def test_ready_line_names_version_model_workers_cores_limits_and_url() -> None:
    from tinyllm_trio import __version__
    from tinyllm_trio.http.startup import ready_line

    class Engine:
        model_path = "/models/x"

        def stats(self) -> dict:
            workers = [{"cpu": 1}, {"cpu": 2}]
            return {"workers": workers, "max_batch": 16, "max_queue": 99}

    line = ready_line(fast_config(host="::1"), Engine(), "tinyllm", 8123)
    url = "http://[::1]:8123"
    assert line.startswith(f"tinyllm-trio {__version__} ready, listening on {url}: model tinyllm")
    assert "(/models/x), 2 worker(s) pinned to cores 1,2, max batch 16" in line
    assert "queue 99" in line

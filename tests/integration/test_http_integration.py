"""The HTTP server on the real Engine and real worker processes.

- the official `openai` SDK, streaming and not, against base_url http://127.0.0.1:PORT/v1;
- a raw-socket /process client that checks the bytes and parses them with `raw_decode`, as the
  original clients do, and agrees with /v1/completions on the same greedy request;
- a client disconnecting mid-stream frees its worker slot while its neighbours keep running;
- `python -m tinyllm_trio serve` as a subprocess under load: SIGINT drains (streams finish,
  exit 0), SIGTERM past the grace period ends streams with an error event (exit 0), a second
  SIGINT stops at once (exit 130); every time in bounded time with /dev/shm clean.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import h11
import openai
import pytest
import trio

from conftest import save_random_checkpoint
from http_fixtures import (
    dechunk,
    post,
    raw_decode_all,
    raw_request,
    read_until,
    running_server,
    split_response,
)
from tinyllm_trio.bench.client import HTTPClient, sse_events
from tinyllm_trio.engine import Engine, open_engine
from tinyllm_trio.ipc.ring import shm_entries


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TinyLLM's real shapes (6 layers, 192 wide, context 512): a 400-token stream lasts long
    enough (~0.1 s or more) to catch it mid-stream."""
    return save_random_checkpoint(tmp_path_factory.mktemp("slow-model"), seed=3)


@asynccontextmanager
async def live(checkpoint: Path, **overrides) -> AsyncIterator[tuple[Engine, int]]:
    async with (
        open_engine(checkpoint, workers=1, max_batch=8) as engine,
        running_server(engine, **overrides) as (_, port),
    ):
        yield engine, port


async def test_openai_sdk_and_the_original_process_api_on_real_workers(tiny_checkpoint) -> None:
    async with live(tiny_checkpoint) as (engine, port):

        def use_sdk() -> dict:
            client = openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="any", max_retries=0
            )
            out = {}
            done = client.completions.create(
                model="tinyllm", prompt="once upon a time", max_tokens=12, temperature=0
            )
            out["text"] = done.choices[0].text
            out["usage"] = done.usage
            out["finish"] = done.choices[0].finish_reason
            stream = client.completions.create(
                model="tinyllm",
                prompt="once upon a time",
                max_tokens=12,
                temperature=0,
                stream=True,
            )
            chunks = list(stream)
            out["streamed"] = "".join(c.choices[0].text for c in chunks)
            out["stream_finish"] = chunks[-1].choices[0].finish_reason
            chat = client.chat.completions.create(
                model="tinyllm",
                messages=[
                    {"role": "system", "content": "a story"},
                    {"role": "user", "content": "lily"},
                ],
                max_completion_tokens=6,
                temperature=0.8,
                seed=1,
                stream=True,
                stream_options={"include_usage": True},
            )
            events = list(chat)
            out["chat_usage"] = events[-1].usage
            out["chat_role"] = events[0].choices[0].delta.role
            with_logprobs = client.completions.create(
                model="tinyllm",
                prompt="the cat",
                max_tokens=4,
                logprobs=3,
                extra_body={"ignore_eos": True},
            )
            out["logprobs"] = with_logprobs.choices[0].logprobs
            with pytest.raises(openai.BadRequestError) as info:
                client.completions.create(model="tinyllm", prompt="the cat " * 40)
            out["too_long"] = info.value.body
            return out

        out = await trio.to_thread.run_sync(use_sdk)
        # /process, the original way: raw bytes, raw_decode on the concatenation.
        # (no_repeat_ngram_size 0: the OpenAI endpoints' default, /process's is 3)
        body = b'{"message": "once upon a time", "max_tokens": 12, "no_repeat_ngram_size": 0}'
        request = post("/process", body)
        status, headers, body = split_response(await raw_request(port, request))
        stats = engine.stats()

    assert out["streamed"] == out["text"] and out["stream_finish"] == out["finish"]
    assert out["usage"].completion_tokens <= 12 and out["usage"].prompt_tokens == 5
    assert out["chat_role"] == "assistant" and 1 <= out["chat_usage"].completion_tokens <= 6
    assert len(out["logprobs"].tokens) == 4 and len(out["logprobs"].top_logprobs[0]) == 3
    assert out["too_long"]["code"] == "context_length_exceeded"
    assert status == 200 and headers["content-type"] == "application/json"
    chunks = dechunk(body)
    objects = raw_decode_all(b"".join(chunks))
    assert len(objects) == len(chunks)  # one object per chunk
    assert objects[0] == {"chunk": "once upon a time", "is_last": False}
    assert objects[-1]["is_last"] is True and not any(o["is_last"] for o in objects[:-1])
    assert "".join(o["chunk"] for o in objects[1:]) == out["text"]  # same greedy continuation
    assert stats["running"] == 0 and stats["waiting"] == 0


async def test_client_disconnect_frees_its_worker_slot(slow_checkpoint) -> None:
    body = json.dumps(
        {"prompt": "once upon a time", "max_tokens": 500, "ignore_eos": True, "stream": True}
    ).encode()
    async with live(slow_checkpoint) as (engine, port):
        streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(4)]
        for stream in streams:
            await stream.send_all(post("/v1/completions", body))
        for stream in streams:
            await read_until(stream, b'"text":', timeout=20)
        assert engine.stats()["running"] == 4
        await streams[0].aclose()  # leaves mid-stream
        with trio.fail_after(2):
            while engine.stats()["running"] != 3:
                await trio.sleep(0.005)
        # The neighbours, started together with the same length, are still generating.
        assert engine.stats()["workers"][0]["running"] == 3
        metrics = (
            await raw_request(
                port, b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
            )
        ).decode()
        assert re.search(r"^tinyllm_http_generations_active 3\.0$", metrics, re.M)
        assert re.search(
            r'^tinyllm_request_success_total\{finished_reason="cancelled"\} 1\.0$', metrics, re.M
        )
        for stream in streams[1:]:
            await stream.aclose()
        with trio.fail_after(2):
            while engine.stats()["running"]:
                await trio.sleep(0.005)


# ---- the real command, in a subprocess, under load ------------------------------------------


class ServerProcess:
    def __init__(self, proc: trio.Process, log: Path) -> None:
        self.proc = proc
        self.log = log
        self.port = 0

    async def wait_ready(self) -> None:
        with trio.fail_after(30):
            while not self.port:
                match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.log.read_text())
                if match:
                    self.port = int(match.group(1))
                elif self.proc.poll() is not None:
                    raise AssertionError(f"server exited: {self.log.read_text()}")
                await trio.sleep(0.05)
            while True:
                raw = await raw_request(
                    self.port, b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
                )
                if raw.startswith(b"HTTP/1.1 200"):
                    return
                await trio.sleep(0.05)


@asynccontextmanager
async def serve_process(
    checkpoint: Path, tmp_path: Path, *flags: str
) -> AsyncIterator[ServerProcess]:
    log = tmp_path / "server.log"
    with open(log, "wb") as log_file:
        proc = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "tinyllm_trio",
                "serve",
                "--model",
                str(checkpoint),
                "--port",
                "0",
                "--workers",
                "1",
                *flags,
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TINYLLM_ACCESS_LOG": "false"},
        )
    server = ServerProcess(proc, log)
    try:
        yield server
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def _stream_to_end(
    port: int, path: str, body: dict, results: list, streaming: trio.Semaphore | None = None
) -> None:
    """Record (status, body) or, for a stream cut off mid-way, (None, the exception);
    `streaming` is released once the body's first chunk has arrived."""
    try:
        async with await HTTPClient.connect("127.0.0.1", port) as client:
            response = await client.request("POST", path, json=body)
            chunks = []
            async for chunk in response.chunks():
                if not chunks and streaming is not None:
                    streaming.release()
                chunks.append(chunk)
            results.append((response.status, b"".join(chunks)))
    except (h11.RemoteProtocolError, trio.BrokenResourceError, OSError) as exc:
        results.append((None, exc))


async def _signal_under_load(
    server: ServerProcess, signals: list[int], body: dict
) -> tuple[list, float]:
    results: list = []
    streaming = trio.Semaphore(4, max_value=4)
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            await streaming.acquire()
            nursery.start_soon(
                _stream_to_end, server.port, "/v1/completions", body, results, streaming
            )
        with trio.fail_after(20):  # every stream has sent its head and a first token
            for _ in range(4):
                await streaming.acquire()
        start = trio.current_time()
        for signum in signals:
            server.proc.send_signal(signum)
            await trio.sleep(0.05)
        with trio.fail_after(20):
            await server.proc.wait()
        elapsed = trio.current_time() - start
    return results, elapsed


LONG = {"prompt": "once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}


def _children(pid: int) -> list[str]:
    """Every thread's children: the pool may spawn a worker from any of them."""
    return [
        child
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]


def _worker_affinities(server: ServerProcess) -> list[set[int]]:
    return [os.sched_getaffinity(int(child)) for child in _children(server.proc.pid)]


async def test_sigint_under_load_drains_and_exits_zero(slow_checkpoint, tmp_path) -> None:
    short = {**LONG, "max_tokens": 60}
    async with serve_process(slow_checkpoint, tmp_path, "--shutdown-grace", "20") as server:
        await server.wait_ready()
        allowed = os.sched_getaffinity(0)
        expected = {max(allowed)} if len(allowed) > 1 else allowed  # 1 of 2+ cores: pinned
        assert _worker_affinities(server) == [expected]
        results, elapsed = await _signal_under_load(server, [signal.SIGINT], short)
    assert server.proc.returncode == 0, server.log.read_text()
    assert elapsed < 15
    assert len(results) == 4
    for status, data in results:  # every in-flight stream finished normally
        events = sse_events(bytearray(), data)
        assert status == 200 and events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert shm_entries(server.proc.pid) == []


async def test_sigterm_past_the_grace_period_ends_streams_with_an_error(
    slow_checkpoint, tmp_path
) -> None:
    # a grace far shorter than the 4 x 400 tokens left (the compiled step decodes them in ~0.3 s)
    flags = ("--shutdown-grace", "0.05", "--pin-workers", "false")
    async with serve_process(slow_checkpoint, tmp_path, *flags) as server:
        await server.wait_ready()
        assert _worker_affinities(server) == [os.sched_getaffinity(0)]  # not pinned
        results, elapsed = await _signal_under_load(server, [signal.SIGTERM], LONG)
    assert server.proc.returncode == 0, server.log.read_text()
    assert elapsed < 10
    assert len(results) == 4
    for status, data in results:
        events = sse_events(bytearray(), data)
        assert status == 200 and events[-1] == "[DONE]", (status, data[:400])
        assert "shutting down" in json.loads(events[-2])["error"]["message"]
    assert shm_entries(server.proc.pid) == []


async def test_second_sigint_stops_at_once(slow_checkpoint, tmp_path) -> None:
    async with serve_process(slow_checkpoint, tmp_path, "--shutdown-grace", "30") as server:
        await server.wait_ready()
        results, elapsed = await _signal_under_load(server, [signal.SIGINT, signal.SIGINT], LONG)
    assert server.proc.returncode == 130, server.log.read_text()
    assert len(results) == 4 and all(status is None for status, _ in results)  # cut off
    assert elapsed < 8
    assert shm_entries(server.proc.pid) == []


def _mapped_files(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


async def test_the_server_process_maps_no_numba_its_workers_do(tiny_checkpoint, tmp_path) -> None:
    """Only the workers run the model: the server reads the checkpoint's config and tokenizer
    and never imports numba/llvmlite (~110 MB of shared pages and 0.4 s per process)."""
    async with serve_process(tiny_checkpoint, tmp_path) as server:
        await server.wait_ready()
        body = b'{"message": "the", "max_tokens": 2}'
        served = await raw_request(
            server.port,
            b"POST /process HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
        )
        assert served.startswith(b"HTTP/1.1 200"), served
        server_maps = _mapped_files(server.proc.pid)
        worker_maps = [_mapped_files(int(child)) for child in _children(server.proc.pid)]
    assert "libc" in server_maps  # the check reads real mappings
    assert "numba" not in server_maps and "llvmlite" not in server_maps
    assert len(worker_maps) == 1 and "llvmlite" in worker_maps[0]

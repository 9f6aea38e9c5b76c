"""The HTTP load generator against our server (fake engine) and a stand-in llama-server."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from functools import partial

import trio
from hypothesis import given
from hypothesis import strategies as st

from http_fixtures import FakeEngine, fast_config, running_server
from tinyllm_trio.bench.loadgen import (
    add_arguments,
    format_comparison,
    format_table,
    percentile,
    process_cpu_seconds,
    run_benchmark,
    run_cli,
)
from tinyllm_trio.bench.workload import shared_prefix
from tinyllm_trio.http.connection import Exchange, HTTPConnection


def _args(url: str, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(
        ["--url", url, "--concurrency", "1,4", "--requests", "6", "--max-tokens", "8", *extra]
    )


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert round(percentile(list(map(float, range(101))), 90), 6) == 90.0


async def test_loadgen_against_our_openai_api() -> None:
    engine = FakeEngine(delay=0.002, max_context=512)
    async with running_server(engine) as (_, port):
        report = await run_benchmark(_args(f"http://127.0.0.1:{port}"))
    levels = report["_levels"]
    assert [lv.concurrency for lv in levels] == [1, 4]
    for lv in levels:
        assert (lv.requests, lv.failed) == (6, 0)
        assert lv.output_tokens_per_s > 0 and lv.ttft_ms["p50"] > 0 and lv.itl_ms["p99"] > 0
    assert report["model"] == "tinyllm"
    # the benchmark's request shape: streaming, ignore_eos, 16-token prompt, fixed length
    prompt, params = engine.calls[-1]
    assert params.ignore_eos and params.max_tokens == 8 and params.temperature == 0.0
    assert len(prompt.split()) == 15  # 16 tokens with BOS on TinyLLM's vocabulary
    assert "conc" in format_table(levels)
    json.dumps(report["levels"])  # the --json payload is plain data


async def test_shared_prefix_runs_each_level_with_the_cache_and_bypassing_it() -> None:
    engine = FakeEngine(max_context=512)
    async with running_server(engine) as (_, port):
        args = _args(f"http://127.0.0.1:{port}", "--shared-prefix-words", "40", "--warmup", "0")
        report = await run_benchmark(args)
    levels = report["_levels"]
    assert [(lv.concurrency, lv.cache) for lv in levels] == [
        (1, "on"),
        (1, "off"),
        (4, "on"),
        (4, "off"),
    ]
    assert all((lv.requests, lv.failed) == (6, 0) for lv in levels)
    prompts = [prompt for prompt, _ in engine.calls]
    assert all(p.startswith(shared_prefix(40) + " ") for p in prompts)
    assert len({p.split()[40] for p in prompts[:6]}) > 1  # the tails differ
    flags = [params.cache_prompt for _, params in engine.calls]
    assert flags == [True] * 6 + [False] * 6 + [True] * 6 + [False] * 6
    table = format_table(levels)
    assert "cache" in table.splitlines()[0] and "  off " in table
    assert report["shared_prefix_words"] == 40


async def _llama_completion(ex: Exchange) -> None:
    """llama-server's streaming /completion: data events, a final stop event, no [DONE]."""
    body = await ex.json()
    await ex.start_stream(200, b"text/event-stream")
    for _ in range(body["n_predict"]):
        await ex.send_chunk(b'data: {"content":" tok","stop":false}\n\n')
        await trio.sleep(0.001)
    final = {"content": "", "stop": True, "tokens_predicted": body["n_predict"]}
    await ex.send_chunk(b"data: " + json.dumps(final).encode() + b"\n\n")
    await ex.end_stream()


async def test_loadgen_against_a_llama_server_stand_in() -> None:
    async def handle_connection(stream: trio.SocketStream) -> None:
        await HTTPConnection(stream, fast_config()).serve(_llama_completion)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, host="127.0.0.1"), handle_connection, 0
        )
        port = listeners[0].socket.getsockname()[1]
        report = await run_benchmark(_args(f"127.0.0.1:{port}", "--api", "llama"))
        nursery.cancel_scope.cancel()
    for lv in report["_levels"]:
        assert (lv.requests, lv.failed) == (6, 0)
        assert lv.output_tokens_per_s > 0


async def _one_response_then_close(stream: trio.SocketStream) -> None:
    """llama-server's habit that cost bench http half its requests: answer one streamed
    /completion, then close the keep-alive connection without a `Connection: close`."""
    async with stream:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: (\d+)", head)[1])
        while len(body) < length:
            body += await stream.receive_some(65536)
        n = json.loads(body)["n_predict"]
        events = [b'data: {"content":" tok","stop":false}\n\n'] * n
        events.append(b'data: {"content":"","stop":true,"tokens_predicted":%d}\n\n' % n)
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events)
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
        )


async def test_a_keep_alive_connection_the_server_closed_costs_no_request() -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, host="127.0.0.1"), _one_response_then_close, 0
        )
        port = listeners[0].socket.getsockname()[1]
        report = await run_benchmark(_args(f"127.0.0.1:{port}", "--api", "llama"))
        nursery.cancel_scope.cancel()
    for lv in report["_levels"]:
        assert (lv.requests, lv.failed) == (6, 0)


async def test_compare_engine_brackets_each_level_with_engine_runs(long_checkpoint) -> None:
    """--compare-engine: each HTTP run of a level is bracketed by runs of the same load through
    an in-process Engine, just before and just after; HTTP / Engine is the median over
    --rounds of each round's HTTP rate over its brackets' mean, and the table pools the rounds'
    requests."""
    engine = FakeEngine(delay=0.001, max_context=512)
    async with running_server(engine) as (_, port):
        report = await run_benchmark(
            _args(
                f"http://127.0.0.1:{port}",
                "--prompt-words",
                "3",
                "--rounds",
                "3",
                "--compare-engine",
                "--engine-model",
                str(long_checkpoint),
                "--engine-workers",
                "1",
            )
        )
    rows = report["_comparisons"]
    assert [r.concurrency for r in rows] == [1, 4]
    for row, level in zip(rows, report["_levels"], strict=True):
        assert len(row.rounds) == 3 and level.requests == 3 * 6
        for (before, http, after), ratio in zip(row.rounds, row.ratios, strict=True):
            assert before > 0 and after > 0 and http > 0
            assert abs(ratio - http / ((before + after) / 2)) < 1e-9
        assert row.ratio == sorted(row.ratios)[1]
    assert report["vs_engine"]["levels"]["4"]["ratio"] == round(rows[1].ratio, 3)
    assert len(report["vs_engine"]["levels"]["4"]["rounds"]) == 3
    assert "HTTP/Engine" in format_comparison(rows, 1)


@given(
    chunks=st.lists(st.binary(min_size=1, max_size=40), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
    after=st.binary(max_size=10),
)
def test_take_chunks_reassembles_any_split_of_a_chunked_body(chunks, cuts, after) -> None:
    """However the bytes arrive, the chunks come out whole and in order, the end is seen once
    the last chunk and trailer section are in, and what follows the body is left alone."""
    from tinyllm_trio.bench.client import take_chunks

    body = b"".join(b"%x;ext=1\r\n%b\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    wire = body + after
    buffer, got, done = bytearray(), [], False
    bounds = sorted({min(c, len(wire)) for c in cuts} | {len(wire)})
    start = 0
    for end in bounds:
        buffer += wire[start:end]
        start = end
        if done:
            continue
        out, done = take_chunks(buffer)
        got += out
    assert done and got == chunks
    assert bytes(buffer) == after


async def test_loadgen_counts_http_errors_as_failures() -> None:
    """A server that refuses (401 without the key) gives failed requests with the status and
    message, not a crash or a hang; keep-alive survives an error response."""
    engine = FakeEngine(delay=0.001, max_context=512)
    async with running_server(engine, api_key="sekrit") as (_, port):
        report = await run_benchmark(_args(f"http://127.0.0.1:{port}", "--model", "tinyllm"))
        good = await run_benchmark(
            _args(f"http://127.0.0.1:{port}", "--model", "tinyllm", "--api-key", "sekrit")
        )
    for lv in report["_levels"]:
        assert (lv.requests, lv.failed) == (0, 6)
        assert any("HTTP 401" in e for e in lv.errors), lv.errors
    for lv in good["_levels"]:
        assert (lv.requests, lv.failed) == (6, 0) and lv.client_cpu_us_per_token > 0


async def test_server_pid_reports_the_servers_and_its_workers_cpu_per_token() -> None:
    """--server-pid: CPU of that process and of its children per output token, from /proc.
    Here the server runs in this process (so its CPU includes the load generator's) and a
    child process burns CPU while a level runs: it must show up as the workers' share."""
    engine = FakeEngine(delay=0.002, max_context=512)
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 3: pass"
    async with running_server(engine) as (_, port), trio.open_nursery() as nursery:
        nursery.start_soon(partial(trio.run_process, [sys.executable, "-c", burn]))
        await trio.sleep(0.5)  # the child is up and burning
        pid = str(os.getpid())
        extra = ("--concurrency", "2", "--requests", "20", "--max-tokens", "30")
        report = await run_benchmark(_args(f"http://127.0.0.1:{port}", *extra, "--server-pid", pid))
        nursery.cancel_scope.cancel()
    (level,) = report["_levels"]
    tokens = level.output_tokens_per_s * level.duration_s
    assert level.server_cpu_us_per_token > 0
    # the child burned CPU for the whole level: on an idle 2-core machine a core of its own
    # (this process mostly waits on the fake engine's sleeps), on a busy one at least a share
    assert level.workers_cpu_us_per_token * tokens / 1e6 > 0.25 * level.duration_s
    assert "server us/tok" in format_table([level])
    own, _ = process_cpu_seconds(os.getpid())  # the children's share is checked above
    assert own > 0


def test_bench_http_refuses_a_server_pid_that_is_not_there(capsys) -> None:
    assert run_cli(_args("http://127.0.0.1:9", "--server-pid", "999999999")) == 2
    assert "--server-pid 999999999" in capsys.readouterr().err


def test_bench_http_refuses_bad_concurrency_levels(capsys) -> None:
    for levels in ("0,8", "1,x", ","):
        assert run_cli(_args("http://127.0.0.1:9", "--concurrency", levels)) == 2
        assert "--concurrency" in capsys.readouterr().err


async def test_prompt_tokens_sends_token_ids_to_either_api() -> None:
    """--prompt-tokens N: the prompt goes out as N token ids (<BOS> first, different per
    request), on llama-server's /completion and on /v1/completions alike, so two servers with
    different tokenizers run the same tokens (`bench compare`)."""
    bodies: list[tuple[str, dict]] = []

    async def record(ex: Exchange) -> None:
        body = await ex.json()
        bodies.append((ex.path, body))
        n = body.get("n_predict") or body["max_tokens"]
        await ex.start_stream(200, b"text/event-stream")
        for _ in range(n):
            if "n_predict" in body:
                await ex.send_chunk(b'data: {"content":" tok","stop":false}\n\n')
            else:
                await ex.send_chunk(b'data: {"choices":[{"index":0,"text":" tok"}]}\n\n')
        if "n_predict" in body:
            await ex.send_chunk(b'data: {"content":"","stop":true,"tokens_predicted":%d}\n\n' % n)
        await ex.end_stream()

    async def handle_connection(stream: trio.SocketStream) -> None:
        await HTTPConnection(stream, fast_config()).serve(record)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, host="127.0.0.1"), handle_connection, 0
        )
        url = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        for api in ("llama", "openai"):
            args = _args(url, "--api", api, "--prompt-tokens", "16", "--model", "m")
            report = await run_benchmark(args)
            assert [(lv.requests, lv.failed) for lv in report["_levels"]] == [(6, 0), (6, 0)]
            assert report["prompt_tokens"] == 16
        nursery.cancel_scope.cancel()
    paths = {path for path, _ in bodies}
    assert paths == {"/completion", "/v1/completions"}
    prompts = [body["prompt"] for _, body in bodies]
    assert all(len(p) == 16 and p[0] == 2 and all(type(t) is int for t in p) for p in prompts)
    assert len({tuple(p) for p in prompts[2:8]}) == 6  # distinct per request in a level


def test_prompt_tokens_excludes_shared_prefix(capsys) -> None:
    args = _args("127.0.0.1:9", "--prompt-tokens", "16", "--shared-prefix-words", "40")
    assert run_cli(args) == 2
    assert "exclude each other" in capsys.readouterr().err

"""The HTTP load generator against our server (fake engine) and a stand-in llama-server."""

from __future__ import annotations

import argparse
import json
from functools import partial

import trio

from http_fixtures import FakeEngine, fast_config, running_server
from tinyllm_trio.http.connection import Exchange, HTTPConnection
from tinyllm_trio.http.loadgen import add_arguments, format_table, percentile, run_benchmark


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


def test_engine_ratio_compares_the_same_concurrency() -> None:
    """--engine-json: HTTP tokens/s over the Engine's at the same level, largest worker count,
    levels the Engine did not measure left out."""
    from tinyllm_trio.http.loadgen import LevelResult, engine_ratios, format_ratios

    def level(c: int, rate: float) -> LevelResult:
        summary = {"p50": 1.0, "p90": 1.0, "p99": 1.0}
        return LevelResult(c, 4, 0, 1.0, 4.0, rate, summary, summary, 1.0, [])

    engine = {
        "max_tokens": 128,
        "requests": {"32": 128},
        "engine": {
            "1": {"32": {"tokens_per_s": 9999.0}},
            "2": {"32": {"tokens_per_s": 6000.0}, "64": {"tokens_per_s": 7000.0}},
        },
    }
    ratios = engine_ratios([level(32, 5100.0), level(8, 2000.0)], engine)
    assert ratios["engine_workers"] == 2
    assert ratios["levels"] == {
        "32": {"http_tokens_per_s": 5100.0, "engine_tokens_per_s": 6000.0, "ratio": 0.85}
    }
    assert "0.85" in format_ratios(ratios)

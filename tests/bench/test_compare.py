"""`bench compare`'s plumbing, with stand-in servers instead of llama-server and ours: the
alternation of who goes first, the ratio and range arithmetic, the JSON's shape, and that both
server processes are stopped however the run ends (a failed start, an error mid-run, a server
that ignores SIGTERM)."""

from __future__ import annotations

import argparse
import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tinyllm_trio.bench.compare import (
    Comparison,
    HTTPMeasure,
    Load,
    ServerSpec,
    compare,
    default_loads,
    format_table,
    free_port,
    run_compare,
    running,
    write_plot,
)
from tinyllm_trio.bench.loadgen import LevelResult

STAND_IN = str(Path(__file__).with_name("stand_in_server.py"))


def _level(concurrency: int, tokens_per_s: float, ttft_ms: float, failed: int = 0) -> LevelResult:
    return LevelResult(
        concurrency=concurrency,
        requests=4,
        failed=failed,
        duration_s=1.0,
        requests_per_s=4.0,
        output_tokens_per_s=tokens_per_s,
        ttft_ms={"p50": ttft_ms, "p90": ttft_ms, "p99": ttft_ms},
        itl_ms={"p50": 1.0, "p90": 1.0, "p99": 1.0},
        e2e_mean_ms=10.0,
        errors=[],
    )


def _spec(name: str, api: str, *flags: str) -> ServerSpec:
    port = free_port()
    return ServerSpec(name, api, [sys.executable, STAND_IN, str(port), *flags], port)


def test_default_loads_are_the_issues() -> None:
    loads = default_loads()
    assert [(lv.concurrency, lv.prompt_tokens, lv.max_tokens) for lv in loads] == [
        (1, 16, 128),
        (8, 16, 128),
        (32, 16, 128),
        (64, 16, 128),
        (8, 400, 16),
    ]
    assert [lv.kind for lv in loads] == ["decode"] * 4 + ["prefill"]
    assert default_loads([1], 0) == loads[:1]


def test_rounds_alternate_and_ratios_are_per_round_medians() -> None:
    """Even rounds run A then B at each load, odd rounds B then A; each round's ratio pairs
    that round's two runs; the median and range are over rounds."""
    a = ServerSpec("llama-server", "llama", ["unused"], 1)
    b = ServerSpec("tinyllm-trio", "openai", ["unused"], 2)
    loads = [Load("1 stream", "decode", 1, 16, 8, 4), Load("prefill", "prefill", 8, 400, 4, 8)]
    # tok/s per (server, round); B's rate over A's is 2, 3 and 1.5 in rounds 0, 1, 2
    rates = {("llama-server", r): 100.0 for r in range(3)}
    rates.update({("tinyllm-trio", 0): 200.0, ("tinyllm-trio", 1): 300.0})
    rates[("tinyllm-trio", 2)] = 150.0
    calls: list[tuple[str, str]] = []

    def measure(spec: ServerSpec, load: Load) -> LevelResult:
        calls.append((spec.name, load.name))
        r = sum(1 for name, ld in calls if name == spec.name and ld == load.name) - 1
        ttft = 10.0 if spec.name == "llama-server" else 5.0 * (r + 1)
        return _level(load.concurrency, rates[(spec.name, r)], ttft)

    cmp = run_compare([a, b], loads, 3, measure)
    assert cmp.order == [
        (0, "1 stream", "llama-server"),
        (0, "1 stream", "tinyllm-trio"),
        (0, "prefill", "llama-server"),
        (0, "prefill", "tinyllm-trio"),
        (1, "1 stream", "tinyllm-trio"),
        (1, "1 stream", "llama-server"),
        (1, "prefill", "tinyllm-trio"),
        (1, "prefill", "llama-server"),
        (2, "1 stream", "llama-server"),
        (2, "1 stream", "tinyllm-trio"),
        (2, "prefill", "llama-server"),
        (2, "prefill", "tinyllm-trio"),
    ]
    assert calls == [(server, load) for _, load, server in cmp.order]
    report = json.loads(json.dumps(cmp.to_json()))  # plain JSON all the way down
    first = report["loads"][0]
    assert first["ratio"]["tokens_per_s"] == {
        "median": 2.0,
        "min": 1.5,
        "max": 3.0,
        "rounds": [2.0, 3.0, 1.5],
    }
    assert first["ratio"]["ttft_p50"] == {
        "median": 1.0,
        "min": 0.5,
        "max": 1.5,
        "rounds": [0.5, 1.0, 1.5],
    }
    assert first["servers"]["tinyllm-trio"]["tokens_per_s"] == {
        "median": 200.0,
        "rounds": [200.0, 300.0, 150.0],
    }
    assert len(first["servers"]["llama-server"]["runs"]) == 3
    assert first["servers"]["llama-server"]["runs"][0]["output_tokens_per_s"] == 100.0
    assert {k: first[k] for k in ("name", "kind", "concurrency", "prompt_tokens")} == {
        "name": "1 stream",
        "kind": "decode",
        "concurrency": 1,
        "prompt_tokens": 16,
    }
    assert (report["baseline"], report["subject"], report["rounds"]) == (
        "llama-server",
        "tinyllm-trio",
        3,
    )
    assert report["order"][4] == [1, "1 stream", "tinyllm-trio"]
    row = format_table(cmp).splitlines()[2]
    assert "2.00x (1.50-3.00)" in row and "1.00x (0.50-1.50)" in row


def test_a_round_where_the_baseline_served_nothing_is_left_out_of_the_range() -> None:
    a = ServerSpec("a", "llama", ["unused"], 1)
    b = ServerSpec("b", "openai", ["unused"], 2)
    rates = iter([0.0, 50.0, 100.0, 100.0])  # round 0: A served nothing (a, b); round 1: (b, a)

    def measure(spec: ServerSpec, load: Load) -> LevelResult:
        rate = next(rates)
        return _level(1, rate, 1.0, failed=4 if rate == 0 else 0)

    cmp = run_compare([a, b], [Load("1 stream", "decode", 1, 16, 8, 4)], 2, measure)
    ratio = cmp.loads[0].ratio("a", "b", "tokens_per_s").summary()
    assert math.isnan(ratio["rounds"][0]) and ratio["median"] == 1.0
    assert cmp.loads[0].failed("a") == 4
    assert format_table(cmp).splitlines()[2].endswith("4/0")


def test_compare_runs_both_stand_in_servers_and_stops_them(tmp_path: Path) -> None:
    """The whole command path but the binaries: start, health wait, warm-up, the alternated
    loads through `bench http`'s load generator (--api llama and openai, token-id prompts),
    the JSON and the plot, and both processes gone afterwards."""
    erased = tmp_path / "erased.log"
    specs = [
        _spec("llama-server", "llama", "--erase-log", str(erased)),
        _spec("tinyllm-trio", "openai"),
    ]
    specs[0].reset_paths = ("/slots/0?action=erase", "/slots/1?action=erase")
    loads = [Load("2 streams", "decode", 2, 16, 8, 4), Load("prefill", "prefill", 2, 40, 2, 4)]
    cmp = compare(specs, loads, 2, tmp_path, HTTPMeasure(timeout=20.0), startup_timeout=20.0)
    # every slot emptied before each of its 2 loads x 2 rounds (and never during warm-up)
    assert erased.read_text().splitlines() == list(specs[0].reset_paths) * 4
    assert isinstance(cmp, Comparison)
    for lc in cmp.loads:
        for spec in specs:
            assert [(lv.requests, lv.failed) for lv in lc.runs[spec.name]] == [(4, 0), (4, 0)]
            assert all(lv.output_tokens_per_s > 0 for lv in lc.runs[spec.name])
    for spec in specs:  # stopped: nothing listens any more
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", spec.port), timeout=1.0).close()
    assert write_plot(cmp, str(tmp_path / "compare.png"))
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def test_a_reset_the_server_refuses_stops_the_run(tmp_path: Path) -> None:
    """llama-server started without --slot-save-path answers the erase with an error: the
    run stops and says so, rather than measure loads that are not alike."""
    specs = [_spec("llama-server", "llama"), _spec("tinyllm-trio", "openai")]
    specs[0].reset_paths = ("/slots/0?action=erase",)
    loads = [Load("2 streams", "decode", 2, 16, 8, 4)]
    with pytest.raises(
        RuntimeError, match=r"llama-server: POST /slots/0\?action=erase answered 501"
    ):
        compare(specs, loads, 1, tmp_path, HTTPMeasure(timeout=20.0), startup_timeout=20.0)


def test_llama_server_gets_flash_attention_a_slot_path_and_a_reset_per_slot(
    tmp_path: Path,
) -> None:
    from tinyllm_trio.bench.compare import add_arguments, server_specs

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--llama-server", "/bin/true", "--parallel", "3"])
    llama, ours = server_specs(args, tmp_path / "m.gguf", tmp_path)
    assert "-fa" in llama.command and "-fa" not in ours.command
    slot_dir = Path(llama.command[llama.command.index("--slot-save-path") + 1])
    assert slot_dir.is_dir()
    assert llama.reset_paths == tuple(f"/slots/{i}?action=erase" for i in range(3))
    assert ours.reset_paths == ()
    args = parser.parse_args(["--llama-server", "/bin/true", "--no-flash-attn"])
    assert "-fa" not in server_specs(args, tmp_path / "m.gguf", tmp_path)[0].command


def test_servers_are_stopped_when_the_run_fails(tmp_path: Path) -> None:
    """An error mid-run stops both: SIGTERM, and SIGKILL for one that ignores it."""
    specs = [_spec("a", "llama"), _spec("b", "openai", "--ignore-sigterm")]
    procs: list[subprocess.Popen[bytes]] = []
    with pytest.raises(ZeroDivisionError), running(specs, tmp_path, 20.0, grace=0.5) as started:
        procs = started
        assert all(p.poll() is None for p in procs)
        1 / 0  # noqa: B018
    assert procs[0].returncode == 0  # drained on SIGTERM
    assert procs[1].returncode == -9  # ignored it: killed after the grace period


def test_a_server_that_dies_at_start_up_is_reported_and_the_other_stopped(
    tmp_path: Path,
) -> None:
    specs = [_spec("fine", "llama"), _spec("broken", "openai", "--exit-at-once")]
    with (
        pytest.raises(RuntimeError, match="broken exited with status 3") as info,
        running(specs, tmp_path, 20.0, grace=2.0),
    ):
        pytest.fail("running must not yield when a server failed to start")
    assert "failing at start-up" in str(info.value)  # the tail of its log
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", specs[0].port), timeout=1.0).close()

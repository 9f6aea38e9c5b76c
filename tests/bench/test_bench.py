"""`tinyllm-trio bench model` runs end to end (on a tiny checkpoint, one run each) and writes the
JSON shape the README and CI read; the numbers themselves are not asserted (a benchmark, not a
timed test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def test_bench_model_cli_writes_table_and_json(tiny_checkpoint, tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    cmd = [sys.executable, "-m", "tinyllm_trio", "bench", "model", "--model", str(tiny_checkpoint)]
    cmd += ["--runs", "1", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "BLAS threads: 1" in proc.stdout  # it re-ran itself single-threaded
    for row in ("prefill, 128-token prompt", "decode, batch 1", "decode, batch 64"):
        assert row in proc.stdout
    data = json.loads(out.read_text())
    assert set(data) == {"prefill_128", "decode", "machine"}
    assert set(data["decode"]) == {"1", "8", "32", "64"}
    assert all(v > 0 for v in [data["prefill_128"], *data["decode"].values()])
    assert set(data["machine"]) == {"sgemm_gflops", "weights_read_gbs", "dram_read_gbs"}
    assert "GFLOP/s" in proc.stdout and "one core here at best: sgemm" in proc.stdout


def test_work_per_token_counts_the_default_models_weights() -> None:
    from tinyllm_trio.bench.model import work_per_token
    from tinyllm_trio.model.transformer import ModelConfig

    config = ModelConfig()  # TinyLLM: 6 layers of 192, vocabulary 3266
    matmul = 6 * 12 * 192 * 192 + 3266 * 192  # 3,281,280 weights in matmuls
    alone = work_per_token(config, tokens_per_pass=1, mean_context=0)
    assert alone.flops == 2 * matmul
    assert alone.weight_bytes == 4 * (matmul + 6 * 4 * 192 + 2 * 192)  # ~13.1 MB a pass
    batch = work_per_token(config, tokens_per_pass=32, mean_context=100)
    assert batch.weight_bytes == alone.weight_bytes / 32
    assert batch.flops == alone.flops + 4 * 100 * 192 * 6


def test_bench_model_cli_reports_a_bad_checkpoint(tmp_path):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "tinyllm_trio", "bench", "model", "--model", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert "not a checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_model_batches_picks_the_decode_batches(tiny_checkpoint, tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "tinyllm_trio", "bench", "model", "--model", str(tiny_checkpoint)]
    cmd += ["--runs", "1", "--batches", "16", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "decode, batch 16" in proc.stdout and "decode, batch 32" not in proc.stdout
    assert set(json.loads(out.read_text())["decode"]) == {"16"}
    bad = subprocess.run(
        [*cmd[:-4], "--batches", "0,x"], env=env, capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2 and "--batches" in bad.stderr


def test_scaling_ceiling_script_prints_each_round_and_the_median(tiny_checkpoint):
    """scripts/scaling_ceiling.sh (the README's two-process ceiling for 2w/1w) runs end to end."""
    script = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "scaling_ceiling.sh")
    bindir = os.path.dirname(sys.executable)  # where this environment's tinyllm-trio lives
    env = dict(os.environ, ROUNDS="2", BATCH="4", MODEL=str(tiny_checkpoint))
    env["PATH"] = bindir + os.pathsep + env["PATH"]
    proc = subprocess.run(
        ["bash", script], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "one process, batch 4" in lines[0] and "batch 2 each" in lines[0]
    rounds = [line.split() for line in lines[1:3]]
    assert [r[0] for r in rounds] == ["1", "2"]
    ratios = [float(r[3]) for r in rounds]
    assert all(
        float(r[2]) / float(r[1]) == pytest.approx(q, abs=0.006)
        for r, q in zip(rounds, ratios, strict=True)
    )
    label, median = lines[3].rsplit(" ", 1)
    assert label == "median two/one:" and float(median) == pytest.approx(sum(ratios) / 2)


NEIGHBOUR_SCRIPT = os.path.join(os.path.dirname(__file__), "../../scripts/neighbour_cost.py")
CORES_SCRIPT = os.path.join(os.path.dirname(__file__), "../../scripts/engine_cores.py")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the script needs two cores")
def test_neighbour_cost_script_prints_a_row_per_work_value(tiny_checkpoint):
    """scripts/neighbour_cost.py (the README's account of worker/bare at one stream) runs the
    bare loop alone and beside a woken neighbour and prints both and their ratio per value."""
    proc = subprocess.run(
        [
            sys.executable,
            NEIGHBOUR_SCRIPT,
            "--work",
            "0,20",
            "--rounds",
            "2",
            "--requests",
            "1",
            "--max-tokens",
            "8",
            "--model",
            str(tiny_checkpoint),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    head, *rows = proc.stdout.splitlines()
    assert head.split()[:2] == ["neighbour", "us/token"]
    assert [int(r.split()[0]) for r in rows] == [0, 20]
    for row in rows:
        _, alone, beside, ratio, spread, write = row.split()
        low, high = map(float, spread.split("-"))
        assert float(alone) > 0 and float(beside) > 0 and low <= float(ratio) <= high
        assert 0 < float(write) < 1e4


def _on_one_core(*args: str) -> subprocess.CompletedProcess:
    """Run a script with `args`, allowed only the first of this process's cores."""
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}),
    )


@pytest.mark.parametrize(
    ("script", "bad"),
    [(NEIGHBOUR_SCRIPT, ["--work", "x"]), (CORES_SCRIPT, ["--rotate-ms", "0"])],
)
def test_two_core_scripts_refuse_one_core_and_bad_arguments(tiny_checkpoint, script, bad):
    one_core = _on_one_core(script, "--model", str(tiny_checkpoint))
    assert one_core.returncode == 2 and "needs two cores" in one_core.stdout
    proc = subprocess.run([sys.executable, script, *bad], capture_output=True, text=True)
    assert proc.returncode == 2 and bad[0] in proc.stderr


COAST_SCRIPT = os.path.join(os.path.dirname(__file__), "../../scripts/coast_lag.py")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the script needs two cores")
def test_coast_lag_script_prints_both_readers_per_period():
    """scripts/coast_lag.py (the README's account of what coasting costs in latency and saves
    the producer) prints a coasting and a rung reader per period, and every message arrived."""
    args = ["--period-us", "300,900", "--messages", "200", "--rounds", "1"]
    proc = subprocess.run(
        [sys.executable, COAST_SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    _, head, *rows = proc.stdout.splitlines()
    assert head.split()[:2] == ["period", "us"]
    assert [(r.split()[0], r.split()[1]) for r in rows] == [
        ("300", "coasts"),
        ("300", "rung"),
        ("900", "coasts"),
        ("900", "rung"),
    ]
    for row in rows:
        _, reader, p50, p90, put, cpu, rang, misses = row.split()
        assert 0 <= float(p50) <= float(p90) and float(put) > 0 and float(cpu) > 0
        if reader == "rung":  # every message rings, and there is no timer to miss
            assert float(rang) == 200 and float(misses) == 0


def test_coast_lag_script_refuses_one_core_and_bad_arguments():
    one_core = _on_one_core(COAST_SCRIPT)
    assert one_core.returncode == 2 and "needs two cores" in one_core.stderr
    for bad in (["--period-us", "x"], ["--period-us", "0"], ["--rounds", "0"]):
        proc = subprocess.run([sys.executable, COAST_SCRIPT, *bad], capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr


def test_bench_model_reports_each_row_as_it_finishes(tiny_checkpoint):
    from tinyllm_trio.bench.model import format_table, run_benchmarks, table_head, table_row
    from tinyllm_trio.model.checkpoint import load_model

    transformer = load_model(tiny_checkpoint).transformer
    seen: list[tuple[str, int]] = []
    decode_done: dict = {}

    def on_row(name, rates):
        seen.append((name, len(decode_done)))
        if name.startswith("decode"):
            decode_done[name] = rates

    results = run_benchmarks(transformer, runs=1, batches=(1, 2), steps=2, on_row=on_row)
    assert seen == [
        ("prefill, 128-token prompt", 0),
        ("decode, batch 1", 0),
        ("decode, batch 2", 1),
    ]
    lines = format_table(results, 1).splitlines()
    assert lines[0] == table_head(1) and lines[2] == table_row(
        "decode, batch 1", decode_done["decode, batch 1"]
    )


def test_bench_model_compares_the_compiled_step_with_the_numpy_path(tiny_checkpoint):
    """--compare-numpy: a numpy row beside each batch the compiled step serves, none beyond."""
    from tinyllm_trio.bench.model import format_table, run_benchmarks, to_json
    from tinyllm_trio.model.checkpoint import load_model

    transformer = load_model(tiny_checkpoint).transformer
    transformer.fused_max_batch = 2
    results = run_benchmarks(transformer, runs=2, batches=(1, 3), steps=2, compare_numpy=True)
    assert list(results["decode_numpy"]) == [1] and len(results["decode_numpy"][1].wall) == 2
    assert transformer.fused_max_batch == 2  # put back after the numpy runs
    names = [line[:28].strip() for line in format_table(results, 2).splitlines()[1:]]
    assert names == [
        "prefill, 128-token prompt",
        "decode, batch 1",
        "decode, batch 1, numpy",
        "decode, batch 3",
    ]
    assert set(to_json(results)["decode_numpy"]) == {"1"}


def test_bench_model_breakdown_charges_the_step_to_its_parts(tiny_checkpoint):
    from tinyllm_trio.bench.model import BREAKDOWN_PARTS, format_breakdown, step_breakdown
    from tinyllm_trio.model.checkpoint import load_model

    loaded = load_model(tiny_checkpoint)
    transformer = loaded.transformer
    transformer.fused_max_batch = 2
    rows = {b: step_breakdown(transformer, loaded.tokenizer, b, steps=6) for b in (1, 4)}
    for shares in rows.values():
        assert set(shares) == set(BREAKDOWN_PARTS) and sum(shares.values()) == pytest.approx(1)
    compiled, blas, attention = BREAKDOWN_PARTS[1], BREAKDOWN_PARTS[0], BREAKDOWN_PARTS[2]
    assert rows[1][compiled] > 0 and rows[1][blas] == rows[1][attention] == 0
    assert rows[4][compiled] == 0 and rows[4][blas] > 0 and rows[4][attention] > 0
    table = format_breakdown(rows).splitlines()
    assert table[0].split()[-2:] == ["batch", "4"] and len(table) == 1 + len(BREAKDOWN_PARTS)


def test_bench_engine_shared_prefix_compares_the_cache_on_and_off(long_checkpoint, tmp_path):
    """The flag's plumbing: two engines (cache on, off), a TTFT and a rate for each."""
    out = tmp_path / "prefix.json"
    cmd = [sys.executable, "-m", "tinyllm_trio", "bench", "engine", "--model", str(long_checkpoint)]
    cmd += ["--shared-prefix-words", "30", "--prompt-words", "3", "--max-tokens", "2"]
    cmd += ["--concurrency", "2", "--requests", "wave", "--runs", "1", "--workers", "1"]
    cmd += ["--pin-workers", "false", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "TTFT p50 on" in proc.stdout and "30-word shared prefix" in proc.stdout
    data = json.loads(out.read_text())
    assert data["shared_prefix_words"] == 30 and data["workers"] == 1
    for side in ("on", "off"):
        level = data["cache"][side]["2"]
        assert level["ttft_p50_ms"] > 0 and level["tokens_per_s"] > 0


def _script_lines(script: str, args: list[str], checkpoint) -> list[str]:
    """The lines a benchmark script printed on `checkpoint`; it must have succeeded."""
    proc = subprocess.run(
        [sys.executable, script, *args, "--model", str(checkpoint)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the script needs two cores")
def test_engine_cores_script_splits_each_run_into_cpu_wait_and_idle(tiny_checkpoint):
    """scripts/engine_cores.py (the README's account of where the engine's CPU lands with two
    workers) prints both modes per run, each worker's time as CPU, run-queue wait and idle,
    then the medians and the rotate/stay ratio."""
    args = ["--runs", "1", "--concurrency", "4", "--requests", "4", "--max-tokens", "4"]
    _, head, *rows, ratio = _script_lines(CORES_SCRIPT, args, tiny_checkpoint)
    assert head.split()[:3] == ["mode", "tok/s", "engine"]
    assert [r.split()[0] for r in rows] == ["stay", "rotate", "stay", "rotate"]
    for row in rows:
        rate, engine, *workers = map(float, row.split()[1:9])
        assert rate > 0 and engine > 0
        a_wait, b_wait = workers[1], workers[4]
        assert a_wait >= b_wait >= 0  # A is the worker that waited longer
        assert all(w >= -5 for w in workers)  # idle: elapsed - cpu - wait, to the ms
    assert ratio.startswith("rotate/stay tok/s: median ")


TICK_SCRIPT = os.path.join(os.path.dirname(__file__), "../../scripts/busy_tick.py")


def test_busy_tick_script_alternates_both_modes_and_only_one_ticks(tiny_checkpoint):
    """scripts/busy_tick.py (the README's account of what the busy tick saves) runs an engine
    with the tick and one without in turn, the order swapped every pair, and prints each run's
    rate, this process's CPU per token and the sleeps on the tick, then the medians."""
    args = ["--pairs", "2", "--concurrency", "8", "--requests", "8", "--max-tokens", "16"]
    _, head, *rows, tick, woken, ratio = _script_lines(TICK_SCRIPT, args, tiny_checkpoint)
    assert head.split() == ["mode", "tok/s", "engine", "us/tok", "ticks"]
    assert [r.split()[0] for r in rows] == ["tick", "woken", "woken", "tick"]
    ticks = {"tick": 0.0, "woken": 0.0}
    for row in rows:
        mode, rate, used, slept = row.split()
        assert float(rate) > 0 and float(used) > 0
        ticks[mode] += float(slept)
    assert ticks["woken"] == 0 and ticks["tick"] >= 1  # every core busy: the tick engaged
    assert tick.endswith("(medians)") and woken.endswith("(medians)")
    assert ratio.startswith("tick/woken tok/s: median ")
    bad = subprocess.run(
        [sys.executable, TICK_SCRIPT, "--tick", "0"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--tick" in bad.stderr

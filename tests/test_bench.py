"""`tinyllm-trio bench model` runs end to end (on a tiny checkpoint, one run each) and writes the
JSON shape the README and CI read; the numbers themselves are not asserted (a benchmark, not a
timed test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys


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
    assert set(data) == {"prefill_128", "decode"}
    assert set(data["decode"]) == {"1", "8", "32", "64"}
    assert all(v > 0 for v in [data["prefill_128"], *data["decode"].values()])


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

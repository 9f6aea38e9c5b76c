"""`tinyllm-trio bench model`: prefill and batched-decode throughput of the numpy model.

What it measures (each number is the median of `--runs` runs, tokens per second):
- prefill_128: one 128-token prompt run through `Transformer.prefill` (one pass);
- decode at batch 1, 8, 32, 64: that many sequences (prompts of 8 to 24 tokens, so lengths
  differ as in real traffic) advanced together by 64 `decode_step` calls; tokens/s counts every
  sequence's token (batch x steps / seconds). Prefilling them is not part of the time. Below
  batch 16 each run repeats that 16 / batch times (a batch-1 pass alone lasts ~50 ms).

BLAS is pinned to one thread, because the server runs one worker process per core and a worker
that spawned BLAS threads would fight its neighbours. The thread count is read by OpenBLAS when
numpy is first imported, so `run_cli` re-runs the benchmark in a child process with
OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS = 1 unless they are already 1 here,
and with the kernel set the workers use (`model/blas.py`: OPENBLAS_CORETYPE=Zen on AMD Zen 4;
set OPENBLAS_CORETYPE yourself to compare another).

The table's "per CPU-second" column divides by this process's CPU time instead of wall-clock
time: the same number on an idle core, and the honest one-core figure on a machine shared with
other work (the JSON holds the wall-clock medians). The last two columns put the median rate
against the hardware: GFLOP/s achieved (2 per weight multiply-add, plus attention over the
sequences' mean context) and GB/s of weights read (every pass reads every weight once: a decode
step of batch B reads them once for B tokens). The line under the table measures what one core
of this machine does at best, with the same numpy and BLAS settings: a large single-threaded
sgemm (GFLOP/s) and a streaming read of an array the size of the weights and of one far larger
than any cache (GB/s), so the distance to the roofline is there to read.

Without a trained default checkpoint it benchmarks random weights of the default shapes, which
costs the same, and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tinyllm_trio.model.blas import (
    BLAS_THREAD_VARS,
    CORETYPE_VAR,
    blas_pinned,
    single_threaded_env,
)

BATCHES = (1, 8, 32, 64)
PREFILL_TOKENS = 128
DECODE_PROMPT = 16
DECODE_STEPS = 64


@dataclass(frozen=True)
class Work:
    """What one token of a measurement costs the hardware: floating-point operations and
    bytes of weights read (a pass reads every weight once, shared by the tokens it makes)."""

    flops: float
    weight_bytes: float


def work_per_token(
    config, tokens_per_pass: float, mean_context: float, matrix_bytes: int = 4
) -> Work:
    """Per token: 2 flops per weight of every matmul (QKV, output, FFN, LM head; the embedding
    is a lookup), plus attention, 4 flops per cached position and channel per layer (q.k and
    the weighted sum of v), at `mean_context` positions; and the bytes of weights a pass
    streams (every matmul weight at `matrix_bytes` each, 2 for the compiled step's bfloat16
    tiles; the float32 LayerNorms; of the embedding tables only the rows of its tokens) over
    the tokens that share the pass."""
    c, layers = config.n_embd, config.n_layer
    matmul_weights = layers * 12 * c * c + config.vocab_size * c  # 3C^2 + C^2 + 8C^2 a layer
    attention = 4 * mean_context * c * layers
    streamed = matrix_bytes * matmul_weights + 4 * (layers * 4 * c + 2 * c)
    return Work(2 * matmul_weights + attention, streamed / tokens_per_pass)


def run_cli(args: argparse.Namespace) -> int:
    if not blas_pinned():
        return _rerun_single_threaded(args)
    if args.runs < 1:
        print("--runs must be >= 1", file=sys.stderr)
        return 2
    from tinyllm_trio.bench.workload import parse_levels

    try:
        batches = parse_levels(args.batches, "--batches")
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    from tinyllm_trio.model.checkpoint import CheckpointError

    try:
        transformer, tokenizer, label = _load(args.model, args.attention_scale, args.weights)
    except CheckpointError as e:
        print(f"tinyllm-trio bench model: {e}", file=sys.stderr)
        return 1
    print(f"model: {label}")
    print(f"BLAS threads: 1 ({', '.join(f'{v}=1' for v in BLAS_THREAD_VARS)})")
    print(f"BLAS kernels: {os.environ.get(CORETYPE_VAR) or 'OpenBLAS default'} ({CORETYPE_VAR})")
    if args.breakdown:
        if tokenizer is None:
            print("--breakdown runs the batcher, which needs a checkpoint", file=sys.stderr)
            return 2
        rows = {}
        for b in batches:
            rows[b] = step_breakdown(transformer, tokenizer, b)
        print(format_breakdown(rows), flush=True)
        return 0
    print(table_head(args.runs), flush=True)
    results = run_benchmarks(
        transformer,
        runs=args.runs,
        batches=batches,
        on_row=lambda name, rates: print(table_row(name, rates), flush=True),
        compare_numpy=args.compare_numpy,
    )
    limits = machine_limits(weight_bytes=work_per_token(transformer.config, 1, 0).weight_bytes)
    print(limits_line(limits), flush=True)
    results["machine"] = limits
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(to_json(results), indent=2) + "\n")
    return 0


def _rerun_single_threaded(args: argparse.Namespace) -> int:
    cmd = [sys.executable, "-m", "tinyllm_trio", "bench", "model", "--runs", str(args.runs)]
    cmd += ["--batches", args.batches] + (["--compare-numpy"] if args.compare_numpy else [])
    cmd += ["--breakdown"] if args.breakdown else []
    if args.model:
        cmd += ["--model", str(args.model)]
    if args.attention_scale:
        cmd += ["--attention-scale", args.attention_scale]
    cmd += ["--weights", args.weights]
    if args.json_path:
        cmd += ["--json", str(args.json_path)]
    return subprocess.run(cmd, env=single_threaded_env(), check=False).returncode


def _load(model: str | None, attention_scale: str | None, weights: str = "float32"):
    from tinyllm_trio.model.checkpoint import CheckpointError, default_model_path, load_model
    from tinyllm_trio.model.transformer import ModelConfig, Transformer

    try:
        loaded = load_model(model, attention_scale=attention_scale, weights_format=weights)
    except CheckpointError:
        if model is not None or (default_model_path() / "config.json").exists():
            raise
        config = ModelConfig(attention_scale=attention_scale or "head")
        note = "random weights, default shapes (no trained default checkpoint yet)"
        return Transformer.random(config, weights_format=weights), None, f"{note}: {config}"
    label = f"{loaded.path}: {loaded.transformer.config}, {weights} weights"
    return loaded.transformer, loaded.tokenizer, label


def run_benchmarks(
    transformer,
    runs: int = 5,
    batches=BATCHES,
    steps: int = DECODE_STEPS,
    on_row=None,
    compare_numpy: bool = False,
):
    """{"prefill_128": Rates, "decode": {batch: Rates}}, one wall and one CPU rate per run.

    A model with a context shorter than 128 + 64 tokens gets shorter prompts / fewer steps.
    `on_row(name, rates)`, when given, is called as each measurement finishes (so the CLI
    prints each table row at once, even into a pipe). With `compare_numpy`, every batch the
    compiled step serves (`Transformer.fused_max_batch`) is also run on the numpy reference
    path, alternating run by run: results["decode_numpy"][batch].
    """
    report = on_row or (lambda name, rates: None)
    import numpy as np

    cfg = transformer.config
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, min(PREFILL_TOKENS, cfg.max_context)).tolist()
    cache = transformer.new_cache(1)

    def prefill() -> None:
        transformer.prefill(cache, 0, prompt)
        cache.drop(0)

    results: dict = {"prefill_128": _timed(prefill, len(prompt), runs, repeat=4), "decode": {}}
    if compare_numpy:
        results["decode_numpy"] = {}
    compiled_up_to = transformer.fused_max_batch
    bfloat16 = transformer.weights_format == "bfloat16"
    results["prefill_128"].work = work_per_token(cfg, len(prompt), (len(prompt) + 1) / 2)
    report(PREFILL_ROW, results["prefill_128"])
    longest = min(DECODE_PROMPT * 3 // 2, cfg.max_context // 2)
    steps = min(steps, cfg.max_context - longest)
    for batch in batches:
        cache = transformer.new_cache(batch)
        seqs = list(range(batch))
        tokens = rng.integers(0, cfg.vocab_size, (steps, batch)).tolist()
        lengths = rng.integers(max(1, longest // 3), longest + 1, batch).tolist()

        def decode(cache=cache, seqs=seqs, tokens=tokens, lengths=lengths) -> _Elapsed:
            for s, n in zip(seqs, lengths, strict=True):
                cache.drop(s)
                transformer.prefill(cache, s, prompt[:n])
            with _Elapsed() as elapsed:
                for step_tokens in tokens:
                    transformer.decode_step(cache, seqs, step_tokens)
            return elapsed

        def numpy_decode(decode=decode) -> _Elapsed:
            transformer.fused_max_batch = 0
            try:
                return decode()
            finally:
                transformer.fused_max_batch = compiled_up_to

        paths = {"decode": decode}
        if compare_numpy and batch <= compiled_up_to:
            paths["decode_numpy"] = numpy_decode
        # a batch-1 pass is ~50 ms, too short to time on a shared machine: repeat small ones
        rates = _timed_alternately(paths, batch * steps, runs, repeat=max(1, 16 // batch))
        mean_context = sum(lengths) / batch + (steps + 1) / 2
        for path, r in rates.items():
            tiles16 = path == "decode" and batch <= compiled_up_to and bfloat16
            r.work = work_per_token(cfg, batch, mean_context, 2 if tiles16 else 4)
            results[path][batch] = r
            report(f"decode, batch {batch}{', numpy' if path == 'decode_numpy' else ''}", r)
    return results


class _Elapsed:
    """Wall-clock and CPU seconds of a block. This process runs one thread, so on an idle core
    the two agree; on a shared machine CPU time is what one core's worth of work costs."""

    wall = cpu = 0.0

    def __enter__(self) -> _Elapsed:
        self._wall, self._cpu = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.thread_time() - self._cpu


@dataclass
class Rates:
    """Tokens per second of each run, by wall clock and by CPU time."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    work: Work = Work(0.0, 0.0)


def _timed(fn: Callable[[], _Elapsed | None], tokens: int, runs: int, repeat: int = 1) -> Rates:
    """Rates of `runs` runs of `repeat` calls; fn may time itself (to leave out its setup)."""
    return _timed_alternately({"": fn}, tokens, runs, repeat)[""]


def _timed_alternately(
    fns: dict[str, Callable[[], _Elapsed | None]], tokens: int, runs: int, repeat: int = 1
) -> dict[str, Rates]:
    """`_timed` for several ways of doing the same work, one run of each in turn, so that the
    machine's drift falls on all of them alike."""
    for fn in fns.values():
        fn()  # warm-up: page in the cache and buffers
    rates = {name: Rates() for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            wall = cpu = 0.0
            for _ in range(repeat):
                with _Elapsed() as whole:
                    own = fn()
                wall += (own or whole).wall
                cpu += (own or whole).cpu
            rates[name].wall.append(tokens * repeat / wall)
            rates[name].cpu.append(tokens * repeat / cpu)
    return rates


def to_json(results: dict) -> dict:
    """Medians of the wall-clock rates, in the documented JSON shape (plus the machine's
    measured limits when the run measured them)."""

    def medians(by_batch: dict) -> dict[str, float]:
        return {str(b): round(statistics.median(r.wall), 1) for b, r in by_batch.items()}

    out = {
        "prefill_128": round(statistics.median(results["prefill_128"].wall), 1),
        "decode": medians(results["decode"]),
    }
    if "decode_numpy" in results:
        out["decode_numpy"] = medians(results["decode_numpy"])
    if "machine" in results:
        out["machine"] = results["machine"]
    return out


def machine_limits(weight_bytes: float, runs: int = 5) -> dict[str, float]:
    """One core's best, measured here with this process's numpy and BLAS settings: GFLOP/s of
    a 1024^3 float32 matmul, and GB/s reading an array of `weight_bytes` (the model's weights:
    what a decode step streams) and one of 512 MB (far beyond any cache)."""
    import numpy as np

    def best(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    n = 1024
    a = np.ones((n, n), np.float32)
    out = np.empty((n, n), np.float32)
    gflops = 2 * n**3 / best(lambda: np.matmul(a, a, out=out)) / 1e9
    rates = {"sgemm_gflops": round(gflops, 1)}
    for name, size in (("weights_read_gbs", weight_bytes), ("dram_read_gbs", 512e6)):
        data = np.ones(int(size) // 4, np.float32)
        rates[name] = round(data.nbytes / best(lambda data=data: np.add.reduce(data)) / 1e9, 1)
    return rates


def limits_line(limits: dict[str, float]) -> str:
    return (
        f"one core here at best: sgemm 1024^3 {limits['sgemm_gflops']:,.1f} GFLOP/s; reading "
        f"the weights' size {limits['weights_read_gbs']:,.1f} GB/s, 512 MB "
        f"{limits['dram_read_gbs']:,.1f} GB/s"
    )


PREFILL_ROW = "prefill, 128-token prompt"


def table_head(runs: int) -> str:
    head = f"tokens/s (median of {runs})"
    return (
        f"{'measurement':<28}{head:>26}{'min':>9}{'max':>9}{'per CPU-second':>16}"
        f"{'GFLOP/s':>9}{'weight GB/s':>13}"
    )


def table_row(name: str, r) -> str:
    med, cpu = statistics.median(r.wall), statistics.median(r.cpu)
    gflops, gbs = med * r.work.flops / 1e9, med * r.work.weight_bytes / 1e9
    return (
        f"{name:<28}{med:>26,.0f}{min(r.wall):>9,.0f}{max(r.wall):>9,.0f}{cpu:>16,.0f}"
        f"{gflops:>9,.1f}{gbs:>13,.1f}"
    )


def format_table(results: dict, runs: int) -> str:
    rows = [(PREFILL_ROW, results["prefill_128"])]
    for b, r in results["decode"].items():
        rows.append((f"decode, batch {b}", r))
        if b in results.get("decode_numpy", {}):
            rows.append((f"decode, batch {b}, numpy", results["decode_numpy"][b]))
    return "\n".join([table_head(runs), *(table_row(name, r) for name, r in rows)])


# ---- where a decode step's time goes ------------------------------------------------------------

BREAKDOWN_PARTS = (
    "weight matmuls (BLAS)",
    "compiled step (all layers)",
    "attention kernel",
    "LayerNorm kernel",
    "GELU kernel",
    "sampling and events",
    "other Python and numpy",
)


def _part_of(filename: str, funcname: str) -> str:
    if funcname == "_linear":
        return BREAKDOWN_PARTS[0]
    if "decode_small_batch" in funcname:
        return BREAKDOWN_PARTS[1]
    if "attend_one_token" in funcname:
        return BREAKDOWN_PARTS[2]
    if "layernorm" in funcname:
        return BREAKDOWN_PARTS[3]
    if funcname in ("gelu", "gelu_"):
        return BREAKDOWN_PARTS[4]
    if (
        "argmax" in funcname
        or filename.endswith(("sampling.py", "tokenizer.py"))
        or (filename.endswith("batching.py") and funcname in ("_accept", "_finish"))
    ):
        return BREAKDOWN_PARTS[5]
    return BREAKDOWN_PARTS[6]


def step_breakdown(transformer, tokenizer, batch: int, steps: int = 48) -> dict[str, float]:
    """Shares (fractions of the total) of a continuous batcher's decode steps at `batch`
    sequences, by part, from a deterministic profile (cProfile) of `steps` steps: each
    function's own time is charged to the part it belongs to. The profiler adds a fixed cost
    per Python call, so the Python parts read somewhat high; the kernels and BLAS calls are
    timed as they run."""
    import cProfile
    import pstats

    from tinyllm_trio.model.batching import ContinuousBatcher
    from tinyllm_trio.model.sampling import SamplingParams

    batcher = ContinuousBatcher(transformer, tokenizer, batch)
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    for i in range(batch):
        batcher.submit(i, [2] + [7 + i % 50] * (DECODE_PROMPT - 1), params)
    while batcher.waiting or batcher.active < batch:
        batcher.step()  # prompts in; the steps after are decode steps of the whole batch
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(steps):
        batcher.step()
    profile.disable()
    shares = dict.fromkeys(BREAKDOWN_PARTS, 0.0)
    for (filename, _, funcname), row in pstats.Stats(profile).stats.items():
        shares[_part_of(filename, funcname)] += row[2]  # tottime: the function's own time
    total = sum(shares.values()) or 1.0
    return {part: t / total for part, t in shares.items()}


def format_breakdown(rows: dict[int, dict[str, float]]) -> str:
    head = f"{'share of a decode step':<30}" + "".join(f"{f'batch {b}':>10}" for b in rows)
    lines = [head]
    for part in BREAKDOWN_PARTS:
        lines.append(f"{part:<30}" + "".join(f"{rows[b][part]:>10.0%}" for b in rows))
    return "\n".join(lines)

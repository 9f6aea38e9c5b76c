#!/usr/bin/env python3
"""Where the engine's own CPU lands when two workers fill both cores.

With as many workers as cores, the engine process (here: this one, which opens the engine as
`bench engine` does) has no core of its own. The scheduler tends to keep it on one core, so
one worker waits in the run queue for all of it while the other finishes its share of a
closed-loop run early and then sits idle. This script measures that split, per run, from
/proc/<pid>/schedstat: each worker's CPU time, its run-queue wait, and its idle time
(elapsed - CPU - wait: blocked on its ring with nothing to do, mostly at the end of a run),
with this process's CPU time beside them. Worker A is the one that waited longer in that
run (the one that shared its core with the engine more), B the other.

It alternates two modes, run by run (the machine drifts): "stay", where the scheduler puts
this process, and "rotate", where this process's thread moves to the next allowed core every
--rotate-ms milliseconds, which spreads its CPU over both workers' cores. Rotating is an
experiment, not something the server does: `open_engine` never changes its caller's affinity.
The last lines give each mode's medians and the median of rotate/stay tokens/s over the pairs.

    python scripts/engine_cores.py [--runs 10] [--rotate-ms 50] [--concurrency 32]
        [--requests 128] [--max-tokens 64] [--model DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tinyllm_trio.bench.engine import add_closed_loop_arguments, with_one_blas_thread

MODES = ("stay", "rotate")


def _schedstat(pid: int) -> tuple[int, int]:
    """(ns on a CPU, ns waiting in the run queue) of a process's main thread."""
    with open(f"/proc/{pid}/schedstat") as f:
        run, wait, _ = f.read().split()
    return int(run), int(wait)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=10, help="runs per mode (alternated)")
    p.add_argument("--rotate-ms", type=float, default=50.0, help="rotate mode's period")
    add_closed_loop_arguments(p)
    return p


async def _measure(args: argparse.Namespace, path: str) -> dict[str, list[tuple[float, ...]]]:
    import trio

    from tinyllm_trio.bench.engine import Load, _engine_run
    from tinyllm_trio.engine import open_engine

    cores = sorted(os.sched_getaffinity(0))
    load = Load(args.max_tokens, per_level=args.requests, sink=True)
    rows: dict[str, list[tuple[float, ...]]] = {mode: [] for mode in MODES}
    async with open_engine(
        path, workers=2, max_batch=max(args.concurrency, 1), max_queue=args.concurrency
    ) as engine:
        await _engine_run(engine, args.concurrency, load)  # warm-up: KV pages, caches
        pids = [w["pid"] for w in engine.stats()["workers"]]

        async def rotate() -> None:
            for turn in range(sys.maxsize):
                os.sched_setaffinity(0, {cores[turn % len(cores)]})
                await trio.sleep(args.rotate_ms / 1000)

        for run in range(args.runs):
            for mode in MODES if run % 2 == 0 else MODES[::-1]:
                before = [_schedstat(pid) for pid in pids]
                start, cpu = time.perf_counter(), time.process_time()
                try:
                    async with trio.open_nursery() as nursery:
                        if mode == "rotate":
                            nursery.start_soon(rotate)
                        rate = (await _engine_run(engine, args.concurrency, load))[0]
                        nursery.cancel_scope.cancel()
                finally:
                    os.sched_setaffinity(0, cores)
                elapsed = time.perf_counter() - start
                workers = []
                for pid, (run0, wait0) in zip(pids, before, strict=True):
                    run1, wait1 = _schedstat(pid)
                    on_cpu, waited = (run1 - run0) / 1e6, (wait1 - wait0) / 1e6
                    workers.append((on_cpu, waited, elapsed * 1e3 - on_cpu - waited))
                workers.sort(key=lambda w: -w[1])  # the one that waited longer first
                row = (rate, (time.process_time() - cpu) * 1e3, *workers[0], *workers[1])
                rows[mode].append(row)
                print(f"{mode:>6}  " + "  ".join(f"{v:9.0f}" for v in row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if min(args.runs, args.concurrency, args.requests, args.max_tokens) < 1:
        _parser().error("--runs, --concurrency, --requests and --max-tokens must be >= 1")
    if args.rotate_ms <= 0:
        _parser().error("--rotate-ms must be > 0")
    if len(os.sched_getaffinity(0)) < 2:
        print("engine_cores.py needs two cores (two workers on them, the engine between)")
        return 2
    with_one_blas_thread()
    import trio

    from tinyllm_trio.bench.engine import _checkpoint

    with tempfile.TemporaryDirectory(prefix="tinyllm-cores-") as tmp:
        path, label = _checkpoint(args.model, None, Path(tmp))
        print(
            f"{label}; 2 workers, {args.concurrency} clients, {args.requests} requests of "
            f"{args.max_tokens} tokens per run; times in ms"
        )
        head = ["tok/s", "engine"]
        head += [f"{w} {k}" for w in ("A", "B") for k in ("cpu", "wait", "idle")]
        print("  mode  " + "  ".join(f"{h:>9}" for h in head), flush=True)
        rows = trio.run(_measure, args, path)
    for mode in MODES:
        medians = [statistics.median(column) for column in zip(*rows[mode], strict=True)]
        print(f"{mode:>6}  " + "  ".join(f"{v:9.0f}" for v in medians) + "  (medians)")
    ratios = [r[0] / s[0] for r, s in zip(rows["rotate"], rows["stay"], strict=True)]
    print(
        f"rotate/stay tok/s: median {statistics.median(ratios):.3f} "
        f"({min(ratios):.3f}-{max(ratios):.3f}) over {len(ratios)} pairs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

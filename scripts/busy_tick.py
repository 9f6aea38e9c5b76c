#!/usr/bin/env python3
"""What the busy tick saves when every core runs a busy worker.

With as many busy workers as cores, the engine process (here: this one, which opens engines as
`bench engine` does) has no core of its own, and each of its wake-ups takes the CPU from a
worker's decode step. The busy tick (`serve --busy-tick`, `open_engine(busy_tick=...)`) reads
the workers on a shared tick instead of after each step of each worker. This script opens two
engines with one worker per core, one with the tick ("tick") and one without ("woken"), and
runs the same closed loop (as `bench engine` at one level, the tokens taken in a token sink)
through each in turn, swapping the order every pair, since the machine drifts. Per run it
prints the tokens/s, this process's CPU per token (the engine's routing: its wake-ups, the
token events, the requests) and the readers' sleeps on the tick. The last lines give each
mode's medians and the median of tick/woken tokens/s over the pairs.

    python scripts/busy_tick.py [--pairs 20] [--tick 0.016] [--concurrency 32]
        [--requests 128] [--max-tokens 64] [--model DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tinyllm_trio.bench.engine import add_closed_loop_arguments, with_one_blas_thread

MODES = ("tick", "woken")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=20, help="runs per mode (alternated)")
    p.add_argument("--tick", type=float, default=0.016, help="the tick mode's busy tick, s")
    add_closed_loop_arguments(p)
    return p


async def _measure(args: argparse.Namespace, path: str) -> dict[str, list[tuple[float, ...]]]:
    import contextlib

    from tinyllm_trio.bench.engine import Load, _engine_run
    from tinyllm_trio.engine import open_engine
    from tinyllm_trio.ipc.pool import default_workers

    load = Load(args.max_tokens, per_level=args.requests, sink=True)
    tokens = args.requests * args.max_tokens
    rows: dict[str, list[tuple[float, ...]]] = {mode: [] for mode in MODES}
    async with contextlib.AsyncExitStack() as stack:
        engines = {}
        for mode, tick in zip(MODES, (args.tick, 0.0), strict=True):
            engines[mode] = await stack.enter_async_context(
                open_engine(
                    path,
                    workers=default_workers(),
                    max_batch=max(args.concurrency, 1),
                    max_queue=args.concurrency,
                    busy_tick=tick,
                )
            )
            await _engine_run(engines[mode], args.concurrency, load)  # warm-up

        def ticks(mode: str) -> int:
            return sum(w["coast"]["ticks"] for w in engines[mode].stats()["workers"])

        for pair in range(args.pairs):
            for mode in MODES if pair % 2 == 0 else MODES[::-1]:
                before, cpu = ticks(mode), time.thread_time()
                rate = (await _engine_run(engines[mode], args.concurrency, load))[0]
                used = (time.thread_time() - cpu) / tokens * 1e6
                row = (rate, used, float(ticks(mode) - before))
                rows[mode].append(row)
                print(f"{mode:>6}  {row[0]:9.0f}  {row[1]:13.2f}  {row[2]:6.0f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if min(args.pairs, args.concurrency, args.requests, args.max_tokens) < 1:
        _parser().error("--pairs, --concurrency, --requests and --max-tokens must be >= 1")
    if not 0 < args.tick <= 1:
        _parser().error("--tick must be > 0 and at most 1 second")
    with_one_blas_thread()
    import trio

    from tinyllm_trio.bench.engine import _checkpoint
    from tinyllm_trio.ipc.pool import default_workers

    with tempfile.TemporaryDirectory(prefix="tinyllm-tick-") as tmp:
        path, label = _checkpoint(args.model, None, Path(tmp))
        print(
            f"{label}; {default_workers()} workers (one per core), {args.concurrency} clients, "
            f"{args.requests} requests of {args.max_tokens} tokens per run; "
            f"tick {args.tick * 1000:g} ms"
        )
        print("  mode      tok/s  engine us/tok   ticks", flush=True)
        rows = trio.run(_measure, args, path)
    for mode in MODES:
        rate, used, ticks = (statistics.median(column) for column in zip(*rows[mode], strict=True))
        print(f"{mode:>6}  {rate:9.0f}  {used:13.2f}  {ticks:6.0f}  (medians)")
    ratios = [t[0] / w[0] for t, w in zip(rows["tick"], rows["woken"], strict=True)]
    print(
        f"tick/woken tok/s: median {statistics.median(ratios):.3f} "
        f"({min(ratios):.3f}-{max(ratios):.3f}) over {len(ratios)} pairs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""What the server's per-token work on the other core costs a worker's decode step.

At one stream a worker decodes on one core and, after each token, wakes the server process
on the other core, which then does its own work for that token (read the ring, route the
token, hand it to the client). `bench engine` shows the worker spending more CPU per token
than the bare loop in a process of its own ("worker/bare"). This script asks how much of that
the neighbour alone explains, with no worker code at all: it runs the bare one-stream loop
(`bench engine`'s `BareLoop`) pinned to one core, in turn

- alone, and
- ringing an eventfd after each token, which a process pinned to the other core waits for
  (epoll, as the server's reader does) and then spends W microseconds of Python work on
  (W = 0: the wake alone),

and prints the loop's CPU per token both ways and their ratio, the median over alternated
rounds (the machine drifts), for each W, and how long the eventfd write itself took (the
median): on a VM, waking a sleeping vCPU is an inter-processor interrupt that exits to the
hypervisor, and the writer waits for it.

    python scripts/neighbour_cost.py [--work 0,35,70] [--rounds 6] [--requests 12]
        [--max-tokens 64] [--model DIR]
"""

from __future__ import annotations

import argparse
import mmap
import os
import select
import statistics
import struct
import sys
import time

WORD = struct.Struct("<q")  # the neighbour's work per wake in us; -1: exit


def neighbour(cpu: int, bell: int, shared: mmap.mmap) -> None:
    """Wait on `bell`; after each wake spend the shared number of microseconds on Python work
    that touches memory, as the server's per-token work does."""
    os.sched_setaffinity(0, {cpu})
    poller = select.epoll()
    poller.register(bell, select.EPOLLIN)
    junk: dict[int, list[object]] = {}
    while True:
        poller.poll()
        try:
            os.eventfd_read(bell)
        except BlockingIOError:
            continue
        (work,) = WORD.unpack_from(shared)
        if work < 0:
            return
        start = time.perf_counter()
        i = 0
        while time.perf_counter() - start < work * 1e-6:
            junk[i % 512] = [i, str(i)]
            i += 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="0,35,70", help="neighbour's us of work per token, listed")
    p.add_argument("--rounds", type=int, default=6, help="alternated rounds per value")
    p.add_argument("--requests", type=int, default=12, help="requests per measurement")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request")
    p.add_argument("--model", default=None, help="checkpoint directory (default: packaged)")
    args = p.parse_args()
    try:
        works = [int(w) for w in args.work.split(",")]
    except ValueError:
        p.error("--work takes comma-separated whole microseconds")
    if min(works) < 0 or min(args.rounds, args.requests, args.max_tokens) < 1:
        p.error("--work must be >= 0, --rounds, --requests and --max-tokens >= 1")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        print("neighbour_cost.py needs two cores (the loop on one, the neighbour on another)")
        return 2

    bell = os.eventfd(0, os.EFD_NONBLOCK)
    shared = mmap.mmap(-1, WORD.size)
    pid = os.fork()  # before numpy and the model: the child stays a small plain process
    if pid == 0:
        try:
            neighbour(cpus[0], bell, shared)
        finally:
            os._exit(0)
    os.sched_setaffinity(0, {cpus[-1]})
    try:
        return measure(args, works, bell, shared)
    finally:
        WORD.pack_into(shared, 0, -1)
        os.eventfd_write(bell, 1)
        os.waitpid(pid, 0)


def measure(args: argparse.Namespace, works: list[int], bell: int, shared: mmap.mmap) -> int:
    from tinyllm_trio.bench.engine import BareLoop, Load

    loop = BareLoop(args.model, None, Load().max_batch)  # `bench engine`'s bare loop
    load = Load(max_tokens=args.max_tokens, per_level=args.requests)  # after 15-word prompts
    writes: list[float] = []  # seconds per eventfd write, the neighbour asleep

    def wake() -> None:
        t = time.perf_counter()
        os.eventfd_write(bell, 1)
        writes.append(time.perf_counter() - t)

    def run(ring: bool) -> float:
        """CPU us per token of `args.requests` requests, one at a time."""
        return loop.run(1, load, wake if ring else None)[1]

    run(False)  # warm: the compiled step's first call, the KV cache's pages
    print(
        "neighbour us/token  alone us/tok  with neighbour us/tok  ratio (median)  range"
        "  wake write us (median)"
    )
    for work in works:
        WORD.pack_into(shared, 0, work)
        alone: list[float] = []
        beside: list[float] = []
        writes.clear()
        for r in range(args.rounds):
            for ring in (False, True) if r % 2 == 0 else (True, False):
                (beside if ring else alone).append(run(ring))
        ratios = [b / a for a, b in zip(alone, beside, strict=True)]
        print(
            f"{work:18d}  {statistics.median(alone):12.1f}  {statistics.median(beside):21.1f}"
            f"  {statistics.median(ratios):14.2f}  {min(ratios):.2f}-{max(ratios):.2f}"
            f"  {statistics.median(writes) * 1e6:22.1f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

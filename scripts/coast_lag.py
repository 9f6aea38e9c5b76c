"""What coasting costs and saves, on a ring alone: a producer process posts at a fixed pace.

    python scripts/coast_lag.py [--period-us 280,1000] [--messages 3000] [--rounds 5]

The producer, pinned to the last core, busy-waits its period (as a decode step computes) and
posts one small message, its `time.monotonic_ns()` inside, to a ring with a doorbell. The
reader, this process pinned to the first core, is `Ring.pump` in Trio, as the worker pool
reads a response ring: coasting (`coast=lambda: True`) or rung for every message
(`coast=None`), alternated round by round. Per configuration and period it prints the medians
over rounds of:

- lag: from the post to the reader's `deliver`, the p50 and p90 of the round's messages;
- the producer's CPU per message beyond its busy wait (the put, and the eventfd write when it
  rings: on a VM, waking the reader's sleeping core is an interrupt the writer waits for);
- the reader's CPU per message;
- how many messages rang the bell, and how many timer wake-ups found nothing (misses).
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import subprocess
import sys
import time

import trio

from tinyllm_trio.ipc.ring import Ring, new_prefix

STAMP = struct.Struct("<Q")

PRODUCER = """
import os, struct, sys, time
from tinyllm_trio.ipc.ring import Ring
ring = Ring.attach(sys.argv[1], doorbell_fd=int(sys.argv[2]))
period, n = float(sys.argv[3]) / 1e6, int(sys.argv[4])
os.sched_setaffinity(0, {int(sys.argv[5])})
put_ns = 0
t = time.perf_counter()
for i in range(n):
    t += period
    while time.perf_counter() < t:
        pass
    c0 = time.thread_time_ns()
    ring.put(1, i, struct.pack("<Q", time.monotonic_ns()))
    put_ns += time.thread_time_ns() - c0
rings = ring.doorbell_rings
ring.put(2, 0, b"")  # the end
print(put_ns / n / 1000, rings, flush=True)
"""


def one_round(period_us: float, messages: int, coast: bool, cpus: list[int]) -> dict[str, float]:
    ring = Ring.create(new_prefix() + "-lag", n_slots=256, slot_size=64, doorbell=True)
    try:
        bell = ring.doorbell_fd
        args = [ring.name, str(bell), str(period_us), str(messages), str(cpus[-1])]
        child = subprocess.Popen(
            [sys.executable, "-c", PRODUCER, *args], pass_fds=(bell,), stdout=subprocess.PIPE
        )
        lags: list[float] = []

        async def main() -> None:
            with trio.CancelScope() as scope:

                def deliver(frames) -> None:
                    now = time.monotonic_ns()
                    for frame in frames:
                        if frame.msg_type == 2:
                            scope.cancel()
                            return
                        lags.append((now - STAMP.unpack(frame.payload)[0]) / 1000)

                await ring.pump(deliver, coast=(lambda: True) if coast else None)

        cpu0 = time.process_time()
        trio.run(main)
        reader_us = (time.process_time() - cpu0) / len(lags) * 1e6
        out, _ = child.communicate(timeout=60)
        put_us, rings = out.split()
        lags.sort()
        misses = ring.coast.misses if ring.coast is not None else 0
        return {
            "lag p50": lags[len(lags) // 2],
            "lag p90": lags[int(len(lags) * 0.9)],
            "put us": float(put_us),
            "reader us": reader_us,
            "rang": int(rings),
            "misses": misses,
        }
    finally:
        ring.destroy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--period-us", default="280,1000", help="producer paces, comma-separated")
    p.add_argument("--messages", type=int, default=3000, help="messages per round")
    p.add_argument("--rounds", type=int, default=5, help="alternated rounds per configuration")
    args = p.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        print("coast_lag.py needs two cores: the reader and the producer", file=sys.stderr)
        return 2
    try:
        periods = [float(x) for x in args.period_us.split(",")]
    except ValueError:
        print(f"--period-us: not numbers: {args.period_us!r}", file=sys.stderr)
        return 2
    if min(periods) <= 0 or args.messages < 1 or args.rounds < 1:
        print("--period-us, --messages and --rounds must be positive", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {cpus[0]})
    keys = ["lag p50", "lag p90", "put us", "reader us", "rang", "misses"]
    print(f"{args.messages} messages per round, medians of {args.rounds} alternated rounds")
    print(f"{'period us':>9}  {'reader':<8}" + "".join(f"{k:>11}" for k in keys))
    for period in periods:
        runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
        for _ in range(args.rounds):
            for coast in (True, False):
                runs[coast].append(one_round(period, args.messages, coast, cpus))
        for coast in (True, False):
            row = [statistics.median(r[k] for r in runs[coast]) for k in keys]
            name = "coasts" if coast else "rung"
            print(f"{period:>9.0f}  {name:<8}" + "".join(f"{v:>11.1f}" for v in row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Coasting: a ring's reader that sleeps on a timer at its producer's pace, unrung.

A doorbell (an eventfd the producer writes after each message) wakes the reader's core when it
sleeps. On a virtual machine that is an inter-processor interrupt, a VM exit the producer
waits for: ~11 us a message on the 2-vCPU machine `scripts/neighbour_cost.py` measures, paid by
the worker on every decode step, 4% of a one-stream step. While the producer posts at a steady
pace the reader does not need the bell: it knows when the next message comes. `Coast` predicts
that from the producer's time stamps (the ring's PUBLISHED word) and runs a periodic timerfd at
the producer's period, in phase with its posts, so the reader wakes as each message lands
(a timer wake-up's own latency, tens of microseconds, is the margin) while the producer skips
the bell (the reader cleared BELL_WANTED).

The policy, from what a wrong guess costs:
- the period is the median of the last three gaps between posts (per message read), so one
  slow step (a prefill) does not move it and a real change of pace does within two steps. A
  period beyond COAST_MAX_PERIOD, or too few gaps, is "not steady": the reader waits for the
  bell. At such a pace the interrupt is a small share of the producer's time;
- a timer that finds the ring empty (a slower step, a finished request, an idle worker) is a
  miss: the timer stops and the reader waits for the bell until the next message, so an idle
  producer costs one wake-up, not a stream of them;
- a message read more than a quarter of a period plus COAST_WAKE_SLACK after its post puts
  the timer out of phase, and a period that moved by more than COAST_RETUNE changes its
  interval: either re-arms it (a system call); a steady producer needs none.

`Ring._pump_on_doorbell` owns the protocol between the flag and the bell; this module only
decides when the reader sleeps on the timer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import trio

from tinyllm_trio.ipc.timerfd import TimerFd

COAST_MAX_PERIOD = 2_000_000  # ns: a slower producer is always rung for (the wake is cheap)
COAST_RETUNE = 0.1  # re-arm when the period moved by this share of the armed interval
COAST_WAKE_SLACK = 50_000  # ns: a timer wake-up's own latency, not a phase error


class Coast:
    """The timer and the producer's pace of one ring's reader (see the module doc)."""

    def __init__(self, timer: TimerFd, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.timer = timer
        self._clock = clock  # the clock of the producer's time stamps (system-wide)
        self.period = 0.0  # ns between the producer's messages while steady, else 0
        self._gaps = (math.inf, math.inf)  # the last two gaps between posts, ns
        self.last = 0  # the producer's time stamp of the last message read
        self.armed = 0  # the interval the timer runs at, ns; 0 = stopped
        self.coasted = False  # the reader slept on the timer and no message came since
        self.belled = False  # the reader waits for the bell until the next message
        self.waits = 0  # sleeps on the timer
        self.misses = 0  # ... that found the ring empty

    @classmethod
    def open(cls) -> Coast | None:
        timer = TimerFd.open()
        return None if timer is None else cls(timer)

    def close(self) -> None:
        self.timer.close()

    @property
    def steady(self) -> bool:
        """Whether the reader may sleep on the timer now (else it waits for the bell)."""
        return bool(self.period) and not self.coasted and not self.belled

    def arrived(self, published: int, messages: int) -> None:
        """The reader just read `messages` messages, the last one posted at `published`."""
        gap = (published - self.last) / messages
        a, b = self._gaps
        self._gaps = (b, gap)
        period = max(min(a, b), min(max(a, b), gap))  # the median of the last three gaps
        self.period = period = period if 0 < period <= COAST_MAX_PERIOD else 0.0
        if self.coasted and self.armed:
            late = self._clock() - published
            if late > 0.25 * period + COAST_WAKE_SLACK:
                self.armed = 0  # out of phase: `sleep` aims it again
        self.last = published
        self.coasted = self.belled = False

    async def sleep(self) -> None:
        """Sleep until just after the producer's next expected post."""
        period = self.period
        if not self.armed or abs(period - self.armed) > COAST_RETUNE * self.armed:
            self.armed = interval = int(period)
            self.timer.arm_at(self.last + interval, interval)
        self.coasted = True
        self.waits += 1
        await trio.lowlevel.wait_readable(self.timer.fileno())
        self.timer.clear()

    def stop(self) -> None:
        """The reader waits for the bell (the timer found the ring empty, or the producer is
        not steady): stop the timer, or it would wake an idle core every period."""
        if self.coasted:
            self.misses += 1
            self.coasted = False
        self.belled = True
        if self.armed:
            self.timer.disarm()
            self.armed = 0

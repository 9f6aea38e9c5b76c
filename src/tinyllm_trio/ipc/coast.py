"""Coasting: a ring's reader that sleeps on a timer at its producer's pace, unrung.

A doorbell (an eventfd the producer writes after each message) wakes the reader's core when it
sleeps. On a virtual machine that is an inter-processor interrupt, a VM exit the producer
waits for: ~11 us a message on the 2-vCPU machine `scripts/neighbour_cost.py` measures, paid by
the worker on every decode step, 4% of a one-stream step. While the producer posts at a steady
pace the reader does not need the bell: it knows when the next message comes. `Coast`
predicts that from the producer's time stamps (the ring's PUBLISHED word) and sleeps on a
timerfd aimed just past the next expected post, so the reader wakes as each message lands
while the producer skips the bell (the reader cleared BELL_WANTED).

The policy, from what a wrong guess costs:
- the period is the median of the last three gaps between posts (per message read), so one
  slow step (a prefill) does not move it and a real change of pace does within two steps. A
  period beyond COAST_MAX_PERIOD, or too few gaps, is "not steady": the reader waits for the
  bell. At such a pace the interrupt is a small share of the producer's time;
- the timer is aimed afresh from each post: the pace (the period, or the last gap when that is
  longer: a decode step slows with every token of context) plus COAST_MARGIN of it. A wake-up
  a little after the post costs that much latency; one a little before it costs a miss;
- a timer that finds the ring empty (a slower step, a finished request, an idle worker) is a
  miss: the reader waits for the bell until the next message, so an idle producer costs one
  wake-up, not a stream of them.

`Ring._pump_on_doorbell` owns the protocol between the flag and the bell; this module only
decides when the reader sleeps on the timer.
"""

from __future__ import annotations

import math

import trio

from tinyllm_trio.ipc.timerfd import TimerFd

COAST_MAX_PERIOD = 2_000_000  # ns: a slower producer is always rung for (the wake is cheap)
COAST_MARGIN = 0.05  # the timer fires this share of a period after the expected post
COAST_FOLLOW = 0.25  # the most a longer last gap may exceed the period and still set the pace


class Coast:
    """The timer and the producer's pace of one ring's reader (see the module doc)."""

    def __init__(self, timer: TimerFd) -> None:
        self.timer = timer
        self.period = 0.0  # ns between the producer's messages while steady, else 0
        self._gaps = (math.inf, math.inf)  # the last two gaps between posts, ns
        self.last = 0  # the producer's time stamp of the last message read
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
        self.period = period if 0 < period <= COAST_MAX_PERIOD else 0.0
        self.last = published
        self.coasted = self.belled = False

    def next_post(self) -> int:
        """When the producer's next message is due (its clock, ns), plus COAST_MARGIN.

        The pace is the median period, or the last gap if that is longer, by at most
        COAST_FOLLOW of the period (an outlier, a prefill, is not a pace): a decode step slows
        a little with every token of context, so a timer at a fixed interval falls behind the
        posts until it fires before one (a miss, and the worker rings after all); aimed afresh
        from each post, it follows them."""
        pace = min(max(self.period, self._gaps[1]), self.period * (1 + COAST_FOLLOW))
        return self.last + int(pace * (1 + COAST_MARGIN))

    async def sleep(self) -> None:
        """Sleep until just after the producer's next expected post (`next_post`)."""
        self.timer.arm_at(self.next_post())
        self.coasted = True
        self.waits += 1
        await trio.lowlevel.wait_readable(self.timer.fileno())
        self.timer.clear()

    def stop(self) -> None:
        """The reader waits for the bell (the timer found the ring empty, or the producer is
        not steady). The timer fires once per `sleep`, so an idle producer costs the reader
        one wake-up, not a stream of them."""
        if self.coasted:
            self.misses += 1
            self.coasted = False
        self.belled = True

"""Coasting: a doorbell ring's reader sleeps on a timer at its producer's pace while the producer
skips the doorbell, and falls back to the doorbell, losing nothing, when the pace breaks."""

from __future__ import annotations

import functools
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import trio

from tinyllm_trio.ipc import ring as ring_mod
from tinyllm_trio.ipc.coast import COAST_FOLLOW, COAST_MARGIN, COAST_MAX_PERIOD, Coast
from tinyllm_trio.ipc.ring import (
    BELL_EVERY,
    BELL_NONE,
    BELL_URGENT,
    BELL_WANTED,
    PUBLISHED,
    PUBLISHED_AT,
    Ring,
    new_prefix,
)
from tinyllm_trio.ipc.timerfd import TimerFd


def _timerfd_works() -> bool:
    timer = TimerFd.open()
    if timer is None:
        return False
    timer.close()
    return True


pytestmark = pytest.mark.skipif(
    not ring_mod.COASTING or not _timerfd_works(), reason="coasting is x86 Linux only"
)

US = 1_000


def _readable(fd: int, timeout: float = 0.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def _bell_ring() -> Ring:
    return Ring.create(new_prefix() + "-c", n_slots=64, slot_size=64, doorbell=True)


# --- the timer -----------------------------------------------------------------------------------


def test_timerfd_fires_once_at_its_deadline() -> None:
    timer = TimerFd.open()
    assert timer is not None
    try:
        timer.arm_at(time.monotonic_ns() - 1)  # a deadline that passed: at once
        assert _readable(timer.fileno(), 1.0)
        assert timer.clear() == 1
        assert not _readable(timer.fileno(), 0.02)  # once: no interval

        start = time.monotonic_ns()
        timer.arm_at(start + 30_000 * US)
        assert not _readable(timer.fileno(), 0.01)  # 10 ms before its 30 ms deadline
        assert _readable(timer.fileno(), 2.0)
        assert time.monotonic_ns() - start >= 30_000 * US
        assert timer.clear() == 1

        timer.arm_at(time.monotonic_ns() + 20_000 * US)
        timer.arm_at(time.monotonic_ns() + 10**9)  # a new deadline replaces the old one
        assert not _readable(timer.fileno(), 0.05)
    finally:
        timer.close()


# --- the policy ----------------------------------------------------------------------------------


class CountingTimer(TimerFd):
    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self.arms: list[int] = []

    def arm_at(self, deadline_ns: int) -> None:
        self.arms.append(deadline_ns)
        super().arm_at(deadline_ns)


def _coast() -> tuple[Coast, CountingTimer]:
    plain = TimerFd.open()
    assert plain is not None
    timer = CountingTimer(plain.fileno())
    coast = Coast(timer)
    coast.arrived(time.monotonic_ns() - 10**9, 1)  # a second ago: every deadline has passed
    return coast, timer


def _post(coast: Coast, gap_us: float, messages: int = 1) -> None:
    """The producer posts `gap_us` after its last post (read with `messages` - 1 others)."""
    coast.arrived(coast.last + int(gap_us * US), messages)


def _steady_coast(gap_us: float = 1_000) -> tuple[Coast, CountingTimer]:
    """A Coast that has read four messages `gap_us` apart: steady, its timer not armed yet."""
    coast, timer = _coast()
    for _ in range(3):
        _post(coast, gap_us)
    return coast, timer


async def _sleep(coast: Coast) -> None:
    with trio.fail_after(5):
        await coast.sleep()


def test_the_period_is_the_median_of_three_gaps_so_one_slow_step_does_not_move_it() -> None:
    coast, _ = _coast()
    try:
        assert not coast.steady  # no gap yet: wait for the bell
        for gap in (300, 300, 5_000, 300):  # us; the 5 ms one is a prefill between two steps
            _post(coast, gap)
        assert coast.steady
        assert coast.period == 300 * US
        _post(coast, 900, messages=3)  # three messages read at once: 300 us each
        assert coast.period == 300 * US
        for _ in range(2):  # the pace really changed: two steps tell
            _post(coast, 600)
        assert coast.period == 600 * US
    finally:
        coast.close()


def test_a_producer_slower_than_the_limit_is_always_rung_for() -> None:
    coast, _ = _coast()
    try:
        for _ in range(4):
            _post(coast, COAST_MAX_PERIOD / US + 1)
        assert not coast.steady
        assert coast.period == 0
    finally:
        coast.close()


async def test_each_sleep_aims_the_timer_once_just_past_the_next_post() -> None:
    coast, timer = _steady_coast()
    try:
        for _ in range(3):
            await _sleep(coast)  # aimed in the past here: fires at once
            assert timer.arms[-1] == coast.last + int(1_000 * US * (1 + COAST_MARGIN))
            _post(coast, 1_000)
        assert len(timer.arms) == 3 and coast.waits == 3 and coast.misses == 0
        await _sleep(coast)
        assert not _readable(timer.fileno(), 0.01)  # one shot: it does not fire again
    finally:
        coast.close()


async def test_a_miss_sends_the_reader_to_the_bell_until_the_next_message() -> None:
    coast, _ = _steady_coast()
    try:
        await _sleep(coast)
        coast.stop()  # it woke to an empty ring
        assert coast.misses == 1
        assert not coast.steady  # the bell, until the next message
        coast.stop()  # another empty wake-up (the bell's, say): not a second miss
        assert coast.misses == 1
        _post(coast, 1_000)
        assert coast.steady
    finally:
        coast.close()


def test_the_aim_follows_a_slowing_producer_but_not_an_outlier() -> None:
    coast, _ = _steady_coast()
    try:
        follow = 1 + COAST_FOLLOW
        _post(coast, 1_100)  # a step a little slower, as each token of context makes it
        assert coast.period == 1_000 * US
        assert coast.next_post() == coast.last + int(1_100 * US * (1 + COAST_MARGIN))
        _post(coast, 1_900)  # a prefill between two steps: the aim moves by COAST_FOLLOW
        assert coast.period == 1_100 * US
        want = coast.last + int(1_100 * US * follow * (1 + COAST_MARGIN))
        assert coast.next_post() == want
        _post(coast, 900)  # a quicker step: the period, not the last gap, sets the pace
        assert coast.next_post() == coast.last + int(1_100 * US * (1 + COAST_MARGIN))
    finally:
        coast.close()


# --- the ring ------------------------------------------------------------------------------------


def test_the_producer_rings_only_while_the_reader_asks_for_the_bell() -> None:
    ring = _bell_ring()
    producer = Ring.attach(ring.name, doorbell_fd=os.dup(ring.doorbell_fd))
    try:
        bell = ring.doorbell_fd
        assert ring._mm[BELL_WANTED] == 1  # a new ring: always rung for
        before = time.monotonic_ns()
        producer.put(1, 7, b"x")
        assert _readable(bell)
        assert before <= PUBLISHED.unpack_from(ring._mm, PUBLISHED_AT)[0] <= time.monotonic_ns()
        os.eventfd_read(bell)
        ring._mm[BELL_WANTED] = 0  # the reader coasts
        producer.put(1, 8, b"y")
        assert not _readable(bell)
        assert producer.doorbell_rings == 1
        assert [ring.get(timeout=0).request_id, ring.get(timeout=0).request_id] == [7, 8]
    finally:
        producer.close()
        ring.destroy()


PACED = """
import sys, time
from tinyllm_trio.ipc.ring import Ring
ring = Ring.attach(sys.argv[1], doorbell_fd=int(sys.argv[2]))
t = time.perf_counter()
for i, gap in enumerate(float(g) for g in sys.argv[3].split(",")):
    t += gap / 1e6
    while time.perf_counter() < t:  # busy, as a decode step is
        pass
    ring.put(1, i, i.to_bytes(4, "little"))
print(ring.doorbell_rings, flush=True)
"""


async def _pump_from(
    plan: list[float], coast: Callable[[], bool] | None = lambda: True
) -> tuple[Ring, list[int], int]:
    """Run a producer process that posts after each gap of `plan` (us); return the ring, the
    ids the pump delivered, and how many times the producer rang."""
    ring = _bell_ring()
    got: list[int] = []
    child = subprocess.Popen(
        [sys.executable, "-c", PACED, ring.name, str(ring.doorbell_fd), ",".join(map(str, plan))],
        pass_fds=(ring.doorbell_fd,),
        stdout=subprocess.PIPE,
    )
    try:

        def deliver(frames) -> None:
            got.extend(int.from_bytes(f.payload, "little") for f in frames)
            if len(got) == len(plan):
                scope.cancel()

        # A lost wake-up hangs the pump here: the producer's last message after a pause
        # can only come by the bell.
        with trio.fail_after(60), trio.CancelScope() as scope:
            await ring.pump(deliver, coast=coast)
        out, _ = child.communicate(timeout=30)
        assert child.returncode == 0
        return ring, got, int(out)
    except BaseException:
        child.kill()
        ring.destroy()
        raise


async def test_a_steady_producer_mostly_skips_the_bell_and_nothing_is_lost() -> None:
    plan = [300.0] * 400  # a one-stream decode step's pace
    ring, got, rings = await _pump_from(plan)
    try:
        assert got == list(range(len(plan)))
        assert ring.coast is not None and ring.coast.waits > 0
        assert rings < len(plan)  # on an idle machine, a handful; loaded, still fewer
        assert ring._mm[BELL_WANTED] == 1  # the pump left: rung for again
    finally:
        ring.destroy()


async def test_a_reader_told_not_to_coast_is_rung_for_every_message() -> None:
    """The pool says no while every core has a busy worker (`WorkerPool._core_to_spare`)."""
    plan = [300.0] * 100
    ring, got, rings = await _pump_from(plan, coast=lambda: False)
    try:
        assert got == list(range(len(plan)))
        assert ring.coast is not None and ring.coast.waits == 0
        assert rings == len(plan)
    finally:
        ring.destroy()


async def test_bursts_pauses_and_pace_changes_lose_no_message() -> None:
    plan: list[float] = []
    for pace, n in ((300, 40), (0, 20), (800, 30), (20_000, 3), (150, 50), (3_000, 5), (400, 30)):
        plan += [float(pace)] * n
    plan += [50_000.0]  # the last message after a long pause: the reader's timer stopped
    ring, got, _ = await _pump_from(plan)
    try:
        assert got == list(range(len(plan)))
        assert ring.coast is not None and ring.coast.misses >= 1
    finally:
        ring.destroy()


async def test_an_idle_producer_stops_the_readers_timer() -> None:
    ring = _bell_ring()
    producer = Ring.attach(ring.name, doorbell_fd=os.dup(ring.doorbell_fd))
    got: list[int] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(ring.pump, coast=lambda: True),
                lambda frames: got.extend(f.request_id for f in frames),
            )
            for i in range(8):  # steady enough to coast on
                producer.put(1, i, b"")
                await trio.sleep(0.001)
            await trio.sleep(0.05)  # the producer went quiet: one miss, then the bell
            coast = ring.coast
            assert coast is not None
            waits = coast.waits
            await trio.sleep(0.05)
            assert coast.waits == waits and not coast.steady
            producer.put(1, 99, b"")  # rung for, and read at once
            with trio.fail_after(5):
                while got[-1:] != [99]:
                    await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
        assert got == [*range(8), 99]
    finally:
        producer.close()
        ring.destroy()


# --- the busy tick -------------------------------------------------------------------------------


def test_a_reader_on_the_busy_tick_is_rung_only_for_urgent_messages() -> None:
    ring = _bell_ring()
    producer = Ring.attach(ring.name, doorbell_fd=os.dup(ring.doorbell_fd))
    try:
        bell = ring.doorbell_fd
        ring._mm[BELL_WANTED] = BELL_URGENT
        producer.put(1, 7, b"x", urgent=False)  # a step of plain tokens: waits for the tick
        assert not _readable(bell)
        producer.put(1, 8, b"y")  # urgent (the default): a first token, a final event
        assert _readable(bell) and producer.doorbell_rings == 1
        os.eventfd_read(bell)
        ring._mm[BELL_WANTED] = BELL_NONE  # coasting: the timer comes, urgent or not
        producer.put(1, 9, b"z")
        assert not _readable(bell) and producer.doorbell_rings == 1
        assert [ring.get(timeout=0).request_id for _ in range(3)] == [7, 8, 9]
        ring._mm[BELL_WANTED] = BELL_URGENT
        half = ring.n_slots // 2
        for i in range(half - 1):  # plain, and the ring less than half full: no bell
            producer.put(1, i, b"", urgent=False)
        assert not _readable(bell)
        producer.put(1, half, b"", urgent=False)  # now half full: rung, or it would block
        assert _readable(bell) and producer.doorbell_rings == 2
    finally:
        producer.close()
        ring.destroy()


async def test_on_the_busy_tick_plain_messages_wait_for_it_and_urgent_ones_do_not() -> None:
    """With no core to spare the reader sleeps until the next multiple of the tick: a plain
    message is read there and not before, an urgent one at once; once a core is spare again
    the reader asks for every bell, and no message is lost on the way."""
    tick = 0.5
    ring = _bell_ring()
    producer = Ring.attach(ring.name, doorbell_fd=os.dup(ring.doorbell_fd))
    spare = [False]
    got: list[tuple[int, float]] = []

    def deliver(frames) -> None:
        got.extend((f.request_id, trio.current_time()) for f in frames)

    async def delivered(n: int) -> float:
        with trio.fail_after(5):
            while len(got) < n:
                await trio.sleep(0.001)
        return got[-1][1]

    async def just_after_a_tick() -> float:
        await trio.sleep_until((int(trio.current_time() / tick) + 1) * tick + 0.02)
        return trio.current_time()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(ring.pump, coast=lambda: spare[0], tick=tick), deliver
            )
            await just_after_a_tick()
            assert ring.ticks >= 1 and ring._mm[BELL_WANTED] == BELL_URGENT
            put_at = await just_after_a_tick()
            producer.put(1, 1, b"", urgent=False)
            next_tick = (int(put_at / tick) + 1) * tick
            assert await delivered(1) >= next_tick  # held to the tick
            put_at = await just_after_a_tick()
            producer.put(1, 2, b"")
            assert await delivered(2) < (int(put_at / tick) + 1) * tick  # not held
            producer.put(1, 3, b"", urgent=False)
            spare[0] = True  # a worker went idle: from the next sleep on, rung for each
            await delivered(3)
            with trio.fail_after(5):
                while ring._mm[BELL_WANTED] != BELL_EVERY:
                    await trio.sleep(0.001)
            rings = producer.doorbell_rings
            put_at = trio.current_time()
            producer.put(1, 4, b"", urgent=False)
            assert producer.doorbell_rings == rings + 1
            assert await delivered(4) < put_at + tick
            nursery.cancel_scope.cancel()
        assert [i for i, _ in got] == [1, 2, 3, 4]
        assert ring._mm[BELL_WANTED] == BELL_EVERY  # the pump left: rung for again
    finally:
        producer.close()
        ring.destroy()

"""The shared-memory ring and the message codec: round trips, wrap-around, back-pressure across
two real processes, cancellation from Trio, and cleanup of a SIGKILLed instance's leftovers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import posix_ipc
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinyllm_trio.ipc import ring as ring_mod
from tinyllm_trio.ipc.messages import (
    Batch,
    Cancel,
    MessageError,
    MsgType,
    Ready,
    Shutdown,
    Submit,
    decode,
    encode,
)
from tinyllm_trio.ipc.ring import (
    FRAME_HEADER_SIZE,
    PUMP_BATCHES_PER_CHECKPOINT,
    MessageTooLargeError,
    Ring,
    RingError,
    new_prefix,
    shm_entries,
    sweep_stale,
)
from tinyllm_trio.model.batching import DoneEvent, ErrorEvent, TokenEvent
from tinyllm_trio.model.sampling import SamplingParams


def _ring(n_slots: int = 8, slot_size: int = 128, *, doorbell: bool = False) -> Ring:
    return Ring.create(new_prefix() + "-t", n_slots=n_slots, slot_size=slot_size, doorbell=doorbell)


# the pump reads in a thread, or (a ring with a doorbell, as the pool's response rings) in Trio
pump_kinds = pytest.mark.parametrize("doorbell", [False, True], ids=["thread", "doorbell"])


# --- codec -------------------------------------------------------------------------------------

ids = st.lists(st.integers(0, 2**32 - 1), max_size=8)
logprob = st.fixed_dictionaries(
    {"token": st.text(max_size=5), "id": st.integers(0, 5000), "logprob": st.floats(-50, 0)}
)
token_events = st.builds(
    TokenEvent,
    request_id=st.integers(0, 2**64 - 1),
    token_ids=ids,
    text=st.text(max_size=40),
    finish_reason=st.sampled_from([None, "stop", "length"]),
    logprobs=st.none() | st.lists(logprob, max_size=3),
)
done_events = st.builds(
    DoneEvent,
    request_id=st.integers(0, 2**64 - 1),
    finish_reason=st.sampled_from(["stop", "length", "cancelled"]),
    prompt_tokens=st.integers(0, 512),
    completion_tokens=st.integers(0, 512),
    timings=st.dictionaries(st.sampled_from(["queue_ms", "prefill_ms"]), st.floats(0, 1e6)),
)
error_events = st.builds(
    ErrorEvent,
    request_id=st.integers(0, 2**64 - 1),
    message=st.text(max_size=60),
    kind=st.sampled_from(["internal", "worker_died", "invalid_request"]),
)
params = st.builds(
    SamplingParams,
    max_tokens=st.integers(1, 500),
    temperature=st.floats(0, 2),
    top_k=st.integers(0, 50),
    seed=st.none() | st.integers(0, 2**31),
    stop=st.lists(st.text(min_size=1, max_size=5), max_size=3).map(tuple),
    logprobs=st.none() | st.integers(0, 20),
)
submits = st.builds(
    Submit,
    request_id=st.integers(0, 2**64 - 1),
    prompt=st.text(max_size=50) | st.lists(st.integers(0, 3265), min_size=1, max_size=50),
    params=params,
)
messages = (
    token_events
    | done_events
    | error_events
    | submits
    | st.builds(Cancel, st.integers(0, 2**64 - 1))
    | st.just(Shutdown())
    | st.builds(Ready, st.integers(1, 2**22), st.dictionaries(st.text(max_size=5), st.integers()))
)


@given(messages | st.builds(Batch, st.lists(messages, max_size=6)))
def test_codec_round_trip(msg) -> None:
    msg_type, request_id, payload = encode(msg)
    assert decode(msg_type, request_id, payload) == msg


@pytest.mark.parametrize(
    ("msg_type", "payload"),
    [
        (99, b""),  # unknown type
        (MsgType.TOKEN, b"\x01"),  # shorter than its header
        (MsgType.TOKEN, b"\x05\x00\x00\x00\x00\x00\x00"),  # claims 5 ids it does not carry
        (MsgType.DONE, b"{not json"),
        (MsgType.DONE, b'{"finish_reason": "stop"}'),  # missing fields
        (MsgType.CANCEL, b"x"),  # cancel carries nothing
        (MsgType.SUBMIT, b'{"prompt": 5, "params": {}}'),
        (MsgType.BATCH, b"\x11\x01"),  # a batch item header cut short
        (MsgType.BATCH, b"\x12" + bytes(8) + b"\xff\x00\x00\x00{}"),  # item past the end
        (MsgType.BATCH, b"\x14" + bytes(12)),  # a batch inside a batch
    ],
)
def test_malformed_payloads_are_rejected(msg_type, payload) -> None:
    with pytest.raises(MessageError):
        decode(msg_type, 1, payload)


# --- ring, one process ---------------------------------------------------------------------------


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, 255), st.integers(0, 2**64 - 1), st.binary(max_size=700)),
        min_size=1,
        max_size=12,
    )
)
def test_ring_round_trip_with_split_messages(batch) -> None:
    """Payloads up to several slots long come back whole, in order, with type and id."""
    ring = _ring(n_slots=64, slot_size=128)
    try:
        for msg_type, request_id, payload in batch:
            ring.put(msg_type, request_id, payload)
        got = [ring.get(timeout=0) for _ in batch]
        assert [(f.msg_type, f.request_id, f.payload) for f in got] == batch
        assert ring.get(timeout=0) is None
    finally:
        ring.destroy()


def test_wrap_around_many_times() -> None:
    """A 4-slot ring carries hundreds of messages, split ones straddling the wrap point."""
    ring = _ring(n_slots=4, slot_size=64)
    cap = 64 - FRAME_HEADER_SIZE
    try:
        for i in range(300):
            payload = bytes([i % 251]) * ((i * 7) % (3 * cap))  # 0..3 slots' worth
            ring.put(1, i, payload)
            frame = ring.get(timeout=0)
            assert frame is not None
            assert (frame.request_id, frame.payload) == (i, payload)
    finally:
        ring.destroy()


def test_full_ring_times_out_without_writing() -> None:
    ring = _ring(n_slots=2, slot_size=64)
    try:
        ring.put(1, 1, b"a")
        ring.put(1, 2, b"b")
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            ring.put(1, 3, b"c", timeout=0.1)
        assert 0.09 < time.monotonic() - t0 < 1.0
        assert [ring.get(timeout=0).payload for _ in range(2)] == [b"a", b"b"]
        assert ring.get(timeout=0) is None
    finally:
        ring.destroy()


def test_oversized_message_is_rejected_not_truncated(monkeypatch) -> None:
    monkeypatch.setattr(ring_mod, "MAX_MESSAGE_BYTES", 1000)
    ring = _ring(n_slots=16)  # 1000 bytes = 9 frames, all buffered (no reader yet)
    try:
        with pytest.raises(MessageTooLargeError, match="1001 bytes"):
            ring.put(1, 1, b"x" * 1001)
        assert ring.get(timeout=0) is None  # nothing half-written
        ring.put(1, 1, b"x" * 1000)
        assert ring.get(timeout=0).payload == b"x" * 1000
    finally:
        ring.destroy()


def test_attach_sees_the_same_ring_and_rejects_foreign_segments() -> None:
    ring = _ring()
    peer = Ring.attach(ring.name)
    try:
        assert (peer.n_slots, peer.slot_size) == (8, 128)
        ring.put(3, 42, b"hello")
        frame = peer.get(timeout=1)
        assert (frame.msg_type, frame.request_id, frame.payload) == (3, 42, b"hello")
    finally:
        peer.destroy()  # not the owner: closes only
        assert shm_entries(os.getpid())
        ring.destroy()
    name = new_prefix() + "-foreign"
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=4096)
    shm.close_fd()
    try:
        for sem in ("-items", "-space"):
            posix_ipc.Semaphore(name + sem, posix_ipc.O_CREX).close()
        with pytest.raises(RingError, match="not a tinyllm ring"):
            Ring.attach(name)
    finally:
        for unlink, n in (
            (posix_ipc.unlink_shared_memory, name),
            (posix_ipc.unlink_semaphore, name + "-items"),
            (posix_ipc.unlink_semaphore, name + "-space"),
        ):
            unlink(n)


def test_prefixes_are_unique_and_create_is_exclusive() -> None:
    assert len({new_prefix() for _ in range(100)}) == 100
    ring = _ring()
    try:
        with pytest.raises(posix_ipc.ExistentialError):
            Ring.create(ring.name, n_slots=2, slot_size=64)
        assert len(shm_entries(os.getpid())) == 3  # the failed create left nothing extra
    finally:
        ring.destroy()


# --- ring, two processes -------------------------------------------------------------------------

CONSUMER = textwrap.dedent(
    """
    import hashlib, sys, time
    from tinyllm_trio.ipc.ring import Ring
    ring = Ring.attach(sys.argv[1])
    n = int(sys.argv[2])
    h = hashlib.sha256()
    for i in range(n):
        frame = ring.get(timeout=10)
        assert frame is not None and frame.request_id == i, (i, frame)
        h.update(frame.payload)
        if i < 20:
            time.sleep(0.005)  # a slow reader at first: the producer must wait, not drop
    ring.close()
    print(h.hexdigest())
    """
)


def test_back_pressure_across_processes() -> None:
    """A full ring blocks its producer until the consumer (another process) frees slots;
    every message arrives, in order, byte for byte."""
    import hashlib

    ring = _ring(n_slots=8, slot_size=96)
    n = 400
    payloads = [os.urandom((i * 37) % 300) for i in range(n)]
    try:
        for i in range(8):
            ring.put(1, i, payloads[i][:80])
        with pytest.raises(TimeoutError):  # full, and no consumer yet
            ring.put(1, 8, b"", timeout=0.05)
        # drain what we wrote, then let a real second process consume the stream
        for _ in range(8):
            ring.get(timeout=0)
        child = subprocess.Popen(
            [sys.executable, "-c", CONSUMER, ring.name, str(n)], stdout=subprocess.PIPE
        )
        t0 = time.monotonic()
        for i, p in enumerate(payloads):
            ring.put(1, i, p, timeout=10)
        produce_time = time.monotonic() - t0
        out, _ = child.communicate(timeout=30)
        assert child.returncode == 0
        assert out.decode().strip() == hashlib.sha256(b"".join(payloads)).hexdigest()
        assert produce_time > 20 * 0.005 * 0.8  # it really waited for the slow reader
    finally:
        ring.destroy()


# --- ring from Trio ------------------------------------------------------------------------------


async def test_trio_send_receive_and_cancel_loses_nothing() -> None:
    ring = _ring(n_slots=4, slot_size=64)
    limiter = trio.CapacityLimiter(4)
    try:
        # a receive cancelled while waiting returns promptly and takes no count
        with trio.move_on_after(0.12) as scope:
            await ring.receive_many(limiter=limiter)
        assert scope.cancelled_caught
        received: list = []

        async def consumer() -> None:
            while len(received) < 50:
                received.extend(await ring.receive_many(limiter=limiter))
                await trio.sleep(0.002)  # slower than the producer: it must wait

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consumer)
            for i in range(50):
                await ring.send(2, i, bytes(range(i % 200)) * 2, limiter=limiter)
        assert [(f.request_id, f.payload) for f in received] == [
            (i, bytes(range(i % 200)) * 2) for i in range(50)
        ]
        # a send cancelled on a full ring writes nothing
        for i in range(4):
            await ring.send(1, i, b"x", limiter=limiter)
        with trio.move_on_after(0.12):
            await ring.send(1, 99, b"y", limiter=limiter)
        frames = await ring.receive_many(limiter=limiter)
        assert [f.request_id for f in frames] == [0, 1, 2, 3]
    finally:
        ring.destroy()


@pump_kinds
async def test_pump_delivers_in_order_back_pressures_and_cancels_promptly(doorbell: bool) -> None:
    ring = _ring(n_slots=4, slot_size=64, doorbell=doorbell)
    got: list = []
    try:
        # cancelled while idle: returns within about one wait slice, takes no count
        t0 = trio.current_time()
        with trio.move_on_after(0.05):
            await ring.pump(got.extend)
        assert trio.current_time() - t0 < 0.5 and got == []

        async def produce() -> None:
            for i in range(40):
                await ring.send(1, i, bytes([i]) * (i % 120))  # some split over 3 slots

        def slow_deliver(frames) -> None:
            got.extend(frames)
            time.sleep(0.002)  # a slow consumer: the 4-slot ring fills, the producer waits
            if len(got) == 40:
                scope.cancel()

        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                await ring.pump(slow_deliver)
        assert [(f.request_id, f.payload) for f in got] == [
            (i, bytes([i]) * (i % 120)) for i in range(40)
        ]
        await ring.send(1, 99, b"after")  # the ring is still consistent
        assert ring.get(timeout=0).payload == b"after"
    finally:
        ring.destroy()


@pump_kinds
async def test_pump_cancelled_mid_stream_loses_nothing_it_read(doorbell: bool) -> None:
    """The pump's thread hands batches over without waiting for them to run; a cancel must
    still deliver every batch it read, in order, before pump returns (the rest stays in the
    ring). Cancelled from inside the first delivery, while the thread keeps reading."""
    ring = _ring(n_slots=64, slot_size=64, doorbell=doorbell)
    got: list = []
    try:
        for i in range(60):
            ring.put(1, i, bytes([i]))

        def deliver(frames) -> None:
            got.extend(frames)
            scope.cancel()

        with trio.CancelScope() as scope:
            await ring.pump(deliver, max_messages=3)
        assert got, "nothing delivered"
        while (frame := ring.get(timeout=0)) is not None:
            got.append(frame)
        assert [f.request_id for f in got] == list(range(60))
    finally:
        ring.destroy()


@pump_kinds
async def test_pump_raises_what_deliver_raised_and_stops(doorbell: bool) -> None:
    ring = _ring(n_slots=64, slot_size=64, doorbell=doorbell)
    calls: list[int] = []
    try:
        for i in range(30):
            ring.put(1, i, b"x")

        def deliver(frames) -> None:
            calls.append(len(frames))
            if len(calls) == 2:
                raise ValueError("consumer bug")

        with trio.fail_after(5), pytest.raises(ValueError, match="consumer bug"):
            await ring.pump(deliver, max_messages=2)
        assert len(calls) == 2  # nothing delivered after the failure
    finally:
        ring.destroy()


@pump_kinds
async def test_pump_lets_other_tasks_run_while_the_producer_never_pauses(doorbell: bool) -> None:
    """A batch that empties the ring skips its own checkpoint (the wait for the bell is one),
    so a producer that always has the next message ready must not starve the other tasks:
    the engine's clients and the HTTP server run in the same thread as the pump."""
    ring = _ring(n_slots=8, slot_size=64, doorbell=doorbell)
    delivered = 0
    ticks = 0
    try:
        ring.put(1, 0, b"x")

        def deliver(frames) -> None:
            nonlocal delivered
            delivered += len(frames)
            if delivered >= 400:
                scope.cancel()
            else:
                ring.put(1, delivered, b"x")  # the next one is always there

        async def other_task() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await trio.lowlevel.checkpoint()

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(other_task)
                with trio.CancelScope() as scope:
                    await ring.pump(deliver, max_messages=1)
                nursery.cancel_scope.cancel()
        assert delivered == 400
        assert ticks >= 400 // PUMP_BATCHES_PER_CHECKPOINT // 2, ticks
    finally:
        ring.destroy()


@pump_kinds
async def test_pump_delivers_in_the_callers_context(doorbell: bool) -> None:
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    ring = _ring(doorbell=doorbell)
    seen: list[str] = []
    try:
        ring.put(1, 1, b"x")
        var.set("the reader's")

        def deliver(frames) -> None:
            seen.append(var.get())
            scope.cancel()

        with trio.CancelScope() as scope:
            await ring.pump(deliver)
        assert seen == ["the reader's"]
    finally:
        ring.destroy()


PRODUCER = """
import sys, time
from tinyllm_trio.ipc.ring import Ring
ring = Ring.attach(sys.argv[1], doorbell_fd=int(sys.argv[2]))
for i in range(int(sys.argv[3])):
    if i % 10 == 0:
        time.sleep(0.02)  # the reader runs dry and sleeps until the next ring
    ring.put(1, i, bytes([i % 256]) * (i % 300))  # some split over several slots
"""


async def test_doorbell_pump_wakes_for_another_process_without_a_thread(monkeypatch) -> None:
    """The pool's response path: a worker process rings the inherited eventfd after each
    message; the pump sleeps in Trio's epoll loop between bursts and misses no message."""

    def no_threads(*args, **kwargs):
        raise AssertionError("the doorbell pump must not wait in a thread")

    monkeypatch.setattr(trio.to_thread, "run_sync", no_threads)
    ring = _ring(n_slots=8, slot_size=128, doorbell=True)
    n = 200
    got: list = []
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", PRODUCER, ring.name, str(ring.doorbell_fd), str(n)],
            pass_fds=(ring.doorbell_fd,),
        )

        def deliver(frames) -> None:
            got.extend(frames)
            if len(got) == n:
                scope.cancel()

        with trio.fail_after(30), trio.CancelScope() as scope:
            await ring.pump(deliver)
        assert child.wait(timeout=10) == 0
        assert [(f.request_id, f.payload) for f in got] == [
            (i, bytes([i % 256]) * (i % 300)) for i in range(n)
        ]
    finally:
        ring.destroy()


# --- leftovers of a dead instance ----------------------------------------------------------------

LEAKER = textwrap.dedent(
    """
    import sys, time
    from tinyllm_trio.ipc.ring import Ring, new_prefix
    Ring.create(new_prefix() + "-w0", n_slots=2, slot_size=64)
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_sweep_removes_leftovers_of_a_killed_instance_only() -> None:
    child = subprocess.Popen([sys.executable, "-c", LEAKER], stdout=subprocess.PIPE)
    mine = _ring()
    try:
        assert child.stdout.readline().strip() == b"ready"
        leftovers = shm_entries(child.pid)
        assert len(leftovers) == 3  # one segment, two semaphores
        sweep_stale()
        assert shm_entries(child.pid) == leftovers  # its owner is alive: left alone
        child.send_signal(signal.SIGKILL)
        child.wait()
        removed = sweep_stale()
        assert set(leftovers) <= set(removed)
        assert shm_entries(child.pid) == []
        assert len(shm_entries(os.getpid())) == 3  # ours (a live pid) untouched
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        mine.destroy()
        sweep_stale()


def test_get_with_a_timeout_never_hangs_on_half_a_message() -> None:
    """A producer that died between the frames of a split message must not hang a reader
    that asked for a bounded wait; the frames read so far stay buffered."""
    ring = _ring(n_slots=8, slot_size=64)
    try:
        cap = 64 - FRAME_HEADER_SIZE
        payload = bytes(range(3 * cap))
        ring.put(1, 5, payload)
        first = ring.get(timeout=0)
        assert first.payload == payload
        # simulate a producer killed after its first frame: write one MORE-flagged frame only
        ring._space.acquire(0)  # what `put` does before each frame
        ring._write_slot(1, ring_mod.FLAG_MORE, 6, b"partial")
        t0 = time.monotonic()
        assert ring.get(timeout=0.1) is None
        assert time.monotonic() - t0 < 1.0
        ring._space.acquire(0)
        ring._write_slot(1, 0, 6, b"-rest")  # ...or one that was only slow
        frame = ring.get(timeout=0)
        assert (frame.request_id, frame.payload) == (6, b"partial-rest")
    finally:
        ring.destroy()

"""A single-producer single-consumer ring of fixed-size slots in POSIX shared memory.

This is the seed's transport, kept in shape and made safer. One ring carries messages one way:
the server's request ring to a worker, the worker's response ring back. A ring is

- one shared-memory segment (``posix_ipc.SharedMemory`` + ``mmap``): a 64-byte ring header
  (magic, slot size, slot count; for a doorbell, BELL_WANTED and the PUBLISHED time stamp)
  followed by ``n_slots`` slots of ``slot_size`` bytes;
- two counting semaphores: ``items`` (filled slots, starts at 0) and ``space`` (free slots, starts
  at ``n_slots``), the seed's ``req_items``/``req_space`` and ``resp``/``resp_consumed`` pair.

Each slot holds a frame: a 16-byte header (message type, flags, payload length, request id) and
up to ``slot_size - 16`` payload bytes. A message longer than one slot is split into consecutive
frames flagged ``MORE`` and reassembled by the consumer; a ring has exactly one producer, which
writes all frames of a message before the next message, so frames never interleave. Nothing is
ever truncated: a payload beyond ``MAX_MESSAGE_BYTES`` raises ``MessageTooLargeError`` before
anything is written.

Read and write positions are private to each side (the semaphores sequence them), so the
segment holds no shared counters that a crashed peer could leave half-updated. ``sem_post`` and
``sem_wait`` are full memory barriers, which is what makes a slot's bytes visible to the peer.

Why posix_ipc and not ``multiprocessing.shared_memory``: the latter registers every segment with
a resource tracker that unlinks segments it does not own when a process exits, and it has no
named semaphores. Here the server creates and unlinks every object; a worker only attaches.

Waiting from Trio: ``send``/``receive_many`` first try without blocking; only an empty (or full)
ring costs a trip to a worker thread, which waits in short bounded slices (``WAIT_SLICE``) and
checks between slices whether its Trio task was cancelled. The thread is never abandoned
(``abandon_on_cancel=False``), so a count it acquired is always used by the task that asked for
it: a cancel is honoured within one slice and no count is ever lost. ``pump`` is the reader the
pool uses: one such thread for the ring's whole life, handing messages back to its task.

The doorbell: a response ring can be created with an ``eventfd`` (``doorbell=True``) that its
producer increments after every whole message (the pool passes the fd to its worker). Then
``pump`` needs no thread at all: it waits for the fd to become readable in Trio's own epoll
loop, so a message costs the server one wake-up of one thread, where the thread pump costs a
semaphore wake-up, a GIL hand-off and a write to Trio's wake-up socket. The semaphores still
carry the slots, as before: the doorbell only says when to look. While the producer posts at a
steady pace the reader may coast instead (`tinyllm_trio.ipc.coast`): it clears the header's
BELL_WANTED byte, the producer then skips the eventfd, and the reader wakes on a timer at the
pace it reads from the producer's PUBLISHED time stamps. While every core runs a busy producer
the reader may read on a shared tick instead (`pump`'s ``tick``): BELL_WANTED stays clear and
the producer rings only for a message it marks urgent.

Names: every object's name starts with ``/tinyllm-<pid>-<random>-``, the owning server's pid and
a per-instance token, so two servers never collide and ``sweep_stale`` can remove the leftovers
of a server that was SIGKILLed (its pid is no longer alive). POSIX semaphores appear in
``/dev/shm`` as ``sem.<name>``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import mmap
import os
import platform
import re
import secrets
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import posix_ipc
import trio

from tinyllm_trio.ipc.coast import Coast

NAME_ROOT = "tinyllm"
SHM_DIR = "/dev/shm"
MAGIC = b"TLRING01"
RING_HEADER = struct.Struct("<8sII")  # magic, slot_size, n_slots
RING_HEADER_SIZE = 64
BELL_WANTED = 16  # header byte: which messages the producer rings the doorbell after
BELL_EVERY, BELL_URGENT, BELL_NONE = 1, 2, 0  # its values: each, the urgent ones, none
PUBLISHED = struct.Struct("<Q")  # header word at PUBLISHED_AT: the producer's last post, in ns
PUBLISHED_AT = 24
FRAME_HEADER = struct.Struct("<BBHIQ")  # type, flags, reserved, payload length, request id
FRAME_HEADER_SIZE = FRAME_HEADER.size  # 16
PUMP_BATCHES_PER_CHECKPOINT = 8  # the doorbell pump's reads in a row without a wait
PUMP_IN_FLIGHT = 4  # batches `pump` has handed to the Trio thread and Trio has not yet run
FLAG_MORE = 0x01
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
WAIT_SLICE = 0.05  # seconds per bounded semaphore wait
MIN_SLOT_SIZE = 64
# Coasting needs a store-load fence between two processes, which a locked instruction gives on
# x86 (glibc's sem_post is one); elsewhere the producer always rings.
COASTING = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")

_STALE_RE = re.compile(rf"^(?:sem\.)?{NAME_ROOT}-(\d+)-[0-9a-f]+-")


class RingError(RuntimeError):
    """A ring could not be used: bad geometry, a foreign segment, or a peer that went away."""


class MessageTooLargeError(RingError):
    """A payload beyond MAX_MESSAGE_BYTES; rejected before any frame is written."""


class PeerGoneError(RingError):
    """The `alive` check of a blocking wait failed (the peer process is gone)."""


@dataclass(frozen=True)
class Frame:
    """One received message: its type, request id and the reassembled payload."""

    msg_type: int
    request_id: int
    payload: bytes


# --- names ---------------------------------------------------------------------------------------


def new_prefix(pid: int | None = None) -> str:
    """A fresh per-instance name prefix ``/tinyllm-<pid>-<random>``."""
    return f"/{NAME_ROOT}-{os.getpid() if pid is None else pid}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def shm_entries(pid: int | None = None) -> list[str]:
    """Our entries in /dev/shm (segments and ``sem.`` semaphores), optionally of one pid only."""
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    found = []
    for entry in names:
        m = _STALE_RE.match(entry)
        if m and (pid is None or int(m.group(1)) == pid):
            found.append(entry)
    return sorted(found)


def sweep_stale() -> list[str]:
    """Unlink the shared memory and semaphores left behind by dead tinyllm instances.

    An entry belongs to a dead instance when the pid in its name is no longer alive (a server
    that was SIGKILLed never ran its cleanup). Entries of live processes are left alone, so two
    servers on one machine do not disturb each other. Returns the entries removed.
    """
    removed = []
    for entry in shm_entries():
        m = _STALE_RE.match(entry)
        assert m is not None
        if _pid_alive(int(m.group(1))):
            continue
        try:
            if entry.startswith("sem."):
                posix_ipc.unlink_semaphore("/" + entry[len("sem.") :])
            else:
                posix_ipc.unlink_shared_memory("/" + entry)
        except posix_ipc.ExistentialError:
            continue  # raced with another sweeper
        removed.append(entry)
    return removed


# --- semaphore waits -----------------------------------------------------------------------------


def _try_acquire(sem: posix_ipc.Semaphore) -> bool:
    # A zero count is the common miss on the hot path (a worker polling an empty request ring
    # every step): reading it is a plain load, where a failed acquire raises and catches.
    if posix_ipc.SEMAPHORE_VALUE_SUPPORTED and sem.value == 0:
        return False
    try:
        sem.acquire(0)
    except posix_ipc.BusyError:
        return False
    return True


def _acquire_blocking(
    sem: posix_ipc.Semaphore,
    timeout: float | None,
    alive: Callable[[], bool] | None,
    in_trio_thread: bool = False,
) -> bool:
    """Wait for a count in bounded slices; False on timeout.

    Between slices: `alive()` false raises PeerGoneError; in a Trio worker thread, a cancelled
    caller raises trio.Cancelled (the count was not taken, so nothing is lost).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        wait = WAIT_SLICE
        if deadline is not None:
            wait = min(wait, deadline - time.monotonic())
            if wait <= 0:
                return _try_acquire(sem)
        try:
            sem.acquire(wait)
            return True
        except posix_ipc.BusyError:
            pass
        if in_trio_thread:
            trio.from_thread.check_cancelled()
        if alive is not None and not alive():
            raise PeerGoneError("the process at the other end of the ring is gone")


def _reserve(fd: int, size: int, name: str) -> None:
    """Allocate every page of a new segment now.

    ``ftruncate`` alone leaves the segment sparse: on a full ``/dev/shm`` the first write to an
    unbacked page is a SIGBUS that kills the writing process (the server, for a request ring).
    Reserved here, a ring that cannot get its memory fails its creation with a RingError.
    """
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        raise RingError(
            f"cannot reserve {size} bytes of shared memory for {name} in {SHM_DIR}: "
            f"{e.strerror or e} (is {SHM_DIR} full or too small? see `df {SHM_DIR}`)"
        ) from e


# --- the ring ------------------------------------------------------------------------------------


class Ring:
    """One SPSC ring: use `create` (the owner, who later unlinks) or `attach` (the peer).

    The synchronous `put`/`get` serve the worker process; the async `send`/`receive_many` serve
    Trio tasks. One side only produces and the other only consumes; a Trio producer must not
    run two `send` calls at once (the pool has one writer task per ring).
    """

    def __init__(
        self,
        name: str,
        shm_fd_mmap: mmap.mmap,
        items: posix_ipc.Semaphore,
        space: posix_ipc.Semaphore,
        *,
        owner: bool,
        doorbell: int | None = None,
    ) -> None:
        self.name = name
        self._doorbell = doorbell  # an eventfd rung after each message (see the module doc)
        self._mm = shm_fd_mmap
        self._items = items
        self._space = space
        self.owner = owner
        magic, self.slot_size, self.n_slots = RING_HEADER.unpack_from(self._mm, 0)
        if magic != MAGIC:
            raise RingError(f"{name} is not a tinyllm ring (magic {magic!r})")
        self.max_payload = self.slot_size - FRAME_HEADER_SIZE
        self._write_pos = 0
        self._read_pos = 0
        self._partial: list[bytes] = []  # frames of a message being reassembled
        self._torn = False  # a split message was abandoned half-written
        self._closed = False
        self.coast: Coast | None = None  # the doorbell `pump`'s timer and pace, if it coasts
        self.doorbell_rings = 0  # this producer's writes to the doorbell
        self.ticks = 0  # the doorbell `pump`'s sleeps on the busy tick

    # names of the three objects, as posix_ipc wants them
    @staticmethod
    def object_names(name: str) -> tuple[str, str, str]:
        return name, name + "-items", name + "-space"

    @classmethod
    def create(cls, name: str, *, n_slots: int, slot_size: int, doorbell: bool = False) -> Ring:
        """Create the segment and both semaphores (exclusive: an existing name is an error).

        With `doorbell`, also an eventfd (`doorbell_fd`, close-on-exec: pass it to the producer
        with `pass_fds`) that lets `pump` wait without a thread. If any step fails, whatever
        was created is unlinked before the error propagates.
        """
        if n_slots < 1 or slot_size < MIN_SLOT_SIZE:
            raise RingError(f"bad ring geometry: {n_slots} slots of {slot_size} bytes")
        shm_name, items_name, space_name = cls.object_names(name)
        size = RING_HEADER_SIZE + n_slots * slot_size
        created: list[Callable[[], None]] = []
        try:
            shm = posix_ipc.SharedMemory(shm_name, posix_ipc.O_CREX, mode=0o600, size=size)
            created.append(lambda: posix_ipc.unlink_shared_memory(shm_name))
            try:
                _reserve(shm.fd, size, shm_name)
                mm = mmap.mmap(shm.fd, size)
            finally:
                shm.close_fd()
            RING_HEADER.pack_into(mm, 0, MAGIC, slot_size, n_slots)
            mm[BELL_WANTED] = BELL_EVERY  # until a reader says otherwise (`_pump_on_doorbell`)
            items = posix_ipc.Semaphore(items_name, posix_ipc.O_CREX, mode=0o600, initial_value=0)
            created.append(lambda: posix_ipc.unlink_semaphore(items_name))
            space = posix_ipc.Semaphore(
                space_name, posix_ipc.O_CREX, mode=0o600, initial_value=n_slots
            )
            created.append(lambda: posix_ipc.unlink_semaphore(space_name))
            bell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if doorbell else None
        except BaseException:
            for undo in reversed(created):
                with contextlib.suppress(posix_ipc.ExistentialError):
                    undo()
            raise
        return cls(name, mm, items, space, owner=True, doorbell=bell)

    @property
    def doorbell_fd(self) -> int | None:
        """The eventfd the producer rings after each message, or None (no doorbell)."""
        return self._doorbell

    @classmethod
    def attach(cls, name: str, *, doorbell_fd: int | None = None) -> Ring:
        """Open an existing ring created by the other side; a producer passes the creator's
        doorbell fd, as inherited, to ring it after each message."""
        shm_name, items_name, space_name = cls.object_names(name)
        shm = posix_ipc.SharedMemory(shm_name)
        try:
            mm = mmap.mmap(shm.fd, shm.size)
        finally:
            shm.close_fd()
        items, space = posix_ipc.Semaphore(items_name), posix_ipc.Semaphore(space_name)
        return cls(name, mm, items, space, owner=False, doorbell=doorbell_fd)

    # --- frames ----------------------------------------------------------------------------------

    def _frames(self, msg_type: int, request_id: int, payload: bytes) -> list[tuple[int, bytes]]:
        if self._torn:
            raise RingError(f"{self.name}: a message was abandoned half-written; ring unusable")
        if len(payload) > MAX_MESSAGE_BYTES:
            raise MessageTooLargeError(
                f"message of {len(payload)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit"
            )
        if not 0 <= msg_type < 256 or not 0 <= request_id < 2**64:
            raise RingError(f"bad frame header: type {msg_type}, request id {request_id}")
        cap = self.max_payload
        if len(payload) <= cap:  # the usual case: one frame, no copy of the payload
            return [(0, payload)]
        chunks = [payload[i : i + cap] for i in range(0, len(payload), cap)] or [b""]
        return [(FLAG_MORE if i < len(chunks) - 1 else 0, c) for i, c in enumerate(chunks)]

    def _write_slot(self, msg_type: int, flags: int, request_id: int, chunk: bytes) -> None:
        """Fill the next slot and publish it; the caller holds a `space` count."""
        off = RING_HEADER_SIZE + self._write_pos * self.slot_size
        FRAME_HEADER.pack_into(self._mm, off, msg_type, flags, 0, len(chunk), request_id)
        start = off + FRAME_HEADER_SIZE
        self._mm[start : start + len(chunk)] = chunk
        self._write_pos = (self._write_pos + 1) % self.n_slots
        if self._doorbell is not None and not flags & FLAG_MORE:  # a whole message: its time
            PUBLISHED.pack_into(self._mm, PUBLISHED_AT, time.monotonic_ns())
        self._items.release()

    def _read_slot(self) -> Frame | None:
        """Consume the next slot (the caller holds an `items` count); a whole message or None."""
        off = RING_HEADER_SIZE + self._read_pos * self.slot_size
        msg_type, flags, _, length, request_id = FRAME_HEADER.unpack_from(self._mm, off)
        if length > self.max_payload:
            raise RingError(f"{self.name}: corrupt frame (payload length {length})")
        start = off + FRAME_HEADER_SIZE
        chunk = self._mm[start : start + length]
        self._read_pos = (self._read_pos + 1) % self.n_slots
        self._space.release()
        if flags & FLAG_MORE:
            self._partial.append(chunk)
            return None
        if self._partial:
            self._partial.append(chunk)
            chunk = b"".join(self._partial)
            self._partial = []
        return Frame(msg_type, request_id, chunk)

    # --- synchronous side (worker process) -------------------------------------------------------

    def put(
        self,
        msg_type: int,
        request_id: int,
        payload: bytes = b"",
        *,
        timeout: float | None = None,
        alive: Callable[[], bool] | None = None,
        urgent: bool = True,
    ) -> None:
        """Write one message, blocking while the ring is full (back-pressure, never a drop).

        `timeout` bounds only the wait for the first frame (TimeoutError, nothing written); once
        a message has started, its remaining frames are always written, or the peer is gone.
        `alive` is checked between bounded waits; False raises PeerGoneError. A message that is
        not `urgent` rings the doorbell only while the reader asks for every message: one
        reading on a timer picks it up when the timer fires.
        """
        frames = self._frames(msg_type, request_id, payload)
        for i, (flags, chunk) in enumerate(frames):
            if not _try_acquire(self._space):
                try:
                    got = _acquire_blocking(self._space, timeout if i == 0 else None, alive)
                except BaseException:
                    self._torn = self._torn or i > 0
                    raise
                if not got:
                    raise TimeoutError(f"{self.name}: ring full for {timeout} s")
            self._write_slot(msg_type, flags, request_id, chunk)
        self._ring_doorbell(urgent)

    def _ring_doorbell(self, urgent: bool = True) -> None:
        # After the semaphore posts: a reader woken by it finds the whole message. The post is a
        # locked instruction, so the flag is read after it (see `_pump_on_doorbell`). A reader
        # on the busy tick is rung for an urgent message, and for any once the ring is half
        # full, so that a fast producer never blocks on a full ring until the tick.
        if self._doorbell is None:
            return
        wanted = self._mm[BELL_WANTED]
        if wanted == BELL_EVERY or (
            wanted == BELL_URGENT
            and (
                urgent
                or not posix_ipc.SEMAPHORE_VALUE_SUPPORTED
                or self._space.value <= self.n_slots // 2
            )
        ):
            os.eventfd_write(self._doorbell, 1)
            self.doorbell_rings += 1

    def get(
        self, *, timeout: float | None = None, alive: Callable[[], bool] | None = None
    ) -> Frame | None:
        """Read one whole message; None if none completed within `timeout` (0 = don't block).

        The timeout bounds the whole call, so a split message whose producer died half-way
        returns None instead of hanging (its frames stay buffered for a later call).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if not _try_acquire(self._items):
                if timeout == 0:
                    return None
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not _acquire_blocking(self._items, remaining, alive):
                    return None
            frame = self._read_slot()
            if frame is not None:
                return frame

    # --- Trio side (server process) --------------------------------------------------------------

    async def send(
        self,
        msg_type: int,
        request_id: int,
        payload: bytes = b"",
        *,
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        """Write one message from Trio, waiting for space in a thread only when the ring is full.

        Cancellation is honoured within one wait slice. A cancel that lands between the frames of
        a split message leaves the ring torn (the peer holds half a message), so further sends
        raise RingError: the pool only cancels a writer when it is discarding the ring anyway.
        """
        frames = self._frames(msg_type, request_id, payload)
        for i, (flags, chunk) in enumerate(frames):
            if not _try_acquire(self._space):
                try:
                    await trio.to_thread.run_sync(
                        _acquire_blocking, self._space, None, None, True, limiter=limiter
                    )
                except BaseException:
                    self._torn = self._torn or i > 0
                    raise
            self._write_slot(msg_type, flags, request_id, chunk)
        self._ring_doorbell()
        await trio.lowlevel.checkpoint()

    async def receive_many(
        self, max_messages: int = 256, *, limiter: trio.CapacityLimiter | None = None
    ) -> list[Frame]:
        """Wait for at least one whole message, then take whatever else is ready (no waiting).

        The wait happens in a worker thread in bounded slices; a count it acquires is always
        consumed here, so a cancel never loses a slot. The frames of a split message read so far
        are kept on the ring, so a cancel mid-message loses nothing either.
        """
        frames: list[Frame] = []
        while not frames:
            if not _try_acquire(self._items):
                await trio.to_thread.run_sync(
                    _acquire_blocking, self._items, None, None, True, limiter=limiter
                )
            self._read_ready(frames, max_messages)
        await trio.lowlevel.checkpoint()
        return frames

    async def pump(
        self,
        deliver: Callable[[list[Frame]], None],
        *,
        max_messages: int = 256,
        limiter: trio.CapacityLimiter | None = None,
        coast: Callable[[], bool] | None = None,
        tick: float = 0.0,
    ) -> None:
        """Receive until cancelled, handing each batch of whole messages to `deliver`.

        One worker thread (a single `trio.to_thread.run_sync` call, never abandoned) waits on
        the ring in bounded slices and hands each batch to the Trio thread with
        `TrioToken.run_sync_soon`, without waiting for it to run: the thread goes straight
        back to the ring, so a batch costs one thread hand-off instead of a round trip
        (`trio.from_thread.run_sync` parks the thread until Trio has run the call and wakes it
        again). At most PUMP_IN_FLIGHT batches are handed over and not yet run, so a slow
        consumer still leaves messages in the ring and slows the producer. `deliver` runs in
        this task's context, batch after batch in order, and every batch read is delivered
        before this call returns, cancelled or not (Trio runs run_sync_soon callbacks first
        in, first out, and `to_thread` reports its own end the same way). A cancel is honoured
        within one wait slice. If `deliver` raises, the pump stops and raises it here; batches
        already handed over after the failing one are dropped.

        A ring with a doorbell is read without a thread (`_pump_on_doorbell`). `coast()`, asked
        before each sleep, says whether this process has a core to spare: then the reader may
        coast (`tinyllm_trio.ipc.coast`); else, with `tick` (seconds), it reads on a shared
        tick, woken between ticks only by urgent messages. With `coast` None it is woken by
        the bell for every message.
        """
        if self._doorbell is not None:
            await self._pump_on_doorbell(self._doorbell, deliver, max_messages, coast, tick)
            return
        token = trio.lowlevel.current_trio_token()
        context = contextvars.copy_context()  # entered by one callback at a time, never nested
        slots = threading.Semaphore(PUMP_IN_FLIGHT)
        failure: list[BaseException] = []

        def deliver_soon(frames: list[Frame]) -> None:
            try:
                if not failure:
                    context.run(deliver, frames)
            except BaseException as e:  # a run_sync_soon callback must not raise: re-raised below
                failure.append(e)
                scope.cancel()
            finally:
                slots.release()

        with trio.CancelScope() as scope:
            await trio.to_thread.run_sync(
                self._pump_in_thread, token, deliver_soon, slots, max_messages, limiter=limiter
            )
        if failure:
            raise failure[0]

    async def _pump_on_doorbell(
        self,
        bell: int,
        deliver: Callable[[list[Frame]], None],
        max_messages: int,
        coast: Callable[[], bool] | None,
        tick: float,
    ) -> None:
        """`pump` without a thread: read what is there, else sleep until the next message.

        `deliver` runs right after each read, in this task, so every batch read is delivered
        before a cancel or a failure of `deliver` ends the loop. A batch that empties the ring
        goes straight to the next wait instead of through a checkpoint of its own first, which
        would cost one more pass of Trio's scheduler per batch, that is per token at one
        stream. A producer that never lets the ring empty still gets a checkpoint every
        PUMP_BATCHES_PER_CHECKPOINT batches.

        Three ways to sleep, chosen before each sleep from `coast()` (a core to spare):
        - on the bell (BELL_WANTED = BELL_EVERY), woken by every message;
        - coasting (`tinyllm_trio.ipc.coast` has the why and the policy), with a core to spare
          while the producer posts at a steady pace: on a timer at its pace, unrung
          (BELL_NONE). A timer that finds the ring empty sends the reader back to the bell;
        - on the busy tick, with no core to spare and `tick` set: until the next multiple of
          `tick` on Trio's clock, so that the readers of every worker wake in one pass of the
          scheduler, or until the producer rings for an urgent message (BELL_URGENT). With
          every core running a worker, each wake-up of this process takes its CPU from a
          worker's decode step, and a wake-up per step of each worker (~2 ms apart at batch
          16) costs more than the tokens it routes; on the tick the same tokens arrive a few
          steps at a time, at most `tick` late, while a request's first token and its end
          (urgent: see the worker's `_urgent`) still wake the reader at once.

        No wake-up can be lost. The bell is cleared before the ring is read, and a producer
        rings after posting, so a message posted after the last read rang after the clear.
        When the reader asks for every bell again, it sets BELL_WANTED, then runs a locked
        instruction (a post and a take of its own `items` count), then reads the ring; the
        producer posts (sem_post: a locked instruction), then reads BELL_WANTED. Either the
        reader sees the message or the producer sees the flag. The tick needs no fence: it
        reads the ring when it fires, rung or not. Where a locked instruction is not a full
        fence (COASTING false: not x86) the flag stays BELL_EVERY and the producer always
        rings."""
        timed = coast is not None and COASTING
        self.coast = coaster = Coast.open() if timed else None
        wanted = BELL_EVERY  # BELL_WANTED as this reader last set it
        batches = 0
        try:
            while True:
                if not _try_acquire(self._items):
                    batches = 0
                    spare = coast() if timed else True  # type: ignore[misc]
                    if coaster is not None:
                        if coaster.steady and spare:
                            if wanted != BELL_NONE:
                                self._mm[BELL_WANTED] = wanted = BELL_NONE
                            await coaster.sleep()
                            continue
                        coaster.stop()
                    if tick > 0 and not spare:
                        if wanted != BELL_URGENT:
                            self._mm[BELL_WANTED] = wanted = BELL_URGENT
                        await self._sleep_to_tick(bell, tick)
                        continue
                    if wanted != BELL_EVERY:
                        self._mm[BELL_WANTED] = wanted = BELL_EVERY
                        self._items.release()  # the fence (see above); nobody else takes
                        self._items.acquire(0)
                    if not _try_acquire(self._items):
                        await trio.lowlevel.wait_readable(bell)
                        with contextlib.suppress(BlockingIOError):  # already cleared
                            os.eventfd_read(bell)
                        continue
                # holding an `items` count
                frames: list[Frame] = []
                self._read_ready(frames, max_messages)
                if frames:
                    deliver(frames)
                    if coaster is not None:
                        published = PUBLISHED.unpack_from(self._mm, PUBLISHED_AT)[0]
                        coaster.arrived(published, len(frames))
                batches += 1
                if batches >= PUMP_BATCHES_PER_CHECKPOINT:
                    batches = 0
                    await trio.lowlevel.checkpoint()
        finally:
            if coaster is not None:
                coaster.close()
            if not self._closed:
                self._mm[BELL_WANTED] = BELL_EVERY

    async def _sleep_to_tick(self, bell: int, tick: float) -> None:
        """Sleep until the next multiple of `tick` seconds on Trio's clock, or the bell."""
        self.ticks += 1
        with trio.move_on_at((math.floor(trio.current_time() / tick) + 1) * tick):
            await trio.lowlevel.wait_readable(bell)
        with contextlib.suppress(BlockingIOError):  # not rung: woken by the tick
            os.eventfd_read(bell)

    def _pump_in_thread(
        self,
        token: trio.lowlevel.TrioToken,
        deliver_soon: Callable[[list[Frame]], None],
        slots: threading.Semaphore,
        max_messages: int,
    ) -> None:
        while True:
            slots.acquire()  # released by every callback, which Trio always runs
            try:
                frames: list[Frame] = []
                while not frames:
                    if not _try_acquire(self._items):
                        _acquire_blocking(self._items, None, None, in_trio_thread=True)
                    self._read_ready(frames, max_messages)
            except BaseException:
                slots.release()
                raise
            token.run_sync_soon(deliver_soon, frames)
            trio.from_thread.check_cancelled()  # also while messages never stop coming

    def _read_ready(self, frames: list[Frame], max_messages: int) -> None:
        """Read the slot whose `items` count the caller holds, then every slot already filled,
        without waiting, appending whole messages to `frames` until it holds `max_messages`.

        `frames` may stay empty (the slots read so far are the start of a split message).
        """
        while True:
            frame = self._read_slot()
            if frame is not None:
                frames.append(frame)
            if len(frames) >= max_messages or not _try_acquire(self._items):
                return

    # --- lifetime --------------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap the segment and close the semaphore handles (does not unlink)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(BufferError):  # a view still alive: unmapped at exit
            self._mm.close()
        self._items.close()
        self._space.close()
        if self._doorbell is not None:
            os.close(self._doorbell)

    def unlink(self) -> None:
        """Remove the three names from the system; safe to call twice or after a sweep."""
        shm_name, items_name, space_name = self.object_names(self.name)
        for unlink, n in (
            (posix_ipc.unlink_shared_memory, shm_name),
            (posix_ipc.unlink_semaphore, items_name),
            (posix_ipc.unlink_semaphore, space_name),
        ):
            with contextlib.suppress(posix_ipc.ExistentialError):
                unlink(n)

    def destroy(self) -> None:
        """close() and, for the owner, unlink()."""
        self.close()
        if self.owner:
            self.unlink()

    def __repr__(self) -> str:
        return f"Ring({self.name!r}, {self.n_slots} x {self.slot_size} B, owner={self.owner})"

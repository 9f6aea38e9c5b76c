"""RequestStream: one request's events on their way from a backend to the task consuming them.

A backend (the worker pool's reader task, or the in-process backend's step task) calls
`deliver` for each event as it arrives and `finish` for a final one; the consumer (an engine
`Generation`) either iterates (`receive`, `async for`) or installs a token sink (`set_sink`)
that gets token events synchronously, right where they are delivered, without a queue round
trip or a task switch. The ordering rule between those two ways lives here and nowhere else:

- a token sink never overtakes a queued event: while any event waits in the queue, new
  tokens queue behind it (the consumer's next `receive` drains them, then it may install the
  sink again);
- a final event (done or error) is always queued, after every token the sink took, so
  iterating is what ends the stream;
- a sink that raises is dropped: that event and every later one are queued as usual.

A stream may carry several requests (a request's n choices share one): it ends, and
`finished` turns True, after the final event of each of its `members`. `close` is the
consumer leaving: it drops the sink, wakes a task waiting in `receive` with
`trio.ClosedResourceError`, and later deliveries are discarded.

It sits at the package's top level because every backend shares it: `ipc/` (the pool) and
`engine.py` (the in-process backend, the `Generation`s) import it; it imports only
`protocol`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Self

import trio

from tinyllm_trio.protocol import DoneEvent, ErrorEvent, Event, TokenEvent

__all__ = ["RequestStream", "TokenSink"]

log = logging.getLogger(__name__)

TokenSink = Callable[[TokenEvent], None]


class RequestStream:
    """The events of one request (or of one request's n choices) and its token sink.

    The queue is a deque with at most one parked consumer task, woken straight by
    `trio.lowlevel.reschedule`: an iterating consumer takes every token through here, and a
    memory channel's bookkeeping for many receivers (a dict and a set per wait, a WouldBlock
    exception per empty queue) is per-token work that one consumer does not need.
    """

    __slots__ = ("_abort", "_open", "_queue", "_sink", "_waiter", "closed", "finished", "sunk")

    def __init__(self, members: int = 1) -> None:
        if members < 1:
            raise ValueError("a stream carries at least one request")
        # Unbounded: bounded in practice by max_tokens, and a slow consumer must never stall
        # the delivery task that serves every other request.
        self._queue: deque[Event] = deque()
        self._waiter: trio.lowlevel.Task | None = None  # the consumer parked in `receive`
        self._abort = self._aborted  # one bound method for every wait, not one per wait
        self._sink: TokenSink | None = None
        self._open = members  # members whose final event has not been delivered yet
        self.finished = False  # every member's final event was delivered
        self.closed = False  # the consumer left (`close`)
        self.sunk = 0  # token ids the sink took (they never pass through `receive`)

    @property
    def queued(self) -> int:
        """Events delivered and not yet received: a sink must not pass them."""
        return len(self._queue)

    # --- the producer's side (a backend's delivery task) ------------------------------------

    def deliver(self, event: Event) -> None:
        """Hand over one event: to the sink if one is installed and nothing is queued (a token
        event only), else to the queue. Never blocks, never raises."""
        if type(event) is TokenEvent:
            self.deliver_token(event)
            return
        self._sink = None  # a final event: queued, after every token the sink took
        self._enqueue(event)

    def deliver_token(self, event: TokenEvent) -> None:
        """`deliver` for a token event (the per-token path: no type check)."""
        # A sink is installed only while the stream is open and unfinished (`close` and a
        # final event drop it), so with one installed and nothing queued the event is its.
        sink = self._sink
        if sink is not None and not self._queue:
            try:
                sink(event)
            except Exception as exc:  # a bug in the sink: this event and the rest queue
                log.error("request %d's token sink failed: %r", event.request_id, exc)
                self._sink = None
            else:
                self.sunk += len(event.token_ids)
                return
        self._enqueue(event)

    def _enqueue(self, event: Event) -> None:
        if self.closed or self.finished:  # the consumer left, or the stream already ended
            return
        self._queue.append(event)
        self._wake()

    def finish(self, event: DoneEvent | ErrorEvent) -> None:
        """Deliver a member's final event (queued, see `deliver`); after the last member's,
        the stream ends: `receive` raises EndOfChannel once the queue is drained."""
        self.deliver(event)
        self._open -= 1
        if self._open <= 0 and not self.finished:
            self.finished = True
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            trio.lowlevel.reschedule(waiter)

    # --- the consumer's side ------------------------------------------------------------------

    def set_sink(self, sink: TokenSink | None) -> bool:
        """Install `sink` for token events (None removes it). Returns False, installing
        nothing, once the stream has finished or been closed."""
        if sink is None:
            self._sink = None
            return True
        if self.finished or self.closed:
            return False
        self._sink = sink
        return True

    async def receive(self) -> Event:
        """The next queued event. Raises trio.EndOfChannel after the last one, and
        trio.ClosedResourceError if `close` was called (also while waiting here); one task
        at a time may wait (trio.BusyResourceError otherwise)."""
        if self._queue and not self.closed:
            # Something is there: still a checkpoint, as every Trio receive is one.
            await trio.lowlevel.checkpoint()
        while True:
            if self.closed:
                raise trio.ClosedResourceError("the stream was closed")
            if self._queue:
                return self._queue.popleft()
            if self.finished:
                raise trio.EndOfChannel
            if self._waiter is not None:
                raise trio.BusyResourceError("another task is already receiving on this stream")
            self._waiter = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort)

    def receive_queued(self) -> Event | None:
        """The next event already queued, or None (nothing queued, or closed); no checkpoint.

        For a consumer that has just had a checkpoint in `receive` and takes the rest of a
        burst (the events one delivery queued together) before its next one."""
        if self._queue and not self.closed:
            return self._queue.popleft()
        return None

    def _aborted(self, raise_cancel: object) -> trio.lowlevel.Abort:
        self._waiter = None  # cancelled while parked: nothing was taken from the queue
        return trio.lowlevel.Abort.SUCCEEDED

    def close(self) -> None:
        """The consumer stopped listening: drop the sink, discard what comes later, and wake a
        task waiting in `receive` (synchronous: callable from a `finally` block)."""
        self._sink = None
        self.closed = True
        self._queue.clear()
        self._wake()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

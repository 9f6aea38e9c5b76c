"""What an `Engine` runs on: the `Backend` interface, and the in-process backend.

`Engine`, `Generation` and `Choices` (engine.py) validate, encode and present a request; a
backend admits it, runs it somewhere and delivers its events into the request's
`RequestStream`. Two backends satisfy `Backend`:

- `tinyllm_trio.ipc.pool.WorkerPool` (`open_engine`): worker processes over shared-memory
  rings, one `ContinuousBatcher` each, supervised and restarted.
- `InProcessBackend` (`open_inprocess_engine`, and the HTTP tests): one event source shaped
  like a `ContinuousBatcher` (`EventSource`), stepped by a Trio task of this process, with the
  pool's admission, overload, cancel and drain rules. No processes, no IPC: for embedding a
  model in one process, and for tests that need the production per-token path without
  worker processes.

Both share the admission rules: at most `max_batch` requests run at once (per worker), the
rest wait in a FIFO queue of `max_queue`, and a request that finds the queue full is refused
with `OverloadedError` by `check_admission`/`admit` itself, before any event.
"""

from __future__ import annotations

import logging
import math
import os
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, Self, TypeVar

import trio

from tinyllm_trio.config import EngineConfig
from tinyllm_trio.errors import OverloadedError, ShuttingDownError, kind_of
from tinyllm_trio.model.sampling import SamplingParams
from tinyllm_trio.protocol import DoneEvent, ErrorEvent, ErrorKind, Event, TokenEvent
from tinyllm_trio.stream import RequestStream

__all__ = [
    "AdmissionQueue",
    "AdmittedRequest",
    "Backend",
    "BackendRequest",
    "EventSource",
    "InProcessBackend",
    "InProcessRequest",
]

log = logging.getLogger(__name__)


class AdmittedRequest(Protocol):
    """What a backend hands back for an admitted request: its id and its event stream."""

    @property
    def id(self) -> int: ...

    @property
    def stream(self) -> RequestStream: ...


R = TypeVar("R", bound=AdmittedRequest)


class Backend(Protocol[R]):
    """What `Engine` needs from whatever runs its requests (`R`: the backend's own request
    handle, which the engine only hands back to `release`)."""

    @property
    def accepting(self) -> bool:
        """False once draining or stopping: `check_admission` raises ShuttingDownError."""
        ...

    @property
    def any_ready(self) -> bool:
        """Some worker (or the in-process source) can run a request now."""
        ...

    @property
    def workers(self) -> int: ...

    @property
    def prefix_cache(self) -> bool: ...

    def stats(self) -> dict[str, object]:
        """running, waiting, max_batch, capacity, restarts, outcomes, prefix_cache and one
        entry per worker (index, pid, ready, running, kv_tokens, ...)."""
        ...

    def check_admission(self, n: int = 1) -> None:
        """Raise ShuttingDownError / OverloadedError (or WorkerDiedError) if admitting `n`
        requests would be refused right now."""
        ...

    def admit(self, prompt: list[int], params: SamplingParams) -> R:
        """Admit a validated request: it runs now or waits in the queue; raises as
        `check_admission`. Its events go to `.stream`."""
        ...

    def admit_group(self, prompt: list[int], params: Sequence[SamplingParams]) -> list[R]:
        """Admit a request's n choices as one (one prefill), sharing one stream."""
        ...

    def release(self, request: R) -> None:
        """The consumer stopped listening: close its stream; withdraw it if queued, cancel it
        if running. Synchronous (callable from `finally`), idempotent."""
        ...

    async def drain(self, grace: float) -> None:
        """Stop accepting; give running and queued requests `grace` seconds; end the rest
        with ``shutting_down`` errors."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until `aclose`; for `nursery.start`, which returns once requests can run."""
        ...

    async def aclose(self, timeout: float = 5.0) -> None:
        """Ordered stop: end every request, stop serving, return when `run` has returned."""
        ...


class EventSource(Protocol):
    """A `ContinuousBatcher`'s shape: what `InProcessBackend` steps."""

    @property
    def idle(self) -> bool:
        """Nothing to step: no active, waiting or finished-but-unreported sequence."""
        ...

    def submit(self, request_id: int, prompt: Sequence[int], params: SamplingParams) -> None:
        """Queue a request; raise for one it cannot run (the request ends with that error)."""
        ...

    def cancel(self, request_id: int) -> None:
        """Stop a request; it ends with DoneEvent("cancelled") at a later step."""
        ...

    def step(self) -> list[Event]:
        """Admit, advance every active sequence by a token, and return the events."""
        ...


@dataclass(eq=False, slots=True)
class BackendRequest:
    """One request in a backend, from admission to its final event (a backend's bookkeeping;
    the engine only reads `id` and `stream`)."""

    id: int
    prompt: list[int]
    params: SamplingParams
    stream: RequestStream  # a request's n choices share one
    finished: bool = False  # its final event was delivered (or it was withdrawn)
    cancel_sent: bool = False
    generated: int = 0  # token ids so far: with the prompt, the KV positions it fills
    # a request's n choices (`admit_group`): every member, in choice order; they run together
    # (one prefill) and share one stream
    group: list[Self] | None = None

    @property
    def events(self) -> RequestStream:
        """Where its events arrive (iterate it, or `receive()`)."""
        return self.stream

    def deliver(self, event: Event) -> None:
        if type(event) is TokenEvent:
            self.generated += len(event.token_ids)
        self.stream.deliver(event)

    def finish(self, event: DoneEvent | ErrorEvent) -> None:
        if not self.finished:
            self.finished = True
            self.stream.finish(event)


Req = TypeVar("Req", bound=BackendRequest)


class AdmissionQueue(Generic[Req]):
    """The admission rules every backend shares: a FIFO queue of at most `max_queue` requests
    in front of batches of `max_batch`, request ids, final events counted once by outcome,
    and the drain. A backend says where a request runs (`running`, `_end_all`); this says
    when one is refused, withdrawn or ended."""

    request_type: type[Req]

    def __init__(self, max_batch: int, max_queue: int) -> None:
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.accepting = True
        self.outcomes: Counter[str] = Counter()  # finish reasons and error kinds, all requests
        self._queue: dict[int, Req] = {}  # FIFO (insertion order)
        self._next_id = 1
        self._activity = trio.lowlevel.ParkingLot()  # unparked when requests finish

    @property
    def running(self) -> int:
        raise NotImplementedError

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def _need(self, n: int) -> int:
        """Free batch slots a group of n choices waits for: all n, or a whole batch when n
        exceeds it (then the rest wait in the batcher and reuse the prompt later)."""
        return min(n, self.max_batch)

    def _refuse_if_closed(self) -> None:
        if not self.accepting:
            raise ShuttingDownError("the engine is shutting down and accepts no new requests")

    def _refuse_if_full(self, n: int, has_room: Callable[[int], bool], busy: str) -> None:
        """OverloadedError if n more would overflow the queue: when requests already wait, or
        when no batch has room for them (`has_room(need)`). `busy` says who is busy."""
        if self.waiting + n > self.max_queue and (self._queue or not has_room(self._need(n))):
            raise OverloadedError(
                f"{busy} ({self.running} requests running) and the admission queue is full "
                f"({self.waiting}/{self.max_queue}); retry later"
            )

    def _new_requests(
        self, prompt: list[int], params: Sequence[SamplingParams], *, group: bool
    ) -> list[Req]:
        """Requests with fresh ids, one per `params`, sharing one stream (which ends after
        every member's final event); with `group`, each knows the others."""
        if not params:
            raise ValueError("a group has at least one choice")
        stream = RequestStream(members=len(params))
        requests: list[Req] = []
        for choice in params:
            requests.append(self.request_type(self._next_id, prompt, choice, stream))
            self._next_id += 1
        if group:
            for request in requests:
                request.group = requests
        return requests

    def _withdraw(self, request: Req) -> bool:
        """`release`'s first half: close the stream; end the request if it is still queued.
        False when it runs (the backend then cancels it where it runs)."""
        request.stream.close()
        if request.finished:
            return True
        if self._queue.pop(request.id, None) is not None:
            self._end(request, DoneEvent(request.id, "cancelled", len(request.prompt), 0))
            return True
        return False

    def _end(self, request: Req, event: DoneEvent | ErrorEvent) -> None:
        """Deliver a request's final event (once) and count its outcome."""
        if not request.finished:
            self.outcomes[event.finish_reason if isinstance(event, DoneEvent) else event.kind] += 1
            request.finish(event)
        self._activity.unpark_all()

    def _end_queued(self, message: str, kind: str) -> None:
        for request in self._queue.values():
            self._end(request, ErrorEvent(request.id, message, kind))
        self._queue.clear()

    def _end_all(self, message: str, kind: str) -> None:
        """End every queued and running request with an error (and cancel the running)."""
        raise NotImplementedError

    async def drain(self, grace: float) -> None:
        """Stop admitting; wait up to `grace` seconds for queued and running requests to
        finish; end the rest with ``shutting_down`` errors (cancelling them where they run)."""
        self.accepting = False
        with trio.move_on_after(grace):
            while self.running or self.waiting:
                await self._activity.park()
        self._end_all("the server is shutting down", ErrorKind.SHUTTING_DOWN)


class InProcessRequest(BackendRequest):
    """One request in an `InProcessBackend`."""


_Message = tuple[str, list[InProcessRequest]] | tuple[str, int]


class InProcessBackend(AdmissionQueue[InProcessRequest]):
    """A `Backend` that steps one `EventSource` in a Trio task of this process.

    `run` (for `nursery.start`) owns the source: it applies submits and cancels between
    steps, runs each `step()` and delivers its events into the requests' streams. Nothing
    else touches the source, so with `in_thread` (the default) a step can run in a worker
    thread (`trio.to_thread.run_sync`) while the event loop keeps serving: a real model's
    step takes milliseconds, which inline would add to every other task's latency. A source
    whose step is cheap and never blocks (a scripted one) may run inline (`in_thread=False`).

    Admission is the pool's, for one worker: up to `max_batch` requests are given to the
    source at once, the rest wait in a FIFO queue of `max_queue`, beyond which `admit` raises
    OverloadedError. A cancelled request is withdrawn from the queue at once, or cancelled in
    the source and counted until the source reports its final event.
    """

    request_type = InProcessRequest

    def __init__(
        self,
        source: EventSource,
        *,
        max_batch: int = EngineConfig.max_batch,
        max_queue: int = EngineConfig.max_queue,
        prefix_cache: bool = False,
        in_thread: bool = True,
    ) -> None:
        EngineConfig(max_batch=max_batch, max_queue=max_queue)  # the usual validation
        super().__init__(max_batch, max_queue)
        self.source = source
        self.prefix_cache = prefix_cache  # whether `source` keeps one (reported in stats)
        self.in_thread = in_thread
        self.any_ready = False  # `run` is serving
        self.restarts = 0
        self.cache_queries = 0
        self.cache_hits = 0
        self._running: dict[int, InProcessRequest] = {}  # given to the source
        self._in_source: set[int] = set()  # ids the source holds and has not ended (`run`'s)
        self._inbox: trio.MemorySendChannel[_Message] | None = None  # while `run` serves
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()

    # --- state ---------------------------------------------------------------------------

    @property
    def workers(self) -> int:
        return 1

    @property
    def running(self) -> int:
        return len(self._running)

    def stats(self) -> dict[str, object]:
        """The pool's `stats()` shape, with this process as the one worker."""
        kv_tokens = sum(len(r.prompt) + r.generated for r in self._running.values())
        return {
            "accepting": self.accepting,
            "running": self.running,
            "waiting": self.waiting,
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            "capacity": self.max_batch,
            "restarts": self.restarts,
            "outcomes": dict(self.outcomes),
            "prefix_cache": {
                "enabled": self.prefix_cache,
                "queries": self.cache_queries,
                "hits": self.cache_hits,
            },
            "workers": [
                {
                    "index": 0,
                    "pid": os.getpid(),
                    "cpu": None,
                    "ready": self.any_ready,
                    "running": self.running,
                    "kv_tokens": kv_tokens,
                    "generation": 1,
                    "restarts": 0,
                    "last_exit": None,
                    "prefix_cache": {"queries": self.cache_queries, "hits": self.cache_hits},
                }
            ],
        }

    # --- admission -----------------------------------------------------------------------

    def _has_room(self, need: int) -> bool:
        return self._inbox is not None and len(self._running) + need <= self.max_batch

    def check_admission(self, n: int = 1) -> None:
        self._refuse_if_closed()
        self._refuse_if_full(n, self._has_room, "the engine is busy")

    def admit(self, prompt: list[int], params: SamplingParams) -> InProcessRequest:
        self.check_admission()
        [request] = self._new_requests(prompt, [params], group=False)
        if not self._queue and self._has_room(1):
            self._submit([request])
        else:
            self._queue[request.id] = request
        return request

    def admit_group(
        self, prompt: list[int], params: Sequence[SamplingParams]
    ) -> list[InProcessRequest]:
        n = len(params)
        self.check_admission(n)
        group = self._new_requests(prompt, params, group=True)
        if not self._queue and self._has_room(self._need(n)):
            self._submit(group)
        else:
            for request in group:
                self._queue[request.id] = request
        return group

    def release(self, request: InProcessRequest) -> None:
        if not self._withdraw(request) and not request.cancel_sent:
            request.cancel_sent = self._post(("cancel", request.id))

    def _post(self, message: _Message) -> bool:
        inbox = self._inbox
        if inbox is None:
            return False
        try:
            inbox.send_nowait(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    def _submit(self, requests: list[InProcessRequest]) -> None:
        """Count `requests` as running and hand them to `run` (which submits them, together,
        before its next step: a group's choices are admitted in one step, one prefill)."""
        for request in requests:
            self._running[request.id] = request
        self._post(("submit", requests))

    def _pump(self) -> None:
        """Move queued requests into the batch while it has room, oldest first."""
        while self._queue:
            head = self._queue[next(iter(self._queue))]
            members = [head]
            if head.group is not None:
                members = [r for r in head.group if r.id in self._queue]
            if not self._has_room(self._need(len(members))):
                return
            for request in members:
                del self._queue[request.id]
            self._submit(members)

    def _end_all(self, message: str, kind: str) -> None:
        """End every queued and running request with an error; cancel them in the source."""
        self._end_queued(message, kind)
        for request in self._running.values():
            self._end(request, ErrorEvent(request.id, message, kind))
            if not request.cancel_sent:
                request.cancel_sent = self._post(("cancel", request.id))
        self._running.clear()
        self._activity.unpark_all()

    # --- the step task -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Step the source until `aclose` (or cancellation); ready at once."""
        inbox, messages = trio.open_memory_channel[_Message](math.inf)
        try:
            with trio.CancelScope() as self._scope:
                self._inbox = inbox
                self.any_ready = True
                self._pump()  # requests admitted before `run` started
                task_status.started()
                while True:
                    if self.source.idle:  # nothing to step: sleep until a message comes
                        self._apply(await messages.receive())
                    while True:
                        try:
                            self._apply(messages.receive_nowait())
                        except trio.WouldBlock:
                            break
                    if not self.source.idle:
                        self._deliver(await self._step())
        finally:
            self._inbox = None
            self.any_ready = False
            self.accepting = False
            self._end_all("the engine stopped", ErrorKind.SHUTTING_DOWN)
            self._stopped.set()

    def _apply(self, message: _Message) -> None:
        """Apply a submit or cancel to the source (only ever between steps)."""
        what, payload = message
        if what == "cancel":
            assert isinstance(payload, int)
            if payload in self._in_source:
                self.source.cancel(payload)
            return
        assert isinstance(payload, list)
        for request in payload:
            if request.finished:  # ended (cancelled, shut down) before it got here
                continue
            try:
                self.source.submit(request.id, request.prompt, request.params)
            except Exception as exc:  # what the worker does: that request fails alone
                self._running.pop(request.id, None)
                self._end(request, ErrorEvent(request.id, str(exc), kind_of(exc)))
                self._pump()
            else:
                self._in_source.add(request.id)  # a cancel posted since follows in the inbox

    async def _step(self) -> list[Event]:
        try:
            if self.in_thread:
                return await trio.to_thread.run_sync(self.source.step)
            events = self.source.step()
            await trio.lowlevel.checkpoint()
            return events
        except Exception as exc:  # a bug in the model code: fail what it was running
            log.error("the in-process step failed:\n%s", traceback.format_exc())
            message = f"internal error in the in-process engine: {type(exc).__name__}: {exc}"
            events: list[Event] = [
                ErrorEvent(rid, message, ErrorKind.INTERNAL) for rid in sorted(self._in_source)
            ]
            for rid in self._in_source:
                try:
                    self.source.cancel(rid)
                except Exception:  # its state is unknown; the requests are ended regardless
                    log.debug("cancel after a failed step failed", exc_info=True)
            return events

    def _deliver(self, events: list[Event]) -> None:
        running = self._running
        for event in events:
            if type(event) is TokenEvent:  # the hot path
                request = running.get(event.request_id)
                if request is not None:
                    request.generated += len(event.token_ids)
                    request.stream.deliver_token(event)
                continue
            assert isinstance(event, DoneEvent | ErrorEvent)
            self._in_source.discard(event.request_id)
            request = running.pop(event.request_id, None)
            if request is None:
                continue  # already ended here (cancelled, shut down)
            if isinstance(event, DoneEvent) and self.prefix_cache and request.params.cache_prompt:
                self.cache_queries += event.prompt_tokens
                self.cache_hits += event.cached_tokens
            self._end(request, event)
            self._pump()

    # --- drain and stop ------------------------------------------------------------------

    async def aclose(self, timeout: float = 5.0) -> None:
        """End every request and stop `run` (after its current step: a step in a thread cannot
        be interrupted; `timeout` is accepted for the `Backend` interface)."""
        self.accepting = False
        self._end_all("the server is shutting down", ErrorKind.SHUTTING_DOWN)
        if self._scope is None:  # never ran
            return
        self._scope.cancel()
        await self._stopped.wait()

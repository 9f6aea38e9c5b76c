"""WorkerPool: the dispatcher that owns the worker processes and routes requests to them.

One `WorkerPool` runs N worker slots. A slot is a position that survives restarts: each time
it (re)starts a worker it creates a fresh pair of rings (new names: a dead worker may have left
a half-written message behind), spawns ``python -m tinyllm_trio.ipc.worker`` through
``trio.lowlevel.open_process`` and runs three things in one nursery: a writer task (the only
producer of the request ring, fed by the slot's outbox channel), a reader task (the only
consumer of the response ring, routing each event to its request's stream) and the wait for
the process to exit. When the process exits, for whatever reason, the nursery is cancelled,
events still in the ring are routed, the slot's in-flight requests end with an `ErrorEvent`
of kind ``worker_died``, both rings are unlinked, and (unless the pool is stopping) a
replacement starts, after an exponential back-off if workers keep dying young.

A worker that hangs without dying (a stuck BLAS call, a SIGSTOP, a deadlock) would hold its
requests forever, so a fourth task watches it: while the worker holds requests, the messages
it sends keep a cancel-scope deadline at least `stall_timeout` seconds ahead (a busy worker
sends one per decode step, milliseconds apart); when the deadline passes, the worker is
SIGKILLed and its requests end as for any other death, with a message that says it stopped
responding.

Admission: a request goes at once to the least-loaded ready worker with a free batch slot
(fewest requests in flight, then lowest index). When every slot is busy it waits in a bounded
FIFO admission queue; when the queue is full `admit` raises `OverloadedError` at once (the HTTP
layer answers 429 with Retry-After). A request counts against its worker until the worker
reports its final event, so a cancelled request frees its slot when the worker has actually
dropped it (within one decode step), and `stats()` shows exactly what the workers hold.

Everything that changes routing state is synchronous (no await between check and update), so
Trio's single thread makes it atomic. Messages to a worker go through its unbounded outbox
(`send_nowait`): a cancel can therefore be sent from a `finally` block or a garbage-collected
generator without awaiting. Each request's event queue (its `RequestStream`) is unbounded too;
it is bounded in practice by `max_tokens`, and an unbounded queue means one slow consumer can
never stall the reader that serves every other request on that worker.

Shutdown (`aclose`) is ordered: stop admitting, end queued and running requests with
``shutting_down`` errors, send each worker `Shutdown`, wait up to a timeout, SIGKILL stragglers,
unlink every ring. Every ring is also destroyed in `finally` blocks on every other exit path
(cancellation, Ctrl+C, an exception during start-up), and `run` sweeps the leftovers of dead
instances (see `ring.sweep_stale`) before it starts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import trio

from tinyllm_trio.backend import AdmissionQueue, BackendRequest
from tinyllm_trio.config import EngineConfig
from tinyllm_trio.errors import (
    EngineError,
    WorkerDiedError,
    WorkerStartError,
)
from tinyllm_trio.ipc.messages import (
    Batch,
    Cancel,
    MessageError,
    Ready,
    Shutdown,
    Submit,
    decode,
    encode,
)
from tinyllm_trio.ipc.ring import (
    Frame,
    MessageTooLargeError,
    Ring,
    RingError,
    new_prefix,
    sweep_stale,
)
from tinyllm_trio.model.blas import single_threaded_env
from tinyllm_trio.model.prefix_cache import BLOCK_TOKENS, block_hashes
from tinyllm_trio.model.sampling import SamplingParams
from tinyllm_trio.protocol import DoneEvent, ErrorEvent, ErrorKind, TokenEvent

log = logging.getLogger(__name__)
worker_log = logging.getLogger("tinyllm_trio.ipc.worker")  # what workers write to stderr
STDERR_DRAIN = 1.0  # seconds to read a dead worker's last stderr lines (a traceback)
STDERR_LINE_MAX = 16384

REQUEST_SLOTS = 32
REQUEST_SLOT_SIZE = 4096  # a 512-token prompt as JSON ids fits in one slot
RESPONSE_SLOTS = 64
RESPONSE_SLOT_SIZE = 4096  # a step's batch of 32 token events is ~1.5 KB; logprobs split
BACKOFF_FIRST = 0.25  # seconds before restarting a worker that died young
BACKOFF_MAX = 30.0
STABLE_AFTER = 30.0  # a worker that lived this long resets the back-off
STALL_SLACK = 1.125  # a silent busy worker is killed after 1 to this many x stall_timeout
AFFINITY_SLACK = 4  # most requests beyond the least-loaded worker's that prefix affinity adds
PREFIX_TABLE_BLOCKS = 4096  # block hashes remembered per worker (~64 K prompt tokens)


def _allowed_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def default_workers() -> int:
    """One worker per CPU this process may run on."""
    return max(1, len(_allowed_cpus()))


def worker_cpus(workers: int, allowed: Sequence[int] | None = None) -> list[int | None]:
    """The core each worker is pinned to, or None for each when they are not pinned.

    Workers are pinned only when a core is left over for the server (fewer workers than
    cores): then each gets one of the highest-numbered cores of `allowed` (default: the cores
    this process may use, so ``taskset`` and cpusets are honoured) and the server keeps the
    low ones. Why: a worker that goes idle between requests is woken by the server, and the
    scheduler may place it on the server's core (wake-affine) and keep both there, so every
    decode step shares a core with the server's IPC work (`tinyllm-trio bench engine
    --pin-workers true|false` shows the difference; the README has the numbers). With as many
    workers as cores (serve's default) nothing is pinned: the server then has to share some
    worker's core anyway, and pinning both workers measured no better.
    """
    cpus = sorted(_allowed_cpus() if allowed is None else allowed)
    if workers >= len(cpus):
        return [None] * workers
    return list(cpus[len(cpus) - workers :])


@contextlib.contextmanager
def unwrap_single_exception() -> Iterator[None]:
    """Re-raise a nursery's ExceptionGroup holding a single exception as that exception.

    Trio's nurseries always group errors; callers of `open_engine` should see the
    `WorkerStartError` or their own body's exception, not a group around it.
    """
    leaf: BaseException | None = None
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        if len(leaves) != 1:
            raise
        leaf = leaves[0]
    if leaf is not None:
        context = leaf.__context__
        try:
            raise leaf
        finally:
            leaf.__context__ = context  # not "during handling of" its own group


def _leaves(group: BaseExceptionGroup) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "is gone"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


@dataclass(eq=False, slots=True)
class PendingRequest(BackendRequest):
    """One request from admission to its final event, and the worker it runs on (the pool's
    bookkeeping, not public). Its events go to `stream` (`RequestStream`)."""

    worker: WorkerSlot | None = None


@dataclass(eq=False)
class WorkerSlot:
    """A worker position: survives its process, counts restarts."""

    index: int
    generation: int = 0
    pid: int | None = None
    ready: bool = False
    inflight: dict[int, PendingRequest] = field(default_factory=dict)
    outbox: trio.MemorySendChannel[object] | None = None
    process: trio.Process | None = None
    restarts: int = 0
    last_exit: int | None = None
    load_error: str | None = None
    stall_scope: trio.CancelScope | None = None  # its deadline: when a busy worker is hung
    cpu: int | None = None  # the core its process is pinned to (`worker_cpus`)
    weights: str | None = None  # the precision its process loaded (from its Ready)
    stalled: bool = False  # the last process was killed for not responding
    ready_once: bool = False  # its current process sent Ready
    down: bool = False  # its last start failed; it waits for a retry (see WorkerPool.live)
    # prefix-aware routing: block hashes of prompts sent here lately (LRU, a hint: the
    # worker's cache may have evicted them), and its prefix cache's counters in tokens
    prefix_blocks: OrderedDict[int, None] = field(default_factory=OrderedDict)
    cache_queries: int = 0
    cache_hits: int = 0
    routed: int = 0  # requests sent to this slot since the pool started (across restarts)
    responses: Ring | None = None  # its current process's response ring

    def coast_stats(self) -> dict[str, int]:
        """Its reader's sleeps on the coasting timer and the misses among them
        (`tinyllm_trio.ipc.coast`), and its sleeps on the busy tick (`Ring.pump`), since its
        current process started."""
        ring = self.responses
        coast = None if ring is None else ring.coast
        ticks = 0 if ring is None else ring.ticks
        if coast is None:
            return {"sleeps": 0, "misses": 0, "ticks": ticks}
        return {"sleeps": coast.waits, "misses": coast.misses, "ticks": ticks}

    @property
    def name(self) -> str:
        return f"worker {self.index}" + (f" (pid {self.pid})" if self.pid else "")

    def post(self, msg: object) -> bool:
        """Queue a message for this worker's writer task; False if no worker is running."""
        if self.outbox is None:
            return False
        try:
            self.outbox.send_nowait(msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True


class WorkerPool(AdmissionQueue[PendingRequest]):
    """N supervised worker processes, their rings, and the admission queue in front of them.

    An engine backend: it satisfies `tinyllm_trio.backend.Backend` (typed, not imported:
    `ipc/` sits below the engine).

    Use through `open_engine`; `run` is meant for `nursery.start` and reports readiness once
    every worker has loaded the model.
    """

    request_type = PendingRequest

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        workers: int | None = EngineConfig.workers,
        max_batch: int = EngineConfig.max_batch,
        max_queue: int = EngineConfig.max_queue,
        attention_scale: str | None = EngineConfig.attention_scale,
        weights: str = EngineConfig.weights,
        ready_timeout: float = EngineConfig.ready_timeout,
        stall_timeout: float = EngineConfig.stall_timeout,
        pin_workers: bool = EngineConfig.pin_workers,
        prefix_cache: bool = EngineConfig.prefix_cache,
        coast: bool = EngineConfig.coast,
        busy_tick: float = EngineConfig.busy_tick,
    ) -> None:
        EngineConfig(  # validates every value, with the same messages as everywhere
            workers=workers,
            max_batch=max_batch,
            max_queue=max_queue,
            attention_scale=attention_scale,
            weights=weights,
            stall_timeout=stall_timeout,
            busy_tick=busy_tick,
        )
        super().__init__(max_batch, max_queue)
        workers = default_workers() if workers is None else workers
        self.model = None if model is None else os.fspath(model)
        self.attention_scale = attention_scale
        self.weights = weights
        self.ready_timeout = ready_timeout
        self.stall_timeout = stall_timeout
        self.prefix_cache = prefix_cache
        self.coast = coast
        self.busy_tick = busy_tick
        self._cores = len(_allowed_cpus())
        self.prefix = new_prefix()
        cpus = worker_cpus(workers) if pin_workers else [None] * workers
        self.slots = [WorkerSlot(i, cpu=cpu) for i, cpu in enumerate(cpus)]
        self._stopping = False
        self._started = False
        self._rings: set[Ring] = set()
        self._limiter = trio.CapacityLimiter(2 * workers + 2)  # readers + writers, not trio's 40
        self._all_ready = trio.Event()
        self._stop_requested = trio.Event()
        self._stopped = trio.Event()
        self.restarts = 0

    # --- public state ----------------------------------------------------------------------------

    @property
    def running(self) -> int:
        return sum(len(s.inflight) for s in self.slots)

    @property
    def any_ready(self) -> bool:
        return any(s.ready for s in self.slots)

    @property
    def workers(self) -> int:
        return len(self.slots)

    @property
    def live(self) -> bool:
        """Some worker is up or on its way (a death is followed by a restart); False when the
        last start of every slot failed, so waiting would mean waiting for a retry that may
        fail again: then requests are refused rather than queued for an unknown time."""
        return not all(s.down for s in self.slots)

    def stats(self) -> dict[str, object]:
        """Counts for /metrics and /health: running and waiting requests, per-worker load."""
        return {
            "accepting": self.accepting,
            "running": self.running,
            "waiting": self.waiting,
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            "capacity": self.max_batch * len(self.slots),
            "restarts": self.restarts,
            "outcomes": dict(self.outcomes),
            "prefix_cache": {
                "enabled": self.prefix_cache,
                "queries": sum(s.cache_queries for s in self.slots),
                "hits": sum(s.cache_hits for s in self.slots),
            },
            "workers": [
                {
                    "index": s.index,
                    "pid": s.pid,
                    "cpu": s.cpu,
                    "weights": s.weights,
                    "ready": s.ready,
                    "running": len(s.inflight),
                    # KV positions its running sequences fill (prompt + generated so far)
                    "kv_tokens": sum(len(r.prompt) + r.generated for r in s.inflight.values()),
                    "generation": s.generation,
                    "restarts": s.restarts,
                    "last_exit": s.last_exit,
                    "prefix_cache": {"queries": s.cache_queries, "hits": s.cache_hits},
                    "routed": s.routed,
                    "coast": s.coast_stats(),
                }
                for s in self.slots
            ],
        }

    # --- admission -------------------------------------------------------------------------------

    def check_admission(self, n: int = 1) -> None:
        """Raise ShuttingDownError / OverloadedError if `admit` (or `admit_group` of `n`
        choices, which queue as n requests) would refuse right now."""
        self._refuse_if_closed()
        if not self.live:
            raise WorkerDiedError(self._no_worker_message())
        self._refuse_if_full(
            n,
            lambda need: self._least_loaded(need) is not None,
            f"all {len(self.slots)} workers are busy",
        )

    def admit(self, prompt: list[int], params: SamplingParams) -> PendingRequest:
        """Route a validated request to a worker or the queue; its events arrive on `.events`."""
        self.check_admission()
        [request] = self._new_requests(prompt, [params], group=False)
        slot = None if self._queue else self._pick(request)
        if slot is not None:
            self._assign(request, slot)
        else:
            self._queue[request.id] = request
        return request

    def admit_group(
        self, prompt: list[int], params: Sequence[SamplingParams]
    ) -> list[PendingRequest]:
        """Route a request's n choices (one `params` each) as one: to a worker with room for
        all of them (or the queue, until one has), sent in one message, so the worker admits
        them in one step and prefills the prompt once (the others fork its KV row). Every
        member delivers its events to the same stream, `.events` of each; release them all.
        """
        n = len(params)
        if n < 1:
            raise ValueError("a group has at least one choice")
        self.check_admission(n)
        group = self._new_requests(prompt, params, group=True)
        slot = None if self._queue else self._pick(group[0], self._need(n))
        if slot is not None:
            self._assign_group(group, slot)
        else:
            for request in group:
                self._queue[request.id] = request
        return group

    def release(self, request: PendingRequest) -> None:
        """The caller stopped listening: withdraw the request or cancel it in its worker.

        Synchronous, so it can run in a `finally` block of a cancelled task. Closing the
        stream wakes a task blocked receiving from it (ClosedResourceError).
        """
        if self._withdraw(request):
            return
        slot = request.worker
        if slot is not None and not request.cancel_sent and request.id in slot.inflight:
            request.cancel_sent = slot.post(Cancel(request.id))

    def _has_room(self, slot: WorkerSlot, need: int) -> bool:
        return (
            slot.ready and slot.outbox is not None and len(slot.inflight) + need <= self.max_batch
        )

    def _least_loaded(self, need: int = 1) -> WorkerSlot | None:
        best = None
        for slot in self.slots:
            if self._has_room(slot, need) and (
                best is None or len(slot.inflight) < len(best.inflight)
            ):
                best = slot
        return best

    def _pick(self, request: PendingRequest, need: int = 1) -> WorkerSlot | None:
        """The worker for `request`: the least-loaded one with room (`need` free batch slots:
        a group's), or None if none has room.

        With the prefix cache, a worker whose table shares more leading prompt blocks with the
        request (its cache likely holds them) wins instead when the prefill it saves pays for
        the imbalance: it may run more requests than the least-loaded worker only if its extra
        cached prompt tokens are at least the decode tokens those extra requests stand for
        (each counted as this request's `max_tokens`), and never more than AFFINITY_SLACK
        beyond it. So one hot prefix cannot pile every request onto one worker, and a burst of
        short cached prompts with long generations still splits evenly: a worker with one
        request more decodes every step of every generation a little slower, which costs
        more than prefilling a block of prompt again."""
        least = self._least_loaded(need)
        if least is None or not self.prefix_cache or not request.params.cache_prompt:
            return least
        hashes = block_hashes(request.prompt)

        def shared(slot: WorkerSlot) -> int:
            blocks = 0
            while blocks < len(hashes) and hashes[blocks] in slot.prefix_blocks:
                blocks += 1
            return blocks

        base = shared(least)
        best, best_key = least, (base, -len(least.inflight))
        for slot in self.slots:
            blocks, load = shared(slot), len(slot.inflight)
            if (blocks, -load) <= best_key or not self._has_room(slot, need):
                continue
            extra = load - len(least.inflight)
            saved = (blocks - base) * BLOCK_TOKENS
            if extra <= AFFINITY_SLACK and extra * request.params.max_tokens <= saved:
                best, best_key = slot, (blocks, -load)
        return best

    def _remember_prefix(self, request: PendingRequest, slot: WorkerSlot) -> None:
        if not self.prefix_cache or not request.params.cache_prompt:
            return
        table = slot.prefix_blocks
        for h in block_hashes(request.prompt):
            table[h] = None
            table.move_to_end(h)
        while len(table) > PREFIX_TABLE_BLOCKS:
            table.popitem(last=False)

    def _assign(self, request: PendingRequest, slot: WorkerSlot) -> None:
        self._remember_prefix(request, slot)
        request.worker = slot
        slot.inflight[request.id] = request
        slot.routed += 1
        slot.post(Submit(request.id, request.prompt, request.params))
        self._start_stall_clock(slot)

    def _assign_group(self, group: list[PendingRequest], slot: WorkerSlot) -> None:
        """Send a request's choices to `slot` in one message (see `admit_group`)."""
        if len(group) == 1:
            self._assign(group[0], slot)
            return
        self._remember_prefix(group[0], slot)
        for request in group:
            request.worker = slot
            slot.inflight[request.id] = request
        slot.routed += len(group)
        submits = [Submit(r.id, r.prompt, r.params) for r in group]
        slot.post(Batch(submits, group[0].id))  # type: ignore[arg-type]
        self._start_stall_clock(slot)

    def _start_stall_clock(self, slot: WorkerSlot) -> None:
        scope = slot.stall_scope
        if scope is not None and scope.deadline == math.inf:  # it was idle: the clock starts
            scope.deadline = trio.current_time() + self.stall_timeout

    def _heard_from(self, slot: WorkerSlot) -> None:
        """The worker just spoke: a busy one gets at least `stall_timeout` more, an idle one
        forever.

        A busy worker speaks every decode step, and moving a deadline costs Trio a heap push,
        so the deadline moves only once less than `stall_timeout` is left, and then to
        STALL_SLACK x `stall_timeout` ahead: a worker is killed after between 1 and
        STALL_SLACK times `stall_timeout` of silence, and the deadline moves a few times a
        second instead of once a token."""
        scope = slot.stall_scope
        if scope is None:
            return
        if not slot.inflight:
            scope.deadline = math.inf
            return
        now = trio.current_time()
        if not now + self.stall_timeout <= scope.deadline < math.inf:
            scope.deadline = now + self.stall_timeout * STALL_SLACK

    async def _watch_stall(self, slot: WorkerSlot, process: trio.Process) -> None:
        with trio.CancelScope(deadline=math.inf) as scope:
            slot.stall_scope = scope
            self._heard_from(slot)
            await trio.sleep_forever()
        slot.stall_scope = None
        if process.returncode is None:  # the deadline passed: hung, not dead
            slot.stalled = True
            log.warning(
                "%s sent nothing for %g s while running %d requests; killing it",
                slot.name,
                self.stall_timeout,
                len(slot.inflight),
            )
            process.kill()

    def _no_worker_message(self) -> str:
        why = "; ".join(f"{s.name}: {s.load_error or 'failed to start'}" for s in self.slots)
        return f"no worker is running (each is being restarted with back-off): {why}"

    def _pump(self) -> None:
        """Move queued requests to workers with free slots, oldest first."""
        while self._queue:
            head = self._queue[next(iter(self._queue))]
            members = [head]
            if head.group is not None:  # the group's choices still queued go together
                members = [r for r in head.group if r.id in self._queue]
            need = self._need(len(members))
            slot = self._least_loaded(need)
            if slot is None:
                return
            for request in members:
                del self._queue[request.id]
            self._assign_group(members, self._pick(head, need) or slot)

    def _end_all(self, message: str, kind: str) -> None:
        """End every queued and running request with an error; cancel them in their workers."""
        self._end_queued(message, kind)
        for slot in self.slots:
            for request in slot.inflight.values():
                self._end(request, ErrorEvent(request.id, message, kind))
                if not request.cancel_sent:
                    request.cancel_sent = slot.post(Cancel(request.id))
            slot.inflight.clear()
        self._activity.unpark_all()

    # --- drain and shutdown ----------------------------------------------------------------------

    async def aclose(self, timeout: float = 5.0) -> None:
        """Ordered stop: end all requests, ask every worker to exit, wait up to `timeout`
        seconds, SIGKILL the rest, and return when every ring is unlinked."""
        self.accepting = False
        self._end_all("the server is shutting down", ErrorKind.SHUTTING_DOWN)
        self._stopping = True
        self._stop_requested.set()
        for slot in self.slots:
            slot.post(Shutdown())
        with trio.move_on_after(timeout):
            await self._stopped.wait()
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                slot.process.kill()
        await self._stopped.wait()

    # --- supervision -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start every worker, report readiness once all have loaded, supervise until `aclose`.

        Raises WorkerStartError if a worker fails before its first Ready (a checkpoint that
        cannot load will not load on a retry either) or if start-up exceeds `ready_timeout`.
        """
        sweep_stale()
        try:
            with unwrap_single_exception():
                async with trio.open_nursery() as nursery:
                    for slot in self.slots:
                        nursery.start_soon(self._supervise, slot)
                    with trio.move_on_after(self.ready_timeout) as waited:
                        await self._all_ready.wait()
                    if waited.cancelled_caught:
                        raise WorkerStartError(
                            f"workers did not load the model within {self.ready_timeout} s"
                        )
                    self._started = True
                    task_status.started()
        finally:
            self.accepting = False
            self._end_all("the engine stopped", ErrorKind.SHUTTING_DOWN)
            for ring in list(self._rings):  # safety net; normally already destroyed
                self._drop_ring(ring)
            self._stopped.set()

    async def _supervise(self, slot: WorkerSlot) -> None:
        young_deaths = 0
        while not self._stopping:
            born = trio.current_time()
            await self._run_worker(slot)
            if self._stopping:
                return
            if not self._started:
                why = slot.load_error or f"{slot.name} {_describe_exit(slot.last_exit)}"
                raise WorkerStartError(f"worker {slot.index} failed to start: {why}")
            young_deaths = 0 if trio.current_time() - born > STABLE_AFTER else young_deaths + 1
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (young_deaths - 1)) if young_deaths else 0
            slot.down = not slot.ready_once
            if not self.live:  # nobody left to serve the queue: fail it now, not after back-off
                message = self._no_worker_message()
                for request in self._queue.values():
                    self._end(request, ErrorEvent(request.id, message, ErrorKind.WORKER_DIED))
                self._queue.clear()
            slot.restarts += 1
            self.restarts += 1
            why = slot.load_error or f"{slot.name} {_describe_exit(slot.last_exit)}"
            log.warning("%s; restarting in %.2f s", why, delay)
            with trio.move_on_after(delay):
                await self._stop_requested.wait()

    def _new_ring(self, name: str, n_slots: int, slot_size: int, *, doorbell: bool = False) -> Ring:
        ring = Ring.create(name, n_slots=n_slots, slot_size=slot_size, doorbell=doorbell)
        self._rings.add(ring)
        return ring

    def _drop_ring(self, ring: Ring) -> None:
        self._rings.discard(ring)
        ring.destroy()

    def _command(self, slot: WorkerSlot, requests: Ring, responses: Ring) -> list[str]:
        cmd = [sys.executable, "-m", "tinyllm_trio.ipc.worker"]
        cmd += ["--requests", requests.name, "--responses", responses.name]
        if responses.doorbell_fd is not None:
            cmd += ["--responses-doorbell", str(responses.doorbell_fd)]
        cmd += ["--parent-pid", str(os.getpid()), "--index", str(slot.index)]
        cmd += ["--max-batch", str(self.max_batch)]
        if not self.prefix_cache:
            cmd.append("--no-prefix-cache")
        if slot.cpu is not None:
            cmd += ["--cpu", str(slot.cpu)]
        if self.model is not None:
            cmd += ["--model", self.model]
        if self.attention_scale is not None:
            cmd += ["--attention-scale", self.attention_scale]
        cmd += ["--weights", self.weights]
        return cmd

    async def _run_worker(self, slot: WorkerSlot) -> None:
        """One worker process from spawn to exit, with its rings; returns after cleanup."""
        slot.generation += 1
        slot.load_error = None
        slot.stalled = False
        slot.ready_once = False
        base = f"{self.prefix}-w{slot.index}g{slot.generation}"
        rings: list[Ring] = []
        try:
            try:
                # posix_ipc's errors (EMFILE, ENOSPC) are not OSError, and whatever fails here
                # is a failed start of this slot, retried with back-off, never the pool's end.
                rings.append(self._new_ring(base + "-req", REQUEST_SLOTS, REQUEST_SLOT_SIZE))
                # the doorbell: the reader waits in Trio's epoll loop, not in a thread
                rings.append(
                    self._new_ring(
                        base + "-resp", RESPONSE_SLOTS, RESPONSE_SLOT_SIZE, doorbell=True
                    )
                )
                requests, responses = rings
                process = await trio.lowlevel.open_process(
                    self._command(slot, requests, responses),
                    stdin=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,  # re-logged: every line goes through `logging`
                    start_new_session=True,  # the terminal's Ctrl+C is the server's alone
                    env=single_threaded_env(),  # one BLAS thread: one worker per core
                    pass_fds=(responses.doorbell_fd,),
                )
            except Exception as e:  # e.g. EAGAIN, ENOMEM, EMFILE, a full /dev/shm
                slot.load_error = f"could not start a worker process: {type(e).__name__}: {e}"
                slot.last_exit = None
                return
            await self._serve_process(slot, process, requests, responses)
        finally:
            for ring in reversed(rings):
                self._drop_ring(ring)

    async def _serve_process(
        self, slot: WorkerSlot, process: trio.Process, requests: Ring, responses: Ring
    ) -> None:
        slot.process, slot.pid, slot.responses = process, process.pid, responses
        outbox, outbox_receive = trio.open_memory_channel[object](math.inf)
        slot.outbox = outbox
        if self._stopping:  # aclose() ran while this worker was being spawned
            slot.post(Shutdown())
        try:
            async with trio.open_nursery() as nursery:
                stderr_done = trio.Event()
                nursery.start_soon(self._relog_stderr, slot, process, stderr_done)
                nursery.start_soon(self._write_loop, slot, requests, outbox_receive)
                nursery.start_soon(self._read_loop, slot, responses)
                nursery.start_soon(self._watch_stall, slot, process)
                await process.wait()
                with trio.move_on_after(STDERR_DRAIN):
                    await stderr_done.wait()
                nursery.cancel_scope.cancel()
        finally:
            slot.outbox = None
            slot.responses = None
            slot.ready = False
            if process.returncode is None:  # we were cancelled: never leave it running
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
            slot.last_exit = process.returncode
            slot.process = None
            if process.stderr is not None:
                with trio.CancelScope(shield=True):
                    await process.stderr.aclose()
            # events the worker wrote before it died still count (e.g. a Done just in time)
            while (frame := responses.get(timeout=0)) is not None:
                self._route(slot, frame)
            slot.ready = False
            if slot.inflight:
                how = _describe_exit(process.returncode)
                if slot.stalled:
                    how = f"stopped responding for {self.stall_timeout:g} s and was killed"
                message = f"{slot.name} {how} while running this request"
                for request in slot.inflight.values():
                    self._end(request, ErrorEvent(request.id, message, ErrorKind.WORKER_DIED))
                slot.inflight.clear()
            self._pump()  # queued requests may fit on the other workers

    async def _relog_stderr(
        self, slot: WorkerSlot, process: trio.Process, done: trio.Event
    ) -> None:
        """Log each line the worker writes to stderr (its warnings, a traceback, a C library's
        message), so that with ``--log-format json`` every line the server emits is JSON."""
        name = slot.name
        pending = b""
        try:
            if process.stderr is None:
                return
            async for chunk in process.stderr:
                *lines, pending = (pending + chunk).split(b"\n")
                if len(pending) > STDERR_LINE_MAX:
                    lines.append(pending)
                    pending = b""
                for line in lines:
                    self._relog(name, slot.index, line)
            self._relog(name, slot.index, pending)
        finally:
            done.set()

    @staticmethod
    def _relog(name: str, index: int, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip()
        if text:
            worker_log.warning("%s: %s", name, text, extra={"worker": index})

    async def _write_loop(
        self, slot: WorkerSlot, requests: Ring, outbox: trio.MemoryReceiveChannel[object]
    ) -> None:
        """Send each queued message; a message that cannot be sent fails its request alone."""
        async for msg in outbox:
            try:
                frame = encode(msg)  # type: ignore[arg-type]
            except Exception as e:  # nothing was written: the ring and the worker are fine
                self._unsendable(slot, msg, e)
                continue
            try:
                await requests.send(*frame, limiter=self._limiter)
            except MessageTooLargeError as e:  # refused before any frame was written
                self._unsendable(slot, msg, e)
            except RingError as e:  # the ring is in an unknown state: replace the worker
                self._unsendable(slot, msg, e)
                log.error("%s: its request ring failed (%s); restarting it", slot.name, e)
                if slot.process is not None:
                    slot.process.kill()
                return

    def _unsendable(self, slot: WorkerSlot, msg: object, exc: Exception) -> None:
        log.error(
            "%s: could not send %s: %s: %s", slot.name, type(msg).__name__, type(exc).__name__, exc
        )
        submits = msg.messages if isinstance(msg, Batch) else [msg]
        for submit in submits:
            if not isinstance(submit, Submit):
                continue
            request = slot.inflight.pop(submit.request_id, None)
            if request is not None:
                why = f"could not send this request to its worker: {type(exc).__name__}: {exc}"
                self._end(request, ErrorEvent(request.id, why, ErrorKind.INTERNAL))
        if submits:
            self._pump()

    async def _read_loop(self, slot: WorkerSlot, responses: Ring) -> None:
        def deliver(frames: list[Frame]) -> None:
            for frame in frames:
                self._route(slot, frame)
            self._heard_from(slot)

        coast = self._core_to_spare if self.coast else None
        await responses.pump(deliver, limiter=self._limiter, coast=coast, tick=self.busy_tick)

    def _core_to_spare(self) -> bool:
        """Whether fewer workers are busy than there are cores, so that this process has one
        to itself: only then does a reader coast (`tinyllm_trio.ipc.coast`); with none to
        spare it reads on the busy tick instead (`Ring.pump`)."""
        return sum(1 for slot in self.slots if slot.inflight) < self._cores

    def _route(self, slot: WorkerSlot, frame: Frame) -> None:
        """Hand one message from a worker to whoever waits for it."""
        try:
            msg = decode(frame.msg_type, frame.request_id, frame.payload)
        except MessageError as e:
            log.error("%s sent a bad message: %s", slot.name, e)
            return
        if type(msg) is not Batch:
            self._route_one(slot, msg)
            return
        # The hot path: one step's events, mostly tokens of running requests.
        inflight = slot.inflight
        for item in msg.messages:
            if type(item) is TokenEvent:
                request = inflight.get(item.request_id)
                if request is not None:  # PendingRequest.deliver, inlined: one call a token
                    request.generated += len(item.token_ids)
                    request.stream.deliver_token(item)
            else:
                self._route_one(slot, item)

    def _route_one(self, slot: WorkerSlot, msg: object) -> None:
        if isinstance(msg, Ready):
            if slot.process is None:  # read after its process exited: not ready at all
                return
            slot.ready = True
            slot.ready_once = True
            slot.down = False
            slot.pid = msg.pid
            slot.weights = msg.info.get("weights")
            slot.prefix_blocks.clear()  # a new process: its cache starts empty
            if all(s.ready for s in self.slots):
                self._all_ready.set()
            self._pump()
            return
        request = slot.inflight.get(msg.request_id)
        if request is None:
            if isinstance(msg, ErrorEvent) and msg.kind == ErrorKind.LOAD_FAILED:
                slot.load_error = msg.message
            return  # a request that was already ended here (cancelled, shut down)
        if isinstance(msg, TokenEvent):
            request.generated += len(msg.token_ids)  # PendingRequest.deliver, inlined
            request.stream.deliver(msg)
        elif isinstance(msg, DoneEvent | ErrorEvent):
            if isinstance(msg, DoneEvent) and self.prefix_cache and request.params.cache_prompt:
                slot.cache_queries += msg.prompt_tokens
                slot.cache_hits += msg.cached_tokens
            del slot.inflight[request.id]
            self._end(request, msg)
            self._pump()


__all__ = [
    "EngineError",
    "PendingRequest",
    "WorkerPool",
    "WorkerSlot",
    "default_workers",
    "worker_cpus",
]

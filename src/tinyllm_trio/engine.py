"""The Engine: the in-process face of a backend, for Trio applications and the HTTP layer.

The backend (`tinyllm_trio.backend.Backend`) is the worker pool (`open_engine`) or one model in
this process (`open_inprocess_engine`); what follows holds for both.

    async with open_engine(model=None, workers=2) as engine:   # None = the packaged model
        async for event in engine.generate("Once upon a time", max_tokens=50, temperature=0.8):
            ...                      # TokenEvent(s), then DoneEvent (or ErrorEvent)
        completion = await engine.complete("Once upon a time", max_tokens=50)
        choices = await engine.complete_choices("Once upon a time", n=3, seed=1)  # one prefill

What is guaranteed:

- `generate()` validates before anything runs: bad sampling parameters raise
  `InvalidParameterError`, a prompt with no room left for one token raises
  `ContextLengthError`, a full admission queue raises `OverloadedError`, a draining engine
  raises `ShuttingDownError`. These are raised by the call itself, synchronously, so an HTTP
  handler can answer 400/429/503 before it sends any header. The returned `Generation` then
  streams events and always ends with exactly one `DoneEvent` or `ErrorEvent` (a worker crash
  is an `ErrorEvent` of kind ``worker_died``, never a hang).
- Leaving the iteration early (break, an exception, a cancel scope, `aclose()`) cancels the
  request in its worker, which drops the sequence within one decode step. For a deterministic
  cancel use ``async with engine.generate(...) as events:``; a bare ``async for`` that breaks
  relies on Trio finalizing the abandoned generator, which happens promptly in CPython.
- `complete()` returns a `Completion` or raises: `WorkerDiedError`, `ShuttingDownError`,
  `OverloadedError`, or the validation errors above.
- `open_engine` starts the pool inside its own nursery (`nursery.start`, so the body runs only
  once every worker has loaded the model). Leaving the block, normally, by an exception or by
  cancellation, stops every worker in order and unlinks every shared-memory object, within
  `shutdown_timeout` seconds plus a SIGKILL.

Draining (what a server does on SIGTERM): stop accepting new connections, then
``await engine.drain(grace)``: new `generate()` calls raise `ShuttingDownError`, running and
queued requests get up to `grace` seconds to finish, and whatever is left ends with an
`ErrorEvent` of kind ``shutting_down``. Then leave the `open_engine` block.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

import trio

from tinyllm_trio.config import EngineConfig
from tinyllm_trio.errors import (
    ContextLengthError,
    EngineError,
    InvalidParameterError,
    OverloadedError,
    ShuttingDownError,
    WorkerDiedError,
    WorkerStartError,
    exception_for,
)
from tinyllm_trio.model.batching import encode_prompt
from tinyllm_trio.model.sampling import SamplingParams
from tinyllm_trio.model.tokenizer import HybridTokenizer
from tinyllm_trio.model.transformer import ModelConfig
from tinyllm_trio.protocol import DoneEvent, ErrorEvent, ErrorKind, Event, TokenEvent

if TYPE_CHECKING:
    from tinyllm_trio.backend import AdmittedRequest, Backend

__all__ = [
    "MAX_CHOICES",
    "Choices",
    "Completion",
    "ContextLengthError",
    "Engine",
    "EngineError",
    "Generation",
    "InvalidParameterError",
    "OverloadedError",
    "ShuttingDownError",
    "WorkerDiedError",
    "WorkerStartError",
    "open_engine",
    "open_inprocess_engine",
]

MODEL_ID = "tinyllm"
MAX_CHOICES = 8  # `n` per request: each choice holds a KV row (a batch slot) of its own


@dataclass
class Completion:
    """A finished generation: its text, why it ended, usage counts and timings."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    cached_tokens: int = 0  # prompt tokens the worker's prefix cache supplied
    # with `prompt_logprobs`: one entry per prompt token, the first one's logprob None
    prompt_logprobs: list[dict[str, Any]] | None = None


class Generation:
    """The event stream of one request: an async iterator and an async context manager.

    Created (and validated) by `Engine.generate`; the request is admitted when iteration
    starts, so a `Generation` that is never iterated costs nothing. Exiting the `async with`
    block, `aclose()` or `cancel()` cancels the request if it is still running; they may be
    called from another task than the one iterating, whose stream then ends with
    `DoneEvent("cancelled")`.

    Events that arrived together (a busy tick reads several decode steps at once) are taken
    after one checkpoint: each further one is a cancel point, not a pass of the scheduler.
    """

    def __init__(
        self, backend: Backend[Any], prompt_ids: list[int], params: SamplingParams
    ) -> None:
        self._backend = backend
        self.prompt_ids = prompt_ids
        self.params = params
        self.request_id: int | None = None
        self._request: AdmittedRequest | None = None
        self._cancelled = False
        self._completion_tokens = 0
        self._events = self._stream()

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    async def _stream(self) -> AsyncIterator[Event]:
        if self._cancelled:
            return
        request = self._backend.admit(self.prompt_ids, self.params)
        self._request, self.request_id = request, request.id
        receive, queued = request.stream.receive, request.stream.receive_queued
        try:
            try:
                while True:
                    event: Event | None = await receive()
                    while event is not None:
                        if isinstance(event, TokenEvent):  # the per-token path, checked first
                            self._completion_tokens += len(event.token_ids)
                            yield event
                        else:
                            yield event
                            if isinstance(event, DoneEvent | ErrorEvent):
                                return
                        # The rest of a burst (several steps' tokens read on one busy tick)
                        # without a pass of the scheduler each: still a cancel point, not a
                        # schedule point, until the queue is empty.
                        await trio.lowlevel.checkpoint_if_cancelled()
                        event = queued()
            except trio.EndOfChannel:
                pass
            except trio.ClosedResourceError:  # cancel() while this task waited for an event
                completion = self._completion_tokens + request.stream.sunk
                yield DoneEvent(request.id, "cancelled", self.prompt_tokens, completion)
                return
            yield ErrorEvent(
                request.id, "the request ended without a final event", ErrorKind.INTERNAL
            )
        finally:
            self._backend.release(request)

    def set_token_sink(self, sink: Callable[[TokenEvent], None] | None) -> bool:
        """Hand token events to `sink(event)` as they arrive, instead of queueing them for the
        task iterating this generation; `None` goes back to queueing.

        For a consumer whose per-token work is synchronous and never waits: the HTTP server
        formats each token and writes it to a non-blocking socket right where the engine
        delivers it, which saves a task switch and a queue round trip per token (the README
        has what it saves in server CPU per streamed token). `sink` runs in the
        engine's delivery task, so it must not block; if it raises, that event and every later
        one are queued as usual. The ordering rules are `RequestStream`'s: the final event
        (done or error) is always queued, after every token the sink took, so iterating still
        ends the stream; events already queued when it is set, and any that arrive while some
        are, keep going through iteration, so the sink never overtakes one.
        Returns False, and installs nothing, before iteration has started (call it after the
        first event) or once the request has ended or been cancelled.
        """
        request = self._request
        if sink is None:
            if request is not None:
                request.stream.set_sink(None)
            return True
        if request is None or self._cancelled:
            return False
        return request.stream.set_sink(sink)  # it counts what the sink takes (`sunk`)

    def cancel(self) -> None:
        """Cancel the request now (synchronous, from any task); idempotent."""
        self._cancelled = True
        if self._request is not None:
            self._backend.release(self._request)

    def __aiter__(self) -> AsyncIterator[Event]:
        # The event stream itself: `async for` then skips the `__anext__` wrapper per event.
        return self._events

    async def __anext__(self) -> Event:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        self.cancel()
        if not self._events.ag_running:  # else the iterating task ends the stream itself
            await self._events.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """Each of n choices' parameters: with a `seed`, choice i samples with seed + i (vLLM's
    rule), so the set is reproducible, its samples differ from each other, and choice 0 is
    exactly what n=1 would give; without one, each draws fresh entropy."""
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CHOICES:
        raise InvalidParameterError("n", f"n must be an integer from 1 to {MAX_CHOICES}")
    if params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=params.seed + i) for i in range(n)]


class Choices(Generation):
    """The events of a request's n choices (`Engine.generate_choices`), interleaved as they
    come: each choice's `TokenEvent`s and then its own `DoneEvent` (or `ErrorEvent`); the
    iteration ends after the n-th final event. `index(event.request_id)` is the event's choice.

    The choices go to one worker together, which prefills the prompt once and gives each
    choice a copy of its KV row. Like `Generation`: admitted when iteration starts; leaving
    the `async with`, `aclose()` or `cancel()` cancels every choice still running. There is
    no token sink (`set_token_sink` returns False): a consumer of n interleaved streams
    iterates.
    """

    def __init__(
        self, backend: Backend[Any], prompt_ids: list[int], params: list[SamplingParams]
    ) -> None:
        self.choice_params = params
        self.n = len(params)
        self._requests: list[AdmittedRequest] = []
        self._index: dict[int, int] = {}
        super().__init__(backend, prompt_ids, params[0])

    def index(self, request_id: int) -> int:
        """The choice (0..n-1) an event of this request belongs to."""
        return self._index[request_id]

    async def _stream(self) -> AsyncIterator[Event]:
        if self._cancelled:
            return
        group = self._backend.admit_group(self.prompt_ids, self.choice_params)
        self._requests = group
        self._index = {r.id: i for i, r in enumerate(group)}
        generated = {r.id: 0 for r in group}
        open_ = set(generated)
        receive = group[0].stream.receive  # the stream every member shares
        try:
            try:
                while True:
                    event = await receive()
                    rid = event.request_id
                    if isinstance(event, TokenEvent):
                        generated[rid] = generated.get(rid, 0) + len(event.token_ids)
                    yield event
                    if isinstance(event, DoneEvent | ErrorEvent):
                        open_.discard(rid)
                        if not open_:
                            return
            except trio.EndOfChannel:
                pass
            except trio.ClosedResourceError:  # cancel() while this task waited for an event
                for rid in sorted(open_):
                    yield DoneEvent(rid, "cancelled", self.prompt_tokens, generated[rid])
                return
            for rid in sorted(open_):
                yield ErrorEvent(rid, "the request ended without a final event", ErrorKind.INTERNAL)
        finally:
            for request in group:
                self._backend.release(request)

    def cancel(self) -> None:
        """Cancel every choice now (synchronous, from any task); idempotent."""
        self._cancelled = True
        for request in self._requests:
            self._backend.release(request)


def kv_cache_usage(stats: dict[str, Any], max_context: int) -> float:
    """The fraction (0..1) of the workers' KV cache that running sequences fill.

    Each worker holds `max_batch` cache rows of `max_context` positions; a running sequence
    fills one position per prompt token and per generated token. So: the sum over running
    sequences of (prompt + generated tokens), over workers x max_batch x max_context. Counted
    by the pool from what it sent and received, at no cost to the workers; rows kept only as
    a cache of finished sequences are not "used".
    """
    workers = stats.get("workers") or ()
    total = len(workers) * int(stats.get("max_batch", 0)) * max_context
    if total <= 0:
        return 0.0
    used = sum(int(w.get("kv_tokens", 0)) for w in workers)
    return min(1.0, used / total)


class Engine:
    """Generation on a backend: a pool of worker processes (`open_engine`) or one model in
    this process (`open_inprocess_engine`); see `tinyllm_trio.backend.Backend`."""

    def __init__(
        self,
        backend: Backend[Any],
        tokenizer: HybridTokenizer,
        model_config: ModelConfig,
        model_path: str | None = None,
    ) -> None:
        self._backend = backend
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.model_path = model_path
        self.model_id = MODEL_ID

    @property
    def ready(self) -> bool:
        """Accepting requests with at least one worker up (False while draining)."""
        return self._backend.accepting and self._backend.any_ready

    @property
    def accepting(self) -> bool:
        return self._backend.accepting

    @property
    def workers(self) -> int:
        return self._backend.workers

    @property
    def prefix_cache(self) -> bool:
        """Whether the workers keep a prefix cache (responses then report cached tokens)."""
        return self._backend.prefix_cache

    def stats(self) -> dict[str, object]:
        """running, waiting, capacity, restarts, per-worker load (pid, ready, running,
        kv_tokens, `routed`: requests sent to it since start), `kv_cache_usage` (see
        `kv_cache_usage`) and prefix-cache counters (queries and hits, in prompt tokens; total
        and per worker)."""
        stats = self._backend.stats()
        stats["max_context"] = self.model_config.max_context
        stats["kv_cache_usage"] = kv_cache_usage(stats, self.model_config.max_context)
        return stats

    def encode_prompt(
        self, prompt: str | Sequence[int], *, parse_special: bool = True
    ) -> list[int]:
        """Token ids of a prompt as the worker will see them (text gets BOS first).

        `parse_special=False` encodes `<|endoftext|>` in the text as ordinary characters
        instead of EOS (for text a user wrote; pass the ids to `generate`). Raises
        InvalidParameterError (param "prompt") for an empty list or an id outside the
        vocabulary, and ContextLengthError when no room is left for one generated token (text
        is encoded only that far). Synchronous and CPU-bound: a caller on an event loop runs a
        long text in a thread.
        """
        return encode_prompt(prompt, self.tokenizer, self.model_config, parse_special=parse_special)

    def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        **overrides: Any,
    ) -> Generation:
        """Validate a request and return its event stream (see the module docstring).

        `params` and/or keyword overrides (`max_tokens=50, temperature=0.8`, ...) give the
        SamplingParams. Raises InvalidParameterError, ContextLengthError, OverloadedError or
        ShuttingDownError right here, before any event. The request is admitted when iteration
        starts; if the queue filled up in between, that first `__anext__` raises
        OverloadedError (still before any event).
        """
        if params is None:
            params = SamplingParams(**overrides)
        elif overrides:
            params = dataclasses.replace(params, **overrides)
        ids = self.encode_prompt(prompt)
        params.check_vocab(self.model_config.vocab_size)
        self._backend.check_admission()
        return Generation(self._backend, ids, params)

    def generate_choices(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        n: int = 1,
        **overrides: Any,
    ) -> Choices:
        """Like `generate`, for n choices of one prompt (OpenAI's `n`, 1 to MAX_CHOICES):
        validated here (InvalidParameterError with param "n" for a bad n), then a `Choices`
        stream. The prompt is prefilled once; `choice_params` says how seeds are derived."""
        if params is None:
            params = SamplingParams(**overrides)
        elif overrides:
            params = dataclasses.replace(params, **overrides)
        per_choice = choice_params(params, n)
        ids = self.encode_prompt(prompt)
        params.check_vocab(self.model_config.vocab_size)
        self._backend.check_admission(n)
        return Choices(self._backend, ids, per_choice)

    async def complete_choices(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        n: int = 1,
        **overrides: Any,
    ) -> list[Completion]:
        """Run n choices to their end: one `Completion` each, in choice order (each with the
        prompt's token count; add their `completion_tokens` for a request's usage)."""
        texts: list[list[str]] = [[] for _ in range(n)]
        ids: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        prompts: list[list[dict[str, Any]] | None] = [None] * n
        done: dict[int, Completion] = {}
        async with self.generate_choices(prompt, params, n, **overrides) as events:
            want_logprobs = events.params.logprobs is not None
            async for event in events:
                i = events.index(event.request_id)
                if isinstance(event, TokenEvent):
                    texts[i].append(event.text)
                    ids[i].extend(event.token_ids)
                    if event.logprobs and event.token_ids:
                        logprobs[i].extend(event.logprobs)
                    elif event.logprobs:  # the prompt's, before the first token
                        prompts[i] = event.logprobs
                elif isinstance(event, DoneEvent):
                    done[i] = Completion(
                        "".join(texts[i]),
                        event.finish_reason,
                        event.prompt_tokens,
                        event.completion_tokens,
                        ids[i],
                        logprobs[i] if want_logprobs else None,
                        event.timings,
                        event.cached_tokens,
                        prompts[i],
                    )
                else:
                    raise exception_for(event.kind, event.message)
        return [done[i] for i in range(n)]

    async def complete(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        **overrides: Any,
    ) -> Completion:
        """Run a request to the end; raise EngineError (or a validation error) if it failed."""
        text: list[str] = []
        token_ids: list[int] = []
        logprobs: list[dict[str, Any]] = []
        prompt_logprobs = None
        async with self.generate(prompt, params, **overrides) as events:
            async for event in events:
                if isinstance(event, TokenEvent):
                    text.append(event.text)
                    token_ids.extend(event.token_ids)
                    if event.logprobs and event.token_ids:
                        logprobs.extend(event.logprobs)
                    elif event.logprobs:  # the prompt's (`prompt_logprobs`), before any token
                        prompt_logprobs = event.logprobs
                elif isinstance(event, DoneEvent):
                    return Completion(
                        "".join(text),
                        event.finish_reason,
                        event.prompt_tokens,
                        event.completion_tokens,
                        token_ids,
                        logprobs if events.params.logprobs is not None else None,
                        event.timings,
                        event.cached_tokens,
                        prompt_logprobs,
                    )
                else:
                    raise exception_for(event.kind, event.message)
        raise EngineError("the request ended without a final event")  # pragma: no cover

    async def drain(self, grace: float = 10.0) -> None:
        """Stop accepting, give running and queued requests `grace` seconds, end the rest."""
        await self._backend.drain(grace)


@asynccontextmanager
async def open_engine(
    model: str | os.PathLike[str] | None = EngineConfig.model,
    *,
    workers: int | None = EngineConfig.workers,
    max_batch: int = EngineConfig.max_batch,
    max_queue: int = EngineConfig.max_queue,
    attention_scale: str | None = EngineConfig.attention_scale,
    weights: str = EngineConfig.weights,
    shutdown_timeout: float = EngineConfig.shutdown_timeout,
    ready_timeout: float = EngineConfig.ready_timeout,
    stall_timeout: float = EngineConfig.stall_timeout,
    pin_workers: bool = EngineConfig.pin_workers,
    prefix_cache: bool = EngineConfig.prefix_cache,
    coast: bool = EngineConfig.coast,
    busy_tick: float = EngineConfig.busy_tick,
) -> AsyncIterator[Engine]:
    """Start `workers` worker processes (default: one per CPU) and yield an Engine.

    The defaults are `tinyllm_trio.config.EngineConfig`'s; `open_engine(**asdict(config))`
    opens the engine an `EngineConfig` describes.

    The config and tokenizer are read here too (validation happens in this process), the
    weights only in the workers. Raises CheckpointError for a checkpoint whose config,
    tokenizer or tensor shapes are wrong, and WorkerStartError if a worker cannot start
    (including a worker that cannot load the weights, say for a NaN in them). A worker that
    holds requests and sends nothing for `stall_timeout` seconds is killed as hung: its
    requests end with a `worker_died` error and it is replaced. On exit every worker is
    stopped and every IPC object unlinked.

    `pin_workers` keeps each worker process on a core of its own when there are more cores
    (of those this process may use) than workers, so the scheduler cannot stack a worker on
    the core where this process does the IPC work; this process itself is left alone. Pass
    False when several engines or servers share a machine's cores, or give each its own cores
    with ``taskset`` (see `tinyllm_trio.ipc.pool.worker_cpus`).

    `prefix_cache` lets each worker keep the keys and values of finished sequences and reuse
    a prompt's longest cached prefix (`tinyllm_trio.model.prefix_cache`); the pool then sends
    a request to the worker that most likely holds its prefix. Outputs do not change.

    `coast` lets this process read a worker's messages on a timer at the worker's pace while
    it decodes at a steady one, so that the worker does not have to wake this process's core
    after every step (`tinyllm_trio.ipc.coast`). With `coast` and every core running a busy
    worker, `busy_tick` (seconds, 0: off) has this process read the workers on a shared tick
    instead of waking after each step of each worker; a request's first token and its end
    still wake it at once (`tinyllm_trio.ipc.ring.Ring.pump`). Outputs do not change, only
    when tokens arrive: the others at most `busy_tick` late.

    `weights` "bfloat16" has every worker round the weights to bfloat16 at load
    (`tinyllm_trio.model.transformer.Transformer`): outputs change a little (the README gives
    the held-out perplexity), and one or two sequences decode faster.
    """
    from tinyllm_trio.ipc.pool import WorkerPool
    from tinyllm_trio.model.checkpoint import read_checkpoint

    # The config and tokenizer only: the workers load the weights, so this process never
    # builds a Transformer and never imports numba.
    info = await trio.to_thread.run_sync(
        functools.partial(read_checkpoint, model, attention_scale=attention_scale)
    )
    path = os.fspath(info.path)
    pool = WorkerPool(
        path,
        workers=workers,
        max_batch=max_batch,
        max_queue=max_queue,
        attention_scale=attention_scale,
        weights=weights,
        ready_timeout=ready_timeout,
        stall_timeout=stall_timeout,
        pin_workers=pin_workers,
        prefix_cache=prefix_cache,
        coast=coast,
        busy_tick=busy_tick,
    )
    async with _serving(Engine(pool, info.tokenizer, info.config, path), shutdown_timeout) as e:
        yield e


@asynccontextmanager
async def open_inprocess_engine(
    model: str | os.PathLike[str] | None = EngineConfig.model,
    *,
    max_batch: int = EngineConfig.max_batch,
    max_queue: int = EngineConfig.max_queue,
    attention_scale: str | None = EngineConfig.attention_scale,
    weights: str = EngineConfig.weights,
    prefix_cache: bool = EngineConfig.prefix_cache,
) -> AsyncIterator[Engine]:
    """Load the model into this process and yield an Engine over it: no worker processes.

    The same `Engine`, `Generation` and token-sink interface as `open_engine`, with the same
    validation, admission (`max_batch` running, `max_queue` waiting, then OverloadedError),
    cancel and drain rules, on one `ContinuousBatcher` that a Trio task steps in a worker
    thread (`tinyllm_trio.backend.InProcessBackend`), so the event loop stays free while it
    computes. For embedding in an application that wants one process, or one core: there is
    no supervision (a crash in the model is this process's) and no second core's worth of
    decoding. Leaving the block ends every request and stops the task. Raises CheckpointError
    for a checkpoint that cannot load.
    """
    from tinyllm_trio.backend import InProcessBackend
    from tinyllm_trio.model.batching import ContinuousBatcher
    from tinyllm_trio.model.checkpoint import load_model

    EngineConfig(
        max_batch=max_batch, max_queue=max_queue, attention_scale=attention_scale, weights=weights
    )
    loaded = await trio.to_thread.run_sync(
        functools.partial(
            load_model, model, attention_scale=attention_scale, weights_format=weights
        )
    )
    batcher = ContinuousBatcher(
        loaded.transformer, loaded.tokenizer, max_batch, prefix_cache=prefix_cache
    )
    backend = InProcessBackend(
        batcher, max_batch=max_batch, max_queue=max_queue, prefix_cache=prefix_cache
    )
    path = None if loaded.path is None else os.fspath(loaded.path)
    engine = Engine(backend, loaded.tokenizer, loaded.transformer.config, path)
    async with _serving(engine, EngineConfig.shutdown_timeout) as e:
        yield e


@asynccontextmanager
async def _serving(engine: Engine, shutdown_timeout: float) -> AsyncIterator[Engine]:
    """Run the engine's backend in a nursery of its own (`nursery.start`: the body runs once
    it serves) and stop it in order however the body ends; the caller sees the body's own
    exception, not an exception group around it."""
    from tinyllm_trio.ipc.pool import unwrap_single_exception

    backend = engine._backend
    with unwrap_single_exception():
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run)
            try:
                yield engine
            finally:
                with trio.CancelScope(shield=True):
                    await backend.aclose(shutdown_timeout)

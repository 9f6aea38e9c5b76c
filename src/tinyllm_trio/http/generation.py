"""One `engine.generate` call as the HTTP endpoints see it.

The three generation endpoints (/process, /v1/completions, /v1/chat/completions) differ only in
how they frame events, so the rest lives here once:

- **Errors before the response starts become HTTP statuses.** The engine validates before its
  first event (invalid parameters, prompt too long, queue full), so we wait for the first event
  before sending the response head: a bad request is a 400 with `param`, overload a 429 with
  `Retry-After`, a prompt over the context a 400 `context_length_exceeded`. Errors after the head
  went out are written in the stream by the endpoint's `StreamFormat.error`.
- **The client leaving cancels the generation**, queued or running: a read stays pending on the
  socket while we wait (`Exchange.watch_for_disconnect`); EOF cancels the scope around the
  iteration, and leaving the iteration closes the engine's iterator, which cancels the request
  in its worker within one decode step.
- **Shutdown cancels through a scope the server owns** (`AppState.generation_scope`): after the
  grace period the server cancels every generation still running, and each one ends its stream
  with a final error event instead of a truncated body.
- **While queued, SSE streams are kept alive**: if the first event takes longer than
  `sse_ping_interval`, the head is sent and `: ping` comments follow (which SSE clients,
  the openai SDK included, ignore), so idle-timeout proxies and clients do not give up.
- **Prompts are bounded before they are tokenized.** A prompt field longer than
  `PROMPT_CHARS_PER_TOKEN` characters per token of the context is a 400 at once (`param`,
  `code: prompt_too_long`); encoding stops as soon as the ids pass the context; a prompt
  longer than `INLINE_ENCODE_CHARS` is encoded in a thread, one at a time, so the event loop
  keeps serving everyone else meanwhile.
- **Special text is parsed only where the client chose it**: `parse_special` (llama-server's
  name) decides whether `<|endoftext|>` in the text is the EOS token or ordinary characters;
  each endpoint passes its own default.
- **Each token is written as it arrives**: one `send_chunk` (one HTTP chunk, one `send_all`)
  per event, no buffering, no per-token allocation beyond the encoded bytes.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import trio

from tinyllm_trio.errors import InvalidParameterError, kind_of
from tinyllm_trio.http.connection import ClientGone, Exchange, HTTPError
from tinyllm_trio.http.errors import engine_error, error_event, http_error
from tinyllm_trio.model.sampling import SamplingParams
from tinyllm_trio.protocol import DoneEvent, ErrorEvent, ErrorKind, Event, TokenEvent

if TYPE_CHECKING:
    from tinyllm_trio.engine import Choices, Generation
    from tinyllm_trio.http.app import AppState

# Request fields every generation endpoint passes to SamplingParams as given (absent or null:
# the default); `temperature` and `max_tokens` have endpoint-specific defaults.
SAMPLING_FIELDS = (
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "ignore_eos",
    "no_repeat_ngram_size",
    "logit_bias",
    "min_tokens",
    "stop_token_ids",
    "cache_prompt",
)

#: Characters a prompt field may have, per token of the model's context. English text runs at
#: 4-6 characters a token on the packaged vocabulary, so 32 leaves room for long words and
#: generous whitespace, while text that could never fit is refused before any tokenizing.
PROMPT_CHARS_PER_TOKEN = 32
#: Prompts up to this many characters are tokenized on the event loop, longer ones in a thread:
#: handing a call to a thread costs several times what a short prompt's encoding does (the
#: README's Limits section has the timeit figures).
INLINE_ENCODE_CHARS = 2048


def check_prompt_size(app: AppState, text: str, param: str) -> None:
    """400 for a prompt field longer than the context could ever hold (see
    PROMPT_CHARS_PER_TOKEN), before any tokenizing."""
    context = app.max_context
    cap = context * PROMPT_CHARS_PER_TOKEN
    if len(text) > cap:
        raise HTTPError(
            400,
            f"'{param}' has {len(text)} characters; at most {cap} are accepted "
            f"({PROMPT_CHARS_PER_TOKEN} per token of this model's {context}-token context)",
            param=param,
            code="prompt_too_long",
        )


async def encode_text(app: AppState, text: str, encode: Callable[[], Any]) -> Any:
    """`encode()` (which tokenizes `text`): inline for a short text, else in a thread under
    `app.encode_limiter`, so a long one never holds the event loop."""
    if len(text) <= INLINE_ENCODE_CHARS:
        return encode()
    return await trio.to_thread.run_sync(encode, limiter=app.encode_limiter)


def parse_special_flag(body: dict[str, Any], default: bool) -> bool:
    """The request's `parse_special` (a boolean; absent or null: the endpoint's default)."""
    value = body.get("parse_special")
    if value is None:
        return default
    if not isinstance(value, bool):
        raise HTTPError(400, "'parse_special' must be a boolean", param="parse_special")
    return value


def sampling_params(prompt_param: str = "prompt", **values: Any) -> SamplingParams:
    """`SamplingParams` from request fields (None = default); invalid values are a 400."""
    given = {k: v for k, v in values.items() if v is not None}
    try:
        return SamplingParams(**given)
    except InvalidParameterError as exc:
        raise HTTPError(400, str(exc), param=exc.param, code="invalid_parameter") from None
    except (TypeError, ValueError) as exc:
        raise HTTPError(400, f"invalid sampling parameters: {exc}") from None


class StreamFormat(Protocol):
    """How one endpoint frames a generation as HTTP chunks."""

    content_type: bytes
    headers: Sequence[tuple[bytes, bytes]]
    ping: bytes | None  # a keep-alive chunk the client ignores, or None if the format has none

    def opening(self) -> bytes | None: ...
    def token(self, event: TokenEvent) -> bytes | None: ...
    def closing(self, done: DoneEvent) -> list[bytes]: ...
    def error(self, error: HTTPError) -> list[bytes]: ...


@dataclass
class Collected:
    """A whole generation, for the non-streaming responses."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict[str, Any]] | None = field(default=None)
    text_offsets: list[int] = field(default_factory=list)  # where each logprobs token starts
    cached_tokens: int = 0
    prompt_logprobs: list[dict[str, Any]] | None = None  # `prompt_logprobs`: the prompt's


class HTTPGeneration:
    """An open `engine.generate` iterator with its timing metrics; use `async with`."""

    __slots__ = (
        "_app",
        "_arrival",
        "_choice_of",
        "_closed",
        "_done",
        "_iter",
        "_last_token_at",
        "_metrics",
        "_next",
        "_prompt",
        "_tokens",
        "exchange",
        "n",
        "open_choices",
        "params",
        "parse_special",
        "prompt_param",
    )

    def __init__(
        self,
        app: AppState,
        exchange: Exchange,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        prompt_param: str = "prompt",
        parse_special: bool = True,
        arrival: float | None = None,
        n: int = 1,
    ) -> None:
        self._app = app
        self.parse_special = parse_special
        self._metrics = app.metrics
        self.exchange = exchange
        self._prompt = prompt
        self.params = params
        self.prompt_param = prompt_param
        self._arrival = exchange.arrival if arrival is None else arrival
        self._iter: Generation | Choices | None = None
        self._choice_of: Callable[[int], int] | None = None  # Choices.index, with n > 1
        self._next: Callable[[], Awaitable[Event]] | None = None  # its __anext__, bound once
        self._last_token_at: float | None = None
        self._tokens = 0
        self._done: str | None = None
        self._closed = False
        self.n = n  # choices (OpenAI's `n`): n > 1 runs `engine.generate_choices`
        self.open_choices = n  # choices without their final event yet

    async def __aenter__(self) -> HTTPGeneration:
        self._metrics.generations_active.inc()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._closed:
            return
        self._closed = True
        m = self._metrics
        m.generations_active.dec()
        if self._done is None:
            self._finish_metrics("cancelled" if exc_info[0] is not None else "error")
        it, self._iter, self._next = self._iter, None, None
        if it is not None:
            it.set_token_sink(None)  # nothing more is written from the engine's side
            await it.aclose()  # cancels the request in its worker

    def _finish_metrics(self, reason: str) -> None:
        self._done = reason
        m = self._metrics
        m.request_success.labels(reason).inc()
        if self._tokens:
            m.generation_tokens.inc(self._tokens)

    async def first(self, fmt: StreamFormat | None = None) -> TokenEvent | DoneEvent | ErrorEvent:
        """The first event. Raises `HTTPError` for anything that went wrong before it.

        With a streaming `fmt` that has a ping, the response head and `: ping` comments are sent
        while the wait lasts longer than `sse_ping_interval`; check `exchange.response_started`
        before answering an error with a status.
        """
        if fmt is None or fmt.ping is None:
            return await self._first()
        failure: Exception | None = None
        event: Any = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._ping_while_waiting, fmt)
            try:
                event = await self._first()
            except Exception as exc:  # re-raised below, outside the nursery
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return event

    async def _first(self) -> TokenEvent | DoneEvent | ErrorEvent:
        # During the drain a request on an open connection is served (with Connection: close);
        # only once the grace period ran out is new work refused.
        if self._app.grace_over:
            self._done = "rejected"
            raise http_error(ErrorKind.SHUTTING_DOWN, "the server is shutting down")
        try:
            prompt = await self._prepared_prompt()
            engine = self._app.require_engine()
            it: Generation | Choices
            if self.n == 1:
                it = engine.generate(prompt, self.params)
            else:
                it = engine.generate_choices(prompt, self.params, self.n)
                self._choice_of = it.index
            self._iter = it
            self._next = it.__aiter__().__anext__
            event = await self._next()
        except StopAsyncIteration:
            raise HTTPError(500, "the engine ended the request without an event") from None
        except HTTPError:
            raise
        except Exception as exc:
            self._done = "rejected"  # counted by its HTTP status, not as a generation
            raise engine_error(exc, self.prompt_param) from exc
        if type(event) is ErrorEvent:
            self._finish_metrics("error")
            raise error_event(event, self.prompt_param)
        self._observe(event)
        return event

    async def _prepared_prompt(self) -> str | list[int]:
        """What to hand `engine.generate`: ids a thread encoded for a long text, or for one
        whose special text is not parsed (the engine's own encoding parses it); else the
        prompt as given, for the engine to encode (cheap for a short text)."""
        prompt = self._prompt
        if not isinstance(prompt, str):
            return prompt
        check_prompt_size(self._app, prompt, self.prompt_param)
        if self.parse_special and len(prompt) <= INLINE_ENCODE_CHARS:
            return prompt
        engine = self._app.require_engine()
        encode = partial(engine.encode_prompt, prompt, parse_special=self.parse_special)
        return await encode_text(self._app, prompt, encode)

    async def _ping_while_waiting(self, fmt: StreamFormat) -> None:
        interval = self._app.config.sse_ping_interval
        ex = self.exchange
        try:
            while True:
                await trio.sleep(interval)
                # Shielded: the main task cancels us when the first event arrives, and a
                # write cut in half would tear the stream. Each write is bounded by
                # send_timeout inside send_bytes.
                with trio.CancelScope(shield=True):
                    if not ex.response_started:
                        await ex.start_stream(200, fmt.content_type, fmt.headers)
                    await ex.send_chunk(fmt.ping)
        except ClientGone:
            return  # the main task's next write (or the disconnect watcher) notices

    async def next(self) -> TokenEvent | DoneEvent | ErrorEvent:
        """The next event; engine exceptions mid-stream come back as an ErrorEvent."""
        try:
            event = await self._next()
        except StopAsyncIteration:
            event = ErrorEvent(-1, "the engine ended the request without a final event")
        except Exception as exc:
            event = ErrorEvent(-1, engine_error(exc, self.prompt_param).message, kind_of(exc))
        self._observe(event)
        return event

    def write_tokens_directly(
        self, format_token: Callable[[TokenEvent], bytes | None], try_send: Callable[[bytes], bool]
    ) -> bool:
        """From now on, format and write each token where the engine delivers it: one
        `write(2)` and no task switch per token (`Generation.set_token_sink`). The first write
        the socket does not take whole ends that: its tail and every later event go through
        `next` and the waiting writes again, until the caller installs a sink again (the
        streaming loop does once such a waiting write has gone out). Events that were already
        queued still come through `next` first. False if the request is over, or has several
        choices (`Choices` offers no sink)."""
        it = self._iter
        if it is None:
            return False
        set_sink = it.set_token_sink
        observe = self._observe

        def sink(event: TokenEvent) -> None:
            data = format_token(event)
            if data is not None and not try_send(data):
                set_sink(None)
            observe(event)

        return set_sink(sink)

    def index(self, event: TokenEvent | DoneEvent) -> int:
        """The choice (0..n-1) of an event."""
        choice_of = self._choice_of
        return 0 if choice_of is None else choice_of(event.request_id)

    def _observe(self, event: TokenEvent | DoneEvent | ErrorEvent) -> None:
        now = time.perf_counter()
        m = self._metrics
        kind = type(event)
        if kind is TokenEvent:
            last = self._last_token_at
            if last is None:
                m.observe_ttft(now - self._arrival)
            else:
                m.observe_itl(now - last)
            self._last_token_at = now
            self._tokens += len(event.token_ids)
        elif kind is DoneEvent:
            self.open_choices -= 1
            if self.open_choices:  # a choice ended; the request goes on
                return
            m.e2e.observe(now - self._arrival)
            queue_ms = event.timings.get("queue_ms") if event.timings else None
            if queue_ms is not None:
                m.queue_time.observe(queue_ms / 1000.0)
            m.prompt_tokens.inc(event.prompt_tokens)
            self._tokens = max(self._tokens, event.completion_tokens)
            self._finish_metrics(event.finish_reason)
        else:
            self._finish_metrics("error")


async def watching_disconnect(exchange: Exchange, body: Callable[[], Any]) -> Any:
    """Run `await body()` while watching the socket; the client leaving cancels it.

    Returns what `body` returned; raises `ClientGone` if the client left (the connection is
    then closed by its loop). Exceptions from `body` are re-raised as they are, not wrapped in
    an exception group.
    """
    failure: Exception | None = None
    result: Any = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(exchange.watch_for_disconnect, nursery.cancel_scope)
        try:
            result = await body()
        except Exception as exc:
            failure = exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if exchange.connection.peer_closed:
        raise ClientGone("the client closed the connection")
    return result


async def stream_response(app: AppState, generation: HTTPGeneration, fmt: StreamFormat) -> None:
    """Stream a generation with `fmt`: head, opening, one chunk per event, closing."""
    ex = generation.exchange

    async def body() -> None:
        async with generation:
            with app.generation_scope() as scope:
                await _stream_events(generation, fmt)
            if scope.cancelled_caught:
                await _end_with_error(ex, fmt, http_error(ErrorKind.SHUTTING_DOWN))

    await watching_disconnect(ex, body)


async def _stream_events(generation: HTTPGeneration, fmt: StreamFormat) -> None:
    ex = generation.exchange
    try:
        event = await generation.first(fmt)
    except HTTPError as err:
        if not ex.response_started:
            raise
        await _end_with_error(ex, fmt, err)
        return
    if not ex.response_started:
        await ex.start_stream(200, fmt.content_type, fmt.headers)
    opening = fmt.opening()
    if opening is not None:
        await ex.send_chunk(opening)
    send_chunk = ex.send_chunk
    token = fmt.token
    sinks = True  # False once the engine offers no token sink for this request
    while True:
        kind = type(event)
        if kind is TokenEvent:
            data = token(event)
            if data is not None:
                await send_chunk(data)
            # A token that comes through here means no sink is writing: none installed yet,
            # or the last one met a full socket and stepped aside. This write has just drained
            # the socket (it waited), so hand later tokens to a sink again.
            if sinks:
                sinks = generation.write_tokens_directly(token, ex.try_send_chunk)
        elif kind is DoneEvent:
            for data in fmt.closing(event):
                await send_chunk(data)
            if not generation.open_choices:
                await ex.end_stream()
                return
        else:
            await _end_with_error(ex, fmt, error_event(event, generation.prompt_param))
            return
        event = await generation.next()


async def _end_with_error(ex: Exchange, fmt: StreamFormat, err: HTTPError) -> None:
    """The error path once the head is out: an error event in the stream, then its end."""
    if not ex.response_started:
        await ex.respond_error(err)
        return
    for data in fmt.error(err):
        await ex.send_chunk(data)
    await ex.end_stream()


async def collect_response(app: AppState, generation: HTTPGeneration) -> list[Collected]:
    """Run a generation to its end (non-streaming): one `Collected` per choice, in order;
    errors raise `HTTPError`."""

    async def body() -> list[Collected]:
        async with generation:
            with app.generation_scope() as scope:
                return await _collect(generation)
            assert scope.cancelled_caught
            raise http_error(ErrorKind.SHUTTING_DOWN)

    return await watching_disconnect(generation.exchange, body)


async def _collect(generation: HTTPGeneration) -> list[Collected]:
    n = generation.n
    parts: list[list[str]] = [[] for _ in range(n)]
    sizes = [0] * n
    want_logprobs = generation.params.logprobs is not None
    logprobs: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    offsets: list[list[int]] = [[] for _ in range(n)]
    prompts: list[list[dict[str, Any]] | None] = [None] * n
    done: dict[int, Collected] = {}
    index = generation.index if n > 1 else None  # n = 1: no lookup per token
    event = await generation.first()
    while True:
        kind = type(event)
        if kind is TokenEvent:
            i = 0 if index is None else index(event)
            if event.logprobs and not event.token_ids:  # the prompt's (echo), before any token
                prompts[i] = event.logprobs
            elif want_logprobs and event.logprobs:
                logprobs[i].extend(event.logprobs)
                offsets[i].extend([sizes[i]] * len(event.logprobs))
            parts[i].append(event.text)
            sizes[i] += len(event.text)
        elif kind is DoneEvent:
            i = 0 if index is None else index(event)
            done[i] = Collected(
                "".join(parts[i]),
                event.finish_reason,
                event.prompt_tokens,
                event.completion_tokens,
                logprobs[i] if want_logprobs else None,
                offsets[i],
                event.cached_tokens,
                prompts[i],
            )
            if not generation.open_choices:
                return [done[i] for i in range(n)]
        else:
            raise error_event(event, generation.prompt_param)
        event = await generation.next()

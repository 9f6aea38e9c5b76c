"""A scripted `ContinuousBatcher` stand-in: the event source of the in-process backend in the
HTTP tests (`http_fixtures.FakeEngine`) and of the backend's own tests."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tinyllm_trio.model.sampling import SamplingParams
from tinyllm_trio.protocol import DoneEvent, ErrorEvent, Event, TokenEvent

TICK = 0.01  # the longest a scripted step sleeps: cancels and shutdown apply between steps


@dataclass(eq=False)
class _Scripted:
    request_id: int
    prompt_tokens: int
    params: SamplingParams
    due: float  # time.monotonic() of its next event
    made: int = 0
    cancelled: bool = False


@dataclass(eq=False)
class ScriptedBatcher:
    """A `ContinuousBatcher`-shaped event source with scripted output, for `InProcessBackend`.

    Each sequence yields `words` cyclically as token texts, one per `delay` seconds after
    `first_delay` (queue + prefill); `eos_after`: finish "stop" after that many tokens (no
    token event for EOS), unless `ignore_eos`; `fail_after`: an ErrorEvent after that many.
    Its steps run in the backend's thread, as a model's do, and sleep (at most `TICK`) until
    the next event is due. Counts sequences `running`, `finished` (final event reached) and
    `cancelled` (cancelled before it).
    """

    words: tuple[str, ...] = (" worried",)
    delay: float = 0.0
    first_delay: float = 0.0
    eos_after: int | None = None
    fail_after: int | None = None
    running: int = 0
    cancelled: int = 0
    finished: int = 0
    _seqs: dict[int, _Scripted] = field(default_factory=dict)

    @property
    def idle(self) -> bool:
        return not self._seqs

    def submit(self, request_id: int, prompt_ids: list[int], params: SamplingParams) -> None:
        due = time.monotonic() + self.first_delay
        self._seqs[request_id] = _Scripted(request_id, len(prompt_ids), params, due)
        self.running += 1

    def cancel(self, request_id: int) -> None:
        seq = self._seqs.get(request_id)
        if seq is not None:
            seq.cancelled = True

    def step(self) -> list[Event]:
        events: list[Event] = []
        now = time.monotonic()
        for seq in [s for s in self._seqs.values() if s.cancelled]:
            events.append(DoneEvent(seq.request_id, "cancelled", seq.prompt_tokens, seq.made))
            self._end(seq, finished=False)
        wait = min((s.due for s in self._seqs.values()), default=now) - now
        if wait > 0:
            time.sleep(min(wait, TICK))
            now = time.monotonic()
        for seq in [s for s in self._seqs.values() if s.due <= now]:
            events.extend(self._advance(seq, now))
        return events

    def _advance(self, seq: _Scripted, now: float) -> list[Event]:
        rid, n, params = seq.request_id, seq.made, seq.params
        if self.fail_after is not None and n >= self.fail_after:
            self._end(seq, finished=True)
            return [ErrorEvent(rid, "the worker died", "worker_died")]
        if self.eos_after is not None and n >= self.eos_after and not params.ignore_eos:
            self._end(seq, finished=True)
            return [DoneEvent(rid, "stop", seq.prompt_tokens, n, {"queue_ms": 1.0})]
        word = self.words[n % len(self.words)]
        seq.made = n = n + 1
        seq.due = now + self.delay
        last = n >= params.max_tokens
        logprobs = None
        if params.logprobs is not None:
            top = [
                {"id": 7 + i, "token": f"t{i}", "logprob": -0.5 - i} for i in range(params.logprobs)
            ]
            logprobs = [{"id": 7, "token": word, "logprob": -0.25, "top_logprobs": top}]
        token = TokenEvent(rid, [7], word, "length" if last else None, logprobs)
        if not last:
            return [token]
        self._end(seq, finished=True)
        return [token, DoneEvent(rid, "length", seq.prompt_tokens, n, {"queue_ms": 2.0})]

    def _end(self, seq: _Scripted, *, finished: bool) -> None:
        del self._seqs[seq.request_id]
        self.running -= 1
        if finished:
            self.finished += 1
        else:
            self.cancelled += 1

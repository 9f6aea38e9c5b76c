"""Continuous batching: many generations advancing together, joining and leaving between steps.

This is what a worker process runs, with no knowledge of IPC: requests are submitted and
cancelled by id, and each `step()` returns the events it produced. One step

1. drops cancelled sequences (their KV-cache slots are free again at once),
2. admits waiting requests while slots are free (prefill; the first token comes from the
   prefill logits, so time to first token is one prefill, not one prefill plus a step),
3. advances every active sequence by one token in a single batched decode call.

A long generation therefore never blocks a short one queued behind it: the newcomer joins the
batch at the next step. Plain greedy rows (no penalties) are picked with one batched argmax;
only rows that need a random draw or penalties pay for per-row work.

Stop strings are matched on text, across token boundaries: text that could still be the start
of a stop string is held back, and the stop string itself is never emitted (as in OpenAI's
API). Every generated token produces exactly one `TokenEvent` (its text may be empty while
held back), except EOS, which ends the sequence with `DoneEvent("stop")` and no text.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tinyllm_trio.errors import ContextLengthError, InvalidParameterError
from tinyllm_trio.model.prefix_cache import PrefixCache
from tinyllm_trio.model.sampling import (
    Sampler,
    SamplingParams,
    log_softmax,
    top_logprobs,
)
from tinyllm_trio.model.tokenizer import EOS, HybridTokenizer, StreamDecoder, TooManyTokensError
from tinyllm_trio.model.transformer import ModelConfig, Transformer
from tinyllm_trio.protocol import DoneEvent, ErrorEvent, Event, TokenEvent

__all__ = [  # the events live in tinyllm_trio.protocol; named here for older imports
    "MAX_BATCH",
    "ContinuousBatcher",
    "DoneEvent",
    "ErrorEvent",
    "Event",
    "StopMatcher",
    "TokenEvent",
    "encode_prompt",
]

# Prompt tokens prefilled together in one pass: enough to batch a burst of short prompts (the
# win), few enough that the pass's scratch arrays stay ~36 MB (~18 KB per token).
PREFILL_TOKENS_PER_PASS = 2048

# Sequences one decode step advances by default (`serve --max-batch`, `EngineConfig`): where a
# step's cost per token flattens on one core (`tinyllm-trio bench model` reads batch 32 and 64).
MAX_BATCH = 32


def encode_prompt(
    prompt: str | Sequence[int],
    tokenizer: HybridTokenizer,
    config: ModelConfig,
    *,
    parse_special: bool = True,
) -> list[int]:
    """The one rule for turning a prompt into the ids a sequence starts from.

    Text is encoded with BOS first (never EOS last), `<|endoftext|>` as EOS only with
    `parse_special`; a list of ids is taken as given. Applied by the Engine before a request is
    sent (so the HTTP layer can answer 400 at once) and by the batcher that runs it. Raises
    InvalidParameterError (param "prompt") for an empty prompt or an id outside the
    vocabulary, and ContextLengthError when no room is left for one token: for text, as soon as
    the encoding passes the context, so a huge prompt costs no more than one that just fits.
    """
    if isinstance(prompt, str):
        limit = config.max_context - 1
        try:
            ids = tokenizer.encode(prompt, max_tokens=limit, parse_special=parse_special)
        except TooManyTokensError:
            raise ContextLengthError(
                f"the prompt has more than {limit} tokens; this model's context is "
                f"{config.max_context} tokens and at least one must be left for the completion"
            ) from None
    else:
        ids = list(prompt)
        for i in ids:
            if not isinstance(i, int | np.integer) or isinstance(i, bool):
                bad = True
            else:
                bad = not 0 <= i < config.vocab_size
            if bad:
                raise InvalidParameterError(
                    "prompt",
                    f"token id {i!r} is outside the vocabulary: not an integer in "
                    f"[0, {config.vocab_size})",
                )
        ids = [int(i) for i in ids]
    if not ids:
        raise InvalidParameterError("prompt", "the prompt is empty")
    if len(ids) >= config.max_context:
        raise ContextLengthError(
            f"the prompt has {len(ids)} tokens; this model's context is {config.max_context} "
            "tokens and at least one must be left for the completion"
        )
    return ids


class StopMatcher:
    """Releases generated text, holding back what could still become a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._held = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was hit)."""
        if not self._stops:
            return delta, False
        text = self._held + delta
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            return text[: min(hits)], True
        keep = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), keep, -1):
                if text.endswith(stop[:n]):
                    keep = n
                    break
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The held-back text, released because the sequence ended without a stop string."""
        held, self._held = self._held, ""
        return held


@dataclass
class _Sequence:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    sampler: Sampler
    decoder: StreamDecoder
    stop: StopMatcher
    submitted: float
    admitted: float = 0.0
    prefilled: float = 0.0
    generated: int = 0
    next_token: int = -1
    cancelled: bool = False
    output_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0

    def done(self, reason: str) -> DoneEvent:
        now = time.perf_counter()
        return DoneEvent(
            self.request_id,
            reason,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=self.generated,
            timings={
                "queue_ms": 1000.0 * (self.admitted - self.submitted) if self.admitted else 0.0,
                "prefill_ms": 1000.0 * (self.prefilled - self.admitted) if self.admitted else 0.0,
                "decode_ms": 1000.0 * (now - self.prefilled) if self.prefilled else 0.0,
            },
            cached_tokens=self.cached_tokens,
        )


class ContinuousBatcher:
    """Up to `max_batch` sequences sharing one KV cache and one decode call per step.

    With `prefix_cache` (the default) the cache rows no active sequence uses keep the keys
    and values of finished sequences, and an admitted prompt copies its longest cached prefix
    instead of computing it (`model/prefix_cache.py`). Identical prompts admitted together
    are prefilled once and the others fork its row (a request's `n` choices), cache or not.
    """

    def __init__(
        self,
        transformer: Transformer,
        tokenizer: HybridTokenizer,
        max_batch: int = MAX_BATCH,
        *,
        prefix_cache: bool = True,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self._cache = transformer.new_cache(max_batch)
        self.prefix = PrefixCache(self._cache) if prefix_cache else None
        self._waiting: deque[_Sequence] = deque()
        self._active: dict[int, _Sequence] = {}
        self._finished_waiting: list[Event] = []

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def idle(self) -> bool:
        return not (self._active or self._waiting or self._finished_waiting)

    def submit(self, request_id: int, prompt: str | Sequence[int], params: SamplingParams) -> None:
        """Queue a request; it is admitted at the next step with a free slot.

        Raises ValueError for a duplicate id, an empty prompt or an id outside the vocabulary,
        and ContextLengthError when the prompt leaves no room for a single generated token.
        """
        if request_id in self._active or any(s.request_id == request_id for s in self._waiting):
            raise ValueError(f"request id {request_id} is already in use")
        ids = encode_prompt(prompt, self.tokenizer, self.transformer.config)
        params.check_vocab(self.transformer.config.vocab_size)
        sampler = Sampler(params, self.transformer.config.vocab_size, ids, eos_id=EOS)
        # The decoder reads the prompt first, so the completion's first delta carries the
        # spacing a continuation needs (" there", but "," with no space).
        decoder = self.tokenizer.stream_decoder(params.detokenize)
        for token in ids:
            decoder.push(token)
        self._waiting.append(
            _Sequence(
                request_id,
                ids,
                params,
                sampler,
                decoder,
                StopMatcher(params.stop),
                submitted=time.perf_counter(),
            )
        )

    def cancel(self, request_id: int) -> None:
        """Stop a request; it ends with DoneEvent("cancelled") at the next step."""
        seq = self._active.get(request_id)
        if seq is not None:
            seq.cancelled = True
            return
        for seq in self._waiting:
            if seq.request_id == request_id:
                self._waiting.remove(seq)
                self._finished_waiting.append(seq.done("cancelled"))
                return

    def step(self) -> list[Event]:
        """Drop cancelled sequences, admit waiting ones, advance all active ones by a token."""
        events, self._finished_waiting = self._finished_waiting, []
        for seq in [s for s in self._active.values() if s.cancelled]:
            self._finish(seq, "cancelled", events)
        while self._waiting and len(self._active) < self.max_batch:
            group = [self._waiting.popleft()]  # always one, however long its prompt
            tokens = len(group[0].prompt_ids)
            # a prompt already in the group costs no prefill (it forks that row), so a
            # request's n choices, submitted together, are admitted together
            prompts = {tuple(group[0].prompt_ids)}
            while self._waiting and len(self._active) + len(group) < self.max_batch:
                ids = self._waiting[0].prompt_ids
                key = tuple(ids)
                if key not in prompts:
                    if tokens + len(ids) > PREFILL_TOKENS_PER_PASS:
                        break
                    tokens += len(ids)
                    prompts.add(key)
                group.append(self._waiting.popleft())
            self._admit(group, events)
        if self._active:
            self._decode(events)
        return events

    def _admit(self, seqs: list[_Sequence], events: list[Event]) -> None:
        """Prefill `seqs` and take each one's first token. One that finishes at once
        (max_tokens 1, EOS) frees its slot for the next.

        Prompts with nothing cached go through `Transformer.prefill_many` in one pass (a
        burst of arrivals costs one pass over all their prompt tokens, not one pass each;
        `step` caps a pass at PREFILL_TOKENS_PER_PASS tokens so its scratch memory stays
        small); those with a cached prefix first claim a row holding it and compute only the
        rest (`extend_many`). A prompt identical to an earlier one of the group is not
        computed again: it forks that one's row afterwards (a request's `n` choices), and
        counts as a prompt entirely reused (`cached_tokens`, the cache's hits) when it uses
        the cache. A prompt that wants its own logprobs (`prompt_logprobs`, for `echo`) is
        prefilled whole, with every position's logits kept (a cached prefix has none)."""
        admitted = time.perf_counter()
        leaders: dict[tuple[tuple[int, ...], bool], _Sequence] = {}
        forks: list[tuple[_Sequence, _Sequence]] = []
        fresh: list[_Sequence] = []
        extended: list[_Sequence] = []
        scored: list[_Sequence] = []
        for seq in seqs:
            wants_prompt = seq.params.prompt_logprobs is not None
            key = (tuple(seq.prompt_ids), wants_prompt)
            if key in leaders:
                forks.append((seq, leaders[key]))
                continue
            leaders[key] = seq
            if wants_prompt:
                scored.append(seq)
                if self.prefix is not None and seq.params.cache_prompt:
                    self.prefix.record(len(seq.prompt_ids), 0)
                continue
            length = 0
            if self.prefix is not None and seq.params.cache_prompt:
                length = self.prefix.lookup(seq.prompt_ids)[1]
                if not length:
                    self.prefix.record(len(seq.prompt_ids), 0)
            (extended if length else fresh).append(seq)
        logits: dict[int, np.ndarray] = {}
        prompt_logprobs: dict[int, list[dict[str, Any]]] = {}
        try:
            for seq in extended:
                assert self.prefix is not None
                source, length = self.prefix.lookup(seq.prompt_ids)  # afresh: claims evict
                seq.cached_tokens = self._cache.claim(seq.request_id, source, length)
                self.prefix.record(len(seq.prompt_ids), seq.cached_tokens)
                self.prefix.sync()
            for group, extend in ((fresh, False), (extended, True)):
                if group:
                    prompts = [(s.request_id, s.prompt_ids) for s in group]
                    run = self.transformer.extend_many if extend else self.transformer.prefill_many
                    rows = run(self._cache, prompts)
                    logits.update((s.request_id, row) for s, row in zip(group, rows, strict=True))
            if scored:
                prompts = [(s.request_id, s.prompt_ids) for s in scored]
                every = self.transformer.prefill_many(self._cache, prompts, every_position=True)
                end = 0
                for seq in scored:
                    start, end = end, end + len(seq.prompt_ids)
                    logits[seq.request_id] = every[end - 1]
                    prompt_logprobs[seq.request_id] = self._prompt_logprobs(
                        seq, every[start : end - 1]
                    )
            for seq, leader in forks:
                self._cache.claim(seq.request_id, leader.request_id, len(seq.prompt_ids))
                logits[seq.request_id] = logits[leader.request_id]
                if leader.request_id in prompt_logprobs:
                    prompt_logprobs[seq.request_id] = prompt_logprobs[leader.request_id]
                if self.prefix is not None and seq.params.cache_prompt:
                    seq.cached_tokens = len(seq.prompt_ids)
                    self.prefix.record(len(seq.prompt_ids), seq.cached_tokens)
        except BaseException:
            for seq in seqs:
                self._cache.drop(seq.request_id)
            raise
        if self.prefix is not None:
            self.prefix.sync()  # rows taken may have evicted entries
            for seq in leaders.values():
                if seq.params.cache_prompt:
                    self.prefix.started(seq.request_id, seq.prompt_ids)
        prefilled = time.perf_counter()
        for seq in seqs:
            seq.admitted, seq.prefilled = admitted, prefilled
            self._active[seq.request_id] = seq
            row = logits[seq.request_id]
            if seq.request_id in prompt_logprobs:  # before the first token, as echo shows it
                events.append(
                    TokenEvent(seq.request_id, [], "", None, prompt_logprobs[seq.request_id])
                )
            self._accept(seq, seq.sampler.choose(row), row, events)

    def _prompt_logprobs(self, seq: _Sequence, rows: np.ndarray) -> list[dict[str, Any]]:
        """The prompt tokens' logprobs entries from the logits of every position but the last
        (`rows[j]` predicts token j + 1): the model's own distribution, as for generated
        tokens (no bias, penalty or temperature). The first token has nothing before it to be
        predicted from, so its logprob is None (OpenAI's and vLLM's null)."""
        ids = seq.prompt_ids
        text = self.tokenizer.token_text
        k = seq.params.prompt_logprobs or 0
        out: list[dict[str, Any]] = [
            {"id": ids[0], "token": text(ids[0]), "logprob": None, "top_logprobs": []}
        ]
        logp = log_softmax(rows)
        out.extend(top_logprobs(logp[j], ids[j + 1], k, text) for j in range(len(ids) - 1))
        return out

    def prefix_stats(self) -> dict[str, int] | None:
        """The prefix cache's counters (queries and hits in prompt tokens, entries parked and
        the tokens they hold), or None when it is off."""
        return None if self.prefix is None else self.prefix.stats()

    def _decode(self, events: list[Event]) -> None:
        # in cache-row order: decode_step's fast path (no permutation of tokens and logits)
        seqs = [self._active[seq_id] for seq_id in self._cache.seq_ids]
        logits = self.transformer.decode_step(
            self._cache, [s.request_id for s in seqs], [s.next_token for s in seqs]
        )
        greedy_rows = [i for i, s in enumerate(seqs) if s.sampler.argmax_greedy]
        argmaxes: list[int | None] = [None] * len(seqs)
        if len(greedy_rows) == len(seqs):  # the usual case: no B x V gather first
            argmaxes = logits.argmax(axis=1).tolist()
        elif greedy_rows:
            picks = logits[greedy_rows].argmax(axis=1).tolist()
            for i, token in zip(greedy_rows, picks, strict=True):
                argmaxes[i] = token
        for seq, row, argmax in zip(seqs, logits, argmaxes, strict=True):
            self._accept(seq, seq.sampler.choose(row, argmax), row, events)

    def _accept(self, seq: _Sequence, token: int, row: np.ndarray, events: list[Event]) -> None:
        """Record a sampled token, emit its event, and end the sequence if it is finished."""
        seq.generated += 1
        seq.output_ids.append(token)
        seq.sampler.observe(token)
        if (token == EOS and not seq.params.ignore_eos) or token in seq.params.stop_token_ids:
            tail = seq.stop.flush()
            if tail:
                events.append(TokenEvent(seq.request_id, [], tail))
            self._finish(seq, "stop", events)
            return
        logprobs = None
        if seq.params.logprobs is not None:
            logprobs = [
                top_logprobs(
                    log_softmax(row), token, seq.params.logprobs, self.tokenizer.token_text
                )
            ]
        text, stopped = seq.stop.feed(seq.decoder.push(token))
        reason = None
        if stopped:
            reason = "stop"
        elif seq.generated >= seq.params.max_tokens or (
            len(seq.prompt_ids) + seq.generated >= self.transformer.config.max_context
        ):
            reason = "length"
            text += seq.stop.flush()
        events.append(TokenEvent(seq.request_id, [token], text, reason, logprobs))
        if reason is not None:
            self._finish(seq, reason, events)
        else:
            seq.next_token = token

    def _finish(self, seq: _Sequence, reason: str, events: list[Event]) -> None:
        self._active.pop(seq.request_id, None)
        if self.prefix is not None and seq.params.cache_prompt:
            # the keys and values held: the prompt and every token fed back (not the last)
            held = self._cache.length(seq.request_id)
            self.prefix.finished(seq.request_id, (seq.prompt_ids + seq.output_ids)[:held])
        else:
            self._cache.drop(seq.request_id)
        events.append(seq.done(reason))

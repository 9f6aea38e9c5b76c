"""Sampling: turning a row of logits into the next token.

`SamplingParams` is the one description of how to sample, shared by every layer: the HTTP layer
builds it from a request, the IPC layer ships it to a worker as JSON, the worker's batcher hands
it to a `Sampler`. Validation happens once, in `SamplingParams.__post_init__`, and raises
`InvalidParameterError` naming the offending parameter so the HTTP layer can answer 400 with
`param` set, the way OpenAI-compatible servers do.

The order of the logits processors follows llama.cpp and vLLM: penalties on the raw logits,
then temperature, then the truncation filters (top-k, top-p, min-p), then a draw from the
remaining distribution. Temperature 0 is greedy and skips the filters entirely.

Log-probabilities are those of the model's raw distribution (before penalties and temperature),
which is what vLLM reports by default and what makes them comparable across sampling settings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tinyllm_trio.errors import InvalidParameterError
from tinyllm_trio.model.tokenizer import DETOKENIZE_MODES

MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 256
MAX_TOP_LOGPROBS = 20
MAX_NO_REPEAT_NGRAM = 32
MAX_LOGIT_BIAS = 300  # entries, as OpenAI caps it
MAX_STOP_TOKEN_IDS = 64


def _valid_unicode(text: str) -> bool:
    """False for a str holding a lone surrogate (JSON's "\\ud800" makes one): no generated
    text can contain it, and it has no UTF-8 form."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check(condition: bool, param: str, message: str) -> None:
    if not condition:
        raise InvalidParameterError(param, message)


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """A finite int or float; not a bool, and not an int too large for any float (JSON allows
    any number of digits, and math.isfinite would raise OverflowError on it)."""
    if not isinstance(value, int | float | np.number) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. Invalid values raise `InvalidParameterError`."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    ignore_eos: bool = False
    logprobs: int | None = None
    # Ban any token that would complete an n-gram already in prompt + output (Hugging Face's
    # `no_repeat_ngram_size`); 0 is off. It breaks the greedy loops a small model falls into.
    no_repeat_ngram_size: int = 0
    # How token ids become text: "plain" (the original's lowercase) or "text" (see
    # StreamDecoder); a detokenization option in the sampling params, as vLLM keeps its own.
    detokenize: str = "plain"
    # token id -> bias added to the raw logits before sampling (-100 bans the token); given as
    # a mapping (JSON object keys may be strings of digits), kept as sorted (id, bias) pairs
    logit_bias: tuple[tuple[int, float], ...] = field(default=())
    min_tokens: int = 0  # EOS and stop_token_ids are banned until this many tokens exist
    stop_token_ids: tuple[int, ...] = field(default=())  # generating one ends with "stop"
    cache_prompt: bool = True  # False: this request neither reuses nor leaves a cached prefix
    # vLLM's name: also report the prompt tokens' log-probabilities (with this many
    # alternatives each), computed from the prefill's logits; what `echo` with `logprobs` needs
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        _check(_is_int(self.max_tokens), "max_tokens", "max_tokens must be an integer")
        _check(self.max_tokens >= 1, "max_tokens", "max_tokens must be at least 1")
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
        ):
            _check(_is_number(getattr(self, name)), name, f"{name} must be a finite number")
        _check(0.0 <= self.temperature <= 100.0, "temperature", "temperature must be in [0, 100]")
        _check(
            _is_int(self.top_k) and self.top_k >= 0,
            "top_k",
            "top_k must be an integer >= 0 (0 disables it)",
        )
        _check(0.0 < self.top_p <= 1.0, "top_p", "top_p must be in (0, 1]")
        _check(0.0 <= self.min_p <= 1.0, "min_p", "min_p must be in [0, 1]")
        _check(
            0.0 < self.repetition_penalty <= 10.0,
            "repetition_penalty",
            "repetition_penalty must be in (0, 10]",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            _check(-2.0 <= getattr(self, name) <= 2.0, name, f"{name} must be in [-2, 2]")
        _check(self.seed is None or _is_int(self.seed), "seed", "seed must be an integer or null")
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        _check(
            isinstance(stop, Sequence) and all(isinstance(s, str) for s in stop),
            "stop",
            "stop must be a string or a list of strings",
        )
        stop = tuple(s for s in stop)
        _check(
            len(stop) <= MAX_STOP_SEQUENCES,
            "stop",
            f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed",
        )
        _check(all(stop), "stop", "stop sequences must not be empty")
        _check(
            all(len(s) <= MAX_STOP_LENGTH for s in stop),
            "stop",
            f"a stop sequence may be at most {MAX_STOP_LENGTH} characters",
        )
        _check(
            all(_valid_unicode(s) for s in stop),
            "stop",
            "a stop sequence must be valid Unicode (it holds a lone surrogate such as \\ud800)",
        )
        object.__setattr__(self, "stop", stop)
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", "ignore_eos must be a boolean")
        _check(
            self.logprobs is None
            or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS),
            "logprobs",
            f"logprobs must be null or an integer in [0, {MAX_TOP_LOGPROBS}]",
        )
        _check(
            _is_int(self.no_repeat_ngram_size)
            and 0 <= self.no_repeat_ngram_size <= MAX_NO_REPEAT_NGRAM,
            "no_repeat_ngram_size",
            f"no_repeat_ngram_size must be an integer in [0, {MAX_NO_REPEAT_NGRAM}] (0 is off)",
        )
        _check(
            self.detokenize in DETOKENIZE_MODES,
            "detokenize",
            f"detokenize must be one of {', '.join(DETOKENIZE_MODES)}",
        )
        object.__setattr__(self, "logit_bias", _check_logit_bias(self.logit_bias))
        _check(
            _is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
            "min_tokens",
            "min_tokens must be an integer in [0, max_tokens]",
        )
        ids = self.stop_token_ids
        _check(
            isinstance(ids, Sequence)
            and not isinstance(ids, str)
            and all(_is_int(i) and i >= 0 for i in ids),
            "stop_token_ids",
            "stop_token_ids must be a list of token ids (integers >= 0)",
        )
        _check(
            len(ids) <= MAX_STOP_TOKEN_IDS,
            "stop_token_ids",
            f"at most {MAX_STOP_TOKEN_IDS} stop token ids are allowed",
        )
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in ids))
        _check(
            isinstance(self.cache_prompt, bool), "cache_prompt", "cache_prompt must be a boolean"
        )
        _check(
            self.prompt_logprobs is None
            or (_is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS),
            "prompt_logprobs",
            f"prompt_logprobs must be null or an integer in [0, {MAX_TOP_LOGPROBS}]",
        )

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids named by the parameters must exist in the model's vocabulary."""
        for param, ids in (
            ("logit_bias", [i for i, _ in self.logit_bias]),
            ("stop_token_ids", self.stop_token_ids),
        ):
            bad = [i for i in ids if i >= vocab_size]
            _check(
                not bad,
                param,
                f"{param}: token id {bad[0] if bad else 0} is outside the vocabulary "
                f"[0, {vocab_size})",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (for the IPC submit message). Shallow: every field is a scalar
        but the three below (`dataclasses.asdict` deep-copies each value, a cost per request)."""
        d = {name: getattr(self, name) for name in self.__dataclass_fields__}
        d["stop"] = list(self.stop)
        d["logit_bias"] = {str(i): b for i, b in self.logit_bias}
        d["stop_token_ids"] = list(self.stop_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SamplingParams:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "stop" in known and isinstance(known["stop"], list):
            known["stop"] = tuple(known["stop"])
        return cls(**known)


def _check_logit_bias(bias: object) -> tuple[tuple[int, float], ...]:
    """Sorted (token id, bias) pairs from a mapping (or pairs); keys may be digit strings."""
    message = "logit_bias must map token ids to numbers in [-100, 100]"
    if isinstance(bias, Mapping):
        items = list(bias.items())
    elif isinstance(bias, Sequence) and not isinstance(bias, str):
        _check(all(isinstance(p, Sequence) and len(p) == 2 for p in bias), "logit_bias", message)
        items = [tuple(p) for p in bias]
    else:
        raise InvalidParameterError("logit_bias", message)
    _check(
        len(items) <= MAX_LOGIT_BIAS,
        "logit_bias",
        f"logit_bias may name at most {MAX_LOGIT_BIAS} tokens",
    )
    out: dict[int, float] = {}
    for key, value in items:
        if isinstance(key, str) and key.isascii() and key.isdigit():
            key = int(key)
        _check(_is_int(key) and key >= 0, "logit_bias", f"logit_bias key {key!r} is not a token id")
        _check(_is_number(value) and -100 <= value <= 100, "logit_bias", message)
        out[int(key)] = float(value)
    return tuple(sorted(out.items()))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis, in float64 for accurate logprobs."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


class Sampler:
    """The per-sequence sampling state: its random generator and its token counts.

    Penalties need to know which tokens were seen: the repetition penalty looks at the prompt
    and the output (as vLLM does), presence and frequency penalties only at the output (as
    OpenAI defines them).
    """

    def __init__(
        self,
        params: SamplingParams,
        vocab_size: int,
        prompt_ids: Sequence[int] = (),
        *,
        eos_id: int | None = None,
    ) -> None:
        self.params = params
        seed = None if params.seed is None else int(params.seed) % 2**64
        self._rng = np.random.default_rng(seed)
        self._banned = eos_id if params.ignore_eos else None
        self._bias: tuple[np.ndarray, np.ndarray] | None = None
        if params.logit_bias:
            ids, values = zip(*params.logit_bias, strict=True)
            bias = np.asarray(values, dtype=np.float64)
            bias[bias <= -100.0] = -np.inf  # -100 bans, as OpenAI documents it
            self._bias = (np.asarray(ids, dtype=np.int64), bias)
        # banned until min_tokens tokens are out: EOS (unless ignored anyway) and stop ids
        early = [*params.stop_token_ids, *([] if eos_id is None else [eos_id])]
        self._early_ban = np.asarray(early, dtype=np.int64) if params.min_tokens else None
        self._generated = 0
        self._output_counts: np.ndarray | None = None
        self._seen: np.ndarray | None = None
        if params.penalised:
            self._output_counts = np.zeros(vocab_size, dtype=np.float32)
            self._seen = np.zeros(vocab_size, dtype=bool)
            self._seen[np.asarray(prompt_ids, dtype=np.int64)] = True
        self._ngrams: NgramBan | None = None
        if params.no_repeat_ngram_size:
            self._ngrams = NgramBan(params.no_repeat_ngram_size, prompt_ids)

    @property
    def argmax_greedy(self) -> bool:
        """Greedy with nothing that changes a logit's value, at most bans (`ignore_eos`,
        `min_tokens`, the n-gram ban): the raw row's argmax is the choice unless it is banned,
        so a batch takes one argmax over all its rows and `choose` checks each."""
        return self.params.greedy and not self.params.penalised and self._bias is None

    def choose(self, logits: np.ndarray, argmax: int | None = None) -> int:
        """The next token from one row of raw logits, as `sample` picks it; `argmax` is the
        row's argmax when the caller took it already for an `argmax_greedy` sampler (the
        batch takes one for all such rows), so it is not asked again per row.

        For an `argmax_greedy` sampler the argmax is the answer when no ban covers it: the
        banned ids would be -inf, and an allowed first maximum stays the first maximum.
        Otherwise (or when it is banned) `sample` does the full work on a copy of the row.
        """
        if argmax is None and self.argmax_greedy:
            argmax = int(logits.argmax())
        if argmax is not None and self._allows(argmax):
            return argmax
        return self.sample(logits)

    def _allows(self, token_id: int) -> bool:
        if token_id == self._banned:
            return False
        if self._early and bool((self._early_ban == token_id).any()):
            return False
        return self._ngrams is None or token_id not in self._ngrams.banned()

    @property
    def _early(self) -> bool:
        return self._early_ban is not None and self._generated < self.params.min_tokens

    def observe(self, token_id: int) -> None:
        """Record a generated token (for the penalties, the n-gram ban and min_tokens)."""
        self._generated += 1
        if self._output_counts is not None:
            self._output_counts[token_id] += 1.0
            self._seen[token_id] = True
        if self._ngrams is not None:
            self._ngrams.append(token_id)

    def sample(self, logits: np.ndarray) -> int:
        """Pick the next token from one row of raw logits (float32, length vocab)."""
        p = self.params
        x = logits.astype(np.float64)
        if self._banned is not None:
            x[self._banned] = -np.inf
        if self._bias is not None:
            x[self._bias[0]] += self._bias[1]
        if self._early:
            x[self._early_ban] = -np.inf
        if self._ngrams is not None:
            banned = self._ngrams.banned()
            if banned and len(banned) < x.size:  # never ban every token
                x[list(banned)] = -np.inf
        if self._output_counts is not None:
            if p.repetition_penalty != 1.0:
                seen = self._seen
                x[seen] = np.where(
                    x[seen] > 0, x[seen] / p.repetition_penalty, x[seen] * p.repetition_penalty
                )
            x -= p.frequency_penalty * self._output_counts
            x -= p.presence_penalty * (self._output_counts > 0)
        if p.greedy:
            return int(np.argmax(x))
        x /= p.temperature
        if 0 < p.top_k < x.size:
            kth = np.partition(x, -p.top_k)[-p.top_k]
            x[x < kth] = -np.inf
        x -= x.max()
        probs = np.exp(x)
        probs /= probs.sum()
        if p.min_p > 0.0:
            probs[probs < p.min_p * probs.max()] = 0.0
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            cut = int(np.searchsorted(cumulative, p.top_p * cumulative[-1])) + 1
            probs[order[cut:]] = 0.0
        cumulative = np.cumsum(probs)
        draw = self._rng.random() * cumulative[-1]
        return int(min(np.searchsorted(cumulative, draw, side="right"), probs.size - 1))


class NgramBan:
    """The tokens that would repeat an n-gram of the sequence so far, kept incrementally.

    Each (n-1)-token context maps to the tokens seen after it, so a step costs one tuple and
    one dict lookup, not a scan of the sequence.
    """

    def __init__(self, n: int, ids: Sequence[int] = ()) -> None:
        self._n = n
        self._ids: list[int] = []
        self._next: dict[tuple[int, ...], set[int]] = {}
        for token in ids:
            self.append(int(token))

    def append(self, token: int) -> None:
        self._ids.append(token)
        if len(self._ids) >= self._n:
            context = tuple(self._ids[len(self._ids) - self._n : -1])
            self._next.setdefault(context, set()).add(token)

    def banned(self) -> set[int]:
        """Tokens that, appended now, would complete an n-gram already present."""
        if len(self._ids) < self._n - 1:
            return set()
        return self._next.get(tuple(self._ids[len(self._ids) - self._n + 1 :]), set())


def top_logprobs(row_logprobs: np.ndarray, chosen: int, n: int, token_text: Any) -> dict[str, Any]:
    """The chosen token's log-probability and the `n` most likely alternatives."""
    entry: dict[str, Any] = {
        "id": chosen,
        "token": token_text(chosen),
        "logprob": float(row_logprobs[chosen]),
        "top_logprobs": [],
    }
    if n > 0:
        best = np.argpartition(-row_logprobs, n - 1)[:n]
        best = best[np.argsort(-row_logprobs[best], kind="stable")]
        entry["top_logprobs"] = [
            {"id": int(i), "token": token_text(int(i)), "logprob": float(row_logprobs[i])}
            for i in best
        ]
    return entry

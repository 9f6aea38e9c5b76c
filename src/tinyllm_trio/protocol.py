"""The vocabulary every layer shares: the events a generation yields and the names of why it
ended or failed.

A request's life, as every layer sees it: zero or more `TokenEvent`s, then exactly one final
event, a `DoneEvent` (it ended: `FinishReason`) or an `ErrorEvent` (it failed: `ErrorKind`).
The batcher makes them, the worker sends them over the rings, the Engine hands them to its
caller, the HTTP layer turns them into chunks and status codes. The kinds are `StrEnum`s, so a
kind is its own wire form (JSON over the rings, `code` in an HTTP error) and compares equal to
its string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = ["DoneEvent", "ErrorEvent", "ErrorKind", "Event", "FinishReason", "TokenEvent"]


class FinishReason(StrEnum):
    """Why a sequence ended (OpenAI's names where OpenAI has one)."""

    STOP = "stop"  # EOS, a stop string or a stop token id
    LENGTH = "length"  # max_tokens, or the context is full
    CANCELLED = "cancelled"  # the caller cancelled, or the client went away


class ErrorKind(StrEnum):
    """Why a request (or a worker) failed; `tinyllm_trio.errors` maps each to its exception."""

    INVALID_REQUEST = "invalid_request"  # a field the model cannot honour
    CONTEXT_LENGTH = "context_length"  # the prompt leaves no room for a token
    OVERLOADED = "overloaded"  # the admission queue is full
    SHUTTING_DOWN = "shutting_down"  # the engine drains or has stopped
    WORKER_DIED = "worker_died"  # the worker crashed, hung, or none is live
    START_FAILED = "start_failed"  # a worker could not be started
    LOAD_FAILED = "load_failed"  # a worker could not load the model (its last message)
    INTERNAL = "internal"  # a bug: anything else


@dataclass(slots=True)
class TokenEvent:
    """One generated token and the text it adds (possibly empty while a stop string may match).

    `finish_reason` is set on a sequence's last token event, so a streaming client can mark its
    final chunk without waiting for the `DoneEvent` that follows.
    """

    request_id: int
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    logprobs: list[dict[str, Any]] | None = None


@dataclass
class DoneEvent:
    """A sequence ended; `finish_reason` is a `FinishReason`."""

    request_id: int
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float] = field(default_factory=dict)
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache


@dataclass
class ErrorEvent:
    """A request failed; `kind` is an `ErrorKind`, `message` says what happened."""

    request_id: int
    message: str
    kind: str = ErrorKind.INTERNAL


Event = TokenEvent | DoneEvent | ErrorEvent

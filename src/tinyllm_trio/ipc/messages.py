"""The messages that cross a ring, and their byte encoding.

Server -> worker: `Submit` (prompt ids or text, sampling parameters), `Cancel`, `Shutdown`.
Worker -> server: `Ready` once the model is loaded, then the batcher's own events
(`TokenEvent`, `DoneEvent`, `ErrorEvent` from `tinyllm_trio.protocol`), so the Engine
hands its callers exactly what the worker's batcher produced. The events of one decode step
travel together as one `Batch` (one ring message, split over slots if need be): the server's
reader then wakes once per step instead of once per token, which is most of the IPC cost.

The ring frame header already carries the message type and the request id; `encode` returns
them with the payload and `decode` takes them back. Token messages, the hot path (one per
generated token), use a small binary layout; everything else is JSON, which is cheap at those
rates and keeps the schema readable:

    TokenEvent payload: <HIB n_ids, text_len, reason_len> ids (<I each) text reason [logprobs]

with the text and finish reason in UTF-8 and the optional logprobs as trailing JSON (absent
means None). A payload that does not match its type raises `MessageError`, never a silent
guess.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from tinyllm_trio.model.sampling import SamplingParams
from tinyllm_trio.protocol import DoneEvent, ErrorEvent, TokenEvent


class MsgType(IntEnum):
    SUBMIT = 1
    CANCEL = 2
    SHUTDOWN = 3
    READY = 16
    TOKEN = 17
    DONE = 18
    ERROR = 19
    BATCH = 20


class MessageError(ValueError):
    """A payload that cannot be decoded as its message type."""


@dataclass(frozen=True)
class Submit:
    """Start a request: `prompt` is token ids (the server has tokenized and checked it) or text."""

    request_id: int
    prompt: list[int] | str
    params: SamplingParams


@dataclass(frozen=True)
class Cancel:
    """Stop a request; the worker answers DoneEvent("cancelled") if it still knew it."""

    request_id: int


@dataclass(frozen=True)
class Shutdown:
    """Exit after the current step; running requests are dropped (the server failed them)."""

    request_id: int = 0


@dataclass(frozen=True)
class Ready:
    """The worker loaded its model and is waiting for requests."""

    pid: int
    info: dict[str, Any] = field(default_factory=dict)
    request_id: int = 0


@dataclass(frozen=True)
class Batch:
    """Several messages in one, in order (the events of one decode step)."""

    messages: list[Message]
    request_id: int = 0


Message = Submit | Cancel | Shutdown | Ready | TokenEvent | DoneEvent | ErrorEvent | Batch

_TOKEN_HEAD = struct.Struct("<HIB")
_ITEM_HEAD = struct.Struct("<BQI")  # type, request id, payload length of one batched message
_TOKEN1_HEAD = struct.Struct("<HIBI")  # a token message's head and its one id (the common case)
_TOKEN = int(MsgType.TOKEN)
_TYPES = {int(t): t for t in MsgType}


def _json(obj: Any) -> bytes:
    # ASCII output (non-ASCII as \u escapes) cannot fail to encode: a lone surrogate a caller
    # passed (say, in a stop string) crosses as its escape instead of raising in the sender.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _utf8(text: str) -> bytes:
    """Token text as bytes; a lone surrogate passes through (decoded the same way) rather than
    raising in the sender."""
    return text.encode("utf-8", "surrogatepass")


def encode(msg: Message) -> tuple[int, int, bytes]:
    """(message type, request id, payload) for one message."""
    if isinstance(msg, TokenEvent):
        text = _utf8(msg.text)
        ids = msg.token_ids
        if len(ids) == 1 and not msg.finish_reason and msg.logprobs is None:
            # The hot path, once per token in the worker: one id, nothing else.
            return MsgType.TOKEN, msg.request_id, _TOKEN1_HEAD.pack(1, len(text), 0, ids[0]) + text
        reason = _utf8(msg.finish_reason or "")
        payload = b"".join(
            (
                _TOKEN_HEAD.pack(len(msg.token_ids), len(text), len(reason)),
                struct.pack(f"<{len(msg.token_ids)}I", *msg.token_ids),
                text,
                reason,
                b"" if msg.logprobs is None else _json(msg.logprobs),
            )
        )
        return MsgType.TOKEN, msg.request_id, payload
    if isinstance(msg, DoneEvent):
        body = {
            "finish_reason": msg.finish_reason,
            "prompt_tokens": msg.prompt_tokens,
            "completion_tokens": msg.completion_tokens,
            "timings": msg.timings,
        }
        if msg.cached_tokens:
            body["cached_tokens"] = msg.cached_tokens
        return MsgType.DONE, msg.request_id, _json(body)
    if isinstance(msg, ErrorEvent):
        return MsgType.ERROR, msg.request_id, _json({"message": msg.message, "kind": msg.kind})
    if isinstance(msg, Submit):
        body = {"prompt": msg.prompt, "params": msg.params.to_dict()}
        return MsgType.SUBMIT, msg.request_id, _json(body)
    if isinstance(msg, Cancel):
        return MsgType.CANCEL, msg.request_id, b""
    if isinstance(msg, Shutdown):
        return MsgType.SHUTDOWN, msg.request_id, b""
    if isinstance(msg, Ready):
        return MsgType.READY, msg.request_id, _json({"pid": msg.pid, "info": msg.info})
    if isinstance(msg, Batch):
        parts = []
        for item in msg.messages:
            if isinstance(item, Batch):
                raise TypeError("a Batch cannot contain a Batch")
            item_type, item_id, item_payload = encode(item)
            parts.append(_ITEM_HEAD.pack(item_type, item_id, len(item_payload)))
            parts.append(item_payload)
        return MsgType.BATCH, msg.request_id, b"".join(parts)
    raise TypeError(f"not a ring message: {msg!r}")


def _decode_batch(request_id: int, payload: bytes) -> Batch:
    items: list[Message] = []
    append = items.append
    unpack_item = _ITEM_HEAD.unpack_from
    unpack_token1 = _TOKEN1_HEAD.unpack_from
    head_size = _ITEM_HEAD.size
    token1_size = _TOKEN1_HEAD.size
    size = len(payload)
    pos = 0
    while pos < size:
        if pos + head_size > size:
            raise MessageError("batch item header runs past the payload")
        item_type, item_id, length = unpack_item(payload, pos)
        pos += head_size
        end = pos + length
        if end > size:
            raise MessageError("batch item runs past the payload")
        if item_type == _TOKEN and length >= token1_size:
            # The hot path, one per generated token: one id, no finish reason, no logprobs.
            # Anything else takes the general decoder below, which validates it in full.
            n_ids, text_len, reason_len, token_id = unpack_token1(payload, pos)
            if n_ids == 1 and reason_len == 0 and token1_size + text_len == length:
                try:
                    text = payload[pos + token1_size : end].decode("utf-8", "surrogatepass")
                except UnicodeDecodeError as e:
                    raise MessageError(f"token message text is not UTF-8: {e}") from None
                append(TokenEvent(item_id, [token_id], text, None, None))
                pos = end
                continue
        if item_type == MsgType.BATCH:
            raise MessageError("a batch cannot contain a batch")
        append(decode(item_type, item_id, payload[pos:end]))
        pos = end
    return Batch(items, request_id)


def _load(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MessageError(f"bad JSON payload: {e}") from None


def _decode_token(request_id: int, payload: bytes) -> TokenEvent:
    if len(payload) < _TOKEN_HEAD.size:
        raise MessageError("token message shorter than its header")
    n_ids, text_len, reason_len = _TOKEN_HEAD.unpack_from(payload)
    pos = _TOKEN_HEAD.size
    end = pos + 4 * n_ids + text_len + reason_len
    if end > len(payload):
        raise MessageError(f"token message of {len(payload)} bytes claims {end}")
    ids = list(struct.unpack_from(f"<{n_ids}I", payload, pos))
    pos += 4 * n_ids
    try:
        text = payload[pos : pos + text_len].decode("utf-8", "surrogatepass")
        pos += text_len
        reason = payload[pos : pos + reason_len].decode("utf-8", "surrogatepass") or None
    except UnicodeDecodeError as e:
        raise MessageError(f"token message text is not UTF-8: {e}") from None
    pos += reason_len
    logprobs = _load(payload[pos:]) if pos < len(payload) else None
    return TokenEvent(request_id, ids, text, reason, logprobs)


def decode(msg_type: int, request_id: int, payload: bytes) -> Message:
    """The message a frame carries; MessageError for an unknown type or a malformed payload."""
    kind = _TYPES.get(msg_type)
    if kind is None:
        raise MessageError(f"unknown message type {msg_type}")
    if kind is MsgType.TOKEN:
        return _decode_token(request_id, payload)
    if kind is MsgType.BATCH:
        return _decode_batch(request_id, payload)
    if kind in (MsgType.CANCEL, MsgType.SHUTDOWN):
        if payload:
            raise MessageError(f"{kind.name} carries no payload, got {len(payload)} bytes")
        return Cancel(request_id) if kind is MsgType.CANCEL else Shutdown(request_id)
    body = _load(payload)
    if not isinstance(body, dict):
        raise MessageError(f"{kind.name} payload must be a JSON object")
    try:
        if kind is MsgType.DONE:
            return DoneEvent(
                request_id,
                body["finish_reason"],
                body["prompt_tokens"],
                body["completion_tokens"],
                body["timings"],
                body.get("cached_tokens", 0),
            )
        if kind is MsgType.ERROR:
            return ErrorEvent(request_id, body["message"], body["kind"])
        if kind is MsgType.SUBMIT:
            prompt = body["prompt"]
            if not isinstance(prompt, str | list):
                raise MessageError("submit prompt must be text or a list of ids")
            return Submit(request_id, prompt, SamplingParams.from_dict(body["params"]))
        return Ready(body["pid"], body.get("info", {}), request_id)
    except KeyError as e:
        raise MessageError(f"{kind.name} payload lacks {e}") from None
    except MessageError:
        raise
    except (TypeError, ValueError) as e:  # e.g. sampling parameters the receiver refuses
        raise MessageError(f"{kind.name} payload is invalid: {e}") from None

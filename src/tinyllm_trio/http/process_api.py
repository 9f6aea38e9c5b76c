"""The seed's API, byte for byte: `GET /ping` (in ops) and `POST /process`.

`POST /process` takes `{"message": str, "max_tokens": int}` (plus optional sampling fields) and
answers `200`, `Content-Type: application/json`, `Transfer-Encoding: chunked`,
`Connection: keep-alive`, with exactly one JSON object per HTTP chunk, written as the original
wrote it (Python's default `json.dumps` separators, `", "` and `": "`, no newline between
objects, because the original clients parse the concatenation with
`json.JSONDecoder().raw_decode`, which does not skip whitespace):

    {"chunk": "Lily and Tom", "is_last": false}     the prompt, echoed as sent
    {"chunk": " worried", "is_last": false}          one per generated token (its text delta)
    {"chunk": " worried", "is_last": true}           the last token, when it ends the stream
    {"chunk": "", "is_last": true}                   instead, when generation stops on EOS

then the terminating zero-length chunk. Text is written as raw UTF-8 (`ensure_ascii=False`), as
the original did, so a non-ASCII prompt echoes unescaped.

Where we differ from the original, on purpose:

- A token whose text delta is empty (held back because it might begin a stop string) sends no
  chunk; the held text goes out with a later token (or is dropped, if it was the stop string).
- `max_tokens` defaults to 50 (the original's clamp) when absent or null; it must be an integer
  from 1 to the model's context length, else 400. A missing or blank `message`, a body that is
  not a JSON object, invalid JSON or a body that is not UTF-8 is a 400 (the original hung,
  crashed or continued the previous request's context).
- Sampling is greedy by default, like the original; `temperature`, `top_k`, `top_p`, `min_p`,
  `repetition_penalty`, `presence_penalty`, `frequency_penalty`, `seed`, `stop` and
  `ignore_eos` and `no_repeat_ngram_size` may be given; `no_repeat_ngram_size` defaults to
  `serve --no-repeat-ngram-size` (3), which keeps greedy text out of loops (the OpenAI
  endpoints default to 0, off, as OpenAI's API has no such ban).
- `parse_special` (default true, as the original: `<|endoftext|>` in the message is the EOS
  token); false encodes it as ordinary text.
- Errors before the stream starts are JSON error responses (`{"error": {"message", "type",
  "param", "code"}}`, like every endpoint); an error after it started is one last chunk
  `{"chunk": "", "is_last": true, "error": "<message>"}`, so a client written for the original
  ends cleanly and a careful one sees the error.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from tinyllm_trio.http.connection import Exchange, HTTPError
from tinyllm_trio.http.generation import (
    SAMPLING_FIELDS,
    HTTPGeneration,
    parse_special_flag,
    sampling_params,
    stream_response,
)
from tinyllm_trio.protocol import DoneEvent, TokenEvent

if TYPE_CHECKING:
    from tinyllm_trio.http.app import AppState

DEFAULT_MAX_TOKENS = 50
_NOT_LAST = b', "is_last": false}'
_LAST = b', "is_last": true}'


def chunk(text: str, is_last: bool) -> bytes:
    """`json.dumps({"chunk": text, "is_last": is_last}, ensure_ascii=False)`, UTF-8, fast."""
    encoded = json.dumps(text, ensure_ascii=False).encode("utf-8", "replace")
    return b'{"chunk": ' + encoded + (_LAST if is_last else _NOT_LAST)


class ProcessFormat:
    """Frames a generation as the original server did (see the module docstring)."""

    content_type = b"application/json"
    headers = ((b"Connection", b"keep-alive"),)
    ping = None  # a JSON stream has no comment syntax

    def __init__(self, message: str) -> None:
        self._message = message
        self._ended = False

    def opening(self) -> bytes:
        return chunk(self._message, False)

    def token(self, event: TokenEvent) -> bytes | None:
        if event.finish_reason is not None:
            self._ended = True
            return chunk(event.text, True)
        if not event.text:
            return None
        return chunk(event.text, False)

    def closing(self, done: DoneEvent) -> list[bytes]:
        return [] if self._ended else [chunk("", True)]

    def error(self, error: HTTPError) -> list[bytes]:
        if self._ended:
            return []
        self._ended = True
        body = {"chunk": "", "is_last": True, "error": error.message}
        return [json.dumps(body, ensure_ascii=False).encode("utf-8", "replace")]


def _bad(message: str, param: str) -> HTTPError:
    return HTTPError(400, message, param=param)


async def process(app: AppState, ex: Exchange) -> None:
    """`POST /process`: stream a continuation of `message` in the original's chunk format."""
    app.require_engine()
    body = await ex.json()
    if not isinstance(body, dict):
        raise _bad("Invalid JSON or missing message field: the body must be a JSON object", "")
    message = body.get("message")
    if not isinstance(message, str) or not message.strip():
        raise _bad(
            "Invalid JSON or missing message field: 'message' must be a non-empty string", "message"
        )
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    context = app.max_context
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise _bad("'max_tokens' must be an integer", "max_tokens")
    if not 1 <= max_tokens <= context:
        raise _bad(f"'max_tokens' must be between 1 and {context}", "max_tokens")
    temperature = body.get("temperature")
    fields = {name: body.get(name) for name in SAMPLING_FIELDS}
    if fields["no_repeat_ngram_size"] is None:
        fields["no_repeat_ngram_size"] = app.config.no_repeat_ngram_size
    params = sampling_params(
        max_tokens=max_tokens,
        temperature=0.0 if temperature is None else temperature,
        detokenize=app.config.detokenize,
        **fields,
    )
    parse_special = parse_special_flag(body, True)  # the original's behaviour
    generation = HTTPGeneration(
        app, ex, message, params, prompt_param="message", parse_special=parse_special
    )
    await stream_response(app, generation, ProcessFormat(message))

"""The OpenAI-compatible API: /v1/completions, /v1/chat/completions, /v1/models(/{id}).

Enough of OpenAI's API that the official `openai` SDK, vLLM's and SGLang's benchmark clients
work unchanged. Request fields:

- `max_tokens` (both) and `max_completion_tokens` (chat; wins when both are given): an integer
  from 1 to the context length. Defaults: 16 for completions (OpenAI's legacy default), the
  whole context for chat (generation then ends on EOS, a stop string or the context limit).
- `temperature` (default 1.0, 0 = greedy), `top_p`, `stop` (a string or up to 4 strings),
  `seed`, `presence_penalty`, `frequency_penalty`; extras as llama-server and vLLM accept them:
  `top_k`, `min_p`, `repetition_penalty`, `ignore_eos` (for benchmarks).
- `logprobs`: completions take an integer N (the chosen token plus N alternatives); chat takes
  `logprobs: true` plus `top_logprobs: N`.
- `n` (1 to 8, both endpoints): n choices with `index` 0..n-1. The worker prefills the prompt
  once and the choices fork its KV row; with a `seed`, choice i samples with seed + i (vLLM's
  rule: a reproducible set whose samples differ). `usage` counts the prompt once and every
  choice's completion tokens; `cached_tokens` is the fewest any choice reused (choice 0's).
  Streaming interleaves the choices' chunks, each with its index and its own finish chunk.
- `echo` (completions): the prompt's text, then the completion; streaming sends the prompt as
  the first chunk of each choice (as vLLM does). With `logprobs`, the prompt tokens' logprobs
  come first (the first token's null), from the prefill's own logits.
- `logit_bias` (token id -> -100..100, -100 bans), `min_tokens`, `stop_token_ids` (vLLM's)
  and `cache_prompt: false` (llama-server's: bypass the prefix cache) on both endpoints.
- `best_of` other than 1 (vLLM's V1 dropped it too), `echo` on chat, non-empty `tools` and a
  `response_format` other than text are refused with 400 rather than silently ignored, since
  they would change what the client gets. `model` is accepted whatever it says (one model is
  served). Unknown fields are ignored.
- `parse_special` (llama-server's name; a boolean): whether `<|endoftext|>` in the text is
  the EOS token (true) or ordinary characters (false). Completions default to true: a
  completion prompt is text the caller formats, markers included, as llama-server's
  `/completion` and vLLM's completions read it. Chat defaults to false: message content is
  what end users typed, and one of them must not end the story for everyone's template
  (vLLM's chat likewise never lets message text become control tokens).
- completions `prompt`: a string, a list of token ids (taken as given: no BOS is added), or a
  one-element list of either. Several prompts in one request are refused (400, `param: prompt`).

The chat template, for a story model that has never seen a conversation: the text content of
every message (system, developer, user, assistant, in order) joined with newlines is the
story so far, and the assistant's reply is its continuation. Roles only select which messages
count (all of them do); no role markers are inserted, since the tokenizer would only spell them
out as words the model never learned.

Streaming is SSE: `data: {json}\\n\\n` per token, `finish_reason` on the last content chunk (or
on an empty final chunk when generation stopped on EOS), with `stream_options.include_usage`
one more chunk with `choices: []` and `usage` (the others then carry `"usage": null`), and
`data: [DONE]\\n\\n` last. An error after the stream started is `data: {"error": {...}}`
followed by `data: [DONE]`. The per-token chunk is two precomputed byte strings around the
JSON-encoded text delta, so the hot path costs one JSON string escape of a short string.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _json_string  # what json.dumps(str) runs
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from tinyllm_trio.engine import MAX_CHOICES
from tinyllm_trio.http.connection import Exchange, HTTPError, json_bytes
from tinyllm_trio.http.generation import (
    SAMPLING_FIELDS,
    Collected,
    HTTPGeneration,
    collect_response,
    parse_special_flag,
    sampling_params,
    stream_response,
)
from tinyllm_trio.protocol import DoneEvent, TokenEvent

if TYPE_CHECKING:
    from tinyllm_trio.http.app import AppState

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
_EXTRA_FIELDS = ("temperature", *SAMPLING_FIELDS)
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_DONE = b"data: [DONE]\n\n"


# ---- request parsing ---------------------------------------------------------------------


async def _json_object(ex: Exchange) -> dict[str, Any]:
    body = await ex.json()
    if not isinstance(body, dict):
        raise HTTPError(400, "the request body must be a JSON object")
    return body


def _max_tokens(value: Any, param: str, default: int, context: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise HTTPError(400, f"'{param}' must be an integer", param=param)
    if not 1 <= value <= context:
        raise HTTPError(400, f"'{param}' must be between 1 and {context}", param=param)
    return value


def _check_common(body: dict[str, Any]) -> tuple[bool, bool, int]:
    """Refuse what we cannot honour; return (stream, include_usage, n)."""
    n = body.get("n")
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise HTTPError(
            400,
            f"'n' must be an integer from 1 to {MAX_CHOICES}",
            param="n",
            code="invalid_parameter",
        )
    best_of = body.get("best_of")  # vLLM's V1 dropped it too
    if best_of is not None and (isinstance(best_of, bool) or best_of != 1):
        raise HTTPError(400, "only best_of=1 is supported", param="best_of")
    if body.get("tools"):
        raise HTTPError(400, "tools are not supported by this model", param="tools")
    response_format = body.get("response_format")
    if response_format is not None and (
        not isinstance(response_format, dict) or response_format.get("type", "text") != "text"
    ):
        raise HTTPError(400, "only the text response format is supported", param="response_format")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise HTTPError(400, "'stream' must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise HTTPError(400, "'stream_options' must be an object", param="stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise HTTPError(
            400, "'include_usage' must be a boolean", param="stream_options.include_usage"
        )
    return stream, include_usage and stream, n


def _echo(body: dict[str, Any]) -> bool:
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise HTTPError(400, "'echo' must be a boolean", param="echo")
    return bool(echo)


def _sampling(
    body: dict[str, Any],
    max_tokens: int,
    logprobs: int | None,
    detokenize: str,
    prompt_logprobs: int | None = None,
):
    return sampling_params(
        max_tokens=max_tokens,
        logprobs=logprobs,
        detokenize=detokenize,
        prompt_logprobs=prompt_logprobs,
        **{name: body.get(name) for name in _EXTRA_FIELDS},
    )


@dataclass(frozen=True)
class Echo:
    """What `echo` puts before the completion: the prompt as the client sent it (its text, or
    token ids decoded), and the shape of the prompt tokens' logprobs."""

    text: str
    tokenizer: Any
    mode: str

    def logprobs(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        """OpenAI's logprobs object for the prompt's tokens: the first one's logprob and
        top_logprobs are null (nothing comes before it to predict it); `text_offset` is where
        each token's text starts in the decoded prompt."""
        push = self.tokenizer.stream_decoder(self.mode).push
        offsets, at = [], 0
        for entry in entries:
            offsets.append(at)
            at += len(push(entry["id"]))
        out = _completion_logprobs(entries, offsets)
        if entries:
            out["top_logprobs"][0] = None
        return out


def _echo_of(app: AppState, prompt: str | list[int]) -> Echo:
    tokenizer = app.engine.tokenizer
    mode = app.config.detokenize
    text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt, mode)
    return Echo(text, tokenizer, mode)


def completion_prompt(prompt: Any) -> str | list[int]:
    """The `prompt` field as text or token ids (one prompt only; the Engine checks the ids)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_token_id(t) for t in prompt):
        return list(prompt)
    if (
        isinstance(prompt, list)
        and len(prompt) > 1
        and all(isinstance(p, str | list) for p in prompt)
    ):
        raise HTTPError(
            400, "only one prompt per request is supported", param="prompt", code="unsupported"
        )
    raise HTTPError(
        400, "'prompt' must be a string or a non-empty list of token ids", param="prompt"
    )


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def chat_prompt(messages: Any) -> str:
    """The documented chat template: message texts in order, joined with newlines."""
    if not isinstance(messages, list) or not messages:
        raise HTTPError(400, "'messages' must be a non-empty list", param="messages")
    texts = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise HTTPError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise HTTPError(
                400, f"messages[{i}].role must be one of {sorted(_ROLES)}", param=f"messages[{i}]"
            )
        content = message.get("content")
        if content is None:
            continue
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text"):
                    raise HTTPError(
                        400,
                        f"messages[{i}].content[{j}]: only text parts are supported",
                        param=f"messages[{i}].content",
                    )
                text = part.get("text")
                if not isinstance(text, str):
                    raise HTTPError(
                        400,
                        f"messages[{i}].content[{j}].text must be a string",
                        param=f"messages[{i}].content",
                    )
                texts.append(text)
        else:
            raise HTTPError(
                400,
                f"messages[{i}].content must be a string or a list of text parts",
                param=f"messages[{i}].content",
            )
    return "\n".join(texts)


# ---- logprobs shapes ---------------------------------------------------------------------


def _completion_logprobs(entries: list[dict[str, Any]], offsets: list[int]) -> dict[str, Any]:
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
        "text_offset": offsets,
    }


def _chat_logprob(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "token": entry["token"],
        "logprob": entry["logprob"],
        "bytes": list(entry["token"].encode("utf-8", "replace")),
        "top_logprobs": [
            {
                "token": t["token"],
                "logprob": t["logprob"],
                "bytes": list(t["token"].encode("utf-8", "replace")),
            }
            for t in entry["top_logprobs"]
        ],
    }


def _chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"content": [_chat_logprob(e) for e in entries], "refusal": None}


def _usage(prompt_tokens: int, completion_tokens: int, cached: int | None = None) -> dict[str, Any]:
    """OpenAI's usage object; `cached` (None when the engine has no prefix cache) becomes
    `prompt_tokens_details.cached_tokens`, the prompt tokens the cache supplied."""
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


def _reports_cache(app: AppState) -> bool:
    return app.engine is not None and app.engine.prefix_cache


# ---- streaming ---------------------------------------------------------------------------


class SSEFormat:
    """OpenAI's SSE framing for one stream of `text_completion` or `chat.completion.chunk`."""

    content_type = b"text/event-stream"
    headers = ((b"Cache-Control", b"no-cache"), (b"X-Accel-Buffering", b"no"))
    ping = b": ping\n\n"

    def __init__(
        self,
        *,
        chat: bool,
        model: str,
        include_usage: bool,
        logprobs: bool,
        n: int = 1,
        index: Callable[[TokenEvent | DoneEvent], int] | None = None,
        echo: Echo | None = None,
    ) -> None:
        self._chat = chat
        self._include_usage = include_usage
        self._logprobs = logprobs
        self._n = n
        self._index = index or (lambda event: 0)
        self._echo = echo
        self._finished = [False] * n
        self._text_size = 0  # of choice 0's text so far (n = 1)
        self._sizes = [0] * n  # of each choice's text so far (n > 1)
        self._open = n
        self._completion_tokens = 0
        self._cached = -1
        if n > 1:  # interleaved choices: each chunk built whole (not the one-choice fast path)
            self.token = self._choice_token  # type: ignore[method-assign]
        self.report_cache = False  # usage carries prompt_tokens_details.cached_tokens
        self._base = {
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        head = b"data: " + json_bytes(self._base)[:-1] + b',"choices":[{"index":0,'
        usage = b',"usage":null' if include_usage else b""
        if chat:
            self._prefix = head + b'"delta":{"content":'
            self._suffix = b'},"logprobs":null,"finish_reason":null}]' + usage + b"}\n\n"
        else:
            self._prefix = head + b'"text":'
            self._suffix = b',"logprobs":null,"finish_reason":null}]' + usage + b"}\n\n"

    def _event(self, choice: dict[str, Any] | None, usage: dict[str, Any] | None = None) -> bytes:
        obj = dict(self._base)
        obj["choices"] = [] if choice is None else [choice]
        if self._include_usage:
            obj["usage"] = usage
        return b"data: " + json_bytes(obj) + b"\n\n"

    def _choice(
        self,
        text: str | None,
        finish_reason: str | None,
        logprobs: list[dict] | None,
        index: int = 0,
        offset: int | None = None,
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index}
        if self._chat:
            choice["delta"] = {} if text is None else {"content": text}
            choice["logprobs"] = _chat_logprobs(logprobs) if logprobs else None
        else:
            at = self._text_size if offset is None else offset
            choice["text"] = text or ""
            choice["logprobs"] = (
                _completion_logprobs(logprobs, [at] * len(logprobs)) if logprobs else None
            )
        choice["finish_reason"] = finish_reason
        return choice

    def opening(self) -> bytes | None:
        """The chunks before any token: chat's role delta, or the echoed prompt (when its
        logprobs are not wanted; else it goes out with them, on their event), per choice."""
        if self._chat:
            return b"".join(
                self._event(
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                )
                for i in range(self._n)
            )
        if self._echo is None or self._logprobs:
            return None
        return b"".join(self._echo_chunk(i, None) for i in range(self._n))

    def _echo_chunk(self, index: int, entries: list[dict[str, Any]] | None) -> bytes:
        """The prompt as choice `index`'s first text (echo), with its logprobs if given."""
        echo = self._echo
        assert echo is not None
        choice = {
            "index": index,
            "text": echo.text,
            "logprobs": echo.logprobs(entries) if entries is not None else None,
            "finish_reason": None,
        }
        if self._n == 1:
            self._text_size += len(echo.text)
        else:
            self._sizes[index] += len(echo.text)
        return self._event(choice)

    def _choice_token(self, event: TokenEvent) -> bytes | None:
        """`token` for n > 1: the chunk of one choice's event, with its index."""
        i = self._index(event)
        if self._echo is not None and event.logprobs and not event.token_ids:
            return self._echo_chunk(i, event.logprobs)
        text = event.text
        logprobs = event.logprobs if self._logprobs else None
        if event.finish_reason is None and not text and not logprobs:
            return None
        if event.finish_reason is not None:
            self._finished[i] = True
        choice = self._choice(text, event.finish_reason, logprobs, i, self._sizes[i])
        self._sizes[i] += len(text)
        return self._event(choice)

    def token(self, event: TokenEvent) -> bytes | None:
        text = event.text
        if event.finish_reason is None and not (self._logprobs and event.logprobs):
            if not text:
                return None
            self._text_size += len(text)
            return self._prefix + _json_string(text).encode("ascii") + self._suffix
        if self._echo is not None and event.logprobs and not event.token_ids:
            return self._echo_chunk(0, event.logprobs)
        if event.finish_reason is not None:
            self._finished[0] = True
        choice = self._choice(text, event.finish_reason, event.logprobs if self._logprobs else None)
        self._text_size += len(text)
        return self._event(choice)

    def closing(self, done: DoneEvent) -> list[bytes]:
        """A choice's finish chunk (unless its last token carried the reason); after the last
        choice's, the usage chunk (all choices' completion tokens, the prompt once) and
        `[DONE]`."""
        i = self._index(done)
        out = []
        if not self._finished[i]:
            reason = done.finish_reason if done.finish_reason in ("stop", "length") else "stop"
            out.append(self._event(self._choice(None, reason, None, i)))
        self._open -= 1
        self._completion_tokens += done.completion_tokens
        cached = done.cached_tokens
        self._cached = cached if self._cached < 0 else min(self._cached, cached)
        if self._open:
            return [b"".join(out)] if out else []
        if self._include_usage:
            cached = self._cached if self.report_cache else None
            usage = _usage(done.prompt_tokens, self._completion_tokens, cached)
            out.append(self._event(None, usage))
        out.append(_DONE)
        return [b"".join(out)]

    def error(self, error: HTTPError) -> list[bytes]:
        return [b"data: " + json_bytes(error.to_dict()) + b"\n\n" + _DONE]


# ---- handlers ----------------------------------------------------------------------------


async def completions(app: AppState, ex: Exchange) -> None:
    """`POST /v1/completions`."""
    app.require_engine()
    body = await _json_object(ex)
    stream, include_usage, n = _check_common(body)
    echo = _echo(body)
    context = app.max_context
    prompt = completion_prompt(body.get("prompt"))
    max_tokens = _max_tokens(
        body.get("max_tokens"), "max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS, context
    )
    logprobs = body.get("logprobs")
    # echo with logprobs: the prompt's too, from the prefill's own logits (as vLLM does)
    prompt_logprobs = logprobs if echo else None
    params = _sampling(body, max_tokens, logprobs, app.config.detokenize, prompt_logprobs)
    generation = HTTPGeneration(
        app,
        ex,
        prompt,
        params,
        prompt_param="prompt",
        parse_special=parse_special_flag(body, True),
        n=n,
    )
    await _answer(
        app,
        generation,
        chat=False,
        stream=stream,
        include_usage=include_usage,
        echo=_echo_of(app, prompt) if echo else None,
    )


async def chat_completions(app: AppState, ex: Exchange) -> None:
    """`POST /v1/chat/completions` (chat template: see the module docstring)."""
    app.require_engine()
    body = await _json_object(ex)
    stream, include_usage, n = _check_common(body)
    if body.get("echo"):  # a completions field; chat has no prompt text to echo
        raise HTTPError(400, "echo is supported on /v1/completions only", param="echo")
    context = app.max_context
    prompt = chat_prompt(body.get("messages"))
    if body.get("max_completion_tokens") is not None:
        max_tokens = _max_tokens(
            body["max_completion_tokens"], "max_completion_tokens", context, context
        )
    else:
        max_tokens = _max_tokens(body.get("max_tokens"), "max_tokens", context, context)
    want_logprobs = body.get("logprobs")
    top = body.get("top_logprobs")
    if want_logprobs is not None and not isinstance(want_logprobs, bool):
        raise HTTPError(400, "'logprobs' must be a boolean", param="logprobs")
    if top is not None and not want_logprobs:
        raise HTTPError(400, "'top_logprobs' requires 'logprobs': true", param="top_logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int)):
        raise HTTPError(400, "'top_logprobs' must be an integer", param="top_logprobs")
    logprobs = (top or 0) if want_logprobs else None
    try:
        params = _sampling(body, max_tokens, logprobs, app.config.detokenize)
    except HTTPError as exc:
        if exc.param == "logprobs":
            exc.param = "top_logprobs"
        raise
    generation = HTTPGeneration(
        app,
        ex,
        prompt,
        params,
        prompt_param="messages",
        parse_special=parse_special_flag(body, False),
        n=n,
    )
    await _answer(app, generation, chat=True, stream=stream, include_usage=include_usage)


async def _answer(
    app: AppState,
    generation: HTTPGeneration,
    *,
    chat: bool,
    stream: bool,
    include_usage: bool,
    echo: Echo | None = None,
) -> None:
    """Answer with a generation: an SSE stream, or one `text_completion` / `chat.completion`
    with its n choices."""
    if stream:
        fmt = SSEFormat(
            chat=chat,
            model=app.model_name,
            include_usage=include_usage,
            logprobs=generation.params.logprobs is not None,
            n=generation.n,
            index=generation.index,
            echo=echo,
        )
        fmt.report_cache = _reports_cache(app)
        await stream_response(app, generation, fmt)
        return
    results = await collect_response(app, generation)
    choices = []
    for index, result in enumerate(results):
        logprobs: Any = None
        if chat:
            content: dict[str, Any] = {"message": {"role": "assistant", "content": result.text}}
            if result.logprobs is not None:
                logprobs = _chat_logprobs(result.logprobs)
        else:
            content, logprobs = _completion_choice(result, echo)
        choices.append(
            {"index": index, **content, "logprobs": logprobs, "finish_reason": result.finish_reason}
        )
    first = results[0]
    response = {
        "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": app.model_name,
        "choices": choices,
        "usage": _usage(  # the prompt once, every choice's completion (as OpenAI counts)
            first.prompt_tokens,
            sum(r.completion_tokens for r in results),
            min(r.cached_tokens for r in results) if _reports_cache(app) else None,
        ),
    }
    await generation.exchange.respond_json(200, response)


def _completion_choice(result: Collected, echo: Echo | None) -> tuple[dict[str, Any], Any]:
    """A completions choice's text and logprobs; with `echo`, the prompt's come first."""
    if echo is None:
        logprobs = None
        if result.logprobs is not None:
            logprobs = _completion_logprobs(result.logprobs, result.text_offsets)
        return {"text": result.text}, logprobs
    if result.logprobs is None:
        return {"text": echo.text + result.text}, None
    logprobs = echo.logprobs(result.prompt_logprobs or [])
    tail = _completion_logprobs(result.logprobs, [len(echo.text) + o for o in result.text_offsets])
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        logprobs[key] += tail[key]
    return {"text": echo.text + result.text}, logprobs


def _model_card(app: AppState) -> dict[str, Any]:
    card: dict[str, Any] = {
        "id": app.model_name,
        "object": "model",
        "created": app.created,
        "owned_by": "tinyllm",
    }
    if app.engine is not None:
        card["max_model_len"] = app.max_context
    return card


async def list_models(app: AppState, ex: Exchange) -> None:
    """`GET /v1/models`: the one model served."""
    await ex.respond_json(200, {"object": "list", "data": [_model_card(app)]})


async def get_model(app: AppState, ex: Exchange) -> None:
    """`GET /v1/models/{id}`: 404 for any id but the one served."""
    model_id = unquote(ex.path[len("/v1/models/") :])
    if model_id != app.model_name:
        raise HTTPError(
            404, f"The model '{model_id}' does not exist", param="model", code="model_not_found"
        )
    await ex.respond_json(200, _model_card(app))

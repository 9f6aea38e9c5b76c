"""Operations endpoints: /ping, /health, /metrics, /tokenize, /detokenize.

- `GET /ping`: liveness, the original's exact answer `{"status": "ok"}`; always 200.
- `GET /health` (also `/v1/health`): readiness. 503 with an OpenAI-shaped error while the
  workers load (`code: "loading"`) or while the server drains on SIGINT/SIGTERM
  (`code: "shutting_down"`, from the signal on, through any `--drain-delay`), 200
  `{"status": "ok"}` when it takes requests.
- `GET /metrics`: Prometheus text (see `metrics.py`).
- `POST /tokenize`: `{"prompt": str}` (or llama-server's `content`, or a chat `messages` list
  through the chat template), `add_special` (default true: BOS first, as generation encodes),
  `with_pieces` -> `{"tokens": [...], "count": n, "max_model_len": ctx}`; with pieces, each
  token is `{"id", "piece"}`. `parse_special` defaults as generation does for the same text
  (true for `prompt`/`content`, false for `messages`), so the count is the one generation
  makes; the text is capped as a prompt is, and a long one is encoded in a thread.
- `POST /detokenize`: `{"tokens": [ids]}` -> `{"prompt": text, "content": text}` (vLLM's and
  llama-server's field names).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from tinyllm_trio.http.connection import Exchange, HTTPError
from tinyllm_trio.http.generation import check_prompt_size, encode_text, parse_special_flag
from tinyllm_trio.http.metrics import CONTENT_TYPE
from tinyllm_trio.http.openai_api import chat_prompt

if TYPE_CHECKING:
    from tinyllm_trio.http.app import AppState

_PING_BODY = b'{"status": "ok"}'


async def ping(app: AppState, ex: Exchange) -> None:
    await ex.respond(200, _PING_BODY)


async def health(app: AppState, ex: Exchange) -> None:
    if app.stopping:
        raise HTTPError(503, "the server is shutting down", code="shutting_down")
    if not app.ready:
        raise HTTPError(503, "Loading model", code="loading", headers=[(b"Retry-After", b"1")])
    await ex.respond(200, _PING_BODY)


async def metrics(app: AppState, ex: Exchange) -> None:
    await ex.respond(200, app.metrics.render(), CONTENT_TYPE)


async def _body(ex: Exchange) -> dict[str, Any]:
    body = await ex.json()
    if not isinstance(body, dict):
        raise HTTPError(400, "the request body must be a JSON object")
    return body


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise HTTPError(400, f"'{name}' must be a boolean", param=name)
    return value


async def tokenize(app: AppState, ex: Exchange) -> None:
    tokenizer = app.require_engine().tokenizer
    body = await _body(ex)
    if "messages" in body:
        text, param = chat_prompt(body["messages"]), "messages"
    else:
        text, param = body.get("prompt", body.get("content")), "prompt"
        if not isinstance(text, str):
            raise HTTPError(400, "'prompt' must be a string", param="prompt")
    add_special = _flag(body, "add_special", True)
    # The defaults of the endpoint the text is for, so the count is the one generation makes.
    parse_special = parse_special_flag(body, param == "prompt")
    check_prompt_size(app, text, param)
    # Not bounded by the context: a client may count the tokens of a text too long for it.
    encode = partial(tokenizer.encode, text, bos=add_special, parse_special=parse_special)
    ids = await encode_text(app, text, encode)
    tokens: list[Any] = ids
    if _flag(body, "with_pieces", False):
        tokens = [{"id": i, "piece": tokenizer.token_text(i)} for i in ids]
    await ex.respond_json(
        200, {"tokens": tokens, "count": len(ids), "max_model_len": app.max_context}
    )


async def detokenize(app: AppState, ex: Exchange) -> None:
    tokenizer = app.require_engine().tokenizer
    body = await _body(ex)
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in ids
    ):
        raise HTTPError(400, "'tokens' must be a list of integers", param="tokens")
    try:
        text = tokenizer.decode(ids)
    except ValueError as exc:
        raise HTTPError(400, str(exc), param="tokens") from None
    await ex.respond_json(200, {"prompt": text, "content": text})

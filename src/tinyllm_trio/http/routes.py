"""Endpoint dispatch: path and method to handler, auth, request ids, access log, request counts.

Handlers are `async def handler(app, exchange)`; they read the request through the `Exchange`,
talk to `app.engine`, and answer through the `Exchange`. They raise `HTTPError` for anything a
status code should say; `Router.handle` is the one place that turns it into a response (or, when
the response already started, closes the connection, since only a streaming endpoint can frame
an error event and it does so itself).

| path                     | methods | auth | module        |
|--------------------------|---------|------|---------------|
| /                        | GET     | no   | webui         |
| /ping                    | GET     | no   | ops           |
| /health, /v1/health      | GET     | no   | ops           |
| /metrics                 | GET     | no   | ops           |
| /tokenize, /detokenize   | POST    | yes  | ops           |
| /process                 | POST    | yes  | process_api   |
| /v1/completions          | POST    | yes  | openai_api    |
| /v1/chat/completions     | POST    | yes  | openai_api    |
| /v1/models, /v1/models/{id} | GET  | yes  | openai_api    |

"auth" applies only when an API key is configured: `Authorization: Bearer <key>`, compared in
constant time (hmac.compare_digest on SHA-256 digests, so not even the length leaks).

With `--cors-origins`, every response gets the CORS headers of `cors.CORSPolicy`, and `OPTIONS`
on any route is a preflight answered here with 204 (before auth: a preflight has no key).
Without it, `OPTIONS` stays a 405 as before. `--no-webui` makes `/` a 404.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import trio

from tinyllm_trio.config import ServerConfig
from tinyllm_trio.http import openai_api, ops, process_api, webui
from tinyllm_trio.http.connection import ClientGone, Exchange, HTTPError
from tinyllm_trio.http.cors import CORSPolicy
from tinyllm_trio.http.metrics import Metrics

access_log = logging.getLogger("tinyllm_trio.access")
log = logging.getLogger("tinyllm_trio.http")

Handler = Callable[["AppState", Exchange], Awaitable[None]]
_KNOWN_METHODS = frozenset({"GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"})


class AppState:
    """What every handler shares: the engine, the config, metrics, and the drain state.

    `engine` may be None while the workers load (`tinyllm-trio serve` listens first, so
    `/health` can say 503 during loading); generation endpoints then answer 503.
    """

    def __init__(self, engine: Any, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.metrics = Metrics(
            self._engine_stats, compat=config.metrics_compat, model_name=lambda: self.model_name
        )
        self.created = int(time.time())
        self.stopping = False  # shutdown() was called: /health says 503 (drain delay, drain)
        self.draining = False  # the drain runs: listeners closed, every response closes
        self.grace_over = False  # the grace period ran out: nothing new may start
        # Long prompts are tokenized in a thread (generation.encode_text). One at a time: the
        # encoder is pure Python, so more threads would only take more of the GIL from the
        # event loop, which keeps about half of it while one thread encodes.
        self.encode_limiter = trio.CapacityLimiter(1)
        self.cors = CORSPolicy(config.cors_origins)
        self._generation_scopes: set[trio.CancelScope] = set()
        key = config.api_key
        self._api_key_digest = hashlib.sha256(key.encode("utf-8")).digest() if key else None

    def _engine_stats(self) -> dict[str, Any] | None:
        engine = self.engine
        if engine is None:
            return None
        try:
            return engine.stats()
        except Exception:  # a scrape must not fail because a worker is restarting
            log.debug("engine.stats() failed", exc_info=True)
            return None

    @property
    def model_name(self) -> str:
        return self.config.model_name or getattr(self.engine, "model_id", None) or "tinyllm"

    @property
    def ready(self) -> bool:
        return (
            self.engine is not None and bool(getattr(self.engine, "ready", True))
        ) and not self.stopping

    def require_engine(self) -> Any:
        """The engine, or 503 while it loads."""
        if self.engine is None:
            raise HTTPError(
                503,
                "Loading model",
                code="loading",
                headers=[(b"Retry-After", b"1")],
            )
        return self.engine

    @property
    def max_context(self) -> int:
        return int(self.require_engine().model_config.max_context)

    @contextmanager
    def generation_scope(self) -> Iterator[trio.CancelScope]:
        """A cancel scope the server cancels when the shutdown grace period runs out."""
        scope = trio.CancelScope()
        self._generation_scopes.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._generation_scopes.discard(scope)

    def cancel_generations(self) -> None:
        self.grace_over = True
        for scope in list(self._generation_scopes):
            scope.cancel()

    @property
    def active_generations(self) -> int:
        return len(self._generation_scopes)

    def authorized(self, ex: Exchange) -> bool:
        if self._api_key_digest is None:
            return True
        scheme, _, token = ex.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(token.strip().encode("utf-8")).digest()
        return hmac.compare_digest(digest, self._api_key_digest)


# path -> (metrics label, {method: handler}, needs auth)
_ROUTES: dict[str, tuple[str, dict[str, Handler], bool]] = {
    "/": ("/", {"GET": webui.index}, False),
    "/ping": ("/ping", {"GET": ops.ping}, False),
    "/health": ("/health", {"GET": ops.health}, False),
    "/v1/health": ("/health", {"GET": ops.health}, False),
    "/metrics": ("/metrics", {"GET": ops.metrics}, False),
    "/tokenize": ("/tokenize", {"POST": ops.tokenize}, True),
    "/detokenize": ("/detokenize", {"POST": ops.detokenize}, True),
    "/process": ("/process", {"POST": process_api.process}, True),
    "/v1/completions": ("/v1/completions", {"POST": openai_api.completions}, True),
    "/v1/chat/completions": (
        "/v1/chat/completions",
        {"POST": openai_api.chat_completions},
        True,
    ),
    "/v1/models": ("/v1/models", {"GET": openai_api.list_models}, True),
}
_MODEL_ROUTE = ("/v1/models/{id}", {"GET": openai_api.get_model}, True)


def match(path: str) -> tuple[str, dict[str, Handler], bool] | None:
    route = _ROUTES.get(path)
    if route is None and path.startswith("/v1/models/") and len(path) > len("/v1/models/"):
        route = _MODEL_ROUTE
    return route


class Router:
    """`handle(exchange)` answers one request; given to `HTTPConnection.serve`."""

    def __init__(self, app: AppState) -> None:
        self.app = app

    async def handle(self, ex: Exchange) -> None:
        started = time.perf_counter()
        route = match(ex.path) if ex.path != "/" or not self.app.config.no_webui else None
        label = route[0] if route is not None else "other"
        origin = ex.headers.get("origin")
        ex.cors_headers = self.app.cors.response_headers(origin)
        try:
            if route is None:
                raise HTTPError(404, f"Endpoint not found: {ex.path}", code="not_found")
            _, methods, needs_auth = route
            if ex.method == "OPTIONS" and self.app.cors.enabled:
                allow = [*methods, "OPTIONS"]
                headers = [(b"Allow", ", ".join(allow).encode("ascii"))]
                headers += self.app.cors.preflight_headers(origin, allow)
                await ex.respond(204, b"", b"text/plain", headers)
                return
            handler = methods.get(ex.method)
            if handler is None and ex.method == "HEAD":
                handler = methods.get("GET")  # RFC 9110 9.3.2: as GET, without the body
            if handler is None:
                allow = ", ".join(methods).encode("ascii")
                raise HTTPError(
                    405,
                    f"method {ex.method} is not allowed on {label}",
                    code="method_not_allowed",
                    headers=[(b"Allow", allow)],
                )
            if needs_auth and not self.app.authorized(ex):
                raise HTTPError(
                    401,
                    "invalid or missing API key (send 'Authorization: Bearer <key>')",
                    code="invalid_api_key",
                    headers=[(b"WWW-Authenticate", b"Bearer")],
                )
            await handler(self.app, ex)
        except HTTPError as exc:
            await self._answer(ex, exc)
        except ClientGone:
            raise
        except Exception:
            log.exception("request %s %s failed [%s]", ex.method, ex.path, ex.request_id)
            await self._answer(ex, HTTPError(500, "internal server error", code="internal_error"))
        finally:
            self._account(ex, label, started)

    async def _answer(self, ex: Exchange, exc: HTTPError) -> None:
        if ex.can_respond():
            await ex.respond_error(exc)
        else:  # mid-response and the endpoint could not frame it: a truncated body says it
            log.warning("error after the response started [%s]: %s", ex.request_id, exc.message)
            ex.keep_alive = False
            raise ClientGone("response abandoned after an error")

    def _account(self, ex: Exchange, label: str, started: float) -> None:
        status = ex.status if ex.status is not None else 499  # 499: client left first
        method = ex.method if ex.method in _KNOWN_METHODS else "other"
        self.app.metrics.http_requests.labels(label, method, str(status)).inc()
        if self.app.config.access_logged(ex.path):
            ms = (time.perf_counter() - started) * 1000.0
            access_log.info(
                '%s "%s %s" %d %.1fms rid=%s',
                ex.connection.peer,
                ex.method,
                ex.path,
                status,
                ms,
                ex.request_id,
                extra={
                    "peer": ex.connection.peer,
                    "method": ex.method,
                    "path": ex.path,
                    "status": status,
                    "duration_ms": round(ms, 3),
                    "request_id": ex.request_id,
                },
            )

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

import logging
import time
from collections.abc import Awaitable, Callable

from tinyllm_trio.http import openai_api, ops, process_api, webui
from tinyllm_trio.http.app import AppState
from tinyllm_trio.http.connection import ClientGone, Exchange, HTTPError

access_log = logging.getLogger("tinyllm_trio.access")
log = logging.getLogger("tinyllm_trio.http")

Handler = Callable[[AppState, Exchange], Awaitable[None]]
_KNOWN_METHODS = frozenset({"GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"})


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

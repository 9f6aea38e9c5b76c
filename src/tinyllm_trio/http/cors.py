"""CORS: which browser origins may call the API from another site, and the headers that say so.

Off unless `--cors-origins` names origins (or `*`): then nothing changes for a client that is
not a browser on another origin. When on:

- A response to a request whose `Origin` is allowed carries `Access-Control-Allow-Origin` with
  that origin, echoed (never a blanket `*`, so a client that sends credentials is served too),
  and `Access-Control-Expose-Headers` so its script can read `X-Request-Id` and a 429's
  `Retry-After`. An origin that is not allowed gets no CORS header at all, and the browser
  keeps the response from its script.
- Every response carries `Vary: Origin`, since it depends on the origin: a shared cache must
  not hand one origin's answer to another.
- A preflight (`OPTIONS` on an API route) answers 204 with `-Allow-Methods` (the route's
  methods), `-Allow-Headers` (`Content-Type`, `Authorization`, `X-Request-Id`) and `-Max-Age`.
  It is not behind the API key: browsers never send `Authorization` on a preflight.

`Access-Control-Allow-Credentials` is never sent: the API authenticates with a bearer token
the page sets itself, not with cookies, so no request needs the browser's credentials.
"""

from __future__ import annotations

from collections.abc import Iterable

Headers = list[tuple[bytes, bytes]]

ALLOW_HEADERS = b"Content-Type, Authorization, X-Request-Id"
EXPOSE_HEADERS = b"X-Request-Id, Retry-After"
MAX_AGE_SECONDS = 3600  # Chromium caps a preflight cache at 2 hours, Firefox at 24


class CORSPolicy:
    """The allowed origins (as `config._origins` normalised them) and the headers they get."""

    def __init__(self, origins: Iterable[str]) -> None:
        self.origins = frozenset(origins)
        self.any_origin = "*" in self.origins

    @property
    def enabled(self) -> bool:
        return bool(self.origins)

    def allowed(self, origin: str | None) -> bool:
        if not origin or not self.enabled:
            return False
        return self.any_origin or origin.lower() in self.origins

    def response_headers(self, origin: str | None) -> Headers:
        """The CORS headers of any response to a request from `origin` (None: no `Origin`)."""
        if not self.enabled:
            return []
        headers: Headers = [(b"Vary", b"Origin")]
        if origin is not None and self.allowed(origin):
            headers.append((b"Access-Control-Allow-Origin", origin.encode("latin-1")))
            headers.append((b"Access-Control-Expose-Headers", EXPOSE_HEADERS))
        return headers

    def preflight_headers(self, origin: str | None, methods: Iterable[str]) -> Headers:
        """What a 204 preflight answer adds to `response_headers` for an allowed origin."""
        if not self.allowed(origin):
            return []
        return [
            (b"Access-Control-Allow-Methods", ", ".join(methods).encode("ascii")),
            (b"Access-Control-Allow-Headers", ALLOW_HEADERS),
            (b"Access-Control-Max-Age", str(MAX_AGE_SECONDS).encode("ascii")),
        ]

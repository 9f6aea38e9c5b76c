"""GET /: the browser playground, one self-contained page shipped in the wheel (http/static/).

No build step, no CDN, no external font: the page is plain HTML, CSS and JavaScript, so it works
on an offline machine. It calls the API the way any client does (`/v1/completions` and
`/v1/chat/completions` with `stream: true`, read with `fetch` and a streamed body), so the API
key, rate limits and disconnect-cancels-generation all apply to it unchanged. The page itself is
not behind the API key (it holds no data); `--no-webui` turns it off and `/` answers 404.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import TYPE_CHECKING

from tinyllm_trio.http.connection import Exchange

if TYPE_CHECKING:
    from tinyllm_trio.http.app import AppState

# Everything the page needs is inline or same-origin; the policy keeps it that way.
_HEADERS = [
    (b"Cache-Control", b"no-cache"),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Referrer-Policy", b"no-referrer"),
    (
        b"Content-Security-Policy",
        b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        b"connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
        b"frame-ancestors 'none'",
    ),
]


@cache
def page() -> bytes:
    """The page's bytes, read once from the package data."""
    return resources.files("tinyllm_trio.http").joinpath("static/index.html").read_bytes()


async def index(app: AppState, ex: Exchange) -> None:
    await ex.respond(200, page(), b"text/html; charset=utf-8", _HEADERS)

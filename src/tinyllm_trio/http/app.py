"""What every handler shares, one `AppState` per server: the engine, the config, metrics,
the API key check and the drain state.

Its own module so that the handler modules (`openai_api`, `process_api`, `ops`, `webui`,
`generation`) can name it without importing the router that imports them.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import trio

from tinyllm_trio.config import ServerConfig
from tinyllm_trio.http.connection import Exchange, HTTPError
from tinyllm_trio.http.cors import CORSPolicy
from tinyllm_trio.http.metrics import Metrics

if TYPE_CHECKING:
    from tinyllm_trio.engine import Engine

log = logging.getLogger("tinyllm_trio.http")


class AppState:
    """What every handler shares: the engine, the config, metrics, and the drain state.

    `engine` may be None while the workers load (`tinyllm-trio serve` listens first, so
    `/health` can say 503 during loading); generation endpoints then answer 503.
    """

    def __init__(self, engine: Engine | None, config: ServerConfig) -> None:
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
        engine = self.engine
        return self.config.model_name or (engine.model_id if engine is not None else "tinyllm")

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.ready and not self.stopping

    def require_engine(self) -> Engine:
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

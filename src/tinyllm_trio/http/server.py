"""The server: listeners, one task per connection, graceful drain; `serve` and `run_cli`.

Embedding in a Trio application (the engine is yours; the server only uses it):

    async with trio.open_nursery() as nursery, open_engine() as engine:
        port = await nursery.start(serve, engine, "127.0.0.1", 0)
        ...                                   # cancel the nursery to stop the server at once

For a graceful stop, pass `shutdown_trigger` (an async callable; when it returns, the server
drains), or use `HTTPServer` directly and call `server.shutdown()`.

Start-up: `tinyllm-trio serve` binds its port at once (a port conflict fails fast) but calls
`listen()` only once the workers are ready, so until then a connection is refused and a proxy
fails over at connect time, which is safe even for a POST (`HTTPServer.run(wait_for_engine=
True)`). An embedding that constructs `HTTPServer(None, ...)` without it listens at once and
answers 503 `loading` meanwhile.

Shutdown is driven by cancel scopes, not flags polled in loops (hypercorn's shape):

0. `shutdown()` marks the app stopping: `/health` answers 503 from now on. With
   `drain_delay` > 0 everything else is served as usual for that long (readiness turns false
   before the endpoint is removed, the Kubernetes pattern); then the drain starts.
1. The drain closes the listening sockets at once (new connections are refused, so a proxy
   retries them elsewhere) and cancels the idle keep-alive waits (idle connections close at
   once). A request that still arrives on an open connection is served, with
   `Connection: close` on its response, like every response from then on.
2. In-flight requests get `shutdown_grace` seconds to finish on their own.
3. Then every generation still running is cancelled through its `generation_scope`; each one
   ends its stream with a final error event (`/process`: an error chunk; SSE:
   `data: {"error": ...}` and `data: [DONE]`), bounded by a short final deadline.
4. Whatever connection is left (say, a client stalling on a write) is cancelled outright.

`run_cli` wires this to signals: the first SIGINT or SIGTERM drains (exit status 0), a second
one cancels everything at once (exit status 130). Either way the engine's `async with` exits,
which stops the workers and unlinks their shared memory and semaphores.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace
from functools import partial
from typing import Any

import trio

from tinyllm_trio.config import ServerConfig
from tinyllm_trio.http.app import AppState
from tinyllm_trio.http.connection import HTTPConnection, HTTPError, json_bytes, reason_phrase
from tinyllm_trio.http.routes import Router
from tinyllm_trio.http.startup import ready_line

log = logging.getLogger("tinyllm_trio.server")

# accept() failures that mean "out of resources right now": wait and retry, as trio's
# serve_listeners does, instead of crashing the server.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_RETRY_SECONDS = 0.1
_FINAL_EVENT_SECONDS = 2.0  # after the grace period: time to write the final error events
_REFUSE_SEND_SECONDS = 1.0
_LISTEN_BACKLOG = 65535  # the kernel caps it at net.core.somaxconn, as trio's default does


def _busy_response() -> bytes:
    error = HTTPError(503, "Max connections reached", code="max_connections")
    body = json_bytes(error.to_dict())
    return (
        b"HTTP/1.1 503 " + reason_phrase(503) + b"\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        b"Retry-After: 1\r\n"
        b"Connection: close\r\n\r\n" + body
    )


_BUSY = _busy_response()


class HTTPServer:
    """One server instance: its `AppState`, connections and drain state."""

    def __init__(self, engine: Any, config: ServerConfig) -> None:
        self.config = config
        self.app = AppState(engine, config)
        self.router = Router(self.app)
        self.port: int | None = None
        self.stopped = trio.Event()
        self._connections: set[HTTPConnection] = set()
        self._refusing = 0
        self._admitted = 0  # counted at accept, before the connection's task first runs
        self._all_closed = trio.Event()
        self._shutdown_called = trio.Event()
        self._engine_attached = trio.Event()
        if engine is not None:
            self._engine_attached.set()
        self.listening = trio.Event()  # set once the sockets listen

    def attach_engine(self, engine: Any) -> None:
        """Start serving generation requests (and, with `wait_for_engine`, start listening)."""
        self.app.engine = engine
        self._engine_attached.set()

    def shutdown(self) -> None:
        """Begin the shutdown: /health 503, `drain_delay`, then the drain (idempotent; safe to
        call from any task)."""
        if self.app.stopping:
            return
        self.app.stopping = True
        self._shutdown_called.set()

    @property
    def shutting_down(self) -> bool:
        return self.app.stopping

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def run(
        self,
        *,
        shutdown_trigger: Callable[[], Awaitable[Any]] | None = None,
        wait_for_engine: bool = False,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind, listen, serve until `shutdown()` (or the trigger), drain, return.

        Reports the bound port with `task_status.started(port)`: once listening, or with
        `wait_for_engine`, once bound, and then listens only after `attach_engine` (or returns
        if `shutdown()` comes first). Cancelling the caller's scope stops everything at once.
        """
        config = self.config
        sockets = await bind_sockets(config.host, config.port)
        listeners: list[trio.SocketListener] = []
        self.port = sockets[0].getsockname()[1]
        try:
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    if shutdown_trigger is not None:
                        accepting.start_soon(self._wait_for_trigger, shutdown_trigger)
                    if wait_for_engine:
                        task_status.started(self.port)
                        await _first_of(self._engine_attached.wait, self._shutdown_called.wait)
                    if not self.app.stopping:
                        listeners = [_listen(sock) for sock in sockets]
                        for listener in listeners:
                            accepting.start_soon(self._accept_loop, listener, connections)
                        self.listening.set()
                    if not wait_for_engine:
                        task_status.started(self.port)
                    await self._shutdown_called.wait()
                    delay = config.drain_delay
                    if delay > 0 and listeners:
                        log.info("/health says 503 now; draining in %.1fs", delay)
                        await trio.sleep(delay)
                    accepting.cancel_scope.cancel()
                # Refuse new connections at once: a proxy fails over at connect time.
                for listener in listeners:
                    await listener.aclose()
                await self._drain()
                connections.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()
                for sock in sockets:
                    sock.close()
            self.stopped.set()

    async def _wait_for_trigger(self, trigger: Callable[[], Awaitable[Any]]) -> None:
        await trigger()
        self.shutdown()

    async def _drain(self) -> None:
        self.app.draining = True
        for conn in list(self._connections):
            conn.cancel_idle_wait()
        grace = self.config.shutdown_grace
        log.info("draining %d connection(s), grace %.1fs", self.connection_count, grace)
        if self._connections:
            with trio.move_on_after(grace):
                await self._all_closed.wait()
        if self._connections:
            log.warning(
                "grace period over: cancelling %d generation(s)", self.app.active_generations
            )
            self.app.cancel_generations()
            with trio.move_on_after(_FINAL_EVENT_SECONDS):
                await self._all_closed.wait()

    async def _accept_loop(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error("accept: %s; retrying in %.1fs", exc, _ACCEPT_RETRY_SECONDS)
                await trio.sleep(_ACCEPT_RETRY_SECONDS)
                continue
            # Not len(self._connections): a task started here joins it only when it first
            # runs, so several accepts in a row overshot the cap (513 with 512).
            if self._admitted >= self.config.max_connections:
                if self._refusing >= self.config.max_connections:
                    await stream.aclose()  # a flood: not even a 503
                else:
                    connections.start_soon(self._refuse, stream)
                continue
            self._admitted += 1
            connections.start_soon(self._serve_connection, stream)

    async def _refuse(self, stream: trio.SocketStream) -> None:
        """503 for a connection over the cap; like the original, but as proper HTTP."""
        self._refusing += 1
        self.app.metrics.http_requests.labels("-", "-", "503").inc()
        try:
            with trio.move_on_after(_REFUSE_SEND_SECONDS):
                await stream.send_all(_BUSY)
                await stream.send_eof()
                while await stream.receive_some(65536):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self._refusing -= 1
            await stream.aclose()

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        app = self.app
        conn = HTTPConnection(stream, self.config, is_draining=lambda: app.draining)
        self._connections.add(conn)
        app.metrics.connections.inc()
        try:
            await conn.serve(self.router.handle)
        except Exception:
            log.exception("connection from %s failed", conn.peer)
        finally:
            self._admitted -= 1
            self._connections.discard(conn)
            app.metrics.connections.dec()
            if app.draining and not self._connections:
                self._all_closed.set()


async def bind_sockets(host: str, port: int) -> list[trio.socket.SocketType]:
    """Bound TCP sockets for `host:port`, not yet listening (a connection is refused).

    What `trio.open_tcp_listeners` does, minus `listen()`: one socket per address `host`
    resolves to, SO_REUSEADDR, IPv6 sockets IPv6-only. Raises OSError (say, EADDRINUSE) now.
    """
    infos = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[trio.socket.SocketType] = []
    try:
        for family, kind, proto, _, address in infos:
            sock = trio.socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            await sock.bind(address)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _listen(sock: trio.socket.SocketType) -> trio.SocketListener:
    sock.listen(_LISTEN_BACKLOG)
    return trio.SocketListener(sock)


async def _first_of(*waits: Callable[[], Awaitable[Any]]) -> None:
    """Return when the first of `waits` returns."""
    async with trio.open_nursery() as nursery:

        async def one(wait: Callable[[], Awaitable[Any]]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        for wait in waits:
            nursery.start_soon(one, wait)


def _coerce_config(config_or_host: ServerConfig | str | None, port: int | None) -> ServerConfig:
    if isinstance(config_or_host, ServerConfig):
        return config_or_host if port is None else replace(config_or_host, port=port)
    return ServerConfig(
        host=config_or_host or ServerConfig.host, port=ServerConfig.port if port is None else port
    )


async def serve(
    engine: Any,
    config_or_host: ServerConfig | str | None = None,
    port: int | None = None,
    *,
    shutdown_trigger: Callable[[], Awaitable[Any]] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `engine` over HTTP until cancelled (or drained after `shutdown_trigger` returns).

    `config_or_host` is a `ServerConfig` or a host name (default 127.0.0.1); `port` overrides
    the config's port (0 picks a free one). Use `port = await nursery.start(serve, engine,
    host, 0)` to learn the bound port: it is reported through `task_status.started(port)` once
    the listeners are open.
    """
    server = HTTPServer(engine, _coerce_config(config_or_host, port))
    await server.run(shutdown_trigger=shutdown_trigger, task_status=task_status)


# ---- the command line ---------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per log line (`--log-format json`), extras such as request_id included."""

    _STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self._STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(config: ServerConfig, stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("tinyllm_trio")
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())
    root.propagate = False


def run_cli(args: argparse.Namespace) -> int:
    """`tinyllm-trio serve`: start the engine and the server; stop on SIGINT/SIGTERM."""
    try:
        config = ServerConfig.from_args(args)
    except ValueError as exc:
        print(f"tinyllm-trio serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(config)
    return trio.run(_serve_until_signalled, config)


async def _serve_until_signalled(config: ServerConfig) -> int:
    from tinyllm_trio.engine import open_engine  # lazily: `--help` stays fast

    server = HTTPServer(None, config)
    status = 0
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signals() -> None:
                nonlocal status
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if server.app.engine is None:
                        log.info("received %s while starting: stopping", name)
                        nursery.cancel_scope.cancel()
                        return
                    if not server.shutting_down:
                        log.info(
                            "received %s: draining (grace %.1fs); send it again to stop now",
                            name,
                            config.shutdown_grace,
                        )
                        server.shutdown()
                        continue
                    log.warning("received %s again: stopping now", name)
                    status = 130
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(on_signals)
            try:
                port = await nursery.start(partial(server.run, wait_for_engine=True))
            except OSError as exc:
                log.error("cannot listen on %s:%d: %s", config.host, config.port, exc)
                nursery.cancel_scope.cancel()
                return 1
            log.info(
                "bound http://%s:%d; listening once the workers are ready",
                _url_host(config.host),
                port,
            )
            try:
                async with open_engine(**asdict(config.engine)) as engine:
                    server.attach_engine(engine)
                    log.info("%s", ready_line(config, engine, server.app.model_name, port))
                    await server.stopped.wait()
            except Exception as exc:
                log.error("the engine failed: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
                status = 1
            log.info("stopped")
            nursery.cancel_scope.cancel()
    return status


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host

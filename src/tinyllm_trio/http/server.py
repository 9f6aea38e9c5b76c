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

Connections, and what a client gets beyond each bound (a connection is a file descriptor, and
fds are the resource a flood of sockets exhausts first):

- The cap is `max_connections`, lowered to what RLIMIT_NOFILE allows once a reserve of fds is
  kept for everything else (workers' rings and pipes, a worker's restart, log files, the
  refusals below): `tinyllm-trio serve` first raises its soft RLIMIT_NOFILE to the hard limit,
  as servers commonly do, and logs both.
- At the cap (or at `max_connections_per_ip` for one address), a new connection evicts the
  oldest idle one (waiting, for a second or more, for its first request or, on keep-alive,
  its next, with no bytes unread), so silent
  sockets cannot lock everyone out; a connection that never speaks is closed after
  `header_timeout` anyway.
- With nothing idle to evict, the new connection's request head is read for a moment:
  `/health` and `/ping` are answered as usual (an orchestrator must not restart a server that
  is merely busy), anything else gets 503 + `Retry-After` and a close. Beyond a bounded number
  of such refusals at once, a connection is closed without an answer.
- If accept() still fails for lack of fds (something else used them), one spare fd kept for
  that is let go to accept the waiting connection and close it at once, so a client is never
  left hanging in the listen backlog, then taken back.

`run_cli` wires this to signals: the first SIGINT or SIGTERM drains (exit status 0), a second
one cancels everything at once (exit status 130). Either way the engine's `async with` exits,
which stops the workers and unlinks their shared memory and semaphores.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import resource
import select
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from tinyllm_trio.config import ServerConfig
from tinyllm_trio.http.app import AppState
from tinyllm_trio.http.connection import Exchange, HTTPConnection, HTTPError
from tinyllm_trio.http.routes import Router
from tinyllm_trio.http.startup import ready_line

if TYPE_CHECKING:
    from tinyllm_trio.engine import Engine

log = logging.getLogger("tinyllm_trio.server")

# accept() failures that mean "out of resources right now": wait and retry, as trio's
# serve_listeners does, instead of crashing the server.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_RETRY_SECONDS = 0.1
_FINAL_EVENT_SECONDS = 2.0  # after the grace period: time to write the final error events
_REFUSE_SECONDS = 1.0  # a refused connection's head is read, and answered, within this
_MAX_REFUSING = 64  # refusals in progress at once; beyond it a connection is just closed
# fds kept for everything but client connections, above those open when listening starts: a
# worker's restart (rings, pipes, a process), log files, the listeners, and the refusals.
_FD_HEADROOM = 64
# A connection is evicted only once it has been idle this long: a client sends its request
# within a round trip of connecting, so in a burst of new clients none is taken for a silent one.
_EVICT_AFTER_IDLE_SECONDS = 1.0
_LISTEN_BACKLOG = 65535  # the kernel caps it at net.core.somaxconn, as trio's default does
# What a connection over the cap may still ask for: the probes an orchestrator restarts on.
_PROBES = frozenset({"/health", "/v1/health", "/ping"})


def _busy_error() -> HTTPError:
    return HTTPError(
        503,
        "Max connections reached",
        code="max_connections",
        headers=[(b"Retry-After", b"1")],
        close=True,
    )


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return (old soft, new soft).

    The usual soft limit (1024) is far below what a server with `max_connections` sockets plus
    its workers' fds needs, and the hard limit is what the operator allowed; servers commonly
    raise it (nginx's worker_rlimit_nofile, systemd's own services). An unlimited hard limit is
    capped at the kernel's nr_open, the most setrlimit accepts.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if target == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            return soft, soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            return soft, soft
        return soft, target
    return soft, soft


def _open_fds() -> int:
    """How many fds this process has open now (0 where /proc is not there to say)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir itself opened
    except OSError:
        return 0


def connection_budget(max_connections: int) -> int:
    """`max_connections`, lowered to what RLIMIT_NOFILE leaves after the reserve of fds.

    The reserve is what is open now (the engine's workers are up when a server listens),
    `_FD_HEADROOM` for what comes and goes (a worker's restart, log files) and the refusals
    in progress. Never below 1.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    reserve = _open_fds() + _FD_HEADROOM + _MAX_REFUSING
    return max(1, min(max_connections, soft - reserve))


def _peer_ip(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "-"
    return str(address[0]) if isinstance(address, tuple) else str(address)


class HTTPServer:
    """One server instance: its `AppState`, connections and drain state."""

    def __init__(self, engine: Engine | None, config: ServerConfig) -> None:
        self.config = config
        self.app = AppState(engine, config)
        self.router = Router(self.app)
        self.port: int | None = None
        self.stopped = trio.Event()
        # connection -> client address, for the ones admitted and not yet released
        self._connections: dict[HTTPConnection, str] = {}
        self._refusing = 0
        self._admitted = 0  # counted at accept, before the connection's task first runs
        self._per_ip: Counter[str] = Counter()  # the same, by client address
        self.capacity = config.max_connections  # lowered by the fd budget when listening
        self._spare_fd: int | None = None
        self._all_closed = trio.Event()
        self._shutdown_called = trio.Event()
        self._engine_attached = trio.Event()
        if engine is not None:
            self._engine_attached.set()
        self.listening = trio.Event()  # set once the sockets listen

    def attach_engine(self, engine: Engine) -> None:
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
                        self._set_capacity()
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
            if self._spare_fd is not None:
                os.close(self._spare_fd)
                self._spare_fd = None
            self.stopped.set()

    def _set_capacity(self) -> None:
        """The connection cap for the fds there are, and the spare fd (see the module doc)."""
        self._spare_fd = os.open(os.devnull, os.O_RDONLY)
        self.capacity = connection_budget(self.config.max_connections)
        if self.capacity < self.config.max_connections:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            log.warning(
                "RLIMIT_NOFILE %d leaves fds for %d connection(s), not --max-connections %d: "
                "serving at most %d (raise the hard limit, e.g. LimitNOFILE= in systemd)",
                soft,
                self.capacity,
                self.config.max_connections,
                self.capacity,
            )

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
        """`trio.serve_listeners` with what it cannot do: count a connection against the caps
        the moment it is accepted, evict or refuse over them, and at EMFILE accept and close a
        waiting connection with the spare fd instead of leaving it in the backlog."""
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                if not await self._shed_one(listener, exc):
                    log.error("accept: %s; retrying in %.1fs", exc, _ACCEPT_RETRY_SECONDS)
                    await trio.sleep(_ACCEPT_RETRY_SECONDS)
                continue
            ip = _peer_ip(stream)
            if self._admit(ip):
                connections.start_soon(self._serve_connection, stream, ip)
            elif self._refusing >= _MAX_REFUSING:
                await stream.aclose()  # a flood: not even a 503
            else:
                connections.start_soon(self._refuse, stream)

    async def _shed_one(self, listener: trio.SocketListener, exc: OSError) -> bool:
        """Out of fds at accept: let the spare fd go, accept the waiting connection and close
        it at once (the client sees a close, not a hang in the backlog), take the spare back.
        False if there is no spare to let go, or even that did not make room."""
        if self._spare_fd is None or exc.errno not in (errno.EMFILE, errno.ENFILE):
            return False
        os.close(self._spare_fd)
        self._spare_fd = None
        try:
            with trio.move_on_after(_ACCEPT_RETRY_SECONDS):
                stream = await listener.accept()
                await stream.aclose()
                self.app.metrics.http_requests.labels("-", "-", "503").inc()
                log.warning("accept: %s; closed a new connection at once", exc)
                return True
            return False
        except OSError:
            return False
        finally:
            try:
                self._spare_fd = os.open(os.devnull, os.O_RDONLY)
            except OSError:
                self._spare_fd = None  # tried again when listening next starts

    def _admit(self, ip: str) -> bool:
        """Count a new connection in, evicting an idle one if that is what makes room."""
        per_ip = self.config.max_connections_per_ip
        if per_ip and self._per_ip[ip] >= per_ip and not self._evict_idle(ip):
            return False
        # Not len(self._connections): a task started here joins it only when it first
        # runs, so several accepts in a row overshot the cap (513 with 512).
        if self._admitted >= self.capacity and not self._evict_idle(None):
            return False
        self._admitted += 1
        self._per_ip[ip] += 1
        return True

    def _evict_idle(self, ip: str | None) -> bool:
        """Close the connection (from `ip`, or any) idle the longest; False if none is idle."""
        settled = trio.current_time() - _EVICT_AFTER_IDLE_SECONDS
        idle = [
            conn
            for conn, peer in self._connections.items()
            if conn.idle_since is not None
            and conn.idle_since <= settled
            and (ip is None or peer == ip)
        ]
        if idle:
            # One whose request is in the kernel's buffer, not yet read, is not idle: readable.
            # One poll(2) for all of them.
            poller = select.poll()
            for conn in idle:
                poller.register(conn.fileno, select.POLLIN)
            readable = {fd for fd, _ in poller.poll(0)}
            idle = [conn for conn in idle if conn.fileno not in readable]
        if not idle:
            return False
        victim = min(idle, key=lambda conn: conn.idle_since or 0.0)
        victim.evict()
        self._release(victim)  # its slot is the new connection's now, while it closes
        self.app.metrics.connections_evicted.inc()
        return True

    def _release(self, conn: HTTPConnection) -> None:
        ip = self._connections.pop(conn, None)
        if ip is None:
            return  # released already (evicted)
        self._admitted -= 1
        self._per_ip[ip] -= 1
        if not self._per_ip[ip]:
            del self._per_ip[ip]

    async def _refuse(self, stream: trio.SocketStream) -> None:
        """A connection over the cap: its probes are answered, anything else is 503 + close.

        The head is read for at most `_REFUSE_SECONDS`, so a busy server still answers
        `/health` and `/ping` (an orchestrator must not restart it for being busy); a client
        that sends nothing in that time gets the 503 too.
        """
        self._refusing += 1
        conn = HTTPConnection(stream, self.config)
        try:
            request = None
            with trio.move_on_after(_REFUSE_SECONDS):
                with contextlib.suppress(HTTPError):  # a malformed head: the 503 will do
                    request = await conn.read_request()
            with trio.move_on_after(_REFUSE_SECONDS):
                if request is None:
                    self.app.metrics.http_requests.labels("-", "-", "503").inc()
                    await conn.answer_and_close(_busy_error())
                    return
                exchange = Exchange(conn, request)
                exchange.keep_alive = False
                if exchange.path in _PROBES:
                    await self.router.handle(exchange)  # counted and logged as usual
                else:
                    self.app.metrics.http_requests.labels("-", "-", "503").inc()
                    await exchange.respond_error(_busy_error())
        except Exception:  # ClientGone, a reset: nothing more to say to this client
            pass
        finally:
            self._refusing -= 1
            with trio.CancelScope(shield=True):
                await conn.close()  # bounded: a half-close, a short drain, a close

    async def _serve_connection(self, stream: trio.SocketStream, ip: str) -> None:
        app = self.app
        conn = HTTPConnection(stream, self.config, is_draining=lambda: app.draining)
        self._connections[conn] = ip
        app.metrics.connections.inc()
        try:
            await conn.serve(self.router.handle)
        except Exception:
            log.exception("connection from %s failed", conn.peer)
        finally:
            self._release(conn)
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
    engine: Engine,
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

    before, after = raise_fd_limit()
    if after != before:
        log.info("raised the soft RLIMIT_NOFILE from %d to %d (the hard limit)", before, after)
    else:
        log.info("RLIMIT_NOFILE soft limit %d", after)
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

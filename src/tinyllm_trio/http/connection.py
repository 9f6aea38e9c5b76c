"""The h11 adapter: one object owns a client's socket and its `h11.Connection`.

Everything above this module speaks in requests, JSON bodies and body chunks; everything below
it is h11 events and `trio.SocketStream` bytes. Modelled on h11's `examples/trio-server.py`.

Policy decisions, and what they trade away:

- **Timeouts are cancel scopes.** A new connection's first request head must arrive in full
  within `header_timeout` of the accept (nginx's `client_header_timeout`): one that never
  speaks is closed silently then, so silent sockets cannot hold the connection cap for the
  longer keep-alive time. An idle keep-alive connection waits for the first byte of its next
  request for `keep_alive_timeout`, then closes silently; once a byte arrived, the whole head
  must arrive within `header_timeout`. The body must arrive within `body_timeout`. A slow head
  or body is 408 and close. A slow client therefore never reaches the engine, so it never
  holds a worker slot.
- **An idle connection can be evicted.** While it waits for the first byte of a request (its
  first, or its next on keep-alive), `idle_since` says since when, and `evict()` closes it at
  once; the server evicts the oldest one when the connection cap is reached, so idle sockets
  cannot lock out a client with a request to send.
- **Limits are checked before reading.** h11's `max_incomplete_event_size` caps the head (h11
  answers with a 431 hint); a declared `Content-Length` over `max_body_size` is refused with 413
  before a single body byte is read (and no `100 Continue` is sent); a chunked body is counted as
  it arrives. Any refusal that leaves unread bytes on the wire closes the connection, because the
  framing of whatever follows can no longer be trusted.
- **One error exit per phase.** Before a response has started, an `HTTPError` becomes a JSON error
  response (`Exchange.respond_error`). After it started, only the endpoint knows its stream
  format, so the endpoint writes its own error event; if even that is impossible the connection
  is closed, which a client sees as a truncated chunked body (never as a clean end).
- **A write that stalls is a disconnect.** Each write may make no progress for at most
  `send_timeout`; a client that stops reading is dropped, so it cannot pin a generation forever.
  A write interrupted half-way poisons the connection (`_write_broken`): nothing more is written
  to a stream whose framing is already torn.
- **Disconnects are noticed while waiting, not only on write.** During a response,
  `watch_for_disconnect` keeps a read pending; EOF or a reset cancels the exchange (and so its
  generation) even while the request is still queued or in prefill. Bytes that arrive instead
  (a pipelined next request) are handed to h11's buffer, up to the head limit.
- **Closing is half-close, bounded drain, close**, so a client that is still sending (say, the
  body we refused with 413) reads our answer instead of a TCP reset.

What a bigger server would add: HTTP/2, TLS, request smuggling hardening beyond h11's parser.
"""

from __future__ import annotations

import contextlib
import http
import json
import os
import re
import time
import uuid
from collections.abc import Iterable
from typing import Any

import h11
import trio

from tinyllm_trio.config import ServerConfig

MAX_RECV = 64 * 1024
_CLOSE_DRAIN_SECONDS = 1.0
_CLOSE_DRAIN_BYTES = 4 * 1024 * 1024

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "server_error",
    503: "unavailable_error",
}
_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

Headers = list[tuple[bytes, bytes]]


def reason_phrase(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def json_bytes(obj: Any) -> bytes:
    """Compact UTF-8 JSON (the OpenAI routes); /process uses its own, spaced format."""
    # "replace": a lone surrogate a client sent as a JSON escape cannot become UTF-8.
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")


class HTTPError(Exception):
    """An error answered with an HTTP status, shaped as an OpenAI error object.

    `close` asks for the connection to be closed after the answer (set when unread request bytes
    make the framing untrustworthy, or for protocol errors).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,  # the OpenAI field's name
        code: str | int | None = None,
        param: str | None = None,
        headers: Iterable[tuple[bytes, bytes]] = (),
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _ERROR_TYPES.get(status, "server_error" if status >= 500 else "error")
        self.code = code
        self.param = param
        self.headers = list(headers)
        self.close = close

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class ClientGone(Exception):
    """The peer closed, reset, or stopped reading: nothing more can be sent to it."""


class HTTPConnection:
    """One client socket and its h11 state machine; `serve` runs the keep-alive loop.

    `is_draining` is asked before waiting for another request: while the server drains, an idle
    connection is closed instead of kept alive, and `cancel_idle_wait` (called by the server
    when it starts draining) ends a wait already in progress. A request whose first byte already
    arrived is read and answered normally.
    """

    def __init__(self, stream: trio.SocketStream, config: ServerConfig, *, is_draining=None):
        self.stream = stream
        self.config = config
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=config.max_header_size)
        self.peer_closed = False
        self.requests_served = 0
        self.peer = _peer_name(stream)
        self.request: h11.Request | None = None
        self._is_draining = is_draining or (lambda: False)
        self._idle_scope: trio.CancelScope | None = None
        self.accepted_at = trio.current_time()
        #: When this connection began waiting, idle, for a request's first byte; None while a
        #: request is read or answered. What eviction orders by (oldest first).
        self.idle_since: float | None = None
        self._evicted = False
        self._write_broken = False
        self._unsent = b""  # the tail of a `try_send_bytes` the socket did not take
        self._fd = stream.socket.fileno()
        # trio already sets TCP_NODELAY on TCP streams; say so here, where latency is decided.
        # (Not TCP, say a unix socket in some embedding: nothing to disable.)
        with contextlib.suppress(OSError):
            self.stream.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, True)

    # ---- the loop -------------------------------------------------------------------------

    async def serve(self, handle) -> None:
        """Answer requests until the peer leaves, a response must close, or the server drains.

        `handle(exchange)` answers one request; it may raise `HTTPError` before its response
        starts. The socket is always closed on return.
        """
        try:
            while True:
                try:
                    request = await self.read_request()
                except HTTPError as exc:
                    await self.answer_and_close(exc)
                    return
                if request is None:
                    return
                exchange = Exchange(self, request)
                self.requests_served += 1
                await handle(exchange)
                if not await self._finish_cycle():
                    return
        except ClientGone:
            pass
        finally:
            await self.close()

    async def _finish_cycle(self) -> bool:
        """Discard an unread request body, then start the next cycle; False: close instead."""
        conn = self.conn
        if conn.our_state is not h11.DONE or self.peer_closed or self._write_broken:
            return False
        if conn.their_state is h11.SEND_BODY:
            try:
                await self.read_body()
            except HTTPError:
                return False
        if conn.their_state is not h11.DONE:
            return False
        conn.start_next_cycle()
        return True

    async def answer_and_close(self, exc: HTTPError) -> None:
        """The one exit for protocol-level errors (no exchange exists yet)."""
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = json_bytes(exc.to_dict())
        headers: Headers = [
            (b"Content-Type", b"application/json"),
            (b"Content-Length", str(len(body)).encode()),
            (b"Connection", b"close"),
            *exc.headers,
        ]
        try:
            await self.send(
                h11.Response(
                    status_code=exc.status, reason=reason_phrase(exc.status), headers=headers
                )
            )
            await self.send(h11.Data(data=body))
            await self.send(h11.EndOfMessage())
        except (h11.LocalProtocolError, ClientGone):
            pass

    # ---- reading --------------------------------------------------------------------------

    async def _receive(self) -> bytes:
        try:
            data = await self.stream.receive_some(MAX_RECV)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.peer_closed = True
        return data

    def _next_event(self):
        try:
            return self.conn.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            message = (
                "request head too large" if status == 431 else f"malformed HTTP request: {exc}"
            )
            raise HTTPError(status, message, close=True) from exc

    async def read_request(self) -> h11.Request | None:
        """The next request head, or None when the peer left or idled out between requests."""
        started = bool(self.conn.trailing_data[0])
        if self.requests_served == 0:  # the first head: within header_timeout of the accept
            deadline = self.accepted_at + self.config.header_timeout
        else:
            deadline = trio.current_time() + (
                self.config.header_timeout if started else self.config.keep_alive_timeout
            )
        while True:
            event = self._next_event()
            if type(event) is h11.Request:
                # h11 enforces the limit only on a head still incomplete in its buffer; one
                # that arrived whole in a single read is measured here.
                if _head_size(event) > self.config.max_header_size:
                    raise HTTPError(431, "request head too large", close=True)
                if _has_both_framings(event):
                    # RFC 9112 6.1: a request with both may be an attempt at request smuggling;
                    # the framing of what follows cannot be trusted, so answer 400 and close.
                    raise HTTPError(
                        400,
                        "a request must not have both Content-Length and Transfer-Encoding",
                        close=True,
                    )
                self.request = event
                return event
            if type(event) is h11.ConnectionClosed:
                return None
            if event is not h11.NEED_DATA:  # pragma: no cover - h11 yields nothing else here
                raise HTTPError(400, "unexpected HTTP event", close=True)
            if not started:
                # Between requests of a keep-alive connection, a drain closes it; a connection
                # accepted just before the listener closed still gets its first request read
                # and served (with Connection: close): the client sent it in good faith.
                keep_alive_wait = self.requests_served > 0
                if keep_alive_wait and self._is_draining():
                    return None
                with trio.CancelScope(deadline=deadline) as scope:
                    self._idle_scope = scope
                    self.idle_since = trio.current_time()
                    if self._evicted:
                        scope.cancel()
                    data = await self._receive()
                self._idle_scope = None
                self.idle_since = None
                if scope.cancelled_caught:
                    return None
                started = True
                if keep_alive_wait:
                    deadline = trio.current_time() + self.config.header_timeout
            else:
                with trio.move_on_at(deadline) as scope:
                    data = await self._receive()
                if scope.cancelled_caught:
                    raise HTTPError(408, "timed out reading the request head", close=True)
            self.conn.receive_data(data)

    def draining(self) -> bool:
        return self._is_draining()

    def cancel_idle_wait(self) -> None:
        """Close this connection now if it is waiting, idle, for its next request (the drain).

        A connection still waiting for its first request is left to send it: it was accepted
        before the listener closed, and its client connected in good faith.
        """
        if self._idle_scope is not None and self.requests_served > 0:
            self._idle_scope.cancel()

    @property
    def fileno(self) -> int:
        return self._fd

    def evict(self) -> None:
        """Close this idle connection now, without the half-close drain (the server needs its
        slot); one that is not idle, or not yet waiting, closes when it next waits."""
        self._evicted = True
        if self._idle_scope is not None:
            self._idle_scope.cancel()

    async def read_body(self, limit: int | None = None) -> bytes:
        """The whole request body: 413 before reading if it is declared too large, 408 if slow."""
        limit = self.config.max_body_size if limit is None else limit
        declared = self._declared_length()
        if declared is not None and declared > limit:
            raise HTTPError(
                413,
                f"request body of {declared} bytes is over the limit of {limit} bytes",
                close=True,
            )
        if self.conn.they_are_waiting_for_100_continue:
            await self.send(h11.InformationalResponse(status_code=100, headers=[]))
        parts: list[bytes] = []
        size = 0
        with trio.move_on_after(self.config.body_timeout) as scope:
            while True:
                event = self._next_event()
                if event is h11.NEED_DATA:
                    self.conn.receive_data(await self._receive())
                elif type(event) is h11.Data:
                    size += len(event.data)
                    if size > limit:
                        raise HTTPError(
                            413, f"request body is over the limit of {limit} bytes", close=True
                        )
                    parts.append(event.data)
                elif type(event) is h11.EndOfMessage:
                    return b"".join(parts)
                else:  # ConnectionClosed mid-body
                    raise ClientGone("peer closed while sending its body")
        assert scope.cancelled_caught
        raise HTTPError(408, "timed out reading the request body", close=True)

    def _declared_length(self) -> int | None:
        # h11 validated the header when it parsed the request head.
        if self.request is not None:
            for name, value in self.request.headers:
                if name == b"content-length":
                    return int(value)
        return None

    async def watch_for_disconnect(self, scope: trio.CancelScope) -> None:
        """Cancel `scope` when the peer closes or resets while its response is being produced.

        Runs beside a handler (same nursery); cancelled by it when the response is complete.
        Pipelined bytes go into h11's buffer for the next cycle, up to the head limit, after
        which we stop reading (TCP back-pressure does the rest).
        """
        while len(self.conn.trailing_data[0]) <= self.config.max_header_size:
            data = await self._receive()
            if not data:
                scope.cancel()
                return
            self.conn.receive_data(data)
        await trio.sleep_forever()

    # ---- writing --------------------------------------------------------------------------

    async def send(self, event) -> None:
        data = self.conn.send(event)
        if data:
            await self.send_bytes(data)

    async def send_bytes(self, data: bytes) -> None:
        """Write already-framed bytes; a stall over `send_timeout` or a reset is ClientGone.

        The per-token hot path. The common case, room in the kernel's send buffer, is one
        non-blocking `write(2)` and no trip through the scheduler (so it is not a checkpoint:
        callers reach one at their next `await` on the engine). Only a write that would block
        (the client is not keeping up) waits for the socket under a `send_timeout` cancel
        scope; a cancel scope per token would cost more than the write itself.
        """
        if self._write_broken:
            raise ClientGone("an earlier write was interrupted")
        if self._unsent:
            data, self._unsent = self._unsent + data, b""
        try:
            sent = os.write(self._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:  # EPIPE, ECONNRESET, EBADF: the peer or the socket is gone
            self._write_broken = True
            raise ClientGone(str(exc)) from exc
        if sent == len(data):
            return
        self._write_broken = True  # stays set if the wait below is cancelled half-way
        with trio.move_on_after(self.config.send_timeout) as scope:
            try:
                await self.stream.send_all(memoryview(data)[sent:])
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ClientGone(str(exc)) from exc
        if scope.cancelled_caught:
            raise ClientGone("client stopped reading")
        self._write_broken = False

    def try_send_bytes(self, data: bytes) -> bool:
        """Write already-framed bytes now, without waiting: True when the socket took them all.

        False when it did not, or the connection is broken: then the caller goes back to
        `send_bytes`, which writes the part not taken first (waiting for the socket under
        `send_timeout`) or raises ClientGone, so nothing is lost or reordered. For the token
        sink (`Generation.set_token_sink`), which runs where no task can wait.
        """
        if self._write_broken or self._unsent:
            self._unsent += data
            return False
        try:
            sent = os.write(self._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:  # the peer or the socket is gone: the next send_bytes says so
            self._write_broken = True
            return False
        if sent == len(data):
            return True
        self._unsent = data[sent:]
        return False

    async def close(self) -> None:
        """Half-close, drain what the peer still sends for a bounded time, close."""
        try:
            if not self.peer_closed and not self._write_broken and not self._evicted:
                with trio.move_on_after(_CLOSE_DRAIN_SECONDS):
                    await self.stream.send_eof()
                    drained = 0
                    while drained < _CLOSE_DRAIN_BYTES:
                        data = await self._receive()
                        if not data:
                            break
                        drained += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await self.stream.aclose()


def _check_encodable(value: Any) -> None:
    """400 with `param` for any string (key or value) that cannot be encoded as UTF-8.

    JSON allows a lone surrogate escape (`"\\ud800"`); such a string cannot be sent to a worker
    or written back, so every text field is refused here, at the edge, once for all endpoints.
    Iterative, so a deep document cannot exhaust the stack.
    """
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            strings = [(path, item)]
        elif isinstance(item, dict):
            strings = []
            for key, child in item.items():
                child_path = f"{path}.{key}" if path else str(key)
                strings.append((child_path, key))
                stack.append((child_path, child))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", child) for i, child in enumerate(item))
            continue
        else:
            continue
        for where, text in strings:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                param = where.encode("utf-8", "replace").decode("utf-8")
                raise HTTPError(
                    400,
                    f"'{param}' is not valid Unicode text (a lone surrogate?)",
                    param=param,
                    code="invalid_text",
                ) from None


def _head_size(request: h11.Request) -> int:
    size = len(request.method) + len(request.target) + 12  # "M T HTTP/1.1\r\n"
    for name, value in request.headers:
        size += len(name) + len(value) + 4  # ": " and CRLF
    return size


def _has_both_framings(request: h11.Request) -> bool:
    names = {name for name, _ in request.headers}
    return b"content-length" in names and b"transfer-encoding" in names


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except (OSError, AttributeError):
        return "-"
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address) or "-"


class Exchange:
    """One request and its response, as the endpoints see it.

    `respond*` send a complete response; `start_stream` / `send_chunk` / `end_stream` send a
    chunked one (each `send_chunk` is one HTTP chunk, written at once: no buffering).
    """

    __slots__ = (
        "_body",
        "_chunked",
        "_conn",
        "arrival",
        "connection",
        "cors_headers",
        "headers",
        "keep_alive",
        "method",
        "path",
        "query",
        "request_id",
        "response_started",
        "status",
    )

    def __init__(self, connection: HTTPConnection, request: h11.Request) -> None:
        self.arrival = time.perf_counter()  # the head is parsed: TTFT and E2E count from here
        self.connection = connection
        self._conn = connection.conn
        self.method = request.method.decode("ascii", "replace")
        target = request.target.decode("latin-1")
        self.path, _, self.query = target.partition("?")
        self.headers = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in request.headers
        }
        given = self.headers.get("x-request-id", "")
        self.request_id = given if _REQUEST_ID_OK.fullmatch(given) else uuid.uuid4().hex
        self.status: int | None = None
        self.response_started = False
        self.keep_alive = True
        self._body: bytes | None = None
        self._chunked = False
        self.cors_headers: Headers = []  # set by the router; on every response, streams too

    # ---- request --------------------------------------------------------------------------

    async def body(self) -> bytes:
        if self._body is None:
            self._body = await self.connection.read_body()
        return self._body

    async def json(self) -> Any:
        """The body parsed as JSON: 400 for a body that is not UTF-8 or not JSON."""
        raw = await self.body()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPError(400, "request body is not valid UTF-8") from None
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise HTTPError(400, f"request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise HTTPError(400, "request body is nested too deeply") from None
        if "\\u" in text:  # only a \uXXXX escape can make a lone surrogate
            _check_encodable(value)
        return value

    # ---- response -------------------------------------------------------------------------

    def _headers(self, content_type: bytes, extra: Iterable[tuple[bytes, bytes]]) -> Headers:
        headers: Headers = [(b"Content-Type", content_type)]
        if self.keep_alive and not self.connection.draining():
            headers.extend(extra)
        else:  # replaces any `Connection: keep-alive` the endpoint asked for
            headers.extend(h for h in extra if h[0].lower() != b"connection")
            headers.append((b"Connection", b"close"))
        headers.append((b"X-Request-Id", self.request_id.encode("ascii")))
        headers.extend(self.cors_headers)
        return headers

    async def respond(
        self,
        status: int,
        body: bytes,
        content_type: bytes = b"application/json",
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        all_headers = self._headers(content_type, headers)
        if status != 204:  # a 204 has no body, and RFC 9110 forbids it a Content-Length
            all_headers.insert(1, (b"Content-Length", str(len(body)).encode("ascii")))
        self.status = status
        self.response_started = True
        send = self.connection.send
        await send(
            h11.Response(status_code=status, reason=reason_phrase(status), headers=all_headers)
        )
        if body and self.method != "HEAD":
            await send(h11.Data(data=body))
        await send(h11.EndOfMessage())

    async def respond_json(self, status: int, obj: Any, headers=()) -> None:
        await self.respond(status, json_bytes(obj), b"application/json", headers)

    async def respond_error(self, exc: HTTPError) -> None:
        if exc.close:
            self.keep_alive = False
        await self.respond(exc.status, json_bytes(exc.to_dict()), b"application/json", exc.headers)

    async def start_stream(
        self, status: int, content_type: bytes, headers: Iterable[tuple[bytes, bytes]] = ()
    ) -> None:
        """Send the head of a chunked response (h11 frames each later chunk)."""
        all_headers = self._headers(content_type, headers)
        all_headers.insert(1, (b"Transfer-Encoding", b"chunked"))
        self.status = status
        self.response_started = True
        response = h11.Response(
            status_code=status, reason=reason_phrase(status), headers=all_headers
        )
        head = self._conn.send(response)
        # h11 keeps `Transfer-Encoding: chunked` for an HTTP/1.1 peer (and drops it for 1.0).
        self._chunked = b"Transfer-Encoding: chunked" in head
        await self.connection.send_bytes(head)

    async def send_chunk(self, data: bytes) -> None:
        """One HTTP chunk, written now: the per-token hot path, one frame, one `write(2)`.

        On a chunked response the frame is formatted here rather than by h11: h11's chunked
        writer keeps no state between chunks (it writes `size CRLF data CRLF`, exactly this),
        so the protocol state stays right, and this saves h11's event machinery per token.
        An HTTP/1.0 peer (close-delimited body) goes through h11.
        """
        if self._chunked:
            await self.connection.send_bytes(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            await self.connection.send_bytes(self._conn.send(h11.Data(data=data)))

    def try_send_chunk(self, data: bytes) -> bool:
        """`send_chunk` without waiting, for the token sink: see `try_send_bytes`."""
        if self._chunked:
            return self.connection.try_send_bytes(b"%x\r\n%b\r\n" % (len(data), data))
        return self.connection.try_send_bytes(self._conn.send(h11.Data(data=data)))

    async def end_stream(self) -> None:
        await self.connection.send(h11.EndOfMessage())

    def can_respond(self) -> bool:
        """True while an error can still be answered with a status code."""
        return not self.response_started and self._conn.our_state in (h11.IDLE, h11.SEND_RESPONSE)

    async def watch_for_disconnect(self, scope: trio.CancelScope) -> None:
        await self.connection.watch_for_disconnect(scope)

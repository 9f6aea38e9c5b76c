"""A small HTTP/1.1 client on Trio and h11, for the load generator and the tests.

It exists so the benchmark needs no dependency beyond the server's own (trio, h11), and so a
test can see what a generic client cannot: the exact HTTP chunk boundaries (h11 marks them with
`chunk_start` / `chunk_end`), the arrival time of each chunk, and a connection reused across
requests (keep-alive).

    async with await HTTPClient.connect("127.0.0.1", port) as client:
        response = await client.request("POST", "/process", json={"message": "hi"})
        async for chunk in response.chunks():      # one item per HTTP chunk
            ...
"""

from __future__ import annotations

import json as _json
import os
from collections.abc import AsyncIterator, Iterable
from typing import Any

import h11
import trio

_RECV = 64 * 1024


class ClientResponse:
    """Status and headers at once; the body streams from `chunks()` (or whole from `read()`)."""

    def __init__(self, client: HTTPClient, response: h11.Response) -> None:
        self._client = client
        self.status = response.status_code
        self.reason = response.reason.decode("latin-1")
        self.http_version = response.http_version
        self.header_list = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers]
        self.headers = {k.lower(): v for k, v in self.header_list}
        self._consumed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, one item per HTTP chunk for a chunked body (else per received piece)."""
        if self._consumed:
            raise RuntimeError("the body was already read")
        self._consumed = True
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            async for chunk in self._chunked_body():
                yield chunk
            return
        while True:
            event = await self._client._next_event()
            if type(event) is h11.Data:
                yield event.data
            elif type(event) is h11.EndOfMessage:
                self._client._finish()
                return
            else:
                raise h11.RemoteProtocolError(f"unexpected {event!r}")

    async def _chunked_body(self) -> AsyncIterator[bytes]:
        """Chunked framing parsed straight off the socket (`take_chunks`): h11 would turn every
        chunk into events through its state machine, which costs more than the rest of the
        client per token. When the body ends, the connection gets a fresh h11 state for its
        next request (keep-alive), fed with whatever followed the body."""
        client = self._client
        buffer = bytearray(client.conn.trailing_data[0])
        while True:
            chunks, done = take_chunks(buffer)
            for chunk in chunks:
                yield chunk
            if done:
                client.conn = h11.Connection(h11.CLIENT)
                if "close" in self.headers.get("connection", "").lower():
                    client.must_close = True
                if buffer:
                    client.conn.receive_data(bytes(buffer))
                return
            data = await client.receive_some()
            if not data:
                raise h11.RemoteProtocolError("peer closed in the middle of a chunked body")
            buffer += data

    async def read(self) -> bytes:
        return b"".join([c async for c in self.chunks()])

    async def json(self) -> Any:
        return _json.loads(await self.read())


class HTTPClient:
    """One keep-alive connection; requests run one after another on it."""

    def __init__(self, stream: trio.SocketStream, host: str) -> None:
        self.stream = stream
        self.host = host
        self.conn = h11.Connection(h11.CLIENT)
        self.must_close = False
        self._fd = stream.socket.fileno()

    async def receive_some(self) -> bytes:
        """The next bytes from the socket (b"" at EOF): `stream.receive_some`, cheaper.

        Trio's `receive_some` first tries to read, and a streaming response's next chunk is
        almost never there yet, so each chunk would cost a failed `recv`, the wait, and the
        `recv` again, through several wrapper layers. Here we wait for readability first, then
        read once: the load generator's per-token cost, which it takes from the server's CPU.
        Errors are trio's (`BrokenResourceError`, `ClosedResourceError`).
        """
        fd = self._fd
        if fd < 0 or self.stream.socket.fileno() != fd:
            raise trio.ClosedResourceError("the connection was closed")
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                return os.read(fd, _RECV)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket error: {exc}") from exc

    @classmethod
    async def connect(cls, host: str, port: int) -> HTTPClient:
        stream = await trio.open_tcp_stream(host, port)
        return cls(stream, f"{host}:{port}")

    async def __aenter__(self) -> HTTPClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.stream.aclose()

    @property
    def reusable(self) -> bool:
        conn = self.conn
        return not self.must_close and conn.our_state is h11.IDLE and conn.their_state is h11.IDLE

    async def _send(self, event: Any) -> None:
        data = self.conn.send(event)
        if data:
            await self.stream.send_all(data)

    async def _next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.stream.receive_some(_RECV))

    def _finish(self) -> None:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()

    async def request(
        self,
        method: str,
        target: str,
        *,
        json: Any = None,
        body: bytes | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> ClientResponse:
        """Send a request and return once the response head arrived."""
        if json is not None:
            body = _json.dumps(json).encode("utf-8")
        all_headers = [("Host", self.host), *headers]
        if body is not None:
            all_headers.append(("Content-Length", str(len(body))))
            if json is not None:
                all_headers.append(("Content-Type", "application/json"))
        await self._send(h11.Request(method=method, target=target, headers=all_headers))
        if body:
            await self._send(h11.Data(data=body))
        await self._send(h11.EndOfMessage())
        while True:
            event = await self._next_event()
            if type(event) is h11.InformationalResponse:
                continue
            if type(event) is h11.Response:
                return ClientResponse(self, event)
            raise h11.RemoteProtocolError(f"unexpected {event!r}")


def take_chunks(buffer: bytearray) -> tuple[list[bytes], bool]:
    """Remove every complete HTTP/1.1 chunk from the front of `buffer` and return their data,
    and whether the body's last chunk (size 0, then the trailer section) was among them; the
    bytes after the body stay in `buffer`. Raises h11.RemoteProtocolError on a bad size line.
    """
    chunks: list[bytes] = []
    pos = 0
    try:
        while True:
            eol = buffer.find(b"\r\n", pos)
            if eol < 0:
                return chunks, False
            try:
                size = int(bytes(buffer[pos:eol]).split(b";", 1)[0], 16)
            except ValueError:
                raise h11.RemoteProtocolError("bad chunk size line") from None
            if size == 0:
                end = buffer.find(b"\r\n\r\n", eol)  # (trailers, if any, end here)
                if end < 0:
                    return chunks, False
                pos = end + 4
                return chunks, True
            start = eol + 2
            if len(buffer) < start + size + 2:
                return chunks, False
            chunks.append(bytes(buffer[start : start + size]))
            pos = start + size + 2
    finally:
        del buffer[:pos]


def sse_events(buffer: bytearray, data: bytes) -> list[str]:
    """Feed bytes; return the `data:` payloads of the SSE events completed so far.

    Handles events split across chunks and several events in one chunk; comments (`: ping`)
    and other fields are skipped.
    """
    buffer += data.replace(b"\r\n", b"\n")
    out: list[str] = []
    while True:
        end = buffer.find(b"\n\n")
        if end < 0:
            return out
        raw = bytes(buffer[:end])
        del buffer[: end + 2]
        lines = [
            line[5:].lstrip(b" ") if line.startswith(b"data:") else None
            for line in raw.split(b"\n")
        ]
        payload = [line for line in lines if line is not None]
        if payload:
            out.append(b"\n".join(payload).decode("utf-8"))

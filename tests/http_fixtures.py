"""Test helpers for the HTTP layer: a scripted fake Engine, a server runner, raw-socket I/O.

The fake engine implements the Engine interface the HTTP layer uses (generate, tokenizer,
model_config, model_id, ready, stats) with scripted events, so the protocol tests run without
worker processes and can force every path: overload, context overflow, mid-stream errors, EOS
stops, slow tokens (for disconnect and shutdown tests). The integration tests use the real
Engine instead.
"""

from __future__ import annotations

import re
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from tinyllm_trio.config import ServerConfig
from tinyllm_trio.engine import OverloadedError, choice_params
from tinyllm_trio.http.server import HTTPServer
from tinyllm_trio.model.batching import DoneEvent, ErrorEvent, TokenEvent, encode_prompt
from tinyllm_trio.model.sampling import SamplingParams
from tinyllm_trio.model.tokenizer import build_vocab
from tinyllm_trio.model.transformer import ModelConfig

STORY = "lily and tom were friends . they worried about the cat . the dog ran to the park !"


@dataclass
class FakeEngine:
    """Yields `words` cyclically as token texts, one per `delay` seconds.

    - `eos_after`: stop with finish "stop" (no token event for EOS) after that many tokens,
      unless `ignore_eos`.
    - `fail_after`: end with an ErrorEvent after that many tokens.
    - `overloaded`: raise OverloadedError before the first event.
    - `first_delay`: extra wait before the first event (queue + prefill).
    Records every call in `calls` and every generation left early in `cancelled`.
    """

    words: tuple[str, ...] = (" worried",)
    delay: float = 0.0
    first_delay: float = 0.0
    eos_after: int | None = None
    fail_after: int | None = None
    overloaded: bool = False
    ready: bool = True
    model_id: str = "tinyllm"
    max_context: int = 64
    calls: list[tuple[Any, SamplingParams]] = field(default_factory=list)
    running: int = 0
    waiting: int = 0
    cancelled: int = 0
    finished: int = 0
    encode_threads: list[bool] = field(default_factory=list)  # True: on the main thread

    def __post_init__(self) -> None:
        self.tokenizer = build_vocab([STORY], n_words=30, n_chars=30)
        self.model_config = ModelConfig(
            vocab_size=self.tokenizer.vocab_size,
            n_embd=16,
            n_head=2,
            n_layer=1,
            max_context=self.max_context,
        )

    def stats(self) -> dict[str, Any]:
        return {"running": self.running, "waiting": self.waiting, "restarts": 0}

    def encode_prompt(self, prompt: str | list[int], *, parse_special: bool = True) -> list[int]:
        """As the Engine's; records the thread it ran in (long prompts leave the event loop)."""
        self.encode_threads.append(threading.current_thread() is threading.main_thread())
        return encode_prompt(prompt, self.tokenizer, self.model_config, parse_special=parse_special)

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None):
        params = params or SamplingParams()
        ids = encode_prompt(prompt, self.tokenizer, self.model_config)  # as the Engine does
        params.check_vocab(self.model_config.vocab_size)
        self.calls.append((prompt, params))
        if self.overloaded:
            raise OverloadedError("the queue is full")
        self.running += 1
        done = False
        try:
            if self.first_delay:
                await trio.sleep(self.first_delay)
            n = 0
            while True:
                if self.fail_after is not None and n >= self.fail_after:
                    done = True
                    yield ErrorEvent(1, "the worker died", "worker_died")
                    return
                if self.eos_after is not None and n >= self.eos_after and not params.ignore_eos:
                    done = True
                    yield DoneEvent(1, "stop", len(ids), n, {"queue_ms": 1.0})
                    return
                word = self.words[n % len(self.words)]
                n += 1
                last = n >= params.max_tokens
                logprobs = None
                if params.logprobs is not None:
                    top = [
                        {"id": 7 + i, "token": f"t{i}", "logprob": -0.5 - i}
                        for i in range(params.logprobs)
                    ]
                    logprobs = [{"id": 7, "token": word, "logprob": -0.25, "top_logprobs": top}]
                if self.delay and n > 1:
                    await trio.sleep(self.delay)
                yield TokenEvent(1, [7], word, "length" if last else None, logprobs)
                if last:
                    done = True
                    yield DoneEvent(1, "length", len(ids), n, {"queue_ms": 2.0})
                    return
        finally:
            self.running -= 1
            if done:
                self.finished += 1
            else:
                self.cancelled += 1

    def generate_choices(
        self, prompt: str | list[int], params: SamplingParams | None = None, n: int = 1
    ) -> FakeChoices:
        """n of `generate`'s streams, one after the other; n validated as the Engine does."""
        choice_params(params or SamplingParams(), n)
        return FakeChoices(self, prompt, params, n)


class FakeChoices:
    """`Engine.generate_choices`'s shape: choice i's events carry request id i + 1."""

    def __init__(
        self, engine: FakeEngine, prompt: str | list[int], params: SamplingParams | None, n: int
    ) -> None:
        self._events = self._run(engine, prompt, params, n)

    @staticmethod
    async def _run(engine: FakeEngine, prompt: Any, params: Any, n: int) -> AsyncIterator[Any]:
        for i in range(n):
            async for event in engine.generate(prompt, params):
                event.request_id = i + 1
                yield event

    def index(self, request_id: int) -> int:
        return request_id - 1

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._events

    async def aclose(self) -> None:
        await self._events.aclose()


class KVUsageEngine(FakeEngine):
    """A FakeEngine whose stats report KV-cache usage, as a pool of two workers would."""

    def stats(self) -> dict:
        return {
            **super().stats(),
            "kv_cache_usage": 0.25,
            "max_batch": 2,
            "max_context": 64,
            "workers": [{"index": 0, "kv_tokens": 32}, {"index": 1, "kv_tokens": 0}],
        }


def fast_config(**overrides: Any) -> ServerConfig:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "access_log": False,
        "shutdown_grace": 1.0,
    }
    values.update(overrides)
    return ServerConfig(**values)


@asynccontextmanager
async def running_server(engine: Any, **overrides: Any) -> AsyncIterator[tuple[HTTPServer, int]]:
    """An `HTTPServer` on 127.0.0.1:<free port>, cancelled on exit."""
    server = HTTPServer(engine, fast_config(**overrides))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run)
        yield server, port
        nursery.cancel_scope.cancel()


async def raw_request(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (or `timeout`)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = bytearray()
    async with stream:
        await stream.send_all(data)
        with trio.move_on_after(timeout):
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not chunk:
                    break
                received += chunk
    return bytes(received)


async def read_until(stream: trio.SocketStream, marker: bytes, *, timeout: float = 5.0) -> bytes:
    """Read from `stream` until `marker` appears (for keep-alive exchanges)."""
    received = bytearray()
    with trio.fail_after(timeout):
        while marker not in received:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            received += chunk
    return bytes(received)


def post(path: str, body: bytes, *, extra: str = "", close: bool = True) -> bytes:
    """A raw POST; `close` adds `Connection: close` so `raw_request` ends promptly."""
    if close:
        extra += "Connection: close\r\n"
    return (
        f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def get(path: str, *, extra: str = "", close: bool = True) -> bytes:
    if close:
        extra += "Connection: close\r\n"
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode()


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, lowercased headers, body bytes as sent: chunk framing kept)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def dechunk(body: bytes) -> list[bytes]:
    """The HTTP chunks of a chunked body, in order, without the terminating empty chunk."""
    chunks = []
    pos = 0
    while True:
        match = re.compile(rb"([0-9a-fA-F]+)\r\n").match(body, pos)
        assert match, f"bad chunk framing at {pos}: {body[pos : pos + 40]!r}"
        size = int(match.group(1), 16)
        start = match.end()
        if size == 0:
            assert body[start : start + 2] == b"\r\n"
            return chunks
        chunks.append(body[start : start + size])
        assert body[start + size : start + size + 2] == b"\r\n"
        pos = start + size + 2

"""Test helpers for the HTTP layer: a scripted Engine, a server runner, raw-socket I/O.

`FakeEngine` is a real `Engine` on the in-process backend (`tinyllm_trio.backend`) whose event
source is a `ScriptedBatcher`: the protocol tests run without worker processes and can force
every path (overload, context overflow, mid-stream errors, EOS stops, slow tokens for
disconnect and shutdown tests), while every event takes the production path from the backend
through `Generation`, its `RequestStream` and the HTTP token sink. The integration tests use
the worker pool instead.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from scripted import ScriptedBatcher
from tinyllm_trio.backend import InProcessBackend
from tinyllm_trio.config import ServerConfig
from tinyllm_trio.engine import Choices, Engine, Generation, OverloadedError
from tinyllm_trio.http.server import HTTPServer
from tinyllm_trio.model.sampling import SamplingParams
from tinyllm_trio.model.tokenizer import build_vocab
from tinyllm_trio.model.transformer import ModelConfig

STORY = "lily and tom were friends . they worried about the cat . the dog ran to the park !"


class ScriptedBackend(InProcessBackend):
    """The in-process backend, with `overloaded()` standing in for a full admission queue."""

    def __init__(self, source: ScriptedBatcher, overloaded: Callable[[], bool]) -> None:
        # FakeEngine took any number of generations at once: room for every test's load
        super().__init__(source, max_batch=256, max_queue=256, in_thread=True)
        self.overloaded = overloaded

    def check_admission(self, n: int = 1) -> None:
        if self.overloaded():
            raise OverloadedError("the queue is full")
        super().check_admission(n)


def _knob(name: str) -> Any:
    """A FakeEngine attribute that reads and writes the script's (a test may change it)."""
    return property(
        lambda self: getattr(self.script, name),
        lambda self, value: setattr(self.script, name, value),
    )


class FakeEngine(Engine):
    """A real `Engine` over the in-process backend and a `ScriptedBatcher`: the HTTP tests
    run `Engine.generate` -> `Generation` -> `RequestStream` -> token sink, the production
    per-token path, with scripted tokens and timing and no worker processes.

    `running_server` runs its backend (`run`). The script's knobs and counters read and write
    through to the batcher (`delay`, `first_delay`, `eos_after`, `fail_after`, `running`,
    `cancelled`, `finished`); `overloaded` makes admission raise OverloadedError; `ready` can
    be set; `calls` records each `generate` (one per choice) that passed validation, as
    (prompt as given, params); `encode_threads` whether each `encode_prompt` ran on the main
    thread. `running` and `waiting`, when set by a test, are what `stats()` reports.
    """

    def __init__(
        self,
        *,
        words: tuple[str, ...] = (" worried",),
        delay: float = 0.0,
        first_delay: float = 0.0,
        eos_after: int | None = None,
        fail_after: int | None = None,
        overloaded: bool = False,
        ready: bool = True,
        max_context: int = 64,
    ) -> None:
        tokenizer = build_vocab([STORY], n_words=30, n_chars=30)
        config = ModelConfig(
            vocab_size=tokenizer.vocab_size, n_embd=16, n_head=2, n_layer=1, max_context=max_context
        )
        self.script = ScriptedBatcher(words, delay, first_delay, eos_after, fail_after)
        self.overloaded = overloaded  # read by the next generate
        self._ready = ready
        self._stats_override: dict[str, int] = {}
        self.calls: list[tuple[Any, SamplingParams]] = []
        self.encode_threads: list[bool] = []
        super().__init__(self._new_backend(), tokenizer, config)

    def _new_backend(self) -> ScriptedBackend:
        return ScriptedBackend(self.script, lambda: self.overloaded)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the backend's step task (a fresh backend each time: one per server run)."""
        if self._backend.any_ready or not self._backend.accepting:
            self._backend = self._new_backend()
        await self._backend.run(task_status=task_status)

    # the script's knobs and counters
    words = _knob("words")
    delay = _knob("delay")
    first_delay = _knob("first_delay")
    eos_after = _knob("eos_after")
    fail_after = _knob("fail_after")
    cancelled = _knob("cancelled")
    finished = _knob("finished")

    @property
    def running(self) -> int:
        return self._stats_override.get("running", self.script.running)

    @running.setter
    def running(self, value: int) -> None:
        self._stats_override["running"] = value

    @property
    def waiting(self) -> int:
        return self._stats_override.get("waiting", 0)

    @waiting.setter
    def waiting(self, value: int) -> None:
        self._stats_override["waiting"] = value

    @property
    def ready(self) -> bool:
        """Scripted (a test flips it, as a loading pool would), and False once draining."""
        return self._ready and self.accepting

    @ready.setter
    def ready(self, value: bool) -> None:
        self._ready = value

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), **self._stats_override}

    def encode_prompt(
        self, prompt: str | Sequence[int], *, parse_special: bool = True
    ) -> list[int]:
        """As the Engine's; records the thread it ran in (long prompts leave the event loop)."""
        self.encode_threads.append(threading.current_thread() is threading.main_thread())
        return super().encode_prompt(prompt, parse_special=parse_special)

    def generate(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, **overrides: Any
    ) -> Generation:
        try:
            generation = super().generate(prompt, params, **overrides)
        except OverloadedError:
            self.calls.append((prompt, params or SamplingParams()))
            raise
        self.calls.append((prompt, generation.params))
        return generation

    def generate_choices(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        n: int = 1,
        **overrides: Any,
    ) -> Choices:
        try:
            choices = super().generate_choices(prompt, params, n, **overrides)
        except OverloadedError:
            self.calls.extend([(prompt, params or SamplingParams())] * n)
            raise
        self.calls.extend((prompt, p) for p in choices.choice_params)
        return choices


class KVUsageEngine(FakeEngine):
    """A FakeEngine whose stats report KV-cache usage, as a pool of two workers would."""

    def stats(self) -> dict:
        return {
            **super().stats(),
            "kv_cache_usage": 0.25,
            "max_batch": 2,
            "max_context": 64,
            "workers": [
                {
                    "index": 0,
                    "kv_tokens": 32,
                    "routed": 7,
                    "coast": {"sleeps": 40, "misses": 3, "ticks": 12},
                },
                {"index": 1, "kv_tokens": 0},  # an engine that reports no coasting
            ],
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
        if isinstance(engine, FakeEngine):
            await nursery.start(engine.run)
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


def raw_decode_all(data: bytes) -> list[dict]:
    """/process's body as the original clients read it: `raw_decode` over the concatenated
    stream of JSON objects, with no separator between them."""
    text = data.decode("utf-8")
    decoder = json.JSONDecoder()
    objects, pos = [], 0
    while pos < len(text):
        obj, pos = decoder.raw_decode(text, pos)
        objects.append(obj)
    return objects

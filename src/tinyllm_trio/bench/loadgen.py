"""`tinyllm-trio bench http`: a streaming load generator for OpenAI-compatible servers and
llama.cpp's llama-server.

Method (TGI's and vLLM's, see the reference notes): at each concurrency level (1, 8, 32, 64 by
default) a fixed number of requests is sent by that many concurrent clients, each client on its
own keep-alive connection; every request streams, has a short prompt (15 words, which is 16
tokens with BOS on TinyLLM's tokenizer; varied per request so no cache can serve it) and asks
for 128 tokens with EOS ignored, so every request does the same work. Reported per level:

- requests/s and output tokens/s over the level's wall time (first send to last byte);
- TTFT (send to first token event) and ITL (every gap between successive token events, pooled
  over requests, vLLM's definition) at p50/p90/p99, plus the mean end-to-end latency.

With `--shared-prefix-words N` every prompt starts with the same N words (then the usual short
prompt as a distinct tail), and each level runs twice, alternating: with the server's prefix
cache, and bypassing it per request (`cache_prompt: false`, which llama-server and this server
accept), so the table shows TTFT and throughput with the cache on and off side by side. One
server measures both: the same process, workers and machine state on either side, so the
difference is the cache's (two servers would share the cores, or drift apart if run in turn).
A bypassing request neither reuses nor leaves a cached prefix, and is routed by load alone.

With `--prompt-tokens N` the prompt is sent as N token ids (<BOS>, then word ids; varied per
request) instead of text: llama-server running `bench gguf`'s file has another tokenizer, and
both servers take ids as given, so both run the same tokens (`bench compare` does this).

Output tokens come from the server's usage report (OpenAI `stream_options.include_usage`,
llama-server's `tokens_predicted`), or by counting token events when there is none.

The client shares the machine with the server, so its CPU per token is taken from the server
and is reported with each level ("client us/tok"). It is kept small: one thread runs a plain
`select` loop over all of a level's keep-alive connections (each socket registered once), reads
what arrived, unframes chunks (`client.take_chunks`) and recognises the usual one-line token
event by a few substring checks (anything else gets `json.loads`). Discovering the model name
uses this package's trio + h11 client. A PNG plot is written with `--plot` only when
matplotlib is importable; it is not a dependency of this package.

    tinyllm-trio bench http --url http://127.0.0.1:8080
    tinyllm-trio bench http --url http://127.0.0.1:8081 --api llama --json llama.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import selectors
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h11
import trio

from tinyllm_trio.bench.client import HTTPClient, sse_events, take_chunks
from tinyllm_trio.bench.workload import (
    MAX_TOKENS,
    PROMPT_WORDS,
    parse_levels,
    prompt_ids,
    prompt_text,
    requests_per_level,
    run_on_engine,
)

_RECV = 64 * 1024

_QUICK_PREFIXES = (b'"choices":[{"index":0,"text":"', b'"choices":[{"index":0,"delta":{"content":"')


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    failed: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_mean_ms: float
    errors: list[str]
    client_cpu_us_per_token: float = math.nan  # the load generator's own CPU, per token
    cache: str = ""  # --shared-prefix-words: "on" or "off" (the server's prefix cache)
    server_cpu_us_per_token: float = math.nan  # --server-pid: that process's CPU, per token
    workers_cpu_us_per_token: float = math.nan  # --server-pid: its child processes' CPU


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _summary_ms(values: list[float]) -> dict[str, float]:
    return {f"p{q}": round(percentile(values, q) * 1000.0, 3) for q in (50, 90, 99)}


class Target:
    """Where and how to send a streaming request; parses the server's events."""

    def __init__(self, args: argparse.Namespace) -> None:
        url = urlsplit(args.url if "://" in args.url else "http://" + args.url)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (443 if url.scheme == "https" else 80)
        if url.scheme == "https":
            raise SystemExit("bench http: https is not supported (plain HTTP only)")
        self.base = url.path.rstrip("/")
        self.api = args.api
        self.model = args.model
        self.max_tokens = args.max_tokens
        self.prompt_words = args.prompt_words
        self.prompt_tokens: int = args.prompt_tokens
        self.shared_prefix_words = args.shared_prefix_words
        self.cache_prompt = bool(args.shared_prefix_words)  # flipped per run in that mode
        self.temperature = args.temperature
        self.headers = [("Authorization", f"Bearer {args.api_key}")] if args.api_key else []

    def request(self, index: int) -> tuple[str, dict[str, Any]]:
        prompt: str | list[int] = (
            prompt_ids(index, self.prompt_tokens)
            if self.prompt_tokens
            else prompt_text(index, self.prompt_words, self.shared_prefix_words)
        )
        if self.api == "llama":
            return self.base + "/completion", {
                "prompt": prompt,
                "n_predict": self.max_tokens,
                "stream": True,
                "ignore_eos": True,
                "temperature": self.temperature,
                "cache_prompt": self.cache_prompt,
            }
        extra = {"cache_prompt": self.cache_prompt} if self.shared_prefix_words else {}
        return self.base + "/v1/completions", {
            **extra,
            "model": self.model,
            "prompt": prompt,
            "max_tokens": self.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
            "temperature": self.temperature,
        }

    def parse(self, payload: str | bytes) -> tuple[int, int | None, bool]:
        """(token events in it, total output tokens if reported, is it the last event)."""
        if type(payload) is bytes:
            quick = self._quick(payload) if self.api == "openai" else None
            if quick is not None:
                return quick
            payload = payload.decode("utf-8")
        if payload == "[DONE]":
            return 0, None, True
        event = json.loads(payload)
        if "error" in event:
            raise RuntimeError(f"server error: {event['error']}")
        if self.api == "llama":
            if event.get("stop"):
                return 0, event.get("tokens_predicted"), True
            return 1, None, False
        usage = event.get("usage")
        total = usage.get("completion_tokens") if usage else None
        choices = event.get("choices") or []
        tokens = sum(1 for c in choices if c.get("text") or (c.get("delta") or {}).get("content"))
        return tokens, total, False

    @staticmethod
    def _quick(payload: bytes) -> tuple[int, int | None, bool] | None:
        """`parse` of a compact one-choice OpenAI token chunk without `json.loads`; None for
        anything else (which `parse` then decodes in full).

        The usual chunk is ``{...,"choices":[{"index":0,"text":"<delta>",...}],...}`` (or
        ``"delta":{"content":"<delta>"``): its token count is whether the delta is non-empty.
        A raw ``"error"``, ``"usage":{`` or second ``"index":`` cannot hide inside a JSON string
        (quotes there are escaped), so their absence means no error, no usage and one choice.
        """
        for prefix in _QUICK_PREFIXES:
            at = payload.find(prefix)
            if at >= 0:
                break
        else:
            return None
        if b'"error"' in payload or b'"usage":{' in payload or payload.count(b'"index":') != 1:
            return None
        end = at + len(prefix)
        return (0 if payload[end : end + 1] == b'"' else 1), None, False

    async def discover_model(self) -> None:
        if self.api != "openai" or self.model:
            return
        try:
            async with await HTTPClient.connect(self.host, self.port) as client:
                response = await client.request(
                    "GET", self.base + "/v1/models", headers=self.headers
                )
                self.model = (await response.json())["data"][0]["id"]
        except Exception:
            self.model = "tinyllm"


class _Stream:
    """One keep-alive connection of the load generator and the request it is running.

    Driven by `_run_level_blocking`'s select loop: `feed` takes whatever the socket had and
    advances a small HTTP/1.1 response parser (status line and headers, then a chunked,
    Content-Length or close-delimited body); each chunk of a streaming body goes through the
    SSE and token parsing at once, timestamped on arrival.
    """

    def __init__(self, target: Target, sock: socket.socket) -> None:
        self.target = target
        self.sock = sock
        self.reusable = True
        self.sent = 0  # requests sent on this connection
        self.index = -1  # the request in flight
        self._reset()

    def _reset(self) -> None:
        self.start = self.first = self.last = 0.0
        self.tokens = 0
        self.reported: int | None = None
        self.itl: list[float] = []
        self.buffer = bytearray()
        self.head: tuple[int, dict[str, str]] | None = None
        self.body_left: int | None = None  # Content-Length body: bytes still to come
        self.error_body = bytearray()
        self.sse = bytearray()

    def send(self, index: int) -> None:
        self._reset()
        self.index = index
        self.sent += 1
        path, body = self.target.request(index)
        payload = json.dumps(body).encode()
        lines = [
            f"POST {path} HTTP/1.1",
            f"Host: {self.target.host}:{self.target.port}",
            "Content-Type: application/json",
            f"Content-Length: {len(payload)}",
            *(f"{k}: {v}" for k, v in self.target.headers),
        ]
        self.start = time.perf_counter()
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload)

    def stale(self) -> bool:
        """Whether the request in flight went out on a reused connection and got nothing back
        at all: the server had closed it (StaleConnectionError)."""
        return self.head is None and not self.buffer and self.sent > 1

    def feed(self, data: bytes, now: float) -> RequestResult | None:
        """Bytes from the socket (b"" at EOF); the request's result once it is complete."""
        if not data:
            self.reusable = False
            if self.head is not None and self.head[1]["framing"] == "close":
                return self._result(now)
            if self.stale():
                raise StaleConnectionError("the server had closed this keep-alive connection")
            raise ConnectionError("the server closed the connection mid-response")
        self.buffer += data
        if self.head is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return None
            self.head = _parse_head(bytes(self.buffer[:end]))
            del self.buffer[: end + 4]
            headers = self.head[1]
            if headers.get("connection", "").lower() == "close":
                self.reusable = False
            if headers["framing"] == "length":
                self.body_left = int(headers["content-length"])
        if self.head[1]["framing"] == "chunked":
            return self._chunks(now)
        piece = bytes(self.buffer)  # a Content-Length or close-delimited body: as it comes
        del self.buffer[:]
        self._body(piece, now)
        if self.body_left is not None:
            self.body_left -= len(piece)
            if self.body_left <= 0:
                return self._result(now)
        return None

    def _chunks(self, now: float) -> RequestResult | None:
        chunks, done = take_chunks(self.buffer)
        for chunk in chunks:
            self._body(chunk, now)
        return self._result(now) if done else None

    def _body(self, piece: bytes, now: float) -> None:
        if self.head is not None and self.head[0] == 200:
            self._chunk(piece, now)
        else:
            self.error_body += piece[: 200 - len(self.error_body)]

    def _chunk(self, chunk: bytes, now: float) -> None:
        if (
            not self.sse
            and chunk[:5] == b"data:"
            and chunk[-2:] == b"\n\n"
            and chunk.find(b"\n") == len(chunk) - 2
            and b"\r" not in chunk
        ):  # the usual chunk: exactly one event of one `data:` line (what sse_events would say)
            payloads: Any = (chunk[5:-2].lstrip(b" "),)
        else:
            payloads = sse_events(self.sse, chunk)
        parse = self.target.parse
        for payload in payloads:
            n, total, _ = parse(payload)
            if total is not None:
                self.reported = total
            if n:
                if self.tokens == 0:
                    self.first = now
                else:
                    self.itl.append(now - self.last)
                self.last = now
                self.tokens += n

    def _result(self, end: float) -> RequestResult:
        status = self.head[0] if self.head is not None else 0
        if status != 200:
            text = bytes(self.error_body).decode("utf-8", "replace")
            return RequestResult(False, error=f"HTTP {status}: {text}")
        if self.tokens == 0:
            return RequestResult(False, error="no tokens in the stream")
        return RequestResult(
            True, self.first - self.start, end - self.start, self.reported or self.tokens, self.itl
        )


class StaleConnectionError(ConnectionError):
    """A kept-alive connection the server closed before answering the next request on it.

    Servers may close an idle or much-used keep-alive connection without saying so
    (llama-server does), and the request sent on it meanwhile gets no response at all. That
    request never reached the server's handler, so it is sent again on a new connection, as
    HTTP clients do (RFC 9112 9.3.1), and not counted as a failure.
    """


def _parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
    """Status code and lower-cased headers of a response head, plus "framing": how its body
    ends (chunked, length or close)."""
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ConnectionError(f"bad status line {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ConnectionError(f"bad header line {line!r}")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        headers["framing"] = "chunked"
    elif "content-length" in headers:
        headers["framing"] = "length"
    else:
        headers["framing"] = "close"
    return int(parts[1]), headers


def _run_level_blocking(
    target: Target, concurrency: int, requests: int, timeout: float
) -> tuple[list[RequestResult], float, float]:
    """`requests` requests from `concurrency` keep-alive connections, each sending its next
    request when the last one ends; one thread, one `select` loop over all of them.

    The load generator shares the machine with the server, so every microsecond it spends per
    token is taken from the server: a plain level-triggered selector with each socket
    registered once costs a `select` and a `recv` per arrival, where an async framework adds
    a task switch and a readiness re-registration. Returns the results, the wall time and this
    process's CPU time over the level.
    """
    results: list[RequestResult] = []
    next_index = 0
    selector = selectors.DefaultSelector()
    streams: set[_Stream] = set()

    def start_next(stream: _Stream | None, index: int | None = None) -> None:
        """Send request `index` (default: the next one) on `stream` if it can take it, else on
        a new connection; a kept-alive connection that fails the send gets one more try on a
        new one (see StaleConnectionError)."""
        nonlocal next_index
        while index is not None or next_index < requests:
            if index is None:
                index = next_index
                next_index += 1
            try:
                if stream is None or not stream.reusable:
                    if stream is not None:
                        close(stream)
                    sock = socket.create_connection((target.host, target.port), timeout=timeout)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    stream = _Stream(target, sock)
                    streams.add(stream)
                    selector.register(sock, selectors.EVENT_READ, stream)
                stream.send(index)
                return
            except OSError as exc:
                stale = stream is not None and stream.sent > 1
                if stream is not None:
                    close(stream)
                    stream = None
                if not stale:
                    results.append(RequestResult(False, error=f"{type(exc).__name__}: {exc}"))
                    index = None
        if stream is not None:
            close(stream)

    def close(stream: _Stream) -> None:
        if stream in streams:
            streams.discard(stream)
            selector.unregister(stream.sock)
            stream.sock.close()

    t0, cpu0 = time.perf_counter(), time.process_time()
    next_check = t0 + 0.5
    try:
        for _ in range(min(concurrency, requests)):
            start_next(None)
        while streams:
            ready = selector.select(timeout=0.5)
            now = time.perf_counter()
            for key, _ in ready:
                stream: _Stream = key.data
                try:
                    result = stream.feed(stream.sock.recv(_RECV), now)
                except (OSError, ValueError, RuntimeError, h11.ProtocolError) as exc:
                    close(stream)
                    if isinstance(exc, ConnectionError) and stream.stale():
                        start_next(None, stream.index)  # sent again: never a failure
                        continue
                    # a reset, a malformed response or a server error event: count it, go on
                    results.append(RequestResult(False, error=f"{type(exc).__name__}: {exc}"))
                    start_next(None)
                    continue
                if result is not None:
                    results.append(result)
                    start_next(stream)
            if now >= next_check:
                next_check = now + 0.5
                for stream in [s for s in streams if now - s.start > timeout]:
                    results.append(RequestResult(False, error=f"timed out after {timeout} s"))
                    close(stream)
                    start_next(None)
    finally:
        for stream in list(streams):
            close(stream)
        selector.close()
    return results, time.perf_counter() - t0, time.process_time() - cpu0


async def run_level(target: Target, concurrency: int, requests: int, timeout: float) -> LevelResult:
    return summarize(concurrency, *await _measure_level(target, concurrency, requests, timeout))


async def _measure_level(
    target: Target, concurrency: int, requests: int, timeout: float
) -> tuple[list[RequestResult], float, float]:
    # In a thread, so that a server in this process's Trio loop (the tests) keeps serving.
    return await trio.to_thread.run_sync(
        _run_level_blocking, target, concurrency, requests, timeout, abandon_on_cancel=True
    )


def summarize(
    concurrency: int, results: list[RequestResult], duration: float, cpu: float
) -> LevelResult:
    """One level's numbers from its requests' results, wall time and the client's CPU time."""
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    return LevelResult(
        concurrency=concurrency,
        requests=len(ok),
        failed=len(results) - len(ok),
        duration_s=round(duration, 4),
        requests_per_s=round(len(ok) / duration, 3),
        output_tokens_per_s=round(tokens / duration, 1),
        ttft_ms=_summary_ms([r.ttft for r in ok]),
        itl_ms=_summary_ms([gap for r in ok for gap in r.itl]),
        e2e_mean_ms=round(1000.0 * sum(r.latency for r in ok) / len(ok), 3) if ok else math.nan,
        errors=sorted({r.error for r in results if not r.ok})[:5],
        client_cpu_us_per_token=round(cpu / tokens * 1e6, 1) if tokens else math.nan,
    )


def format_table(levels: list[LevelResult]) -> str:
    server = any(not math.isnan(lv.server_cpu_us_per_token) for lv in levels)
    cache = any(lv.cache for lv in levels)
    header = (
        f"{'conc':>5}"
        + (f" {'cache':>5}" if cache else "")
        + f" {'ok':>5} {'fail':>4} {'req/s':>8} {'out tok/s':>10} "
        f"{'TTFT p50':>9} {'p90':>8} {'p99':>8} {'ITL p50':>8} {'p90':>7} {'p99':>7} "
        f"{'client us/tok':>13}"
    )
    if server:
        header += f" {'server us/tok':>13} {'workers us/tok':>14}"
    lines = [header, "-" * len(header)]
    for lv in levels:
        t, i = lv.ttft_ms, lv.itl_ms
        line = (
            f"{lv.concurrency:>5}{f' {lv.cache:>5}' if cache else ''} {lv.requests:>5} "
            f"{lv.failed:>4} {lv.requests_per_s:>8.2f} "
            f"{lv.output_tokens_per_s:>10.1f} {t['p50']:>9.1f} {t['p90']:>8.1f} {t['p99']:>8.1f} "
            f"{i['p50']:>8.2f} {i['p90']:>7.2f} {i['p99']:>7.2f} "
            f"{lv.client_cpu_us_per_token:>13.1f}"
        )
        if server:
            line += f" {lv.server_cpu_us_per_token:>13.1f} {lv.workers_cpu_us_per_token:>14.1f}"
        lines.append(line)
    lines.append("(times in ms; client us/tok: the load generator's own CPU per output token)")
    if server:
        lines.append(
            "(server / workers us/tok: CPU of --server-pid / of its child processes per token)"
        )
    return "\n".join(lines)


def process_cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) used so far by process `pid` and by its live child
    processes (a server's workers), from Linux's /proc. OSError if `pid` is not there."""
    tick = os.sysconf("SC_CLK_TCK")

    def stat(path: str) -> tuple[int, float]:  # (parent pid, CPU seconds)
        with open(path, "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after "pid (comm)", which may hold ")"
        return int(fields[1]), (int(fields[11]) + int(fields[12])) / tick

    own = stat(f"/proc/{pid}/stat")[1]
    children = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid, cpu = stat(f"/proc/{entry}/stat")
            except (OSError, IndexError, ValueError):  # gone meanwhile, or unreadable
                continue
            if ppid == pid:
                children += cpu
    return own, children


@dataclass
class EngineComparison:
    """The same level's load run through an in-process Engine right before and right after
    each HTTP run: a shared machine drifts over minutes, and the two neighbours bracket it.
    One (engine before, HTTP, engine after) triple of tokens/s per round; the ratio is the
    median of the rounds' ratios."""

    concurrency: int
    rounds: list[tuple[float, float, float]]

    @property
    def ratios(self) -> list[float]:
        return [http / ((before + after) / 2) for before, http, after in self.rounds]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def http_tokens_per_s(self) -> float:
        return statistics.median(http for _, http, _ in self.rounds)

    @property
    def engine_tokens_per_s(self) -> float:
        return statistics.median((before + after) / 2 for before, _, after in self.rounds)

    def to_json(self) -> dict[str, Any]:
        return {
            "rounds": [
                {
                    "engine_before_tokens_per_s": round(before, 1),
                    "http_tokens_per_s": round(http, 1),
                    "engine_after_tokens_per_s": round(after, 1),
                    "ratio": round(ratio, 3),
                }
                for (before, http, after), ratio in zip(self.rounds, self.ratios, strict=True)
            ],
            "ratio": round(self.ratio, 3),
        }


def format_comparison(rows: list[EngineComparison], workers: int) -> str:
    lines = [
        f"HTTP / Engine ({workers} workers in this process, same load, run just before and "
        "after each HTTP run; medians over rounds):",
        f"{'conc':>5} {'rounds':>6} {'http tok/s':>11} {'engine tok/s':>13} {'HTTP/Engine':>12}"
        f" {'min':>6} {'max':>6}",
    ]
    for r in rows:
        lines.append(
            f"{r.concurrency:>5} {len(r.rounds):>6} {r.http_tokens_per_s:>11.1f} "
            f"{r.engine_tokens_per_s:>13.1f} {r.ratio:>12.2f} {min(r.ratios):>6.2f} "
            f"{max(r.ratios):>6.2f}"
        )
    return "\n".join(lines)


def write_plot(levels: list[LevelResult], path: str, title: str) -> bool:
    """A PNG of tokens/s and TTFT p50 against concurrency; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    conc = [lv.concurrency for lv in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(conc, [lv.output_tokens_per_s for lv in levels], marker="o")
    left.set(xlabel="concurrent streams", ylabel="output tokens/s", xscale="log", title=title)
    right.plot(conc, [lv.ttft_ms["p50"] for lv in levels], marker="o", label="TTFT p50")
    right.plot(conc, [lv.itl_ms["p50"] for lv in levels], marker="s", label="ITL p50")
    right.set(xlabel="concurrent streams", ylabel="ms", xscale="log")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument(
        "--api",
        choices=["openai", "llama"],
        default="openai",
        help="openai: POST /v1/completions (SSE); llama: llama-server's POST /completion",
    )
    parser.add_argument(
        "--concurrency",
        default="1,8,32,64",
        help="comma-separated concurrency levels (default: 1,8,32,64)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="requests per level (default: max(16, 4 x concurrency))",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=MAX_TOKENS, help="output tokens per request"
    )
    parser.add_argument(
        "--prompt-words",
        type=int,
        default=PROMPT_WORDS,
        help="prompt length in words (15 = 16 tokens)",
    )
    parser.add_argument(
        "--prompt-tokens",
        type=_non_negative_int,
        default=0,
        help="send the prompt as this many token ids (<BOS>, then word ids) instead of text, so "
        "servers with different tokenizers (llama-server on `bench gguf`'s file) run the same "
        "tokens; 0 = text prompts of --prompt-words (default)",
    )
    parser.add_argument(
        "--shared-prefix-words",
        type=_non_negative_int,
        default=0,
        help="start every prompt with the same N words (then the usual prompt as a distinct "
        "tail) and run each level with the server's prefix cache and bypassing it "
        "(cache_prompt: false), alternately, to compare TTFT and throughput (default 0: off)",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--model", default=None, help="model name (default: from /v1/models)")
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured requests first")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--json", dest="json_path", default=None, help="write results here")
    parser.add_argument(
        "--compare-engine",
        action="store_true",
        help="also run each level's load through an Engine in this process (serve's defaults, "
        "--engine-workers, --engine-model), just before and after the HTTP run, and report "
        "HTTP / Engine: what the HTTP layer costs. Start the server with the same settings",
    )
    parser.add_argument(
        "--engine-model",
        default=None,
        help="checkpoint for --compare-engine (default: the packaged model, env TINYLLM_MODEL)",
    )
    parser.add_argument(
        "--engine-workers", type=int, default=2, help="workers for --compare-engine (default 2)"
    )
    parser.add_argument(
        "--plot", default=None, help="write a PNG plot here (needs matplotlib, not a dependency)"
    )
    parser.add_argument(
        "--rounds",
        type=_positive_int,
        default=1,
        help="run each level this many times (its requests pooled in the table; with "
        "--compare-engine, HTTP / Engine is the median of the rounds' ratios)",
    )
    parser.add_argument(
        "--server-pid",
        type=int,
        default=None,
        help="the server's process id, on this machine (Linux): also report its CPU and its "
        "child processes' (the workers) per output token",
    )


async def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    target = Target(args)
    await target.discover_model()
    levels = parse_levels(str(args.concurrency), "--concurrency")
    if args.warmup:
        await run_level(target, 1, args.warmup, args.timeout)
    results: list[LevelResult] = []
    comparisons: list[EngineComparison] = []
    async with contextlib.AsyncExitStack() as stack:
        engine = None
        if args.compare_engine:
            from tinyllm_trio.engine import open_engine

            engine = await stack.enter_async_context(
                open_engine(
                    args.engine_model or os.environ.get("TINYLLM_MODEL") or None,
                    workers=args.engine_workers,
                    max_queue=max([*levels, 1]),
                )
            )
            await _engine_rate(engine, args, max([*levels, 1]), max([*levels, 1]), 4)  # warm-up
        # --shared-prefix-words: each round runs the level with the cache, then bypassing it
        modes: tuple[bool | None, ...] = (True, False) if args.shared_prefix_words else (None,)
        for concurrency in levels:
            requests = args.requests or requests_per_level(concurrency)
            runs: dict[bool | None, list[tuple[list[RequestResult], float, float]]] = {
                mode: [] for mode in modes
            }
            brackets: list[tuple[float, float, float]] = []
            server_cpu = {mode: [0.0, 0.0] for mode in modes}
            for _ in range(args.rounds):
                for mode in modes:
                    target.cache_prompt = mode is not False and bool(args.shared_prefix_words)
                    bracket = engine is not None and mode is not False
                    if bracket:
                        before = await _engine_rate(engine, args, concurrency, requests)
                    cpu_before = process_cpu_seconds(args.server_pid) if args.server_pid else None
                    run = await _measure_level(target, concurrency, requests, args.timeout)
                    if cpu_before is not None:
                        cpu_after = process_cpu_seconds(args.server_pid)
                        used = server_cpu[mode]
                        server_cpu[mode] = [used[i] + cpu_after[i] - cpu_before[i] for i in (0, 1)]
                    runs[mode].append(run)
                    if bracket:
                        http = summarize(concurrency, *run).output_tokens_per_s
                        after = await _engine_rate(engine, args, concurrency, requests)
                        brackets.append((before, http, after))
            for mode in modes:
                level = summarize(
                    concurrency,
                    [r for results, _, _ in runs[mode] for r in results],
                    sum(duration for _, duration, _ in runs[mode]),
                    sum(cpu for _, _, cpu in runs[mode]),
                )
                level.cache = "" if mode is None else ("on" if mode else "off")
                if args.server_pid:
                    _add_server_cpu(level, server_cpu[mode])
                label = f" cache {level.cache:>3}" if level.cache else ""
                print(
                    f"concurrency {concurrency:>3}{label}: {level.output_tokens_per_s:9.1f} tok/s, "
                    f"TTFT p50 {level.ttft_ms['p50']:.1f} ms, {level.failed} failed",
                    file=sys.stderr,
                )
                results.append(level)
            if brackets:
                comparisons.append(EngineComparison(concurrency, brackets))
    report: dict[str, Any] = {
        "url": args.url,
        "api": args.api,
        "model": target.model,
        "prompt_words": args.prompt_words,
        "prompt_tokens": target.prompt_tokens,
        "shared_prefix_words": args.shared_prefix_words,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "levels": [asdict(lv) for lv in results],
        "_levels": results,
    }
    if comparisons:
        report["vs_engine"] = {
            "engine_workers": args.engine_workers,
            "levels": {str(c.concurrency): c.to_json() for c in comparisons},
        }
        report["_comparisons"] = comparisons
    return report


def _add_server_cpu(level: LevelResult, cpu: list[float]) -> None:
    """`cpu`: seconds the server process and its children used over the level's runs."""
    tokens = level.output_tokens_per_s * level.duration_s
    if tokens > 0:
        level.server_cpu_us_per_token = round(cpu[0] / tokens * 1e6, 1)
        level.workers_cpu_us_per_token = round(cpu[1] / tokens * 1e6, 1)


async def _engine_rate(
    engine: Any, args: argparse.Namespace, concurrency: int, requests: int, max_tokens: int = 0
) -> float:
    """Output tokens/s of one level's load through the in-process Engine."""
    max_tokens = max_tokens or args.max_tokens
    start = time.perf_counter()
    tokens = await run_on_engine(
        engine,
        concurrency,
        requests,
        max_tokens,
        args.prompt_words,
        shared_prefix_words=args.shared_prefix_words,
    )
    return tokens / (time.perf_counter() - start)


def run_cli(args: argparse.Namespace) -> int:
    try:
        parse_levels(str(args.concurrency), "--concurrency")
    except ValueError as e:
        print(f"bench http: {e}", file=sys.stderr)
        return 2
    if args.prompt_tokens and args.shared_prefix_words:
        print(
            "bench http: --prompt-tokens and --shared-prefix-words exclude each other",
            file=sys.stderr,
        )
        return 2
    if args.server_pid is not None:
        try:
            process_cpu_seconds(args.server_pid)
        except OSError as exc:
            print(f"bench http: --server-pid {args.server_pid}: {exc}", file=sys.stderr)
            return 2
    report = trio.run(run_benchmark, args)
    levels: list[LevelResult] = report.pop("_levels")
    print(format_table(levels))
    comparisons = report.pop("_comparisons", None)
    if comparisons:
        print(format_comparison(comparisons, args.engine_workers))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    if args.plot and not write_plot(levels, args.plot, f"{args.api} @ {args.url}"):
        print("bench http: matplotlib is not installed; no plot written", file=sys.stderr)
    return 1 if any(lv.requests == 0 for lv in levels) else 0

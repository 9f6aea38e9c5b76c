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

Output tokens come from the server's usage report (OpenAI `stream_options.include_usage`,
llama-server's `tokens_predicted`), or by counting token events when there is none.

The client is this package's small trio + h11 client (no extra dependency). It runs on the same
machine as the server, so its own CPU use counts against the server's: per token it waits for
the socket, reads once, and recognises the usual one-line token event by a few substring
checks (anything else gets `json.loads`). A PNG plot is written with `--plot`
only when matplotlib is importable; it is not a dependency of this package.

    tinyllm-trio bench http --url http://127.0.0.1:8080
    tinyllm-trio bench http --url http://127.0.0.1:8081 --api llama --json llama.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import trio

from tinyllm_trio.http.client import HTTPClient, sse_events
from tinyllm_trio.workload import MAX_TOKENS, PROMPT_WORDS, prompt_text, requests_per_level

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
        self.temperature = args.temperature
        self.headers = [("Authorization", f"Bearer {args.api_key}")] if args.api_key else []

    def request(self, index: int) -> tuple[str, dict[str, Any]]:
        prompt = prompt_text(index, self.prompt_words)
        if self.api == "llama":
            return self.base + "/completion", {
                "prompt": prompt,
                "n_predict": self.max_tokens,
                "stream": True,
                "ignore_eos": True,
                "temperature": self.temperature,
                "cache_prompt": False,
            }
        return self.base + "/v1/completions", {
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


async def _one_request(client: HTTPClient, target: Target, index: int) -> RequestResult:
    path, body = target.request(index)
    start = time.perf_counter()
    response = await client.request("POST", path, json=body, headers=target.headers)
    if response.status != 200:
        text = (await response.read())[:200].decode("utf-8", "replace")
        return RequestResult(False, error=f"HTTP {response.status}: {text}")
    buffer = bytearray()
    first = last = 0.0
    tokens = 0
    reported: int | None = None
    itl: list[float] = []
    async for chunk in response.chunks():
        now = time.perf_counter()
        if (
            not buffer
            and chunk[:5] == b"data:"
            and chunk[-2:] == b"\n\n"
            and chunk.find(b"\n") == len(chunk) - 2
            and b"\r" not in chunk
        ):  # the usual chunk: exactly one event of one `data:` line (what sse_events would say)
            payloads: Any = (chunk[5:-2].lstrip(b" "),)
        else:
            payloads = sse_events(buffer, chunk)
        for payload in payloads:
            n, total, _ = target.parse(payload)
            if total is not None:
                reported = total
            if n:
                if tokens == 0:
                    first = now
                else:
                    itl.append(now - last)
                last = now
                tokens += n
    end = time.perf_counter()
    if tokens == 0:
        return RequestResult(False, error="no tokens in the stream")
    return RequestResult(True, first - start, end - start, reported or tokens, itl)


async def run_level(target: Target, concurrency: int, requests: int, timeout: float) -> LevelResult:
    results: list[RequestResult] = []
    next_index = 0

    async def client_task() -> None:
        nonlocal next_index
        client: HTTPClient | None = None
        try:
            while next_index < requests:
                index = next_index
                next_index += 1
                if client is None or not client.reusable:
                    if client is not None:
                        await client.aclose()
                    client = await HTTPClient.connect(target.host, target.port)
                try:
                    with trio.fail_after(timeout):
                        results.append(await _one_request(client, target, index))
                except (trio.TooSlowError, OSError, trio.BrokenResourceError, RuntimeError) as exc:
                    results.append(RequestResult(False, error=f"{type(exc).__name__}: {exc}"))
                    await client.aclose()
                    client = None
                except Exception as exc:  # a malformed response: count it, keep going
                    results.append(RequestResult(False, error=f"{type(exc).__name__}: {exc}"))
                    await client.aclose()
                    client = None
        finally:
            if client is not None:
                await client.aclose()

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(client_task)
    duration = time.perf_counter() - start
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
    )


def format_table(levels: list[LevelResult]) -> str:
    header = (
        f"{'conc':>5} {'ok':>5} {'fail':>4} {'req/s':>8} {'out tok/s':>10} "
        f"{'TTFT p50':>9} {'p90':>8} {'p99':>8} {'ITL p50':>8} {'p90':>7} {'p99':>7}"
    )
    lines = [header, "-" * len(header)]
    for lv in levels:
        t, i = lv.ttft_ms, lv.itl_ms
        lines.append(
            f"{lv.concurrency:>5} {lv.requests:>5} {lv.failed:>4} {lv.requests_per_s:>8.2f} "
            f"{lv.output_tokens_per_s:>10.1f} {t['p50']:>9.1f} {t['p90']:>8.1f} {t['p99']:>8.1f} "
            f"{i['p50']:>8.2f} {i['p90']:>7.2f} {i['p99']:>7.2f}"
        )
    lines.append("(times in ms)")
    return "\n".join(lines)


def engine_ratios(levels: list[LevelResult], engine: dict[str, Any]) -> dict[str, Any]:
    """HTTP tokens/s over the in-process Engine's at each concurrency both measured, with the
    Engine's largest worker count. The Engine run must be the same load (tokens, requests)."""
    workers = max(engine["engine"], key=int)
    by_c = engine["engine"][workers]
    rows = {}
    for lv in levels:
        measured = by_c.get(str(lv.concurrency)) or by_c.get(lv.concurrency)
        if measured:
            rate = measured["tokens_per_s"]
            rows[str(lv.concurrency)] = {
                "http_tokens_per_s": lv.output_tokens_per_s,
                "engine_tokens_per_s": round(rate, 1),
                "ratio": round(lv.output_tokens_per_s / rate, 3),
            }
    return {
        "engine_workers": int(workers),
        "engine_max_tokens": engine.get("max_tokens"),
        "engine_requests": engine.get("requests"),
        "levels": rows,
    }


def format_ratios(ratios: dict[str, Any]) -> str:
    lines = [f"HTTP / Engine ({ratios['engine_workers']} workers, same load, in process):"]
    for c, row in ratios["levels"].items():
        lines.append(
            f"{c:>5} {row['http_tokens_per_s']:>10.1f} / {row['engine_tokens_per_s']:>8.1f}"
            f" = {row['ratio']:.2f}"
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
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--model", default=None, help="model name (default: from /v1/models)")
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured requests first")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--json", dest="json_path", default=None, help="write results here")
    parser.add_argument(
        "--engine-json",
        default=None,
        help="a `bench engine --requests auto --max-tokens 128 --json` result of the same "
        "model: adds each level's HTTP / Engine throughput (the HTTP layer's cost)",
    )
    parser.add_argument(
        "--plot", default=None, help="write a PNG plot here (needs matplotlib, not a dependency)"
    )


async def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    target = Target(args)
    await target.discover_model()
    levels = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
    if args.warmup:
        await run_level(target, 1, args.warmup, args.timeout)
    results = []
    for concurrency in levels:
        requests = args.requests or requests_per_level(concurrency)
        level = await run_level(target, concurrency, requests, args.timeout)
        print(
            f"concurrency {concurrency:>3}: {level.output_tokens_per_s:9.1f} tok/s, "
            f"TTFT p50 {level.ttft_ms['p50']:.1f} ms, {level.failed} failed",
            file=sys.stderr,
        )
        results.append(level)
    return {
        "url": args.url,
        "api": args.api,
        "model": target.model,
        "prompt_words": args.prompt_words,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "levels": [asdict(lv) for lv in results],
        "_levels": results,
    }


def run_cli(args: argparse.Namespace) -> int:
    report = trio.run(run_benchmark, args)
    levels: list[LevelResult] = report.pop("_levels")
    print(format_table(levels))
    if args.engine_json:
        with open(args.engine_json) as f:
            ratios = engine_ratios(levels, json.load(f))
        report["vs_engine"] = ratios
        print(format_ratios(ratios))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    if args.plot and not write_plot(levels, args.plot, f"{args.api} @ {args.url}"):
        print("bench http: matplotlib is not installed; no plot written", file=sys.stderr)
    return 1 if any(lv.requests == 0 for lv in levels) else 0

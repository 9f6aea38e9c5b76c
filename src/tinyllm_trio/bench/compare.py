"""`tinyllm-trio bench compare`: llama.cpp's llama-server and `tinyllm-trio serve`, side by side.

Two servers measured on one machine must not run at once (they would share the cores), and
measured one after the other they see a machine that drifts (a shared host, a thermal state,
the page cache). So both stay up the whole time, idle while the other is measured, and every
load runs against one and then the other, in an order swapped every round: round 0 is A then
B at each load, round 1 B then A, and so on. Each round gives one ratio per load from two
neighbouring runs; the table shows the median ratio and its range over rounds, which says how
far a single run could be trusted.

The model is the same on both sides: llama-server runs `bench gguf`'s export of the packaged
checkpoint (fp32, same greedy tokens), `-t 2` threads, `-np 64` slots of the full 512-token
context each. The load is `bench http`'s, sent the same way to both (`--api llama` to
llama-server's /completion, `--api openai` to our /v1/completions): prompts of token ids,
which both servers take as given, so the different tokenizers do not change the work; greedy,
EOS ignored, streamed. Loads:

- 1, 8, 32 and 64 concurrent streams: 16-token prompts, 128 output tokens (decode-bound);
- prefill-heavy: 8 concurrent requests of 400-token prompts, 16 output tokens each.

Both processes belong to one context manager (`running`): whatever happens (a server that
never gets healthy, a failed load, Ctrl-C) each is sent SIGTERM, given a grace period, then
killed with its process group (our server's workers included).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from tinyllm_trio.bench.loadgen import (
    LevelResult,
    Target,
    _run_level_blocking,
    summarize,
)
from tinyllm_trio.bench.loadgen import (
    add_arguments as add_http_arguments,
)
from tinyllm_trio.bench.workload import parse_levels, requests_per_level

CONTEXT = 512  # TinyLLM's, and each llama-server slot's
STREAM_PROMPT_TOKENS = 16
STREAM_MAX_TOKENS = 128
PREFILL_CONCURRENCY = 8
PREFILL_MAX_TOKENS = 16


@dataclass(frozen=True)
class Load:
    """One measured load: `requests` requests from `concurrency` clients (a closed loop)."""

    name: str
    kind: str  # "decode" (the stream levels) or "prefill"
    concurrency: int
    prompt_tokens: int
    max_tokens: int
    requests: int


def default_loads(levels: Sequence[int] = (1, 8, 32, 64), prefill_tokens: int = 400) -> list[Load]:
    """The stream levels and, unless `prefill_tokens` is 0, the prefill-heavy load."""
    loads = [
        Load(
            f"{c} stream{'s' if c > 1 else ''}",
            "decode",
            c,
            STREAM_PROMPT_TOKENS,
            STREAM_MAX_TOKENS,
            requests_per_level(c),
        )
        for c in levels
    ]
    if prefill_tokens:
        c = PREFILL_CONCURRENCY
        loads.append(
            Load(
                f"prefill {c}x{prefill_tokens}",
                "prefill",
                c,
                prefill_tokens,
                PREFILL_MAX_TOKENS,
                requests_per_level(c),
            )
        )
    return loads


@dataclass
class ServerSpec:
    """A server to start and measure: its command line, where it listens, how it is spoken
    to (`bench http`'s --api)."""

    name: str
    api: str
    command: list[str]
    port: int
    host: str = "127.0.0.1"
    health_path: str = "/health"
    # POSTed before every measured load, so that no load pays for what the one before left
    # behind (llama-server's slots keep finished requests' cache cells)
    reset_paths: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def free_port() -> int:
    """A TCP port nothing listens on now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM (both servers drain and exit on it), then, after `grace` seconds, SIGKILL to
    the process group: a server's child processes (our workers) go with it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # started in its own session: pgid == pid
    proc.wait()


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _healthy(spec: ServerSpec) -> bool:
    conn = http.client.HTTPConnection(spec.host, spec.port, timeout=2.0)
    try:
        conn.request("GET", spec.health_path)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def wait_healthy(
    spec: ServerSpec, proc: subprocess.Popen[bytes], log: Path, timeout: float
) -> None:
    """Until `spec`'s health endpoint says 200 (llama-server says 503 while loading);
    RuntimeError with the log's tail if the process exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while not _healthy(spec):
        if proc.poll() is not None:
            raise RuntimeError(
                f"{spec.name} exited with status {proc.returncode} before it was healthy; "
                f"its log ({log}) ends:\n{_log_tail(log)}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{spec.name} not healthy after {timeout:.0f} s; its log ({log}) ends:\n"
                f"{_log_tail(log)}"
            )
        time.sleep(0.2)


@contextlib.contextmanager
def running(
    specs: Sequence[ServerSpec], log_dir: Path, startup_timeout: float = 120.0, grace: float = 15.0
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start every server (output to `log_dir`/<name>.log), wait until all are healthy, yield
    their processes; on the way out, however it is taken, stop each (`stop_process`)."""
    with contextlib.ExitStack() as stack:
        procs: list[subprocess.Popen[bytes]] = []
        logs: list[Path] = []
        for spec in specs:
            log = log_dir / f"{spec.name}.log"
            out = stack.enter_context(open(log, "wb"))
            proc = subprocess.Popen(
                spec.command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, for stop_process's SIGKILL
            )
            stack.callback(stop_process, proc, grace)
            procs.append(proc)
            logs.append(log)
        for spec, proc, log in zip(specs, procs, logs, strict=True):
            wait_healthy(spec, proc, log, startup_timeout)
        yield procs


def reset(spec: ServerSpec) -> None:
    """POST each of `spec.reset_paths`; RuntimeError on any answer but 2xx (a reset that did
    not happen would make the load after it unequal, silently)."""
    for path in spec.reset_paths:
        conn = http.client.HTTPConnection(spec.host, spec.port, timeout=30.0)
        try:
            conn.request("POST", path, body=b"{}", headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            body = response.read()
        except OSError as exc:
            raise RuntimeError(f"{spec.name}: POST {path} failed: {exc}") from exc
        finally:
            conn.close()
        if not 200 <= response.status < 300:
            raise RuntimeError(
                f"{spec.name}: POST {path} answered {response.status}: "
                f"{body[:300].decode(errors='replace')}"
            )


Measure = Callable[[ServerSpec, Load], LevelResult]


class HTTPMeasure:
    """Runs a load against a server with `bench http`'s load generator (its select loop, its
    parsing of either API), from this process."""

    def __init__(self, timeout: float = 300.0) -> None:
        self.timeout = timeout
        self._targets: dict[str, Target] = {}

    def target(self, spec: ServerSpec) -> Target:
        if spec.name not in self._targets:
            parser = argparse.ArgumentParser()
            add_http_arguments(parser)
            args = parser.parse_args(["--url", spec.url, "--api", spec.api])
            target = Target(args)
            trio.run(target.discover_model)  # our server's model name, from /v1/models
            self._targets[spec.name] = target
        return self._targets[spec.name]

    def __call__(self, spec: ServerSpec, load: Load) -> LevelResult:
        target = self.target(spec)
        target.prompt_tokens = load.prompt_tokens
        target.max_tokens = load.max_tokens
        run = _run_level_blocking(target, load.concurrency, load.requests, self.timeout)
        return summarize(load.concurrency, *run)


@dataclass
class Ratio:
    """Per-round ratios of B's figure over A's (NaN where A's is 0 or missing)."""

    rounds: list[float]

    @property
    def finite(self) -> list[float]:
        return [r for r in self.rounds if math.isfinite(r)]

    def summary(self) -> dict[str, Any]:
        ok = self.finite
        return {
            "median": _median(ok),
            "min": round(min(ok), 3) if ok else math.nan,
            "max": round(max(ok), 3) if ok else math.nan,
            "rounds": [round(r, 3) for r in self.rounds],
        }


def _ratio(b: float, a: float) -> float:
    return b / a if a > 0 and math.isfinite(a) and math.isfinite(b) else math.nan


@dataclass
class LoadComparison:
    """Both servers' runs of one load, one per round each."""

    load: Load
    runs: dict[str, list[LevelResult]] = field(default_factory=dict)

    def tokens_per_s(self, name: str) -> list[float]:
        return [lv.output_tokens_per_s for lv in self.runs[name]]

    def ttft_p50(self, name: str) -> list[float]:
        return [lv.ttft_ms["p50"] for lv in self.runs[name]]

    def failed(self, name: str) -> int:
        return sum(lv.failed for lv in self.runs[name])

    def ratio(self, a: str, b: str, metric: str) -> Ratio:
        get = self.tokens_per_s if metric == "tokens_per_s" else self.ttft_p50
        return Ratio([_ratio(y, x) for x, y in zip(get(a), get(b), strict=True)])


@dataclass
class Comparison:
    """A run of `bench compare`: A is the baseline (llama-server), B the subject (ours);
    ratios are B / A."""

    specs: list[ServerSpec]
    rounds: int
    loads: list[LoadComparison]
    order: list[tuple[int, str, str]]  # (round, load, server) in the order they ran

    @property
    def a(self) -> str:
        return self.specs[0].name

    @property
    def b(self) -> str:
        return self.specs[1].name

    def to_json(self) -> dict[str, Any]:
        loads = []
        for lc in self.loads:
            servers = {}
            for name in (self.a, self.b):
                tps, ttft = lc.tokens_per_s(name), lc.ttft_p50(name)
                servers[name] = {
                    "tokens_per_s": {"median": _median(tps), "rounds": tps},
                    "ttft_p50_ms": {"median": _median(ttft), "rounds": ttft},
                    "failed": lc.failed(name),
                    "runs": [asdict(lv) for lv in lc.runs[name]],
                }
            loads.append(
                {
                    **asdict(lc.load),
                    "servers": servers,
                    "ratio": {
                        m: lc.ratio(self.a, self.b, m).summary()
                        for m in ("tokens_per_s", "ttft_p50")
                    },
                }
            )
        return {
            "baseline": self.a,
            "subject": self.b,
            "ratio": f"{self.b} / {self.a}, per round; median and range over rounds",
            "rounds": self.rounds,
            "servers": [
                {"name": s.name, "api": s.api, "url": s.url, "command": s.command}
                for s in self.specs
            ],
            "loads": loads,
            "order": [list(o) for o in self.order],
        }


def _median(values: list[float]) -> float:
    ok = [v for v in values if math.isfinite(v)]
    return round(statistics.median(ok), 3) if ok else math.nan


def run_compare(
    specs: Sequence[ServerSpec],
    loads: Sequence[Load],
    rounds: int,
    measure: Measure,
    progress: Callable[[str], None] | None = None,
) -> Comparison:
    """Every load against both servers (already up), alternated: in even rounds
    specs[0] then specs[1] at each load, in odd rounds the other way round."""
    if len(specs) != 2:
        raise ValueError("bench compare compares exactly two servers")
    comparisons = [LoadComparison(load, {s.name: [] for s in specs}) for load in loads]
    order: list[tuple[int, str, str]] = []
    for r in range(rounds):
        ordered = list(specs) if r % 2 == 0 else list(reversed(specs))
        for lc in comparisons:
            for spec in ordered:
                reset(spec)
                level = measure(spec, lc.load)
                lc.runs[spec.name].append(level)
                order.append((r, lc.load.name, spec.name))
                if progress:
                    progress(
                        f"round {r} {lc.load.name:>14} {spec.name:>13}: "
                        f"{level.output_tokens_per_s:8.1f} tok/s, TTFT p50 "
                        f"{level.ttft_ms['p50']:.1f} ms, {level.failed} failed"
                    )
    return Comparison(list(specs), rounds, comparisons, order)


def _range(ratio: Ratio) -> str:
    s = ratio.summary()
    if not ratio.finite:
        return "-"
    return f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})"


def format_table(cmp: Comparison) -> str:
    """One row per load: both servers' median tok/s and TTFT p50, and the ratios B / A with
    their range over rounds (TTFT: below 1 means B answers sooner)."""
    a, b = cmp.a, cmp.b
    header = (
        f"{'load':<16} {a + ' tok/s':>19} {b + ' tok/s':>19} {'ratio (range)':>20} "
        f"{a + ' TTFT':>18} {b + ' TTFT':>18} {'TTFT ratio (range)':>20} {'failed':>7}"
    )
    lines = [header, "-" * len(header)]
    for lc in cmp.loads:
        lines.append(
            f"{lc.load.name:<16} {_median(lc.tokens_per_s(a)):>19.1f} "
            f"{_median(lc.tokens_per_s(b)):>19.1f} "
            f"{_range(lc.ratio(a, b, 'tokens_per_s')):>20} "
            f"{_median(lc.ttft_p50(a)):>15.1f} ms {_median(lc.ttft_p50(b)):>15.1f} ms "
            f"{_range(lc.ratio(a, b, 'ttft_p50')):>20} "
            f"{f'{lc.failed(a)}/{lc.failed(b)}':>7}"
        )
    lines.append(
        f"(medians over {cmp.rounds} round(s), order swapped every round; ratios {b} / {a} "
        "per round, median (min-max); TTFT is p50; failed: requests, both servers)"
    )
    return "\n".join(lines)


def write_plot(cmp: Comparison, path: str) -> bool:
    """ONE PNG, both servers: output tokens/s (left) and TTFT p50 (right) by concurrency,
    medians with the rounds' range as error bars; the prefill-heavy load's TTFT as separate
    hollow markers. False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.4))
    decode = [lc for lc in cmp.loads if lc.load.kind == "decode"]
    prefill = [lc for lc in cmp.loads if lc.load.kind == "prefill"]
    for name, colour, marker in ((cmp.a, "tab:gray", "s"), (cmp.b, "tab:blue", "o")):
        for axis, get in ((left, "tokens_per_s"), (right, "ttft_p50")):
            xs = [lc.load.concurrency for lc in decode]
            values = [getattr(lc, get)(name) for lc in decode]
            mid = [_median(v) for v in values]
            low = [m - min(v) for m, v in zip(mid, values, strict=True)]
            high = [max(v) - m for m, v in zip(mid, values, strict=True)]
            axis.errorbar(
                xs, mid, yerr=[low, high], marker=marker, color=colour, capsize=3, label=name
            )
        for lc in prefill:
            v = lc.ttft_p50(name)
            right.plot(
                [lc.load.concurrency],
                [_median(v)],
                marker="D",
                markerfacecolor="none",
                color=colour,
                linestyle="none",
                label=f"{name}, {lc.load.name} ({lc.load.max_tokens} out)",
            )
    left.set(
        xlabel="concurrent streams",
        ylabel="output tokens/s",
        xscale="log",
        title=f"throughput ({STREAM_PROMPT_TOKENS}-token prompts, {STREAM_MAX_TOKENS} out)",
    )
    right.set(
        xlabel="concurrent requests",
        ylabel="TTFT p50 (ms)",
        xscale="log",
        yscale="log",
        title="time to first token",
    )
    for axis in (left, right):
        xs = sorted({lc.load.concurrency for lc in cmp.loads})
        axis.set_xticks(xs, [str(x) for x in xs])
        axis.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
        axis.grid(alpha=0.3)
    left.legend(fontsize=8, loc="upper left")
    right.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # clear of points
    fig.suptitle(f"{cmp.b} vs {cmp.a}: medians and range over {cmp.rounds} alternated rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def server_specs(args: argparse.Namespace, gguf: Path, log_dir: Path) -> list[ServerSpec]:
    """llama-server (the baseline) and `tinyllm-trio serve` (the subject) on free ports.

    llama-server gets its fastest settings for this model: flash attention (`-fa`; without it
    every batch attends over every cell of its one shared KV buffer up to the highest in use),
    and a slot save path, which its `POST /slots/{id}?action=erase` needs: every slot is
    erased before each measured load (`ServerSpec.reset_paths`), since a finished request's
    slot keeps its cells and the loads after it would pay for them."""
    llama_port, our_port = free_port(), free_port()
    slots = log_dir / "llama-slots"
    slots.mkdir(parents=True, exist_ok=True)
    llama = [
        args.llama_server,
        "-m",
        str(gguf),
        "-t",
        str(args.threads),
        "-np",
        str(args.parallel),
        "-c",
        str(args.parallel * CONTEXT),  # the full context for every slot
        "--host",
        "127.0.0.1",
        "--port",
        str(llama_port),
        "--slot-save-path",
        str(slots),
        *(["-fa"] if args.flash_attn else []),
        *args.llama_arg,
    ]
    ours = [
        sys.executable,
        "-m",
        "tinyllm_trio",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(our_port),
        "--workers",
        str(args.workers),
        "--access-log",
        "false",
        "--log-level",
        "warning",
        *(["--model", args.model] if args.model else []),
        *args.serve_arg,
    ]
    return [
        ServerSpec(
            "llama-server",
            "llama",
            llama,
            llama_port,
            reset_paths=tuple(f"/slots/{i}?action=erase" for i in range(args.parallel)),
        ),
        ServerSpec("tinyllm-trio", "openai", ours, our_port),
    ]


def warm_up(specs: Sequence[ServerSpec], loads: Sequence[Load], measure: Measure) -> None:
    """A few unmeasured requests of every kind of load on each server (first-touch of
    pages, caches, lazily built kernels), so round 0 is not the slow one."""
    for spec in specs:
        for load in {(lv.kind, lv.prompt_tokens, lv.max_tokens): lv for lv in loads}.values():
            measure(spec, Load("warm-up", load.kind, 2, load.prompt_tokens, load.max_tokens, 2))


def compare(
    specs: Sequence[ServerSpec],
    loads: Sequence[Load],
    rounds: int,
    log_dir: Path,
    measure: Measure | None = None,
    startup_timeout: float = 120.0,
) -> Comparison:
    """Start both servers, warm them up, run the alternated rounds, stop both (always)."""
    measure = measure or HTTPMeasure()

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    with running(specs, log_dir, startup_timeout):
        progress(f"both servers healthy; logs in {log_dir}")
        warm_up(specs, loads, measure)
        return run_compare(specs, loads, rounds, measure, progress)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--llama-server", required=True, help="path to llama.cpp's llama-server binary"
    )
    parser.add_argument(
        "--gguf",
        default=None,
        help="GGUF for llama-server (default: `bench gguf`'s export of --model, written to "
        "the log directory)",
    )
    parser.add_argument("--model", default=None, help="checkpoint (default: the packaged model)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds")
    parser.add_argument("--levels", default="1,8,32,64", help="concurrent streams per level")
    parser.add_argument(
        "--prefill-tokens",
        type=int,
        default=400,
        help="prompt tokens of the prefill-heavy load (8 concurrent, 16 out; 0 skips it)",
    )
    parser.add_argument("--threads", type=int, default=2, help="llama-server -t")
    parser.add_argument("--parallel", type=int, default=64, help="llama-server -np (slots)")
    parser.add_argument(
        "--flash-attn",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pass llama-server -fa (newer builds take `--llama-arg=-fa --llama-arg=on` "
        "with --no-flash-attn)",
    )
    parser.add_argument("--workers", type=int, default=2, help="tinyllm-trio serve --workers")
    parser.add_argument(
        "--llama-arg", action="append", default=[], help="extra llama-server argument"
    )
    parser.add_argument(
        "--serve-arg", action="append", default=[], help="extra tinyllm-trio serve argument"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument(
        "--startup-timeout", type=float, default=120.0, help="seconds for both to get healthy"
    )
    parser.add_argument(
        "--log-dir", default=None, help="server logs (and the GGUF) here (default: a temp dir)"
    )
    parser.add_argument("--json", dest="json_path", default=None, help="write results here")
    parser.add_argument("--plot", default=None, help="write the PNG plot here (matplotlib)")


def run_cli(args: argparse.Namespace) -> int:
    try:
        levels = parse_levels(args.levels, "--levels")
    except ValueError as exc:
        print(f"bench compare: {exc}", file=sys.stderr)
        return 2
    if args.rounds < 1:
        print("bench compare: --rounds must be >= 1", file=sys.stderr)
        return 2
    if not os.access(args.llama_server, os.X_OK):
        print(f"bench compare: {args.llama_server} is not an executable", file=sys.stderr)
        return 2
    if args.prefill_tokens + PREFILL_MAX_TOKENS > CONTEXT:
        print(
            f"bench compare: --prefill-tokens must be <= {CONTEXT - PREFILL_MAX_TOKENS}",
            file=sys.stderr,
        )
        return 2
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="tinyllm-compare-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    gguf = Path(args.gguf) if args.gguf else None
    if gguf is None:
        from tinyllm_trio.bench.gguf_export import write_gguf

        gguf = write_gguf(log_dir / "tinyllm.gguf", args.model)
        print(f"wrote {gguf}", file=sys.stderr)
    specs = server_specs(args, gguf, log_dir)
    loads = default_loads(levels, args.prefill_tokens)
    try:
        result = compare(
            specs, loads, args.rounds, log_dir, HTTPMeasure(args.timeout), args.startup_timeout
        )
    except RuntimeError as exc:
        print(f"bench compare: {exc}", file=sys.stderr)
        return 1
    print(format_table(result))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result.to_json(), f, indent=2)
            f.write("\n")
    if args.plot and not write_plot(result, args.plot):
        print("bench compare: matplotlib is not installed; no plot written", file=sys.stderr)
    failed = sum(lc.failed(s.name) for lc in result.loads for s in specs)
    if failed:
        print(f"bench compare: {failed} requests failed (see the JSON's errors)", file=sys.stderr)
    return 1 if failed else 0

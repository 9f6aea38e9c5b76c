"""`tinyllm-trio bench engine`: what the process boundary costs, and what a second worker buys.

Four measurements, each the median of `--runs` runs:

- bare: the worker's own loop in this process: one `ContinuousBatcher` with serve's default
  `--max-batch` (32), kept across runs as a worker keeps its own. No IPC, no Trio.
- bare in 2 processes (for each worker count w > 1: w processes): the same loop in processes
  of their own, running at once, each given its share of the level (C/w clients and requests,
  as the pool's routing splits them). "2p/bare" is what a second core gives this load with no
  IPC and no server at all: the ceiling that "2w/1w" reads against on this machine.
- engine: the same load through `open_engine` (1 worker, then 2 by default; the same max batch
  per worker), consumed by Trio tasks: IPC both ways, routing, per-request channels, all of it.
- The load at each level C is a closed loop: C clients, each starting its next request when the
  last one ends, max(16, 4 x C) requests in all (bench http's count; `--requests N`, or `wave`
  for one wave of C), 64 tokens each after 16-token prompts (EOS ignored). Tokens/s counts
  every generated token from the first submit to the last final event, prefill included.
  "1w/bare" is the price of the process boundary (target: >= 0.85); "2w/1w" is the scaling of
  a second worker (target on 2 cores: >= 1.6 at 32+). Beyond the max batch, generations wait
  in the queue, as in the server: at 64, one worker decodes 32 at a time and two workers 64.
  `--max-tokens 128` is exactly bench http's load (`bench http --compare-engine` runs that
  in-process Engine load itself, next to each HTTP level).
- IPC: a token message's round trip between two processes over two rings (encode, put, the
  peer's get and put back, get, decode), and the Trio-side cost of receiving a stream of
  token messages (`receive_many` + decode), in microseconds per message.

The configurations are measured in turn (for each level and run: bare, 1 worker, 2 workers),
with every engine started up front, and each ratio is the median over runs of one run against
its neighbour: a shared machine's speed drifts over minutes, and back-to-back runs see the same
drift, so the ratios stay meaningful when the absolute rates move.

Wall-clock rates are honest only on an otherwise idle machine: the workers and this process
share the cores with everything else running. So each rate comes with its CPU cost per token
(bare: this process's CPU time; engine: the workers' CPU time from /proc/<pid>/schedstat plus
this process's, i.e. the IPC and routing included), and "1w/bare cpu" compares those: the
process boundary's price measured in CPU, which a busy machine does not distort. "worker
us/tok" is the worker process's share alone, and "worker/bare" sets it against the bare loop:
what the same batcher costs inside a worker (messages, the ring, and a decode step slowed by
the engine's work on the other core).

With `--shared-prefix-words N` it measures the prefix cache instead: every prompt is the same N
words then the usual short prompt as a distinct tail; two engines (the first `--workers` count
each), one with the prefix cache and one without, are started up front, warmed with that
prefix, and run each level in turn (on, off, on, off, ...); the table gives each side's time to
first token (p50 of the level's requests, median over runs) and tokens/s, and off/on.

BLAS is single-threaded (as in the workers), so `run_cli` re-runs the benchmark in a child
process with the thread variables set when they are not already 1. Without a trained default
checkpoint it uses random weights of the default shapes (same cost), saved to a temporary
directory the workers load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tinyllm_trio.bench.workload import (
    PROMPT_WORDS,
    corpus_text,
    parse_levels,
    prompt_text,
    requests_per_level,
    run_on_engine,
)
from tinyllm_trio.config import EngineConfig, add_model_arguments
from tinyllm_trio.model.batching import MAX_BATCH  # serve's default --max-batch
from tinyllm_trio.model.blas import blas_pinned, single_threaded_env

CONCURRENCY = (1, 8, 32, 64)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `tinyllm-trio bench engine` (the CLI declares them through this)."""
    # as serve declares them; float32 weights only: this compares processes, not precisions
    add_model_arguments(p, weights=False)
    p.add_argument(
        "--concurrency",
        default=",".join(map(str, CONCURRENCY)),
        help="comma-separated numbers of concurrent generations (default 1,8,32,64)",
    )
    p.add_argument(
        "--workers", default="1,2", help="comma-separated worker counts to compare (default 1,2)"
    )
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per generation")
    p.add_argument(
        "--max-batch",
        type=int,
        default=MAX_BATCH,
        help=f"sequences per worker (and in the bare loop), as serve's --max-batch "
        f"(default {MAX_BATCH}); more concurrent generations wait in the queue",
    )
    p.add_argument(
        "--requests",
        default="auto",
        help="generations per level, run as a closed loop of `concurrency` clients: a number, "
        "'auto' (default: bench http's count, max(16, 4 x concurrency)) or 'wave' (one wave "
        "of `concurrency`)",
    )
    p.add_argument(
        "--prompt-words",
        type=int,
        default=PROMPT_WORDS,
        help="prompt length in words (default 15 = 16 tokens, as bench http)",
    )
    p.add_argument(
        "--shared-prefix-words",
        type=int,
        default=0,
        help="compare the prefix cache on and off instead (see above): every prompt starts "
        "with the same N words (default 0: the worker-scaling benchmark)",
    )
    p.add_argument("--runs", type=int, default=3, help="runs per measurement (median reported)")
    p.add_argument("--ipc-messages", type=int, default=20000, help="messages per IPC test")
    p.add_argument("--skip-bare", action="store_true", help="only the engine and IPC numbers")
    p.add_argument(
        "--pin-workers",
        choices=("true", "false"),
        default="true",
        help="pin each worker to a core of its own when a core is left over, as serve does "
        "by default (default true)",
    )
    p.add_argument(
        "--coast",
        choices=("true", "false"),
        default="true",
        help="let the engine read each worker's steady steps on a timer instead of being woken "
        "by the worker after each, as serve does by default (default true; false: serve "
        "--no-coast)",
    )
    p.add_argument(
        "--busy-tick",
        type=float,
        default=EngineConfig.busy_tick,
        metavar="SECONDS",
        help="with every core running a busy worker, read the workers on a shared tick of this "
        f"many seconds, as serve does (default {EngineConfig.busy_tick}; 0: serve --busy-tick 0, "
        "woken after every step)",
    )
    p.add_argument(
        "--consumer",
        choices=("iterate", "sink"),
        default="iterate",
        help="how each engine client takes its tokens: iterating the generation (a task "
        "switch per token, default) or in a token sink after the first, as the HTTP server "
        "does (Generation.set_token_sink)",
    )
    p.add_argument("--json", dest="json_path", default=None, help="also write results here")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinyllm-trio bench engine", description=__doc__)
    add_arguments(p)
    return p


def run_cli(args: argparse.Namespace) -> int:
    if not blas_pinned():
        cmd = [sys.executable, "-m", "tinyllm_trio.bench.engine", *_argv(args)]
        return subprocess.call(cmd, env=single_threaded_env())
    if min(args.runs, args.max_tokens, args.prompt_words, args.max_batch) < 1:
        print("--runs, --max-tokens, --prompt-words and --max-batch must be >= 1", file=sys.stderr)
        return 2
    if args.shared_prefix_words < 0:
        print("--shared-prefix-words must be >= 0", file=sys.stderr)
        return 2
    if not 0 <= args.busy_tick <= 1:
        print("--busy-tick must be between 0 and 1 second", file=sys.stderr)
        return 2
    try:
        load = Load(
            args.max_tokens,
            args.prompt_words,
            _requests(args.requests),
            args.max_batch,
            sink=args.consumer == "sink",
        )
    except ValueError as e:
        print(f"--requests: {e}", file=sys.stderr)
        return 2
    try:
        concurrency = parse_levels(args.concurrency, "--concurrency")
        workers = parse_levels(args.workers, "--workers")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    from tinyllm_trio.model.checkpoint import CheckpointError

    with tempfile.TemporaryDirectory(prefix="tinyllm-bench-") as tmp:
        try:
            path, label = _checkpoint(args.model, args.attention_scale, Path(tmp))
        except CheckpointError as e:
            print(f"tinyllm-trio bench engine: {e}", file=sys.stderr)
            return 1
        show = format_table
        if args.shared_prefix_words:
            show = format_prefix_table
            results = prefix_cache_comparison(
                path,
                attention_scale=args.attention_scale,
                workers=workers[0],
                concurrency=concurrency,
                load=load,
                runs=args.runs,
                shared_prefix_words=args.shared_prefix_words,
                pin_workers=args.pin_workers == "true",
                coast=args.coast == "true",
                busy_tick=args.busy_tick,
            )
        else:
            results = run_benchmarks(
                path,
                attention_scale=args.attention_scale,
                concurrency=concurrency,
                workers=workers,
                load=load,
                runs=args.runs,
                ipc_messages=args.ipc_messages,
                bare=not args.skip_bare,
                pin_workers=args.pin_workers == "true",
                coast=args.coast == "true",
                busy_tick=args.busy_tick,
            )
    results["model"] = label
    print(show(results))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _argv(args: argparse.Namespace) -> list[str]:
    out = ["--concurrency", args.concurrency, "--workers", args.workers]
    out += ["--max-tokens", str(args.max_tokens), "--runs", str(args.runs)]
    out += ["--prompt-words", str(args.prompt_words), "--max-batch", str(args.max_batch)]
    out += ["--shared-prefix-words", str(args.shared_prefix_words)]
    if args.requests is not None:
        out += ["--requests", str(args.requests)]
    out += ["--ipc-messages", str(args.ipc_messages)]
    if args.model is not None:
        out += ["--model", str(args.model)]
    if args.attention_scale is not None:
        out += ["--attention-scale", args.attention_scale]
    if args.skip_bare:
        out.append("--skip-bare")
    out += ["--pin-workers", args.pin_workers, "--coast", args.coast]
    out += ["--busy-tick", str(args.busy_tick)]
    out += ["--consumer", args.consumer]
    if args.json_path:
        out += ["--json", str(args.json_path)]
    return out


def add_closed_loop_arguments(p: argparse.ArgumentParser) -> None:
    """The closed loop that the two-worker scripts (scripts/engine_cores.py,
    scripts/busy_tick.py) run for each measurement, and the model it runs."""
    p.add_argument("--concurrency", type=int, default=32, help="clients of the closed loop")
    p.add_argument("--requests", type=int, default=128, help="generations per run")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per generation")
    p.add_argument("--model", default=None, help="checkpoint directory (default: packaged)")


def with_one_blas_thread() -> None:
    """Run this script again with one BLAS thread unless it already has one, as `bench
    engine` runs (the BLAS library reads its settings when numpy loads it)."""
    if not blas_pinned():
        os.execve(sys.executable, [sys.executable, *sys.argv], single_threaded_env())


def _checkpoint(model: str | None, attention_scale: str | None, tmp: Path) -> tuple[str, str]:
    """A checkpoint directory the workers can load, and a label for the table."""
    from tinyllm_trio.model.checkpoint import default_model_path, load_model, save_checkpoint

    if model is not None or (default_model_path() / "config.json").exists():
        loaded = load_model(model, attention_scale=attention_scale)
        return str(loaded.path), f"{loaded.path} ({_shape(loaded.transformer.config)})"
    from tinyllm_trio.model.tokenizer import build_vocab
    from tinyllm_trio.model.transformer import ModelConfig, Transformer

    tokenizer = build_vocab([corpus_text()], n_words=3200, n_chars=60)  # TinyLLM's shape
    config = ModelConfig(vocab_size=tokenizer.vocab_size)
    save_checkpoint(tmp, Transformer.random(config, seed=0), tokenizer)
    return str(tmp), f"random weights, default shapes ({_shape(config)}; no trained model found)"


def _shape(config) -> str:
    return (
        f"V={config.vocab_size} C={config.n_embd} H={config.n_head} L={config.n_layer} "
        f"ctx={config.max_context}"
    )


@dataclass(frozen=True)
class Load:
    """What each level runs: `requests(c)` generations of `max_tokens` tokens (EOS ignored)
    after `prompt_words`-word prompts, at most c at a time (a closed loop)."""

    max_tokens: int = 64
    prompt_words: int = PROMPT_WORDS
    per_level: int | str | None = None  # None: one wave of c; "auto": bench http's count
    max_batch: int = MAX_BATCH  # sequences decoded together per worker / in the bare loop
    sink: bool = False  # engine clients take tokens in a token sink instead of iterating

    def requests(self, c: int) -> int:
        if self.per_level is None:
            return c
        if self.per_level == "auto":
            return requests_per_level(c)
        return int(self.per_level)

    def prompt(self, index: int) -> str:
        return prompt_text(index, self.prompt_words)


def _requests(text: str | None) -> int | str | None:
    if text is None or text == "wave":
        return None
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"expected a positive integer, 'auto' or 'wave', got {text!r}")
    return int(text)


# --- measurements --------------------------------------------------------------------------------


Measurement = tuple[float, float, float]
"""(tokens per second, CPU microseconds per token, of which the worker processes')"""


def _cpu_ns(pid: int) -> int:
    """CPU time a process has used, in ns (scheduler accounting, finer than clock ticks)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


class BareLoop:
    """The worker's loop without the worker: one `ContinuousBatcher` in this process, made
    once and reused, as a worker keeps its batcher (and KV cache) for its whole life. A fresh
    batcher per run would charge every run for faulting in a new KV cache."""

    def __init__(self, path: str, attention_scale: str | None, max_batch: int) -> None:
        from tinyllm_trio.model.batching import ContinuousBatcher
        from tinyllm_trio.model.checkpoint import load_model

        loaded = load_model(path, attention_scale=attention_scale)
        self.batcher = ContinuousBatcher(loaded.transformer, loaded.tokenizer, max_batch=max_batch)
        self._next_id = 0

    def run(self, c: int, load: Load, on_token: Callable[[], object] | None = None) -> Measurement:
        """`load.requests(c)` requests, C at once, the next submitted as one finishes; step
        until idle. `on_token` is called after each token event (scripts/neighbour_cost.py
        wakes a process on another core there)."""
        from tinyllm_trio.model.sampling import SamplingParams
        from tinyllm_trio.protocol import DoneEvent, TokenEvent

        batcher = self.batcher
        params = SamplingParams(max_tokens=load.max_tokens, temperature=0, ignore_eos=True)
        total = load.requests(c)
        base = self._next_id
        self._next_id += total
        t0, cpu0 = time.perf_counter(), time.process_time()
        submitted = min(c, total)
        for i in range(submitted):
            batcher.submit(base + i, load.prompt(i), params)
        tokens = 0
        while not batcher.idle:
            for event in batcher.step():
                if isinstance(event, TokenEvent):
                    tokens += len(event.token_ids)
                    if on_token is not None:
                        on_token()
                elif isinstance(event, DoneEvent) and submitted < total:
                    batcher.submit(base + submitted, load.prompt(submitted), params)
                    submitted += 1
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        assert tokens == total * load.max_tokens, tokens
        return tokens / elapsed, cpu / tokens * 1e6, cpu / tokens * 1e6  # all of it "worker"


class BareProcesses:
    """`n` bare loops in `n` processes of their own, run at once: the most `n` workers could
    give on this machine with no IPC and no server (`2p/bare` in the table is the ceiling of
    `2w/1w`). Each child (``python -m tinyllm_trio.bench.engine --bare-child``) loads the model
    once and keeps its batcher, like a worker; the parent sends every child its share of a
    level in one go (a JSON line on stdin) and reads back its tokens and seconds."""

    def __init__(self, n: int, path: str, attention_scale: str | None, max_batch: int) -> None:
        cmd = [sys.executable, "-m", "tinyllm_trio.bench.engine", "--bare-child", path]
        cmd += ["--max-batch", str(max_batch)]
        if attention_scale is not None:
            cmd += ["--attention-scale", attention_scale]
        self.children = []
        try:
            for _ in range(n):
                self.children.append(
                    subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                )
            for child in self.children:
                if child.stdout is None or child.stdout.readline().strip() != "ready":
                    raise RuntimeError("a bare benchmark process failed to start")
        except BaseException:
            self.close()
            raise

    def run(self, c: int, load: Load) -> Measurement:
        """Level c split across the processes (C/n clients and requests each, as the pool's
        least-loaded routing splits it); tokens/s counts all of them over the slowest one."""
        n, total = len(self.children), load.requests(c)
        orders = []
        for i, child in enumerate(self.children):
            clients, requests = c // n + (i < c % n), total // n + (i < total % n)
            if clients and requests:  # one stream: only the first process works
                orders.append((child, {"c": clients, "requests": requests}))
        for child, order in orders:  # all sent before any is read: they run at once
            order.update(max_tokens=load.max_tokens, prompt_words=load.prompt_words)
            assert child.stdin is not None
            child.stdin.write(json.dumps(order) + "\n")
            child.stdin.flush()
        done = []
        for child, _ in orders:
            assert child.stdout is not None
            line = child.stdout.readline()
            if not line:
                raise RuntimeError(f"a bare benchmark process exited ({child.wait()})")
            done.append(json.loads(line))
        tokens = sum(d["tokens"] for d in done)
        cpu_us = sum(d["cpu_s"] for d in done) / tokens * 1e6
        return tokens / max(d["seconds"] for d in done), cpu_us, cpu_us

    def close(self) -> None:
        for child in self.children:
            if child.stdin is not None:
                child.stdin.close()  # end of orders: the child exits
        for child in self.children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def _bare_child(path: str, attention_scale: str | None, max_batch: int) -> int:
    """The child side of `BareProcesses`: one BareLoop, one level per line of stdin."""
    loop = BareLoop(path, attention_scale, max_batch)
    loop.run(max_batch, Load(4, PROMPT_WORDS))  # warm-up: every batch slot once
    print("ready", flush=True)
    for line in sys.stdin:
        order = json.loads(line)
        load = Load(order["max_tokens"], order["prompt_words"], order["requests"], max_batch)
        rate, cpu_us, _ = loop.run(order["c"], load)
        tokens = order["requests"] * order["max_tokens"]
        result = {"tokens": tokens, "seconds": tokens / rate, "cpu_s": cpu_us * tokens / 1e6}
        print(json.dumps(result), flush=True)
    return 0


def _busy_tick(tick: float) -> str:
    return f"busy tick {tick * 1000:g} ms" if tick else "no busy tick"


def _coast_counts(engine) -> tuple[int, int]:
    """The engine's coasting timer sleeps and misses so far, over its workers."""
    workers = [w["coast"] for w in engine.stats()["workers"]]
    return sum(w["sleeps"] for w in workers), sum(w["misses"] for w in workers)


def _routed(engine) -> list[int]:
    """The requests the engine's pool has sent to each worker so far."""
    return [w.get("routed", 0) for w in engine.stats()["workers"]]


async def _engine_run(engine, c: int, load: Load) -> Measurement:
    """`load.requests(c)` generations through `engine` (`workload.run_on_engine`), with the
    CPU of this process and of the engine's workers."""
    total = load.requests(c)
    pids = [w["pid"] for w in engine.stats()["workers"]]
    workers0 = sum(_cpu_ns(pid) for pid in pids)
    t0, cpu0 = time.perf_counter(), time.process_time()
    tokens = await run_on_engine(
        engine, c, total, load.max_tokens, load.prompt_words, sink=load.sink
    )
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    worker_cpu = (sum(_cpu_ns(pid) for pid in pids) - workers0) / 1e9
    assert tokens == total * load.max_tokens, tokens
    return tokens / elapsed, (cpu + worker_cpu) / tokens * 1e6, worker_cpu / tokens * 1e6


def interleaved_measurements(
    path: str,
    attention_scale: str | None,
    workers: Sequence[int],
    concurrency: Sequence[int],
    load: Load,
    runs: int,
    *,
    bare: bool = True,
    pin_workers: bool = True,
    coast: bool = True,
    busy_tick: float = EngineConfig.busy_tick,
) -> dict[str, dict]:
    """Every configuration's runs, taken in turn: for each level and run, the bare loop, then
    the engine with each worker count (all engines started once, up front, and idle while
    another one runs). A shared machine drifts over minutes; measured back to back, the
    configurations see the same conditions, so their ratios hold even when the absolute rates
    move. With `bare`, each worker count w > 1 also gets w bare loops in w processes at once
    (`BareProcesses`), right after the in-process one. Returns {"bare": {c: [m, ...]},
    "bare_procs": {w: {c: [m, ...]}}, "engine": {w: {c: [m, ...]}}}, runs in order."""
    import contextlib

    import trio

    from tinyllm_trio.engine import open_engine

    async def main() -> dict[str, dict]:
        out: dict[str, dict] = {"bare": {}, "bare_procs": {}, "engine": {w: {} for w in workers}}
        out["coast"] = {w: {} for w in workers}  # timer sleeps and misses, per level
        out["routed"] = {w: {} for w in workers}  # requests sent to each worker, per level
        async with contextlib.AsyncExitStack() as stack:
            engines = {}
            for w in workers:
                engines[w] = await stack.enter_async_context(
                    open_engine(
                        path,
                        workers=w,
                        max_batch=load.max_batch,
                        max_queue=max(concurrency),  # beyond the max batch they wait, as in serve
                        attention_scale=attention_scale,
                        pin_workers=pin_workers,
                        coast=coast,
                        busy_tick=busy_tick,
                    )
                )
                # warm-up: every batch slot once, so no measured run faults in KV cache pages
                await _engine_run(engines[w], max(concurrency), Load(4, load.prompt_words))
            loop = BareLoop(path, attention_scale, load.max_batch) if bare else None
            if loop is not None:
                loop.run(max(concurrency), Load(4, load.prompt_words))  # warm-up, as above
            procs = {}
            for w in workers if bare else ():
                if w > 1:
                    procs[w] = BareProcesses(w, path, attention_scale, load.max_batch)
                    stack.callback(procs[w].close)
            for c in concurrency:
                for _ in range(runs):
                    if loop is not None:  # synchronous: the engines' workers sit idle meanwhile
                        out["bare"].setdefault(c, []).append(loop.run(c, load))
                    for w, p in procs.items():
                        out["bare_procs"].setdefault(w, {}).setdefault(c, []).append(p.run(c, load))
                    for w, engine in engines.items():
                        before, sent = _coast_counts(engine), _routed(engine)
                        out["engine"][w].setdefault(c, []).append(
                            await _engine_run(engine, c, load)
                        )
                        (sleeps, misses), counts = _coast_counts(engine), out["coast"][w]
                        last = counts.get(c, (0, 0))
                        counts[c] = (
                            last[0] + sleeps - before[0],
                            last[1] + misses - before[1],
                        )
                        routed = out["routed"][w].setdefault(c, [0] * w)
                        for i, (now, then) in enumerate(zip(_routed(engine), sent, strict=True)):
                            routed[i] += now - then
        return out

    return trio.run(main)


def prefix_cache_comparison(
    path: str,
    *,
    attention_scale: str | None,
    workers: int,
    concurrency: Sequence[int],
    load: Load,
    runs: int,
    shared_prefix_words: int,
    pin_workers: bool = True,
    coast: bool = True,
    busy_tick: float = EngineConfig.busy_tick,
) -> dict:
    """TTFT and tokens/s of the same shared-prefix load on two engines, prefix cache on and
    off, run alternately (see the module docstring); medians over `runs`."""
    import contextlib

    import trio

    from tinyllm_trio.engine import open_engine
    from tinyllm_trio.model.checkpoint import load_model

    async def run(engine, c: int) -> tuple[float, float]:
        ttfts: list[float] = []
        t0 = time.perf_counter()
        tokens = await run_on_engine(
            engine,
            c,
            load.requests(c),
            load.max_tokens,
            load.prompt_words,
            shared_prefix_words=shared_prefix_words,
            ttfts=ttfts,
        )
        return tokens / (time.perf_counter() - t0), 1000.0 * statistics.median(ttfts)

    async def main() -> dict[bool, dict[int, list[tuple[float, float]]]]:
        out: dict[bool, dict[int, list[tuple[float, float]]]] = {True: {}, False: {}}
        async with contextlib.AsyncExitStack() as stack:
            engines = {}
            for cache in (True, False):
                engines[cache] = await stack.enter_async_context(
                    open_engine(
                        path,
                        workers=workers,
                        max_batch=load.max_batch,
                        max_queue=max(concurrency),
                        attention_scale=attention_scale,
                        pin_workers=pin_workers,
                        coast=coast,
                        busy_tick=busy_tick,
                        prefix_cache=cache,
                    )
                )
                await run(engines[cache], max(concurrency))  # warm-up: KV pages, the prefix
            for c in concurrency:
                for _ in range(runs):
                    for cache in (True, False):
                        out[cache].setdefault(c, []).append(await run(engines[cache], c))
        return out

    measured = trio.run(main)
    tokenizer = load_model(path, attention_scale=attention_scale).tokenizer
    prompt = prompt_text(0, load.prompt_words, shared_prefix_words)
    return {
        "shared_prefix_words": shared_prefix_words,
        "prompt_tokens": len(tokenizer.encode(prompt)),
        "prompt_words": load.prompt_words,
        "max_tokens": load.max_tokens,
        "requests": {c: load.requests(c) for c in concurrency},
        "max_batch": load.max_batch,
        "workers": workers,
        "runs": runs,
        "concurrency": list(concurrency),
        "cpus": len(os.sched_getaffinity(0)),
        "cache": {
            "on" if cache else "off": {
                c: {
                    "tokens_per_s": statistics.median(m[0] for m in per_c[c]),
                    "ttft_p50_ms": statistics.median(m[1] for m in per_c[c]),
                }
                for c in concurrency
            }
            for cache, per_c in measured.items()
        },
    }


def format_prefix_table(results: dict) -> str:
    """The prefix-cache comparison as a table: TTFT p50 and tokens/s, cache on and off."""
    on, off = results["cache"]["on"], results["cache"]["off"]
    head = ["concurrency", "requests", "TTFT p50 on", "TTFT p50 off", "off/on"]
    head += ["tok/s on", "tok/s off"]
    rows = []
    for c in results["concurrency"]:
        a, b = _by_level(on, c), _by_level(off, c)
        rows.append(
            [
                str(c),
                str(_by_level(results["requests"], c)),
                f"{a['ttft_p50_ms']:.1f} ms",
                f"{b['ttft_p50_ms']:.1f} ms",
                f"{b['ttft_p50_ms'] / a['ttft_p50_ms']:.1f}x",
                f"{a['tokens_per_s']:.0f}",
                f"{b['tokens_per_s']:.0f}",
            ]
        )
    about = (
        f"prefix cache on/off: {results['shared_prefix_words']}-word shared prefix + "
        f"{results['prompt_words']}-word tail ({results['prompt_tokens']} prompt tokens), "
        f"{results['max_tokens']} tokens per generation, {results['workers']} worker(s), max "
        f"batch {results['max_batch']}, median of {results['runs']} alternating runs, "
        f"{results['cpus']} CPUs"
    )
    return "\n".join(_table(results, about, head, rows))


def _table(results: dict, about: str, head: list[str], rows: list[list[str]]) -> list[str]:
    """The model line, `about`, then `head` and `rows` right-aligned in columns."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [
        f"model: {results.get('model', '?')}",
        about,
        "  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)),
    ]
    return lines + ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]


def _by_level(by_c: dict, c: int):
    """A per-level value (JSON turns int keys into strings)."""
    return by_c[c] if c in by_c else by_c[str(c)]


def _share_of_ceiling(
    w_engine: list[Measurement],
    one: list[Measurement],
    w_bare: list[Measurement],
    bare: list[Measurement],
) -> float:
    """Median over runs of (wW/1w) / (wP/bare), each run's four configurations measured in
    turn: how much of what w bare processes gain over one the engine's w workers gain over
    its one. Taken run by run, so the drift that moves both ratios of a run cancels, which
    the quotient of the two medians would not do."""
    return statistics.median(
        (e[0] / o[0]) / (p[0] / b[0])
        for e, o, p, b in zip(w_engine, one, w_bare, bare, strict=True)
    )


def _ratio(num: list[Measurement], den: list[Measurement]) -> float:
    """Median over runs of num/den tokens per second, each run against its neighbour."""
    return statistics.median(a[0] / b[0] for a, b in zip(num, den, strict=True))


_ECHO = """
import sys
from tinyllm_trio.ipc.ring import Ring
inbox, outbox, n = Ring.attach(sys.argv[1]), Ring.attach(sys.argv[2]), int(sys.argv[3])
for _ in range(n):
    f = inbox.get(timeout=30)
    outbox.put(f.msg_type, f.request_id, f.payload)
"""

_STREAM = """
import sys
from tinyllm_trio.ipc.messages import encode
from tinyllm_trio.ipc.ring import Ring
from tinyllm_trio.protocol import TokenEvent
outbox, n = Ring.attach(sys.argv[1], doorbell_fd=int(sys.argv[3])), int(sys.argv[2])
frame = encode(TokenEvent(7, [123], " cat"))
for _ in range(n):
    outbox.put(*frame, timeout=30)
"""


def ipc_costs(messages: int) -> dict[str, float]:
    """Round trip of a token message between two processes, and Trio-side receive cost."""
    import trio

    from tinyllm_trio.ipc.messages import decode, encode
    from tinyllm_trio.ipc.pool import RESPONSE_SLOT_SIZE, RESPONSE_SLOTS
    from tinyllm_trio.ipc.ring import Ring, new_prefix
    from tinyllm_trio.protocol import TokenEvent

    base = new_prefix()
    there = Ring.create(base + "-b-there", n_slots=RESPONSE_SLOTS, slot_size=RESPONSE_SLOT_SIZE)
    back = Ring.create(base + "-b-back", n_slots=RESPONSE_SLOTS, slot_size=RESPONSE_SLOT_SIZE)
    # streamed as the pool reads: a response ring with a doorbell, Ring.pump, decode each one
    inbox = Ring.create(
        base + "-b-in", n_slots=RESPONSE_SLOTS, slot_size=RESPONSE_SLOT_SIZE, doorbell=True
    )
    try:
        rounds = max(1000, messages // 10)
        echo = subprocess.Popen([sys.executable, "-c", _ECHO, there.name, back.name, str(rounds)])
        event = TokenEvent(7, [123], " cat")
        t0 = time.perf_counter()
        for _ in range(rounds):
            there.put(*encode(event))
            frame = back.get(timeout=30)
            assert decode(frame.msg_type, frame.request_id, frame.payload) == event
        round_trip = (time.perf_counter() - t0) / rounds
        echo.wait(timeout=30)

        bell = inbox.doorbell_fd
        stream = subprocess.Popen(
            [sys.executable, "-c", _STREAM, inbox.name, str(messages), str(bell)], pass_fds=(bell,)
        )

        async def receive() -> float:
            got = 0
            t0 = 0.0

            def deliver(frames) -> None:
                nonlocal got, t0
                if not t0:
                    t0 = time.perf_counter()
                for f in frames:
                    decode(f.msg_type, f.request_id, f.payload)
                got += len(frames)
                if got >= messages:
                    scope.cancel()

            with trio.CancelScope() as scope:
                await inbox.pump(deliver)
            return (time.perf_counter() - t0) / messages

        streamed = trio.run(receive)
        stream.wait(timeout=30)
    finally:
        there.destroy()
        back.destroy()
        inbox.destroy()
    return {"round_trip_us": round_trip * 1e6, "streamed_us_per_msg": streamed * 1e6}


def run_benchmarks(
    path: str,
    *,
    attention_scale: str | None = None,
    concurrency: Sequence[int] = CONCURRENCY,
    workers: Sequence[int] = (1, 2),
    load: Load = Load(),
    runs: int = 3,
    ipc_messages: int = 20000,
    bare: bool = True,
    pin_workers: bool = True,
    coast: bool = True,
    busy_tick: float = EngineConfig.busy_tick,
) -> dict:
    results: dict = {
        "max_tokens": load.max_tokens,
        "prompt_words": load.prompt_words,
        "requests": {c: load.requests(c) for c in concurrency},
        "max_batch": load.max_batch,
        "runs": runs,
        "concurrency": list(concurrency),
        "pin_workers": pin_workers,
        "coasting": coast,  # "coast" becomes the timer's counts below
        "busy_tick": busy_tick,
        "consumer": "sink" if load.sink else "iterate",
    }
    measured = interleaved_measurements(
        path,
        attention_scale,
        workers,
        concurrency,
        load,
        runs,
        bare=bare,
        pin_workers=pin_workers,
        coast=coast,
        busy_tick=busy_tick,
    )
    if bare:
        results["bare"] = {c: _medians(v) for c, v in measured["bare"].items()}
        results["bare_procs"] = {
            w: {c: _medians(v) for c, v in per_c.items()}
            for w, per_c in measured["bare_procs"].items()
        }
    results["engine"] = {
        w: {c: _medians(v) for c, v in per_c.items()} for w, per_c in measured["engine"].items()
    }
    results["coast"] = {
        w: {c: {"sleeps": n, "misses": m} for c, (n, m) in per_c.items()}
        for w, per_c in measured["coast"].items()
    }
    results["routed"] = measured["routed"]
    ratios: dict[str, dict[int, float]] = {}
    one = measured["engine"].get(1)
    for c in concurrency:
        if bare and one:
            ratios.setdefault("1w/bare", {})[c] = _ratio(one[c], measured["bare"][c])
        for w in workers:
            if one and w != 1:
                ratios.setdefault(f"{w}w/1w", {})[c] = _ratio(measured["engine"][w][c], one[c])
            if bare and w != 1:
                ratios.setdefault(f"{w}p/bare", {})[c] = _ratio(
                    measured["bare_procs"][w][c], measured["bare"][c]
                )
            if one and bare and w != 1:
                ratios.setdefault(f"{w}w/1w of {w}p/bare", {})[c] = _share_of_ceiling(
                    measured["engine"][w][c],
                    one[c],
                    measured["bare_procs"][w][c],
                    measured["bare"][c],
                )
    results["ratios"] = ratios
    results["ipc"] = ipc_costs(ipc_messages)
    results["cpus"] = len(os.sched_getaffinity(0))
    return results


def _medians(runs: list[Measurement]) -> dict[str, float]:
    return {
        "tokens_per_s": statistics.median(r[0] for r in runs),
        "cpu_us_per_token": statistics.median(r[1] for r in runs),
        "worker_cpu_us_per_token": statistics.median(r[2] for r in runs),
    }


def format_table(results: dict) -> str:
    workers = sorted(results["engine"])
    bare = results.get("bare")
    head = ["concurrency"]
    if bare:
        head += ["bare tok/s", "bare cpu us/tok"]
    for w in workers:
        head += [f"engine {w}w tok/s", f"{w}w cpu us/tok"]
        if bare and w == 1:
            head += ["1w/bare", "1w/bare cpu", "worker us/tok", "worker/bare"]
        if w != 1 and 1 in results["engine"]:
            head.append(f"{w}w/1w")
        if w != 1 and bare:
            head.append(f"{w}p/bare")
        if w != 1 and bare and 1 in results["engine"]:
            head.append(f"{w}w/1w of {w}p")
    rows = []
    for c in results["concurrency"]:
        row = [str(c)]
        if bare:
            row += [f"{bare[c]['tokens_per_s']:.0f}", f"{bare[c]['cpu_us_per_token']:.0f}"]
        for w in workers:
            m = results["engine"][w][c]
            row += [f"{m['tokens_per_s']:.0f}", f"{m['cpu_us_per_token']:.0f}"]
            if bare and w == 1:
                row.append(f"{_run_ratio(results, '1w/bare', c):.2f}")
                # efficiency: bare CPU per token / engine CPU per token (1.0 = free IPC)
                row.append(f"{bare[c]['cpu_us_per_token'] / m['cpu_us_per_token']:.2f}")
                # the worker process alone against the bare loop (1.0 = a worker costs nothing)
                worker = m.get("worker_cpu_us_per_token", math.nan)  # older JSON files lack it
                row += [f"{worker:.0f}", f"{worker / bare[c]['cpu_us_per_token']:.2f}"]
            if w != 1 and 1 in results["engine"]:
                row.append(f"{_run_ratio(results, f'{w}w/1w', c):.2f}")
            if w != 1 and bare:
                row.append(f"{_run_ratio(results, f'{w}p/bare', c):.2f}")
            if w != 1 and bare and 1 in results["engine"]:
                row.append(f"{_run_ratio(results, f'{w}w/1w of {w}p/bare', c):.2f}")
        rows.append(row)
    about = (
        f"{results['max_tokens']} tokens per generation after {results['prompt_words']}-word "
        f"prompts, requests per level {_counts(results)}, max batch {results['max_batch']} per "
        f"worker, median of {results['runs']} interleaved runs (ratios: median of run "
        f"pairs), "
        f"{results['cpus']} CPUs, BLAS threads 1, workers "
        f"{'pinned' if results.get('pin_workers', True) else 'not pinned'}, "
        f"{'coasting' if results.get('coasting', True) else 'not coasting'}, "
        f"{_busy_tick(results.get('busy_tick', 0.0))}, engine clients "
        f"{'take tokens in a sink' if results.get('consumer') == 'sink' else 'iterate'}"
    )
    lines = _table(results, about, head, rows)
    ipc = results["ipc"]
    lines.append(
        f"IPC: token message round trip between two processes {ipc['round_trip_us']:.1f} us; "
        f"streamed, Trio receive + decode {ipc['streamed_us_per_msg']:.2f} us/message"
    )
    lines += _coast_lines(results)
    lines += _routing_lines(results)
    return "\n".join(lines)


def _routing_lines(results: dict) -> list[str]:
    """How the pool split each level's requests between two or more workers (prefix-aware
    routing may favour the worker that holds a prompt's blocks)."""
    out = []
    for w, per_c in sorted(results.get("routed", {}).items(), key=lambda kv: int(kv[0])):
        parts = [f"{c}: " + "/".join(f"{n:,}" for n in counts) for c, counts in per_c.items()]
        if int(w) > 1 and parts:
            out.append(
                f"routing, {w}w, requests per worker by level (all runs): " + "; ".join(parts)
            )
    return out


def _coast_lines(results: dict) -> list[str]:
    """Where the engine coasted (`--coast true`): its timer sleeps and the share that found
    no message (a miss: the worker rang after all), per worker count and level."""
    out = []
    for w, per_c in sorted(results.get("coast", {}).items(), key=lambda kv: int(kv[0])):
        parts = [
            f"{c}: {v['sleeps']:,} sleeps, {v['misses']:,} misses "
            f"({100 * v['misses'] / v['sleeps']:.1f}%)"
            for c, v in per_c.items()
            if v["sleeps"]
        ]
        if parts:
            out.append(f"coasting, {w}w, timer sleeps by level (all runs): " + "; ".join(parts))
    return out


def _run_ratio(results: dict, name: str, c: int) -> float:
    """A ratio of two configurations at level c (JSON turns int keys into strings)."""
    by_c = results["ratios"][name]
    return by_c[c] if c in by_c else by_c[str(c)]


def _counts(results: dict) -> str:
    counts = results["requests"]
    if all(int(n) == int(c) for c, n in counts.items()):
        return "= concurrency (one wave)"
    return ", ".join(f"{n} at {c}" for c, n in counts.items())


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--bare-child"]:  # internal: one of BareProcesses' children
        child = argparse.ArgumentParser(prog="python -m tinyllm_trio.bench.engine --bare-child")
        child.add_argument("path")
        child.add_argument("--max-batch", type=int, required=True)
        child.add_argument("--attention-scale", choices=["head", "embd"], default=None)
        a = child.parse_args(args[1:])
        return _bare_child(a.path, a.attention_scale, a.max_batch)
    return run_cli(build_parser().parse_args(args))


if __name__ == "__main__":
    raise SystemExit(main())

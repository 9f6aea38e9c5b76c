"""Prometheus metrics for one server, in its own `CollectorRegistry`.

Each server gets its own registry (not prometheus-client's global one), so two servers in one
process (tests, or an app embedding two) never share or collide on counters.

Names follow vLLM's metric set under a `tinyllm_` prefix, so the usual dashboards map across:

- `tinyllm_http_requests_total{endpoint,method,status}`: every answered request. `endpoint` is
  the route template (`/v1/models/{id}`), or `other` for unknown paths, to bound cardinality.
- `tinyllm_prompt_tokens_total`, `tinyllm_generation_tokens_total`: tokens in and out.
- `tinyllm_request_success_total{finished_reason}`: generations that ended (`stop`, `length`,
  `error`, `cancelled` when the client left or the server cancelled it).
- `tinyllm_num_requests_running` / `tinyllm_num_requests_waiting`: read from `engine.stats()` at
  scrape time (running in a worker / queued for a slot), plus `tinyllm_worker_restarts_total`
  and `tinyllm_worker_requests_running{worker}` (each worker's load).
- `tinyllm_worker_requests_routed_total{worker}`: requests the server sent to each worker
  since it started (a worker's restarts do not reset it): how prefix-aware routing balances
  the workers.
- `tinyllm_worker_coast_sleeps_total{worker}` and `tinyllm_worker_coast_misses_total{worker}`:
  the engine's reads of a worker on its coasting timer, and those that found no message (the
  worker then rang; `tinyllm_trio.ipc.coast`), since that worker's process started.
- `tinyllm_worker_busy_ticks_total{worker}`: the engine's sleeps on the busy tick while every core
  ran a busy worker (`--busy-tick`; `tinyllm_trio.ipc.ring.Ring.pump`), since that worker's
  process started.
- `tinyllm_kv_cache_usage_ratio`: the fraction (0..1) of the workers' KV cache positions that
  running sequences fill (`engine.kv_cache_usage`: prompt + generated tokens of every running
  sequence over workers x max_batch x context), and `tinyllm_worker_kv_cache_usage_ratio{worker}`.
- `--metrics-compat vllm` also exports the three gauges a router scrapes from vLLM by default,
  with vLLM's exact names and a `model_name` label: `vllm:num_requests_waiting` (=
  `tinyllm_num_requests_waiting`), `vllm:num_requests_running` (= `tinyllm_num_requests_running`),
  `vllm:kv_cache_usage_perc` (= `tinyllm_kv_cache_usage_ratio`; a 0..1 fraction, as vLLM's is,
  despite "perc"), so dashboards and the Gateway API endpoint picker work unchanged.
- `tinyllm_http_generations_active`: generations the HTTP layer is streaming now; returns to 0
  when a client disconnects mid-stream, which is how tests see the slot being freed.
- Histograms: `tinyllm_time_to_first_token_seconds`, `tinyllm_inter_token_latency_seconds`,
  `tinyllm_e2e_request_latency_seconds`, `tinyllm_request_queue_time_seconds`. Times are
  measured in the server process with `time.perf_counter()`, from the moment the request head
  was parsed (TTFT, E2E), as vLLM measures them from arrival.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4.encode("ascii")

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip


def fast_observer(histogram: Histogram) -> Callable[[float], None]:
    """`histogram.observe` for the per-token path: the same counts, less of the cost.

    prometheus-client's `observe` checks its labels and scans the buckets linearly on every
    call; here the bucket is found by bisection (``amount <= bound``, as `observe` decides) and
    the two counters are bumped directly. Falls back to `observe` if the client's internals
    ever differ from what this expects.
    """
    try:
        bounds = [float(b) for b in histogram._upper_bounds]
        bucket_incs = [bucket.inc for bucket in histogram._buckets]
        sum_inc = histogram._sum.inc
    except AttributeError:  # pragma: no cover - another prometheus-client layout
        return histogram.observe
    if len(bounds) != len(bucket_incs) or not bounds or bounds[-1] != float("inf"):
        return histogram.observe  # pragma: no cover

    def observe(amount: float) -> None:
        sum_inc(amount)
        i = bisect_left(bounds, amount)
        if i < len(bucket_incs):  # (NaN lands nowhere, as with observe)
            bucket_incs[i](1)

    return observe


class _EngineCollector:
    """Gauges read from `engine.stats()` when scraped (nothing to keep in sync)."""

    def __init__(
        self,
        stats: Callable[[], dict[str, Any] | None],
        compat: str | None = None,
        model_name: Callable[[], str] = lambda: "tinyllm",
    ) -> None:
        self._stats = stats
        self._compat = compat
        self._model_name = model_name

    def describe(self):
        return []

    def collect(self):
        stats = self._stats() or {}
        usage = GaugeMetricFamily(
            "tinyllm_kv_cache_usage_ratio",
            "Fraction (0..1) of the workers' KV cache positions filled by running sequences",
        )
        usage.add_metric([], float(stats.get("kv_cache_usage", 0.0)))
        per_worker_usage = GaugeMetricFamily(
            "tinyllm_worker_kv_cache_usage_ratio",
            "Fraction (0..1) of each worker's KV cache positions filled by running sequences",
            labels=["worker"],
        )
        rows = int(stats.get("max_batch", 0)) * int(stats.get("max_context", 0))
        for worker in stats.get("workers") or ():
            filled = float(worker.get("kv_tokens", 0)) / rows if rows > 0 else 0.0
            per_worker_usage.add_metric([str(worker.get("index", "?"))], min(1.0, filled))
        yield from (usage, per_worker_usage)
        if self._compat == "vllm":
            label = [self._model_name()]
            for name, doc, value in (
                ("vllm:num_requests_running", "Requests running (tinyllm_num_requests_running)",
                 stats.get("running", 0)),
                ("vllm:num_requests_waiting", "Requests waiting (tinyllm_num_requests_waiting)",
                 stats.get("waiting", 0)),
                ("vllm:kv_cache_usage_perc", "KV-cache usage, 0..1 (tinyllm_kv_cache_usage_ratio)",
                 stats.get("kv_cache_usage", 0.0)),
            ):  # fmt: skip
                family = GaugeMetricFamily(name, doc, labels=["model_name"])
                family.add_metric(label, float(value))
                yield family
        running = GaugeMetricFamily(
            "tinyllm_num_requests_running", "Requests being generated in a worker now"
        )
        running.add_metric([], float(stats.get("running", 0)))
        waiting = GaugeMetricFamily(
            "tinyllm_num_requests_waiting", "Requests queued for a worker slot"
        )
        waiting.add_metric([], float(stats.get("waiting", 0)))
        restarts = CounterMetricFamily(
            "tinyllm_worker_restarts", "Worker processes replaced after they died"
        )
        restarts.add_metric([], float(stats.get("restarts", 0)))
        per_worker = GaugeMetricFamily(
            "tinyllm_worker_requests_running",
            "Requests running in each worker process",
            labels=["worker"],
        )
        routed = CounterMetricFamily(
            "tinyllm_worker_requests_routed",
            "Requests the server sent to each worker (its balance under prefix-aware routing)",
            labels=["worker"],
        )
        for worker in stats.get("workers") or ():
            index = str(worker.get("index", "?"))
            per_worker.add_metric([index], float(worker.get("running", 0)))
            routed.add_metric([index], float(worker.get("routed", 0)))
        yield from (running, waiting, restarts, per_worker, routed)
        # vLLM's names and units: prompt tokens looked up in the prefix cache, and of those
        # the tokens it supplied (hits / queries is the hit rate)
        cache = stats.get("prefix_cache") or {}
        for name, key, text in (
            ("tinyllm_prefix_cache_queries", "queries", "Prompt tokens looked up in the cache"),
            ("tinyllm_prefix_cache_hits", "hits", "Prompt tokens the prefix cache supplied"),
        ):
            family = CounterMetricFamily(name, text)
            family.add_metric([], float(cache.get(key, 0)))
            yield family
        for name, key, text in (
            ("tinyllm_worker_coast_sleeps", "sleeps", "Reads of a worker on its coasting timer"),
            ("tinyllm_worker_coast_misses", "misses", "Coasting timer reads that found nothing"),
            ("tinyllm_worker_busy_ticks", "ticks", "Sleeps on the busy tick (no core to spare)"),
        ):
            family = CounterMetricFamily(name, text, labels=["worker"])
            for worker in stats.get("workers") or ():
                coast = worker.get("coast") or {}
                family.add_metric([str(worker.get("index", "?"))], float(coast.get(key, 0)))
            yield family


class Metrics:
    """The server's instruments; `render()` is the /metrics body."""

    def __init__(
        self,
        engine_stats: Callable[[], dict[str, Any] | None],
        *,
        compat: str | None = None,
        model_name: Callable[[], str] = lambda: "tinyllm",
    ) -> None:
        self.registry = r = CollectorRegistry()
        self.http_requests = Counter(
            "tinyllm_http_requests",
            "HTTP requests answered, by endpoint, method and status",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "tinyllm_prompt_tokens", "Prompt tokens of finished generations", registry=r
        )
        self.generation_tokens = Counter(
            "tinyllm_generation_tokens", "Generated tokens streamed to clients", registry=r
        )
        self.request_success = Counter(
            "tinyllm_request_success",
            "Generations that ended, by finish reason",
            ["finished_reason"],
            registry=r,
        )
        self.generations_active = Gauge(
            "tinyllm_http_generations_active",
            "Generations the HTTP layer is producing now",
            registry=r,
        )
        self.connections = Gauge("tinyllm_http_connections", "Open client connections", registry=r)
        self.connections_evicted = Counter(
            "tinyllm_http_connections_evicted",
            "Idle connections closed to make room for a new one at the connection cap",
            registry=r,
        )
        self.ttft = Histogram(
            "tinyllm_time_to_first_token_seconds",
            "From request arrival to the first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "tinyllm_inter_token_latency_seconds",
            "Between successive generated tokens of one request",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "tinyllm_e2e_request_latency_seconds",
            "From request arrival to the end of its generation",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "tinyllm_request_queue_time_seconds",
            "Time a request waited for a worker slot",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_EngineCollector(engine_stats, compat, model_name))
        # Once per streamed token: the cheap equivalents of `.observe`.
        self.observe_ttft = fast_observer(self.ttft)
        self.observe_itl = fast_observer(self.itl)

    def render(self) -> bytes:
        return generate_latest(self.registry)

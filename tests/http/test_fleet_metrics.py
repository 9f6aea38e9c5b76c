"""Router metrics: the KV-cache usage gauge (real workers) and `--metrics-compat vllm`."""

from __future__ import annotations

from pathlib import Path

import trio

from http_fixtures import KVUsageEngine, get, raw_request, running_server, split_response
from tinyllm_trio import SamplingParams, open_engine
from tinyllm_trio.engine import kv_cache_usage
from tinyllm_trio.model.batching import TokenEvent


def test_kv_cache_usage_counts_positions_of_running_sequences() -> None:
    stats = {"max_batch": 4, "workers": [{"kv_tokens": 30}, {"kv_tokens": 10}]}
    assert kv_cache_usage(stats, 10) == 40 / (2 * 4 * 10)
    assert kv_cache_usage({"max_batch": 4, "workers": []}, 10) == 0.0
    assert kv_cache_usage({"max_batch": 1, "workers": [{"kv_tokens": 99}]}, 10) == 1.0


async def test_kv_cache_usage_follows_a_real_generation(long_checkpoint: Path) -> None:
    async with open_engine(long_checkpoint, workers=1, max_batch=4) as engine:
        assert engine.stats()["kv_cache_usage"] == 0.0
        total = 1 * 4 * engine.model_config.max_context
        prompt = engine.encode_prompt("once upon a time")
        params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        seen = 0
        async with engine.generate(prompt, params) as events:
            async for event in events:
                assert isinstance(event, TokenEvent)
                seen += len(event.token_ids)
                if seen == 20:
                    usage = engine.stats()["kv_cache_usage"]
                    # the pool may have received tokens this task has not read yet
                    assert (len(prompt) + 20) / total <= usage <= (len(prompt) + 200) / total
                    break
        with trio.fail_after(10):
            while engine.stats()["running"]:
                await trio.sleep(0.01)
        assert engine.stats()["kv_cache_usage"] == 0.0


async def _scrape(**overrides) -> str:
    engine = KVUsageEngine()
    engine.running, engine.waiting = 3, 5
    async with running_server(engine, **overrides) as (_, port):
        status, _, body = split_response(await raw_request(port, get("/metrics")))
    assert status == 200
    return body.decode()


async def test_metrics_export_kv_usage_and_vllm_names_only_when_asked() -> None:
    plain = await _scrape()
    assert "tinyllm_kv_cache_usage_ratio 0.25" in plain
    assert 'tinyllm_worker_kv_cache_usage_ratio{worker="0"} 0.25' in plain
    assert 'tinyllm_worker_kv_cache_usage_ratio{worker="1"} 0.0' in plain
    assert 'tinyllm_worker_coast_sleeps_total{worker="0"} 40.0' in plain
    assert 'tinyllm_worker_coast_misses_total{worker="0"} 3.0' in plain
    assert 'tinyllm_worker_coast_sleeps_total{worker="1"} 0.0' in plain
    assert 'tinyllm_worker_busy_ticks_total{worker="0"} 12.0' in plain
    assert 'tinyllm_worker_busy_ticks_total{worker="1"} 0.0' in plain
    assert 'tinyllm_worker_requests_routed_total{worker="0"} 7.0' in plain
    assert 'tinyllm_worker_requests_routed_total{worker="1"} 0.0' in plain
    assert "vllm:" not in plain
    compat = await _scrape(metrics_compat="vllm", model_name="tiny")
    assert 'vllm:num_requests_running{model_name="tiny"} 3.0' in compat
    assert 'vllm:num_requests_waiting{model_name="tiny"} 5.0' in compat
    assert 'vllm:kv_cache_usage_perc{model_name="tiny"} 0.25' in compat
    assert "tinyllm_num_requests_waiting 5.0" in compat  # our own names stay

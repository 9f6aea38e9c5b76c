"""Prefix-aware routing in the pool (both sides of its rule), a group's routing, and the
prefix-cache switch on the flag, the environment and `open_engine`."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import trio

from tinyllm_trio import SamplingParams, open_engine
from tinyllm_trio.config import ServerConfig, add_server_arguments
from tinyllm_trio.ipc.messages import Batch, Submit
from tinyllm_trio.ipc.pool import AFFINITY_SLACK, PendingRequest, WorkerPool
from tinyllm_trio.model.prefix_cache import BLOCK_TOKENS, block_hashes
from tinyllm_trio.stream import RequestStream

HOT = list(range(10, 10 + 3 * BLOCK_TOKENS))  # three whole blocks: a long shared prefix
COLD = list(range(200, 200 + 3 * BLOCK_TOKENS))
PARAMS = SamplingParams(max_tokens=4)


def _pool(workers: int = 2, max_batch: int = 8, **kw) -> tuple[WorkerPool, list]:
    """A pool whose slots look ready, with outboxes we read instead of worker processes."""
    pool = WorkerPool(None, workers=workers, max_batch=max_batch, pin_workers=False, **kw)
    inboxes = []
    for slot in pool.slots:
        send, receive = trio.open_memory_channel[object](100)
        slot.ready, slot.outbox = True, send
        inboxes.append(receive)
    return pool, inboxes


def _busy(pool: WorkerPool, index: int, requests: int) -> None:
    """Give worker `index` that many running requests (stand-ins)."""
    slot = pool.slots[index]
    for _ in range(requests):
        rid = -1 - len(slot.inflight) - 100 * index
        slot.inflight[rid] = PendingRequest(rid, [], PARAMS, RequestStream(), worker=slot)


async def test_a_hot_prefix_goes_to_the_worker_that_holds_it_though_it_is_busier() -> None:
    pool, _ = _pool()
    first = pool.admit([*HOT, 1], PARAMS)  # both idle: worker 0 (lowest index) gets it
    assert first.worker is pool.slots[0]
    _busy(pool, 0, AFFINITY_SLACK - 1)  # now worker 0 is busier, within the slack
    again = pool.admit([*HOT, 2], PARAMS)
    assert again.worker is pool.slots[0]
    other = pool.admit([*COLD, 3], PARAMS)  # nothing shared: the least-loaded worker
    assert other.worker is pool.slots[1]
    bypass = pool.admit([*HOT, 4], SamplingParams(max_tokens=4, cache_prompt=False))
    assert bypass.worker is pool.slots[1]  # a bypassing request is routed by load alone


async def test_a_much_busier_worker_loses_its_hot_prefix_to_the_least_loaded() -> None:
    pool, _ = _pool()
    pool.admit([*HOT, 1], PARAMS)
    _busy(pool, 0, AFFINITY_SLACK + 1)  # 1 + slack + 1 running against 0
    spilled = pool.admit([*HOT, 2], PARAMS)
    assert spilled.worker is pool.slots[1]  # one hot prefix cannot pile everything on one
    # ... and worker 1 now holds the prefix too: the next one may go to either, by load
    assert pool.admit([*HOT, 3], PARAMS).worker is pool.slots[1]


async def test_a_busier_worker_keeps_a_short_prefix_only_for_a_short_generation() -> None:
    block = list(range(400, 400 + BLOCK_TOKENS))  # one cached block: 16 prompt tokens saved
    pool, _ = _pool()
    long_run = SamplingParams(max_tokens=64)
    assert pool.admit([*block, 1], long_run).worker is pool.slots[0]
    # worker 0 holds the block and runs one request more: 16 tokens of prefill saved do not
    # pay for a 64-token generation on the busier worker
    assert pool.admit([*block, 2], long_run).worker is pool.slots[1]
    pool, _ = _pool()
    short_run = SamplingParams(max_tokens=BLOCK_TOKENS)
    assert pool.admit([*block, 1], short_run).worker is pool.slots[0]
    assert pool.admit([*block, 2], short_run).worker is pool.slots[0]  # 16 saved >= 16 decoded
    assert pool.admit([*block, 3], short_run).worker is pool.slots[1]  # but not 2 x 16


async def test_a_burst_of_short_cached_prompts_splits_evenly() -> None:
    """The steady state of a closed-loop benchmark: every prompt ran before, and worker 0's
    table holds them all. Piling four extra 64-token generations on it for a block of prefill
    each made it the last to finish, every wave."""
    pool, _ = _pool(max_batch=32)
    prompts = [[*range(500 + 20 * i, 500 + 20 * i + BLOCK_TOKENS), 1] for i in range(32)]
    for prompt in prompts:
        for h in block_hashes(prompt):
            pool.slots[0].prefix_blocks[h] = None
    params = SamplingParams(max_tokens=64)
    placed = [pool.admit(prompt, params).worker.index for prompt in prompts]
    assert placed.count(0) == placed.count(1) == 16
    # what an operator sees of the split (engine.stats() and /metrics)
    assert [w["routed"] for w in pool.stats()["workers"]] == [16, 16]
    pool.admit_group(prompts[0], [params] * 3)  # a request's three choices count three
    assert sum(w["routed"] for w in pool.stats()["workers"]) == 35


async def test_routing_by_prefix_is_off_with_the_cache() -> None:
    pool, _ = _pool(prefix_cache=False)
    pool.admit([*HOT, 1], PARAMS)
    _busy(pool, 0, 1)
    assert pool.admit([*HOT, 2], PARAMS).worker is pool.slots[1]


async def test_a_group_goes_in_one_message_to_a_worker_with_room_for_all() -> None:
    pool, inboxes = _pool()
    _busy(pool, 0, 2)
    _busy(pool, 1, 6)  # room for 6 and for 2: n=4 fits only worker 0
    group = pool.admit_group(HOT, [PARAMS] * 4)
    assert {r.worker.index for r in group} == {0}
    message = inboxes[0].receive_nowait()
    assert isinstance(message, Batch)
    assert [m.request_id for m in message.messages] == [r.id for r in group]
    assert all(isinstance(m, Submit) and m.prompt == HOT for m in message.messages)
    # no room for 4 anywhere now: the group waits whole in the queue, then goes together
    late = pool.admit_group(COLD, [PARAMS] * 4)
    assert pool.waiting == 4 and all(r.worker is None for r in late)
    for rid in [rid for rid in pool.slots[1].inflight if rid < 0][:2]:
        pool.slots[1].inflight.pop(rid)
    pool._pump()
    assert pool.waiting == 0 and {r.worker.index for r in late} == {1}


def _config(argv: list[str], env: dict[str, str]) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    return ServerConfig.from_args(parser.parse_args(argv), env)


def test_the_flag_and_the_environment_switch_the_cache() -> None:
    assert _config([], {}).prefix_cache is True
    assert _config(["--no-prefix-cache"], {}).prefix_cache is False
    assert _config([], {"TINYLLM_PREFIX_CACHE": "false"}).prefix_cache is False
    assert _config(["--prefix-cache"], {"TINYLLM_PREFIX_CACHE": "false"}).prefix_cache is True


@pytest.mark.slow
async def test_open_engine_without_the_cache_reuses_nothing(tiny_checkpoint: Path) -> None:
    prompt = "once upon a time there was a little girl named lily and she liked to play"
    async with open_engine(
        tiny_checkpoint, workers=1, max_batch=2, pin_workers=False, prefix_cache=False
    ) as engine:
        assert engine.prefix_cache is False
        params = SamplingParams(max_tokens=4, temperature=0)
        runs = [await engine.complete(prompt, params) for _ in range(2)]
        stats = engine.stats()["prefix_cache"]
    assert [r.cached_tokens for r in runs] == [0, 0]
    assert runs[0].token_ids == runs[1].token_ids
    assert stats == {"enabled": False, "queries": 0, "hits": 0}

"""The in-process backend: an `Engine` over one event source stepped in this process.

Its admission, overload, cancel and drain rules are the pool's (tests/ipc/ checks those on
worker processes); here with a `ScriptedBatcher` (fast, exact timing) and once with a real
`ContinuousBatcher` through `open_inprocess_engine`, against the worker pool's output.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from http_fixtures import FakeEngine
from scripted import ScriptedBatcher
from tinyllm_trio import SamplingParams, open_engine, open_inprocess_engine
from tinyllm_trio.backend import Backend, InProcessBackend
from tinyllm_trio.engine import Engine
from tinyllm_trio.errors import OverloadedError, ShuttingDownError
from tinyllm_trio.ipc.pool import WorkerPool
from tinyllm_trio.model.tokenizer import build_vocab
from tinyllm_trio.model.transformer import ModelConfig
from tinyllm_trio.protocol import DoneEvent, ErrorEvent, TokenEvent

STORY = "lily and tom were friends . they worried about the cat"


def _engine(script: ScriptedBatcher, **kw: int) -> tuple[Engine, InProcessBackend]:
    tokenizer = build_vocab([STORY], n_words=20, n_chars=20)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, n_embd=16, n_head=2, n_layer=1, max_context=64
    )
    backend = InProcessBackend(script, **kw)
    return Engine(backend, tokenizer, config), backend


def test_both_backends_satisfy_the_interface() -> None:
    # typing.Protocol: checked by a type checker; this keeps the names honest at run time
    members = [m for m in dir(Backend) if not m.startswith("_")]
    for cls in (WorkerPool, InProcessBackend):
        missing = [m for m in members if not hasattr(cls, m) and m not in vars(cls(*_args(cls)))]
        assert missing == [], cls.__name__


def _args(cls: type) -> tuple:
    return (None,) if cls is WorkerPool else (ScriptedBatcher(),)


async def test_a_generation_streams_and_the_sink_takes_tokens_in_order() -> None:
    engine, backend = _engine(ScriptedBatcher(words=(" a", " b")))
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        completion = await engine.complete("lily", max_tokens=4)
        assert completion.text == " a b a b" and completion.finish_reason == "length"
        taken: list[TokenEvent] = []
        async with engine.generate("lily", max_tokens=5) as events:
            first = await events.__anext__()
            assert events.set_token_sink(taken.append)
            rest = [event async for event in events]
        assert isinstance(first, TokenEvent) and isinstance(rest[-1], DoneEvent)
        tokens = [first, *taken, *(e for e in rest if isinstance(e, TokenEvent))]
        assert [e.text for e in tokens] == [" a", " b", " a", " b", " a"]
        assert rest[-1].completion_tokens == 5
        assert backend.stats()["outcomes"] == {"length": 2}
        nursery.cancel_scope.cancel()


async def test_a_cancelled_generation_counts_the_tokens_its_sink_took() -> None:
    engine, backend = _engine(ScriptedBatcher(delay=0.002))
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        taken: list[TokenEvent] = []
        events = engine.generate("lily", max_tokens=1000)
        seen = [await events.__anext__()]  # the first token, iterated
        assert events.set_token_sink(taken.append)
        with trio.fail_after(10):
            while len(taken) < 3:
                await trio.sleep(0.001)

        async def cancel() -> None:  # from another task, while this one waits for an event
            events.cancel()

        nursery.start_soon(cancel)
        seen += [event async for event in events]
        assert isinstance(seen[-1], DoneEvent) and seen[-1].finish_reason == "cancelled"
        assert seen[-1].completion_tokens == 1 + len(taken)
        nursery.cancel_scope.cancel()


async def test_overload_cancel_of_a_queued_request_and_the_queue_draining() -> None:
    script = ScriptedBatcher(delay=0.01)
    engine, backend = _engine(script, max_batch=1, max_queue=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        running = engine.generate("lily", max_tokens=3)
        queued = engine.generate("lily", max_tokens=3)
        assert isinstance(await running.__anext__(), TokenEvent)  # admitted: runs
        nursery.start_soon(queued.__anext__)  # admitted: waits in the queue
        await trio.testing.wait_all_tasks_blocked()
        assert (backend.running, backend.waiting) == (1, 1)
        with pytest.raises(OverloadedError):
            engine.generate("lily", max_tokens=3)
        await queued.aclose()  # withdrawn from the queue at once
        assert backend.waiting == 0 and script.running == 1
        assert isinstance([e async for e in running][-1], DoneEvent)
        nursery.cancel_scope.cancel()
    assert script.cancelled == 0 and backend.stats()["outcomes"]["cancelled"] == 1


async def test_a_cancelled_running_request_reaches_the_source_and_frees_its_slot() -> None:
    script = ScriptedBatcher(delay=0.01)
    engine, backend = _engine(script, max_batch=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        async with engine.generate("lily", max_tokens=1000) as events:
            await events.__anext__()
        with trio.fail_after(2):
            while backend.running:
                await trio.sleep(0.005)
        assert script.cancelled == 1 and script.running == 0
        assert (await engine.complete("lily", max_tokens=2)).finish_reason == "length"
        nursery.cancel_scope.cancel()


async def test_drain_ends_long_requests_and_refuses_new_ones() -> None:
    engine, backend = _engine(ScriptedBatcher(delay=0.01))
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        short = engine.generate("lily", max_tokens=2)
        long = engine.generate("lily", max_tokens=10_000)
        await short.__anext__()
        await long.__anext__()
        await engine.drain(0.2)
        assert isinstance([e async for e in short][-1], DoneEvent)
        last = [e async for e in long][-1]
        assert isinstance(last, ErrorEvent) and last.kind == "shutting_down"
        with pytest.raises(ShuttingDownError):
            engine.generate("lily")
        await backend.aclose()


async def test_choices_run_together_and_each_ends() -> None:
    engine, backend = _engine(ScriptedBatcher(words=(" x",)), max_batch=4)
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        completions = await engine.complete_choices("lily", n=3, max_tokens=2, seed=1)
        assert [c.text for c in completions] == [" x x"] * 3
        nursery.cancel_scope.cancel()


async def test_a_fake_engine_is_an_engine_on_the_production_path() -> None:
    engine = FakeEngine(words=(" w",))
    assert isinstance(engine, Engine)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        assert (await engine.complete("lily", max_tokens=3)).text == " w w w"
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_open_inprocess_engine_matches_the_worker_pool(tiny_checkpoint: Path) -> None:
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = ["lily and tom", "the cat", "they worried"]
    async with open_inprocess_engine(tiny_checkpoint, max_batch=2) as engine:
        assert engine.workers == 1 and engine.ready
        here = []
        async with trio.open_nursery() as nursery:  # 3 at once on 2 slots: one queues

            async def run(i: int) -> None:
                here.append((i, (await engine.complete(prompts[i], params)).text))

            for i in range(3):
                nursery.start_soon(run, i)
    async with open_engine(tiny_checkpoint, workers=1, pin_workers=False) as engine:
        there = [(i, (await engine.complete(p, params)).text) for i, p in enumerate(prompts)]
    assert sorted(here) == there

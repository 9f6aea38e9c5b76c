"""The Engine API over real worker processes: correctness under concurrency, validation before
any event, cancellation, overload, crashes, drain and bounded shutdown."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

from tinyllm_trio import (
    Completion,
    ContextLengthError,
    InvalidParameterError,
    OverloadedError,
    SamplingParams,
    ShuttingDownError,
    WorkerDiedError,
    open_engine,
)
from tinyllm_trio.model.batching import ContinuousBatcher, DoneEvent, ErrorEvent, TokenEvent
from tinyllm_trio.model.checkpoint import load_model

PROMPTS = [
    "once upon a time",
    "the cat",
    "lily and tom were friends",
    "a bird sang",
    "the dog liked to run",
    "they saw a big tree",
    "look said the cat",
    "the children laughed",
]
LONG = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)  # ~0.3 s on long_checkpoint


def _solo(
    checkpoint: Path, prompt: str, params: SamplingParams, weights: str = "float32"
) -> tuple[list[int], str]:
    """(token ids, text) of one request run alone in an in-process batcher."""
    loaded = load_model(checkpoint, weights_format=weights)
    batcher = ContinuousBatcher(loaded.transformer, loaded.tokenizer, max_batch=1)
    batcher.submit(1, prompt, params)
    ids, text = [], []
    while not batcher.idle:
        for event in batcher.step():
            if isinstance(event, TokenEvent):
                ids.extend(event.token_ids)
                text.append(event.text)
    return ids, "".join(text)


async def _wait_until(predicate, timeout: float = 2.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def test_many_concurrent_greedy_generations_match_solo_runs(tiny_checkpoint: Path) -> None:
    """40 generations through 2 workers at once: each one's tokens and text are exactly what
    the same prompt produces alone; nothing is mixed between requests."""
    cases = [
        (PROMPTS[i % len(PROMPTS)], SamplingParams(max_tokens=5 + i % 17, temperature=0))
        for i in range(40)
    ]
    expected = {(p, s.max_tokens): _solo(tiny_checkpoint, p, s) for p, s in set(cases)}
    results: dict[int, tuple[list[int], str, DoneEvent]] = {}
    async with open_engine(tiny_checkpoint, workers=2, max_batch=32) as engine:

        async def run(i: int, prompt: str, params: SamplingParams) -> None:
            ids, text = [], []
            async for event in engine.generate(prompt, params):
                if isinstance(event, TokenEvent):
                    ids.extend(event.token_ids)
                    text.append(event.text)
                else:
                    results[i] = (ids, "".join(text), event)

        async with trio.open_nursery() as nursery:
            for i, (prompt, params) in enumerate(cases):
                nursery.start_soon(run, i, prompt, params)
        stats = engine.stats()
    assert len(results) == 40
    for i, (prompt, params) in enumerate(cases):
        ids, text, done = results[i]
        assert isinstance(done, DoneEvent), done
        assert (ids, text) == expected[(prompt, params.max_tokens)], (i, prompt)
        assert done.completion_tokens == len(ids)
    assert stats["outcomes"]["length"] + stats["outcomes"].get("stop", 0) == 40
    assert all(w["generation"] == 1 for w in stats["workers"])


async def test_complete_returns_text_usage_and_logprobs(tiny_checkpoint: Path) -> None:
    async with open_engine(tiny_checkpoint, workers=1) as engine:
        completion = await engine.complete("once upon a time", max_tokens=7, temperature=0)
        assert isinstance(completion, Completion)
        ids, text = _solo(tiny_checkpoint, "once upon a time", SamplingParams(7, temperature=0))
        assert (completion.token_ids, completion.text) == (ids, text)
        assert completion.prompt_tokens == len(engine.tokenizer.encode("once upon a time"))
        assert completion.completion_tokens == len(ids)
        assert completion.logprobs is None
        assert set(completion.timings) >= {"queue_ms", "prefill_ms", "decode_ms"}

        with_lp = await engine.complete([2, 7, 8], max_tokens=4, temperature=0, logprobs=3)
        assert len(with_lp.logprobs) == with_lp.completion_tokens
        assert all(len(lp["top_logprobs"]) == 3 for lp in with_lp.logprobs)


async def test_workers_load_bfloat16_weights_when_asked(tiny_checkpoint: Path) -> None:
    """`weights="bfloat16"` reaches every worker process (each says what it loaded), and
    their output is the bfloat16 model's; float32 stays the default."""
    params = SamplingParams(max_tokens=12, temperature=0)
    async with open_engine(tiny_checkpoint, workers=1) as engine:
        assert [w["weights"] for w in engine.stats()["workers"]] == ["float32"]
    async with open_engine(tiny_checkpoint, workers=2, weights="bfloat16") as engine:
        assert [w["weights"] for w in engine.stats()["workers"]] == ["bfloat16"] * 2
        for prompt in PROMPTS[:3]:
            completion = await engine.complete(prompt, params)
            expected = _solo(tiny_checkpoint, prompt, params, weights="bfloat16")
            assert (completion.token_ids, completion.text) == expected
    with pytest.raises(ValueError, match="weights must be one of"):
        async with open_engine(tiny_checkpoint, workers=1, weights="int8"):
            pass


async def test_invalid_requests_raise_before_any_event(tiny_checkpoint: Path) -> None:
    async with open_engine(tiny_checkpoint, workers=1) as engine:
        context = engine.model_config.max_context
        with pytest.raises(InvalidParameterError) as exc:
            engine.generate("hi", temperature=-1)
        assert exc.value.param == "temperature"
        with pytest.raises(InvalidParameterError, match="max_tokens"):
            engine.generate("hi", SamplingParams(), max_tokens=0)
        with pytest.raises(ContextLengthError, match=f"context is {context} tokens"):
            engine.generate([2] * context)
        engine.generate([2] * (context - 1))  # exactly one token of room: fine
        with pytest.raises(InvalidParameterError, match="not an integer"):
            engine.generate([2, engine.model_config.vocab_size])
        with pytest.raises(InvalidParameterError, match="empty"):
            engine.generate([])
        with pytest.raises(ContextLengthError):
            await engine.complete("the cat " * context)
        assert engine.stats()["outcomes"] == {}  # nothing reached a worker


async def test_the_engine_coasts_on_a_steady_worker_and_can_be_told_not_to(
    long_checkpoint: Path, monkeypatch
) -> None:
    """A one-stream generation's steps come at a steady pace: the engine reads them on its
    timer (`tinyllm_trio.ipc.coast`), and every token still arrives, the same ones as when
    it is woken by the worker for each (`coast=False`, serve --no-coast)."""
    from tinyllm_trio.ipc.coast import Coast

    sleeps: list[int] = []
    original = Coast.sleep

    async def counted(self: Coast) -> None:
        sleeps.append(1)
        await original(self)

    monkeypatch.setattr(Coast, "sleep", counted)
    params = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)
    outputs = {}
    for coast in (True, False):
        sleeps.clear()
        async with open_engine(long_checkpoint, workers=1, coast=coast) as engine:
            result = await engine.complete("the cat", params)
            counted = engine.stats()["workers"][0]["coast"]  # what operators see
        assert counted["sleeps"] == len(sleeps) and 0 <= counted["misses"] <= len(sleeps)
        assert len(result.token_ids) == 120
        outputs[coast] = result.token_ids
        assert (len(sleeps) > 0) is coast
    assert outputs[True] == outputs[False]


async def test_with_no_core_to_spare_the_engine_reads_on_its_busy_tick(
    long_checkpoint: Path,
) -> None:
    """Every core runs a busy worker (here: one worker, and this process allowed one core):
    the engine reads the worker on its busy tick instead of after every step. A 1 s tick
    holds plain tokens, yet a generation started just after a tick ends long before the next
    one (the worker rings for its end, and for plain tokens once its ring is half full; which
    steps it rings for is `test_worker.py`'s), its tokens are those of the tick turned off,
    and the worker's stats count the ticks."""
    allowed = os.sched_getaffinity(0)
    params = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)
    outputs = {}
    os.sched_setaffinity(0, {min(allowed)})  # the pool counts the cores it may use
    try:
        for tick in (1.0, 0.0):
            async with open_engine(long_checkpoint, workers=1, busy_tick=tick) as engine:
                ids: list[int] = []
                if tick:
                    await trio.sleep_until(int(trio.current_time() / tick + 1) * tick + 0.01)
                start = trio.current_time()
                async with engine.generate("the cat", params) as events:
                    async for event in events:
                        if type(event) is TokenEvent:
                            ids.extend(event.token_ids)
                took = trio.current_time() - start
                ticks = engine.stats()["workers"][0]["coast"]["ticks"]
            outputs[tick] = ids
            assert (ticks > 0) is (tick > 0)
            if tick:
                assert took < 0.9  # the end was not held for the next tick
    finally:
        os.sched_setaffinity(0, allowed)
    assert outputs[1.0] == outputs[0.0] and len(outputs[0.0]) == 120


async def test_cancel_mid_generation_frees_the_slot(long_checkpoint: Path) -> None:
    """Each way of leaving a stream early (async with, cancel scope, break) cancels the request
    in its worker: the worker reports the request "cancelled" (had the cancel arrived after the
    500 tokens, it would say "length") and the slot is free again (running == 0)."""
    async with open_engine(long_checkpoint, workers=1) as engine:
        async with engine.generate("once upon a time", LONG) as events:
            seen = 0
            async for event in events:
                assert isinstance(event, TokenEvent)
                seen += 1
                if seen == 3:
                    break
        await _wait_until(lambda: engine.stats()["running"] == 0)
        assert engine.stats()["outcomes"] == {"cancelled": 1}

        got = 0
        with trio.move_on_after(0.05):
            async for _ in engine.generate("the cat", LONG):
                got += 1
        assert got > 0
        await _wait_until(lambda: engine.stats()["running"] == 0)
        assert engine.stats()["outcomes"] == {"cancelled": 2}

        async for _ in engine.generate("the dog", LONG):
            break  # no aclose: Trio finalizes the abandoned generator
        await _wait_until(lambda: engine.stats()["outcomes"].get("cancelled") == 3)
        assert engine.stats()["running"] == 0


async def _through_sink_and_iteration(generation, sink_fails_at: int | None = None) -> list:
    """Run `generation` with a token sink set after its first event; every event in the order
    this task saw it, as ("sink" | "iter", event). The sink raises on call `sink_fails_at`."""
    log: list = []
    calls = 0

    def sink(event: TokenEvent) -> None:
        nonlocal calls
        calls += 1
        if calls == sink_fails_at:
            raise RuntimeError("a bug in the sink")
        log.append(("sink", event))

    async for event in generation:
        log.append(("iter", event))
        if len(log) == 1:
            assert generation.set_token_sink(sink)
    return log


async def test_a_token_sink_takes_the_tokens_in_order_and_iteration_ends_the_stream(
    long_checkpoint: Path,
) -> None:
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    async with open_engine(long_checkpoint, workers=1) as engine:
        want = await engine.complete("once upon a time", params)
        for fails_at in (None, 3):  # a sink that raises hands that token and the rest back
            generation = engine.generate("once upon a time", params)
            assert not generation.set_token_sink(print)  # not started: nothing to attach to
            async with generation:
                log = await _through_sink_and_iteration(generation, fails_at)
            tokens = [event for _, event in log if type(event) is TokenEvent]
            assert "".join(e.text for e in tokens) == want.text
            assert {source for source, _ in log} == {"sink", "iter"}
            assert log[-1][0] == "iter" and type(log[-1][1]) is DoneEvent
            assert log[-1][1].completion_tokens == len(tokens) == 60
            if fails_at is not None:
                assert [source for source, _ in log].count("sink") == fails_at - 1
            assert not generation.set_token_sink(print)  # ended: nothing to attach to


async def test_a_token_sink_stops_when_the_generation_is_closed(long_checkpoint: Path) -> None:
    async with open_engine(long_checkpoint, workers=1) as engine:
        taken: list[TokenEvent] = []
        generation = engine.generate("once upon a time", LONG)

        async def consume() -> None:
            async for _ in generation:
                generation.set_token_sink(taken.append)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            with trio.fail_after(10):
                while len(taken) < 5:
                    await trio.sleep(0.001)
            await generation.aclose()  # from another task than the one iterating
        seen = len(taken)
        await trio.sleep(0.2)  # the worker drops it within a step; nothing more reaches the sink
        assert len(taken) == seen < LONG.max_tokens
        with trio.fail_after(2):
            while engine.stats()["running"]:
                await trio.sleep(0.005)


async def test_overload_is_refused_at_once_and_queued_requests_run_later(
    long_checkpoint: Path,
) -> None:
    """1 batch slot + 1 queue place: a third request is refused at once (before any event);
    closing the running stream from another task frees the slot and the queued one runs."""
    async with open_engine(long_checkpoint, workers=1, max_batch=1, max_queue=1) as engine:
        finals: dict[str, object] = {}

        async def consume(name: str, gen) -> None:
            async for event in gen:
                if not isinstance(event, TokenEvent):
                    finals[name] = event

        async with trio.open_nursery() as nursery:
            running = engine.generate("the dog", LONG)
            nursery.start_soon(consume, "long", running)
            await _wait_until(lambda: engine.stats()["running"] == 1)
            nursery.start_soon(consume, "queued", engine.generate("once", max_tokens=3))
            await _wait_until(lambda: engine.stats()["waiting"] == 1)
            with pytest.raises(OverloadedError, match="queue is full") as exc:
                engine.generate("one too many")
            assert exc.value.retry_after >= 1
            with pytest.raises(OverloadedError):
                await engine.complete("one too many")
            await running.aclose()  # while the "long" task is blocked in __anext__
        assert finals["long"] == DoneEvent(
            running.request_id, "cancelled", running.prompt_tokens, finals["long"].completion_tokens
        )
        assert isinstance(finals["queued"], DoneEvent)
        assert finals["queued"].completion_tokens == 3
        await _wait_until(lambda: engine.stats()["running"] == 0)
        assert engine.stats()["outcomes"] == {"cancelled": 1, "length": 1}


async def test_complete_raises_worker_died_and_the_engine_recovers(long_checkpoint: Path) -> None:
    async with open_engine(long_checkpoint, workers=1) as engine:
        old_pid = engine.stats()["workers"][0]["pid"]

        async def kill_soon() -> None:
            await _wait_until(lambda: engine.stats()["running"] == 1)
            await trio.sleep(0.02)
            os.kill(old_pid, signal.SIGKILL)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill_soon)
            with pytest.raises(WorkerDiedError, match="SIGKILL"), trio.fail_after(2):
                await engine.complete("once upon a time", LONG)
        await _wait_until(
            lambda: engine.ready and engine.stats()["workers"][0]["pid"] != old_pid, 10
        )
        completion = await engine.complete("the cat", max_tokens=3, temperature=0)
        assert completion.completion_tokens == 3
        assert engine.stats()["restarts"] == 1


async def test_drain_finishes_short_requests_and_ends_long_ones(long_checkpoint: Path) -> None:
    async with open_engine(long_checkpoint, workers=1) as engine:
        finals: dict[str, object] = {}
        started = {"short": trio.Event(), "long": trio.Event()}

        async def run(name: str, params: SamplingParams) -> None:
            async for event in engine.generate("once upon a time", params):
                if not isinstance(event, TokenEvent):
                    finals[name] = event
                else:
                    started[name].set()

        async with trio.open_nursery() as nursery:
            # a grace between the short one's 11 steps left and the long one's ~500 (the rest
            # of the context, ~0.35 s idle): it holds for steps of 0.3 to 13 ms, and the drain
            # starts once both run in the worker, not while a prompt may be queued. (Not by
            # polling stats()["running"] == 2: the short one's ~15 ms there can fall between
            # two polls on a loaded machine.)
            nursery.start_soon(run, "short", SamplingParams(max_tokens=12, temperature=0))
            nursery.start_soon(run, "long", SamplingParams(max_tokens=5000, ignore_eos=True))
            with trio.fail_after(5):
                await started["short"].wait()
                await started["long"].wait()
            t0 = trio.current_time()
            await engine.drain(grace=0.15)
            assert trio.current_time() - t0 < 0.5
            assert not engine.ready and not engine.accepting
            with pytest.raises(ShuttingDownError):
                engine.generate("too late")
        assert isinstance(finals["short"], DoneEvent)
        assert isinstance(finals["long"], ErrorEvent) and finals["long"].kind == "shutting_down"


async def test_leaving_open_engine_with_requests_in_flight_is_bounded(
    long_checkpoint: Path,
) -> None:
    """Streams that outlive the engine block (they run in an outer nursery) end with a
    shutting_down error; the block exits promptly; workers and IPC objects are gone
    (the conftest fixture checks)."""
    finals: list[object] = []
    async with trio.open_nursery() as outer:
        async with open_engine(long_checkpoint, workers=2) as engine:

            async def consume(i: int) -> None:
                async for event in engine.generate(PROMPTS[i % 8], LONG):
                    if not isinstance(event, TokenEvent):
                        finals.append(event)

            for i in range(10):
                outer.start_soon(consume, i)
            await _wait_until(lambda: engine.stats()["running"] == 10)
            t0 = trio.current_time()
        assert trio.current_time() - t0 < 3.0
    assert len(finals) == 10
    assert all(isinstance(e, ErrorEvent) and e.kind == "shutting_down" for e in finals)


async def test_cancelling_open_engine_from_outside_cleans_up(long_checkpoint: Path) -> None:
    """A cancel scope around the engine fires while 6 requests stream: the block unwinds within
    a bounded time and leaves no worker or IPC object (checked by the conftest fixture)."""
    with trio.CancelScope() as scope:
        async with open_engine(long_checkpoint, workers=2) as engine, trio.open_nursery() as n:
            for i in range(6):
                n.start_soon(engine.complete, PROMPTS[i], LONG)
            await _wait_until(lambda: engine.stats()["running"] == 6)
            t0 = trio.current_time()
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert trio.current_time() - t0 < 3.0


async def test_body_errors_surface_unwrapped_and_engines_do_not_collide(
    tiny_checkpoint: Path,
) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with (
            open_engine(tiny_checkpoint, workers=1) as a,
            open_engine(tiny_checkpoint, workers=1) as b,
        ):
            ra = await a.complete("the cat", max_tokens=4, temperature=0)
            rb = await b.complete("the cat", max_tokens=4, temperature=0)
            assert ra.token_ids == rb.token_ids
            raise Boom


def test_engine_benchmark_refuses_a_busy_tick_out_of_range() -> None:
    import subprocess
    import sys

    for bad in ("-0.001", "1.5"):
        proc = subprocess.run(
            [sys.executable, "-m", "tinyllm_trio", "bench", "engine", "--busy-tick", bad],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 2 and "--busy-tick must be between 0 and 1" in proc.stderr


def test_engine_benchmark_runs_and_reports(tiny_checkpoint: Path) -> None:
    """`tinyllm-trio bench engine` end to end on a tiny model (keeps the benchmark working)."""
    from tinyllm_trio.bench.engine import Load, format_table, run_benchmarks

    results = run_benchmarks(
        str(tiny_checkpoint),
        concurrency=[1, 4],
        workers=[1, 2],
        load=Load(max_tokens=8, prompt_words=3),
        runs=1,
        ipc_messages=2000,
    )
    for c in (1, 4):
        assert results["bare"][c]["tokens_per_s"] > 0
        engine = results["engine"][2][c]
        # the workers' share is part of the whole (which adds this process's IPC and routing)
        assert 0 < engine["worker_cpu_us_per_token"] < engine["cpu_us_per_token"]
        assert results["bare_procs"][2][c]["tokens_per_s"] > 0  # two bare processes at once
    assert results["ipc"]["round_trip_us"] > 0
    assert results["busy_tick"] == 0.016  # serve's default, reported with the numbers
    table = format_table(results)
    assert "1w/bare" in table and "2w/1w" in table and "2p/bare" in table
    assert "coasting, busy tick 16 ms," in table
    assert "worker/bare" in table
    assert "round trip" in table and "one wave" in table
    ratios = results["ratios"]
    assert set(ratios) == {"1w/bare", "2w/1w", "2p/bare", "2w/1w of 2p/bare"}
    assert ratios["2w/1w"][4] > 0 and ratios["2p/bare"][4] > 0
    # one run: the share of the ceiling is that run's 2w/1w over its 2p/bare
    assert ratios["2w/1w of 2p/bare"][4] == pytest.approx(ratios["2w/1w"][4] / ratios["2p/bare"][4])
    assert "2w/1w of 2p" in table
    for w in (1, 2):  # per level, the engine's timer sleeps and misses (zero or more)
        assert {"sleeps", "misses"} <= set(results["coast"][w][1])
    for c in (1, 4):  # every request of every run went to some worker, counted once
        assert sum(results["routed"][2][c]) == results["requests"][c] * results["runs"]
        assert len(results["routed"][2][c]) == 2


def test_engine_benchmark_reports_where_it_coasted_and_how_often_it_missed() -> None:
    from tinyllm_trio.bench.engine import _coast_lines

    coast = {1: {1: {"sleeps": 4000, "misses": 300}, 32: {"sleeps": 0, "misses": 0}}}
    coast[2] = {1: {"sleeps": 0, "misses": 0}}  # two workers, never coasting: no line
    assert _coast_lines({"coast": coast}) == [
        "coasting, 1w, timer sleeps by level (all runs): 1: 4,000 sleeps, 300 misses (7.5%)"
    ]
    assert _coast_lines({}) == []  # a JSON file from before the counters


def test_engine_benchmark_reports_how_the_pool_split_each_level() -> None:
    from tinyllm_trio.bench.engine import _routing_lines

    routed = {1: {32: [640]}, 2: {1: [15, 0], 32: [320, 1320]}}
    assert _routing_lines({"routed": routed}) == [
        "routing, 2w, requests per worker by level (all runs): 1: 15/0; 32: 320/1,320"
    ]
    assert _routing_lines({}) == []  # a JSON file from before the counts


def test_the_share_of_the_ceiling_is_taken_run_by_run() -> None:
    """bench engine's "2w/1w of 2p": each run's 2w/1w over the same run's 2p/bare, then the
    median, so a phase of the machine that moves both ratios of a run cancels out of it."""
    from tinyllm_trio.bench.engine import _share_of_ceiling

    def runs(*rates: float) -> list[tuple[float, float, float]]:
        return [(r, 1.0, 1.0) for r in rates]

    # per run, 2w/1w = 1.4, 1.6, 1.5 and 2p/bare = 1.5, 1.7, 1.7: their quotients' median is
    # 1.4/1.5; the quotient of the two medians (1.5/1.7) would mix runs
    share = _share_of_ceiling(
        runs(14, 16, 15), runs(10, 10, 10), runs(15, 17, 17), runs(10, 10, 10)
    )
    assert share == pytest.approx(1.4 / 1.5)


def test_engine_benchmark_closed_loop_runs_every_request(tiny_checkpoint: Path) -> None:
    """With more requests than clients, each client takes the next one as it finishes (the
    load bench http sends), and every request's tokens are counted (asserted inside)."""
    from tinyllm_trio.bench.engine import Load, interleaved_measurements

    load = Load(max_tokens=5, prompt_words=2, per_level=7)
    assert load.requests(3) == 7 and Load(per_level="auto").requests(32) == 128
    measured = interleaved_measurements(str(tiny_checkpoint), None, [1, 2], [3], load, runs=2)
    assert len(measured["bare"][3]) == 2 and measured["bare"][3][0][0] > 0
    assert [len(measured["engine"][w][3]) for w in (1, 2)] == [2, 2]
    assert len(measured["bare_procs"][2][3]) == 2  # 2 + 1 clients, 4 + 3 requests, all counted


async def test_engine_benchmark_sink_consumer_counts_every_token(
    long_checkpoint: Path, monkeypatch
) -> None:
    """`bench engine --consumer sink`: each client installs a token sink after its first token
    and still counts every token and one TTFT per request. (A request that ended before its
    client got to the first token refuses the sink; its tokens are counted from iteration.)"""
    from tinyllm_trio.bench.workload import run_on_engine
    from tinyllm_trio.engine import Generation

    installed: list[bool] = []
    through_sinks: list[int] = []
    original = Generation.set_token_sink

    def spy(self, sink):
        def counted(event):
            through_sinks.append(len(event.token_ids))
            sink(event)

        installed.append(original(self, counted))
        return installed[-1]

    monkeypatch.setattr(Generation, "set_token_sink", spy)
    ttfts: list[float] = []
    async with open_engine(long_checkpoint, workers=1) as engine:
        tokens = await run_on_engine(engine, 3, 7, 40, 2, ttfts=ttfts, sink=True)
        assert engine.stats()["outcomes"]["length"] == 7
    assert tokens == 7 * 40 and len(ttfts) == 7
    assert len(installed) == 7  # each request's client tried, after its first token
    assert any(installed) and sum(through_sinks) > 0  # and sinks took tokens


def test_bare_processes_split_a_level_and_count_every_token(tiny_checkpoint: Path) -> None:
    """The 2p/bare ceiling: each child runs its share at once; a child whose share is empty
    (one stream over two processes) is left out instead of counted as zero."""
    from tinyllm_trio.bench.engine import BareProcesses, Load

    procs = BareProcesses(2, str(tiny_checkpoint), None, max_batch=4)
    try:
        rate, cpu_us, worker_us = procs.run(1, Load(max_tokens=6, prompt_words=2, per_level=3))
        assert rate > 0 and cpu_us > 0 and worker_us == cpu_us  # bare: all of it is "worker"
        rate, cpu_us, worker_us = procs.run(5, Load(max_tokens=6, prompt_words=2, per_level=9))
        assert rate > 0 and cpu_us > 0 and worker_us == cpu_us
    finally:
        procs.close()
    assert all(child.returncode == 0 for child in procs.children)


def test_engine_benchmark_request_counts_parse() -> None:
    from tinyllm_trio.bench.engine import Load, _requests, build_parser

    assert build_parser().parse_args([]).requests == "auto"  # a closed loop by default
    assert _requests("auto") == "auto" and _requests("wave") is None and _requests("7") == 7
    assert Load(per_level=_requests("wave")).requests(8) == 8
    for bad in ("0", "-3", "many"):
        with pytest.raises(ValueError, match="positive integer"):
            _requests(bad)

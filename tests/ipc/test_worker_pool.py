"""Worker processes and the pool, with real subprocesses: the worker loop over rings made by the
test (back-pressure), routing, admission and overload, crash detection and recovery, leftovers
of a SIGKILLed server."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from tinyllm_trio.engine import OverloadedError, WorkerStartError
from tinyllm_trio.ipc.messages import Batch, Ready, Shutdown, Submit, decode, encode
from tinyllm_trio.ipc.pool import STALL_SLACK, WorkerPool, worker_cpus
from tinyllm_trio.ipc.ring import Ring, new_prefix, shm_entries
from tinyllm_trio.model.batching import ContinuousBatcher, DoneEvent, ErrorEvent, TokenEvent
from tinyllm_trio.model.checkpoint import load_model
from tinyllm_trio.model.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


def _solo(checkpoint: Path, prompt: list[int], params: SamplingParams) -> list[int]:
    """Token ids of one request run alone in an in-process batcher (the reference)."""
    loaded = load_model(checkpoint)
    batcher = ContinuousBatcher(loaded.transformer, loaded.tokenizer, max_batch=1)
    batcher.submit(1, prompt, params)
    ids: list[int] = []
    while not batcher.idle:
        for event in batcher.step():
            if isinstance(event, TokenEvent):
                ids.extend(event.token_ids)
    return ids


# --- the worker process on its own ---------------------------------------------------------------


def test_worker_back_pressure_never_drops_or_reorders(tiny_checkpoint: Path) -> None:
    """A worker whose response ring (4 slots) is not read blocks instead of dropping events;
    read late, every request's tokens are complete, in order, and equal to a solo run."""
    base = new_prefix()
    requests = Ring.create(base + "-req", n_slots=8, slot_size=4096)
    responses = Ring.create(base + "-resp", n_slots=4, slot_size=256)
    tokenizer = load_model(tiny_checkpoint).tokenizer
    prompts = [tokenizer.encode(p) for p in ("once upon a time", "the dog", "a bird")]
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tinyllm_trio.ipc.worker",
            "--requests",
            requests.name,
            "--responses",
            responses.name,
            "--parent-pid",
            str(os.getpid()),
            "--model",
            str(tiny_checkpoint),
        ]
    )
    try:
        ready = responses.get(timeout=20)
        assert isinstance(decode(ready.msg_type, ready.request_id, ready.payload), Ready)
        for i, prompt in enumerate(prompts, start=1):
            requests.put(*encode(Submit(i, prompt, GREEDY)))
        time.sleep(0.3)  # 3 x 41 events into a 4-slot ring: the worker must be blocked by now
        assert worker.poll() is None
        events: dict[int, list] = {1: [], 2: [], 3: []}
        done = 0
        while done < 3:
            frame = responses.get(timeout=10)
            assert frame is not None, "the worker stopped sending"
            msg = decode(frame.msg_type, frame.request_id, frame.payload)
            for event in msg.messages if isinstance(msg, Batch) else [msg]:
                events[event.request_id].append(event)
                done += isinstance(event, DoneEvent)
        for i, prompt in enumerate(prompts, start=1):
            tokens = [t for e in events[i] if isinstance(e, TokenEvent) for t in e.token_ids]
            assert tokens == _solo(tiny_checkpoint, prompt, GREEDY)
            assert isinstance(events[i][-1], DoneEvent)
            assert events[i][-1].completion_tokens == 40
        requests.put(*encode(Shutdown()))
        assert worker.wait(timeout=10) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        requests.destroy()
        responses.destroy()


def test_worker_exits_and_unlinks_when_its_server_dies(tiny_checkpoint: Path) -> None:
    """A worker whose parent was SIGKILLed notices within a wait slice and leaves nothing."""
    script = textwrap.dedent(
        f"""
        import os, subprocess, sys, time
        from tinyllm_trio.ipc.ring import Ring, new_prefix
        base = new_prefix()
        req = Ring.create(base + "-req", n_slots=4, slot_size=4096)
        resp = Ring.create(base + "-resp", n_slots=4, slot_size=1024)
        w = subprocess.Popen([sys.executable, "-m", "tinyllm_trio.ipc.worker",
            "--requests", req.name, "--responses", resp.name,
            "--parent-pid", str(os.getpid()), "--model", {str(tiny_checkpoint)!r}],
            start_new_session=True)
        assert resp.get(timeout=20) is not None  # Ready
        print(w.pid, flush=True)
        time.sleep(60)
        """
    )
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        worker_pid = int(server.stdout.readline())
        assert len(shm_entries(server.pid)) == 6
        server.send_signal(signal.SIGKILL)
        server.wait()
        deadline = time.monotonic() + 3
        while _alive(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(worker_pid), "the orphaned worker kept running"
        assert shm_entries(server.pid) == []
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        server.stdout.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# --- the pool ------------------------------------------------------------------------------------


async def _start(nursery: trio.Nursery, checkpoint: Path, **kw) -> WorkerPool:
    pool = WorkerPool(checkpoint, **kw)
    await nursery.start(pool.run)
    return pool


async def _collect(pool: WorkerPool, prompt: list[int], params: SamplingParams) -> list:
    request = pool.admit(prompt, params)
    try:
        return [event async for event in request.events]
    finally:
        pool.release(request)


async def test_least_loaded_routing_and_stats(tiny_checkpoint: Path) -> None:
    async with trio.open_nursery() as nursery:
        pool = await _start(nursery, tiny_checkpoint, workers=2, max_batch=4)
        try:
            requests = [pool.admit([2, 7, 8], GREEDY) for _ in range(6)]
            stats = pool.stats()
            assert [w["running"] for w in stats["workers"]] == [3, 3]
            assert stats["running"] == 6 and stats["waiting"] == 0
            assert {r.worker.index for r in requests[:2]} == {0, 1}
            for request in requests:
                events = [e async for e in request.events]
                assert isinstance(events[-1], DoneEvent)
                pool.release(request)
            assert pool.stats()["running"] == 0
            assert pool.outcomes["length"] == 6
        finally:
            await pool.aclose()


def test_workers_get_cores_of_their_own_when_one_is_left_for_the_server() -> None:
    assert worker_cpus(1, [0, 1]) == [1]  # the low core is left to the server
    assert worker_cpus(2, [7, 2, 5]) == [5, 7]  # a cpuset / taskset's cores, not 0..n-1
    assert worker_cpus(2, [0, 1]) == [None, None]  # no spare core: the kernel balances
    assert worker_cpus(3, [0, 1]) == [None, None, None]
    allowed = os.sched_getaffinity(0)
    assert worker_cpus(1) == ([max(allowed)] if len(allowed) > 1 else [None])


@pytest.mark.parametrize("pin", [True, False])
async def test_workers_are_pinned_unless_told_not_to(tiny_checkpoint: Path, pin: bool) -> None:
    """A pinned worker runs on its own core (the scheduler cannot move it onto the server's
    core); unpinned, it may run anywhere this process may. The server process is untouched."""
    allowed = os.sched_getaffinity(0)
    pinned = pin and len(allowed) > 1  # one core: nothing to leave to the server
    async with trio.open_nursery() as nursery:
        pool = await _start(nursery, tiny_checkpoint, workers=1, pin_workers=pin)
        try:
            slot = pool.slots[0]
            assert os.sched_getaffinity(slot.pid) == ({max(allowed)} if pinned else allowed)
            assert pool.stats()["workers"][0]["cpu"] == (max(allowed) if pinned else None)
            assert os.sched_getaffinity(0) == allowed
            events = await _collect(pool, [2, 7, 8], GREEDY)
            assert isinstance(events[-1], DoneEvent)
        finally:
            await pool.aclose()


def test_a_core_that_cannot_be_had_costs_only_the_pinning(capsys) -> None:
    from tinyllm_trio.ipc.worker import pin_to

    before = os.sched_getaffinity(0)
    pin_to(1 << 20, "worker 0")  # no such CPU
    assert os.sched_getaffinity(0) == before
    assert "could not pin itself to CPU 1048576" in capsys.readouterr().err


async def test_admission_queue_overload_and_withdrawal(tiny_checkpoint: Path) -> None:
    """One worker, 2 batch slots, 2 queue places: the 5th request is refused at once; a queued
    request that is abandoned leaves the queue; queued ones run in FIFO order."""
    long = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    async with trio.open_nursery() as nursery:
        pool = await _start(nursery, tiny_checkpoint, workers=1, max_batch=2, max_queue=2)
        try:
            running = [pool.admit([2, 7], long) for _ in range(2)]
            queued = [pool.admit([2, 8], GREEDY) for _ in range(2)]
            assert (pool.running, pool.waiting) == (2, 2)
            with pytest.raises(OverloadedError, match="queue is full"):
                pool.admit([2, 9], GREEDY)
            pool.release(queued[0])  # the client went away while queued
            assert pool.waiting == 1
            assert pool.outcomes["cancelled"] == 1
            events = [e async for e in queued[1].events]
            assert isinstance(events[-1], DoneEvent) and events[-1].completion_tokens == 40
            for request in running:
                assert isinstance([e async for e in request.events][-1], DoneEvent)
        finally:
            await pool.aclose()


async def test_sigkill_fails_only_that_workers_requests_and_pool_recovers(
    long_checkpoint: Path,
) -> None:
    """Kill a worker mid-stream: its requests end with worker_died within 2 s, the other
    worker's requests finish normally, a replacement starts and serves new requests."""
    long = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)  # ~0.3 s of decoding
    async with trio.open_nursery() as nursery:
        pool = await _start(nursery, long_checkpoint, workers=2, max_batch=8)
        try:
            victim = pool.slots[0]
            old_pid = victim.pid
            doomed = [pool.admit([2, 7], long) for _ in range(4)]
            on_victim = [r for r in doomed if r.worker is victim]
            assert len(on_victim) == 2
            assert isinstance(await on_victim[0].events.receive(), TokenEvent)
            t0 = trio.current_time()
            os.kill(victim.pid, signal.SIGKILL)
            for request in on_victim:
                with trio.fail_after(2):
                    events = [e async for e in request.events]
                final = events[-1]
                assert isinstance(final, ErrorEvent) and final.kind == "worker_died", final
                assert "SIGKILL" in final.message
                assert sum(isinstance(e, TokenEvent) for e in events) < 400  # cut short
            assert trio.current_time() - t0 < 2
            for request in doomed:
                if request.worker is not victim:
                    events = [e async for e in request.events]
                    assert isinstance(events[-1], DoneEvent)
                    assert events[-1].completion_tokens == 500
            with trio.fail_after(10):
                while not (victim.ready and victim.pid != old_pid):
                    await trio.sleep(0.02)
            stats = pool.stats()
            assert stats["restarts"] == 1 and victim.generation == 2
            # the replacement keeps its slot's core (or, unpinned, the server's cores)
            expected = os.sched_getaffinity(0) if victim.cpu is None else {victim.cpu}
            assert os.sched_getaffinity(victim.pid) == expected
            assert stats["outcomes"] == {"worker_died": 2, "length": 2}
            # the replacement serves requests (it is the least loaded: both are idle, index 0)
            fresh = pool.admit([2, 7], GREEDY)
            assert fresh.worker is victim
            events = [e async for e in fresh.events]
            assert isinstance(events[-1], DoneEvent)
        finally:
            await pool.aclose()


async def test_a_hung_worker_is_killed_after_the_stall_timeout_and_replaced(
    long_checkpoint: Path,
) -> None:
    """A worker that stops (SIGSTOP: alive, silent) while it holds requests would hang them
    forever; after `stall_timeout` it is killed, its requests end with worker_died saying so,
    and a replacement serves. An idle worker is silent by right and is left alone."""
    long = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)
    async with trio.open_nursery() as nursery:
        pool = await _start(nursery, long_checkpoint, workers=1, stall_timeout=1.0)
        try:
            victim = pool.slots[0]
            old_pid = victim.pid
            await trio.sleep(1.5)  # idle for longer than the timeout: not a stall
            assert victim.pid == old_pid and pool.restarts == 0
            request = pool.admit([2, 7], long)
            assert isinstance(await request.events.receive(), TokenEvent)
            os.kill(old_pid, signal.SIGSTOP)
            t0 = trio.current_time()
            with trio.fail_after(5):
                events = [e async for e in request.events]
            final = events[-1]
            assert isinstance(final, ErrorEvent) and final.kind == "worker_died", final
            assert "stopped responding for 1 s" in final.message
            assert 0.9 < trio.current_time() - t0 < 3
            with trio.fail_after(10):
                while not (victim.ready and victim.pid != old_pid):
                    await trio.sleep(0.02)
            assert not _alive(old_pid)
            events = await _collect(pool, [2, 7, 8], GREEDY)
            assert isinstance(events[-1], DoneEvent)
        finally:
            await pool.aclose()


async def test_a_busy_workers_stall_deadline_stays_at_least_the_timeout_ahead(
    tiny_checkpoint: Path, mock_clock: trio.testing.MockClock
) -> None:
    """A busy worker speaks every decode step; the deadline follows it coarsely (a move per
    step would cost a heap push per token) but is never less than `stall_timeout` ahead of
    the last message, so a worker that keeps speaking is never killed early."""
    pool = WorkerPool(tiny_checkpoint, workers=1, stall_timeout=2.0)
    slot = SimpleNamespace(stall_scope=trio.CancelScope(deadline=math.inf), inflight={1: None})
    deadlines = set()
    for _ in range(1000):  # 3 s of 3 ms steps
        mock_clock.jump(0.003)
        pool._heard_from(slot)
        ahead = slot.stall_scope.deadline - trio.current_time()
        assert 2.0 <= ahead <= 2.0 * STALL_SLACK, ahead
        deadlines.add(slot.stall_scope.deadline)
    assert len(deadlines) < 20, len(deadlines)  # moved a few times, not once a step
    slot.inflight.clear()  # idle: silent by right
    pool._heard_from(slot)
    assert slot.stall_scope.deadline == math.inf


def test_stall_timeout_must_be_positive(tiny_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="stall_timeout"):
        WorkerPool(tiny_checkpoint, workers=1, stall_timeout=0)


async def test_a_worker_that_cannot_load_fails_startup_clearly(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")  # exists, so the worker tries: and fails
    pool = WorkerPool(tmp_path, workers=1)
    with pytest.raises(WorkerStartError, match="could not load the model"), trio.fail_after(20):
        await pool.run()  # raises before it would report readiness


async def test_a_worker_that_cannot_be_spawned_fails_startup_clearly(
    tiny_checkpoint: Path, monkeypatch
) -> None:
    monkeypatch.setattr(WorkerPool, "_command", lambda *a: ["/nonexistent/python"])
    pool = WorkerPool(tiny_checkpoint, workers=1)
    with pytest.raises(WorkerStartError, match="could not start a worker process"):
        with trio.fail_after(20):
            await pool.run()


async def test_replacements_back_off_when_workers_keep_dying(
    tiny_checkpoint: Path, monkeypatch
) -> None:
    import tinyllm_trio.ipc.pool as pool_mod

    monkeypatch.setattr(pool_mod, "BACKOFF_FIRST", 0.5)
    async with trio.open_nursery() as nursery:
        pool = await _start(nursery, tiny_checkpoint, workers=1)
        try:
            slot = pool.slots[0]
            delays = []
            for _ in range(3):
                pid, generation = slot.pid, slot.generation
                os.kill(pid, signal.SIGKILL)
                killed = trio.current_time()
                with trio.fail_after(10):
                    while slot.generation == generation:  # the replacement's spawn
                        await trio.sleep(0.005)
                    delays.append(trio.current_time() - killed)
                    while not (slot.ready and slot.pid != pid):  # dies young again below
                        await trio.sleep(0.01)
            # From each kill to the replacement's spawn: the back-off, doubling (its start-up,
            # which a loaded machine stretches, comes after and is not in it), plus the
            # moments it takes to notice the death.
            for delay, backoff in zip(delays, [0.5, 1.0, 2.0], strict=True):
                assert backoff <= delay < backoff + 0.45, delays
            assert pool.restarts == 3
        finally:
            await pool.aclose()


# --- a SIGKILLed server --------------------------------------------------------------------------

SERVER = textwrap.dedent(
    """
    import sys, trio
    from tinyllm_trio import open_engine

    async def main():
        async with open_engine(sys.argv[1], workers=1) as engine:
            print(engine.stats()["workers"][0]["pid"], flush=True)
            await trio.sleep(60)

    trio.run(main)
    """
)


async def test_leftovers_of_a_killed_server_are_removed_by_the_next(tiny_checkpoint: Path) -> None:
    """Server and worker SIGKILLed together (as an OOM kill of both would) leave their rings;
    the next pool to start removes them and uses fresh names of its own."""
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(tiny_checkpoint)], stdout=subprocess.PIPE
    )
    try:
        worker_pid = int(await trio.to_thread.run_sync(server.stdout.readline))
        os.kill(worker_pid, signal.SIGKILL)
        server.send_signal(signal.SIGKILL)
        server.wait()
        leftovers = shm_entries(server.pid)
        assert len(leftovers) == 6  # two rings: a segment and two semaphores each
        async with trio.open_nursery() as nursery:
            pool = await _start(nursery, tiny_checkpoint, workers=1)
            assert shm_entries(server.pid) == []
            assert len(shm_entries(os.getpid())) == 6
            await pool.aclose()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        server.stdout.close()
        await trio.sleep(0.05)
        if _alive(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)


async def test_workers_pin_blas_ignore_sigint_and_inherit_no_sockets(tiny_checkpoint: Path) -> None:
    """The seed's workers were forked with the server's sockets and took the terminal's Ctrl+C.
    Ours: own session, SIGINT ignored, no socket among their fds (even one the server marked
    inheritable), BLAS pinned to one thread (one worker per core; no BLAS thread pool)."""
    import socket

    from tinyllm_trio.model.blas import blas_env

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.set_inheritable(True)
    try:
        async with trio.open_nursery() as nursery:
            pool = await _start(nursery, tiny_checkpoint, workers=1)
            try:
                pid = pool.slots[0].pid
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                for var in (b"OPENBLAS_NUM_THREADS", b"OMP_NUM_THREADS", b"MKL_NUM_THREADS"):
                    assert var + b"=1" in environ
                for var, value in blas_env().items():  # the kernel set too, where one is picked
                    assert f"{var}={value}".encode() in environ
                status = dict(
                    line.split(":\t", 1)
                    for line in Path(f"/proc/{pid}/status").read_text().split("\n")
                    if ":\t" in line
                )
                assert int(status["Threads"]) == 1  # no BLAS threads
                assert int(status["SigIgn"], 16) & (1 << (signal.SIGINT - 1))
                assert os.getsid(pid) != os.getsid(0)  # the terminal's Ctrl+C is not theirs
                fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
                assert not [fd for fd in fds if fd.startswith("socket:")], fds
                os.kill(pid, signal.SIGINT)  # ignored: still serving
                events = await _collect(pool, [2, 7, 8], GREEDY)
                assert isinstance(events[-1], DoneEvent) and pool.slots[0].pid == pid
            finally:
                await pool.aclose()
    finally:
        listener.close()


def test_readers_coast_only_while_a_core_is_left_to_the_server() -> None:
    """Coasting moves the wake-up from the worker to a timer in this process; with every core
    busy with a worker, that timer would take a worker's core, so the pool says no."""
    pool = WorkerPool("/nonexistent", workers=3, pin_workers=False)
    pool._cores = 2
    assert pool._core_to_spare()  # all idle
    pool.slots[0].inflight[1] = SimpleNamespace()
    assert pool._core_to_spare()  # one busy worker, two cores
    pool.slots[2].inflight[2] = SimpleNamespace()
    assert not pool._core_to_spare()  # two busy workers take both cores
    pool.slots[0].inflight.clear()
    assert pool._core_to_spare()

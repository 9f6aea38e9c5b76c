"""Issue 11, the ipc/ side: a request that cannot be sent fails alone, a ring that cannot get
its memory fails its creation (never a SIGBUS later), a worker that cannot be restarted for any
reason is retried with back-off while the others serve."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import posix_ipc
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import tinyllm_trio.ipc.pool as pool_mod
from tinyllm_trio.engine import WorkerDiedError
from tinyllm_trio.ipc.messages import MessageError, Submit, decode, encode
from tinyllm_trio.ipc.pool import WorkerPool
from tinyllm_trio.ipc.ring import Ring
from tinyllm_trio.model.batching import DoneEvent, ErrorEvent, TokenEvent
from tinyllm_trio.model.sampling import SamplingParams

_ANY_CHAR = st.characters(exclude_categories=())  # st.text() alone never makes a surrogate
LONG = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)


@settings(max_examples=300, deadline=None)
@given(st.text(_ANY_CHAR), st.text(_ANY_CHAR, min_size=1))
def test_messages_encode_any_str_and_round_trip(text: str, stop: str) -> None:
    """Lone surrogates included: encoding never raises, and decoding gives the same message
    back, except a stop string with a lone surrogate, which the receiver refuses as a
    MessageError (answered with an error event), never as another exception."""
    params = SamplingParams(max_tokens=3)
    object.__setattr__(params, "stop", (stop,))  # past validation, as a buggy caller could
    for msg in (Submit(7, text, params), TokenEvent(7, [1], text, None, None)):
        frame = encode(msg)
        if isinstance(msg, Submit) and any(0xD800 <= ord(c) <= 0xDFFF for c in stop):
            with pytest.raises(MessageError, match="lone surrogate"):
                decode(*frame)
            continue
        assert decode(*frame) == msg


def _unencodable() -> SamplingParams:
    params = SamplingParams(max_tokens=3)
    object.__setattr__(params, "stop", (b"not a str",))  # json.dumps raises TypeError
    return params


async def test_a_request_that_cannot_be_sent_fails_alone(tiny_checkpoint: Path) -> None:
    async with trio.open_nursery() as nursery:
        pool = WorkerPool(tiny_checkpoint, workers=1)
        await nursery.start(pool.run)
        try:
            other = pool.admit([2, 7], LONG)
            assert isinstance(await other.events.receive(), TokenEvent)
            bad = pool.admit([2, 7], _unencodable())
            with trio.fail_after(10):
                events = [e async for e in bad.events]
            assert isinstance(events[-1], ErrorEvent) and events[-1].kind == "internal"
            assert "could not send this request" in events[-1].message
            surrogate = SamplingParams(max_tokens=3)
            object.__setattr__(surrogate, "stop", ("\ud800",))
            odd = pool.admit([2, 7], surrogate)  # crosses the ring as an escape
            with trio.fail_after(20):
                events = [e async for e in odd.events]
            # the worker refuses it (and lives): it must never decode a message into a crash
            assert isinstance(events[-1], ErrorEvent) and events[-1].kind == "invalid_request"
            assert "lone surrogate" in events[-1].message
            with trio.fail_after(60):
                rest = [e async for e in other.events]
            assert isinstance(rest[-1], DoneEvent) and rest[-1].finish_reason == "length"
            assert pool.restarts == 0
        finally:
            await pool.aclose()


async def test_a_worker_that_cannot_be_restarted_backs_off_while_others_serve(
    tiny_checkpoint: Path, monkeypatch
) -> None:
    """posix_ipc's "too many open files" is not an OSError: it used to end the pool."""
    monkeypatch.setattr(pool_mod, "BACKOFF_FIRST", 0.1)
    real_create = Ring.create
    failures = []

    def flaky_create(name: str, **kw) -> Ring:
        if "-w1g" in name and len(failures) < 3:
            failures.append(name)
            raise posix_ipc.Error("Too many open files")
        return real_create(name, **kw)

    async with trio.open_nursery() as nursery:
        pool = WorkerPool(tiny_checkpoint, workers=2)
        await nursery.start(pool.run)
        try:
            monkeypatch.setattr(Ring, "create", staticmethod(flaky_create))
            victim = pool.slots[1]
            old = victim.pid
            os.kill(old, signal.SIGKILL)
            with trio.fail_after(10):
                while len(failures) < 2:
                    await trio.sleep(0.01)
            request = pool.admit([2, 7], SamplingParams(max_tokens=5, temperature=0))
            assert request.worker is pool.slots[0]  # never routed to the dead slot
            events = [e async for e in request.events]
            assert isinstance(events[-1], DoneEvent)
            with trio.fail_after(20):
                while not (victim.ready and victim.pid != old):
                    await trio.sleep(0.02)
            assert len(failures) == 3 and pool.restarts == 4
        finally:
            await pool.aclose()


SMALL_SHM = textwrap.dedent(
    """
    import sys, trio
    from tinyllm_trio import open_engine
    from tinyllm_trio.ipc.ring import Ring, RingError
    try:
        Ring.create("/tinyllm-1-00-x", n_slots=64, slot_size=4096)
    except RingError as e:
        print("ring:", e, flush=True)
    import os
    print("left:", os.listdir("/dev/shm"), flush=True)

    async def main():
        async with open_engine(sys.argv[1], workers=1) as engine:
            print(await engine.complete([2, 7], max_tokens=50, temperature=0, ignore_eos=True))

    try:
        trio.run(main)
    except Exception as e:
        print("start:", type(e).__name__, e, flush=True)
    """
)


def test_a_full_dev_shm_fails_start_up_clearly_never_sigbus(tiny_checkpoint: Path) -> None:
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=100k tmpfs /dev/shm"],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"no private tmpfs here (unshare -m): {probe.stderr.decode().strip()}")
    script = 'mount -t tmpfs -o size=200k tmpfs /dev/shm && exec "$0" -c "$1" "$2"'
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, sys.executable, SMALL_SHM, str(tiny_checkpoint)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    assert "ring: cannot reserve 262208 bytes" in done.stdout
    assert "left: []" in done.stdout
    assert "start: WorkerStartError" in done.stdout and "cannot reserve" in done.stdout


async def test_with_no_worker_left_requests_fail_clearly_then_recover(
    tiny_checkpoint: Path, monkeypatch
) -> None:
    """The only worker cannot be restarted: queued and new requests fail at once (no hang for
    the back-off); once a retry succeeds, requests are served again."""
    monkeypatch.setattr(pool_mod, "BACKOFF_FIRST", 0.2)
    real_create = Ring.create
    broken = [True]

    def create(name: str, **kw) -> Ring:
        if broken[0]:
            raise posix_ipc.Error("Too many open files")
        return real_create(name, **kw)

    async with trio.open_nursery() as nursery:
        pool = WorkerPool(tiny_checkpoint, workers=1, max_batch=1)
        await nursery.start(pool.run)
        try:
            monkeypatch.setattr(Ring, "create", staticmethod(create))
            slot = pool.slots[0]
            running = pool.admit([2, 7], LONG)
            queued = pool.admit([2, 7], LONG)
            assert pool.waiting == 1
            os.kill(slot.pid, signal.SIGKILL)
            with trio.fail_after(10):
                events = [e async for e in queued.events]
            assert isinstance(events[-1], ErrorEvent) and events[-1].kind == "worker_died"
            assert "no worker is running" in events[-1].message
            assert "Too many open files" in events[-1].message
            assert [e async for e in running.events][-1].kind == "worker_died"
            with pytest.raises(WorkerDiedError, match="no worker is running"):
                pool.admit([2, 7], LONG)
            broken[0] = False
            with trio.fail_after(20):
                while not slot.ready:
                    await trio.sleep(0.02)
            request = pool.admit([2, 7], SamplingParams(max_tokens=5, temperature=0))
            assert isinstance([e async for e in request.events][-1], DoneEvent)
        finally:
            await pool.aclose()


async def test_worker_stderr_and_pool_lines_are_json_with_log_format_json(
    tmp_path: Path,
) -> None:
    """A worker's own stderr line (here: why its model did not load) comes out through
    `logging`, so with --log-format json it is a JSON line like every other."""
    import io
    import json
    import logging

    from tinyllm_trio.config import ServerConfig
    from tinyllm_trio.engine import WorkerStartError
    from tinyllm_trio.http.server import configure_logging

    root = logging.getLogger("tinyllm_trio")
    saved = (root.handlers[:], root.level, root.propagate)
    stream = io.StringIO()
    configure_logging(ServerConfig(log_format="json"), stream)
    try:
        (tmp_path / "config.json").write_text("{}")
        pool = WorkerPool(tmp_path, workers=1)
        with pytest.raises(WorkerStartError), trio.fail_after(20):
            await pool.run()
    finally:
        root.handlers[:], root.level, root.propagate = saved
    lines = stream.getvalue().splitlines()
    records = [json.loads(line) for line in lines]  # every line, or this raises
    ours = [r for r in records if r["logger"] == "tinyllm_trio.ipc.worker"]
    assert any("could not load the model" in r["message"] for r in ours), lines
    assert all(r["worker"] == 0 for r in ours)


async def test_a_lone_surrogate_stop_through_the_engine_fails_only_that_call(
    long_checkpoint: Path,
) -> None:
    """The audit's request: refused by the call itself (param "stop"), before anything is
    queued; a stream already running goes on and the engine keeps serving. (The long model:
    on the tiny one, with a 64-token context, the stream could end before it is counted.)"""
    from tinyllm_trio.engine import InvalidParameterError, open_engine

    async with open_engine(long_checkpoint, workers=1) as engine:
        async with engine.generate([2, 7], LONG) as running:
            first = await running.__anext__()
            assert isinstance(first, TokenEvent)
            for stop in ("\ud800", ["ok", "x\udfff"]):
                with pytest.raises(InvalidParameterError, match="lone surrogate") as info:
                    engine.generate("hi", max_tokens=3, stop=stop)
                assert info.value.param == "stop"
            assert engine.stats()["running"] == 1 and engine.stats()["waiting"] == 0
            rest = [e async for e in running]
            assert isinstance(rest[-1], DoneEvent) and rest[-1].finish_reason == "length"
        done = await engine.complete([2, 7], max_tokens=3, temperature=0, stop="\u00e9")
        assert done.finish_reason in ("length", "stop")
        assert engine.stats()["restarts"] == 0


FD_LIMIT = textwrap.dedent(
    """
    import os, resource, signal, sys, trio
    import tinyllm_trio.ipc.pool as pool_mod
    from tinyllm_trio import open_engine

    pool_mod.BACKOFF_FIRST = 0.05

    async def main():
        async with open_engine(sys.argv[1], workers=2, pin_workers=False) as engine:
            pool = engine._backend
            slot = pool.slots[1]
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
            fillers = []

            def fill():  # every fd there is, including those the dead worker's slot frees
                try:
                    while True:
                        fillers.append(os.open("/dev/null", os.O_RDONLY))
                except OSError:
                    pass

            fill()
            os.kill(slot.pid, signal.SIGKILL)
            with trio.fail_after(20):
                while pool.restarts < 3:
                    fill()
                    await trio.sleep(0.005)
            print("error:", slot.load_error, flush=True)
            done = await engine.complete([2, 7], max_tokens=5, temperature=0)
            print("served:", done.finish_reason, flush=True)
            for fd in fillers:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            with trio.fail_after(30):
                while not slot.ready:
                    await trio.sleep(0.02)
            print("recovered", flush=True)

    trio.run(main)
    """
)


def test_out_of_fds_at_a_restart_backs_off_and_the_pool_serves_on(tiny_checkpoint: Path) -> None:
    """A real RLIMIT_NOFILE: the replacement's rings cannot be created (posix_ipc's EMFILE),
    the server lives, serves on the other worker, and the slot comes back once fds free up."""
    done = subprocess.run(
        [sys.executable, "-c", FD_LIMIT, str(tiny_checkpoint)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "error: could not start a worker process" in done.stdout
    # posix_ipc's wording for EMFILE, or the OS's when the spawn is what runs out
    assert "maximum number of files open" in done.stdout or "Too many open files" in done.stdout
    assert "served: length" in done.stdout and "recovered" in done.stdout


async def _answered_or_closed(port: int, results: list[bytes | None]) -> None:
    """One connection that starts a head and stops: what it gets back within 5 s, or None
    for a connection still waiting (admitted and reading its head, or, the bug, left in the
    listen backlog while accept() fails with EMFILE and retries)."""
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        results.append(b"refused")
        return
    async with stream:
        try:
            await stream.send_all(b"GET /v1/models HTTP/1.1\r\nHost: t\r\n")
            with trio.move_on_after(5):
                data = b""
                while chunk := await stream.receive_some(65536):
                    data += chunk
                results.append(data)
                return
            results.append(None)
        except trio.BrokenResourceError:
            results.append(b"reset")


async def _get(port: int, path: str) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
        return data


async def test_serve_under_a_low_fd_limit_raises_it_keeps_a_reserve_and_never_hangs(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """`serve` under RLIMIT_NOFILE 150:256 (prlimit's reproduction, scaled down): the soft
    limit is raised to 256 and logged, the connection cap is lowered to what the fds allow,
    300 connections that each hold a half-sent head all get an answer or a close (none hangs),
    /health is answered over the cap, and a worker killed at the limit is restarted (the
    reserve is what its rings and pipes need)."""
    import re
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (150, 256))

    log = tmp_path / "server.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "tinyllm_trio", "serve", "--model", str(tiny_checkpoint)),
                *("--port", "0", "--workers", "1", "--pin-workers", "false"),
                *("--header-timeout", "30", "--access-log", "false"),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=limit,
        )
    try:
        with trio.fail_after(60):
            while not (found := re.search(r"listening on http://[^:]+:(\d+)", log.read_text())):
                assert proc.poll() is None, log.read_text()
                await trio.sleep(0.05)
        port = int(found.group(1))
        text = log.read_text()
        assert "raised the soft RLIMIT_NOFILE from 150 to 256" in text
        capacity = int(re.search(r"leaves fds for (\d+) connection", text).group(1))
        assert 1 <= capacity < 256 - 64

        results: list[bytes | None] = []
        async with trio.open_nursery() as nursery:
            for _ in range(300):
                nursery.start_soon(_answered_or_closed, port, results)
                await trio.sleep(0)
        # Only the admitted connections still wait for their heads; every other one was
        # answered (503) or closed.
        assert results.count(None) <= capacity
        assert sum(r.startswith(b"HTTP/1.1 503") for r in results if r) >= 1
        async with trio.open_nursery() as nursery:  # the server at its limit again
            for _ in range(300):
                nursery.start_soon(_answered_or_closed, port, [])
                await trio.sleep(0)
            await trio.sleep(2.5)  # the refusals are over; the admitted ones hold the cap
            health = await _get(port, "/health")
            assert health.startswith(b"HTTP/1.1 200"), health
            children = [  # every thread's children: the pool may spawn from any of them
                child
                for task in Path(f"/proc/{proc.pid}/task").iterdir()
                for child in (task / "children").read_text().split()
            ]
            os.kill(int(children[0]), signal.SIGKILL)  # at the limit, as in the audit
            with trio.fail_after(20):
                while not re.search(rb"worker_restarts_total [1-9]", await _get(port, "/metrics")):
                    await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
        assert proc.poll() is None, log.read_text()  # the server lived through all of it
        with trio.fail_after(20):
            while not (await _get(port, "/health")).startswith(b"HTTP/1.1 200"):
                await trio.sleep(0.1)
        completion = await _get(port, "/v1/models")
        assert completion.startswith(b"HTTP/1.1 200")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


SPARE_FD = textwrap.dedent(
    """
    import os, resource, sys, trio
    import tinyllm_trio.http.server as server_mod
    from tinyllm_trio.config import ServerConfig

    server_mod.connection_budget = lambda cap: cap  # no reserve: run into EMFILE itself

    async def main():
        server = server_mod.HTTPServer(None, ServerConfig(port=0, header_timeout=30.0))
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.run)
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
            print(port, flush=True)
            await trio.to_thread.run_sync(sys.stdin.readline)
            nursery.cancel_scope.cancel()

    trio.run(main)
    """
)


async def test_out_of_fds_at_accept_a_new_connection_is_closed_not_left_hanging() -> None:
    """The last line of defence, with no reserve to keep the server off the limit: accept()
    fails with EMFILE, the spare fd is let go to accept and close the waiting connection."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SPARE_FD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(await trio.to_thread.run_sync(proc.stdout.readline))
        results: list[bytes | None] = []
        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(_answered_or_closed, port, results)
                await trio.sleep(0)
        assert results.count(None) <= 10  # only the few the 8 spare fds admitted still wait
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=20) == 0, proc.stderr.read()
        assert "closed a new connection at once" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

"""deploy/nginx/nginx.conf, run for real: nginx in front of three `tinyllm-trio serve` processes.

The file is used as shipped, with only its four ports swapped for free ones, and nginx runs
from a prefix directory under tmp_path (every path in the file is relative to it). The three
instances are real servers (`--workers 1 --pin-workers false`: three on one machine must not
pin to the same core) on a random model wide enough that a long stream lasts about a second.

- every instance serves part of the load (least_conn);
- a /process stream's first token reaches the client long before its last (nginx does not
  buffer it; /process sends no X-Accel-Buffering header, so only the file's
  `proxy_buffering off` keeps it streaming);
- a rolling SIGTERM restart of all three (SIGTERM, wait for the exit, start again on the same
  port, wait for /health 200, next) under a closed loop of 8 streaming clients: 0 failed
  requests; it prints "rolling restart: N requests, 0 failed" (the README quotes it);
- SIGKILL of one instance: only the streams it held fail, and every later request succeeds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from conftest import save_random_checkpoint
from http_fixtures import raw_decode_all
from tinyllm_trio.bench.client import HTTPClient, sse_events
from tinyllm_trio.ipc.ring import shm_entries

CONF = Path(__file__).parents[2] / "deploy" / "nginx" / "nginx.conf"
FAIL_TIMEOUT = float(re.search(r"fail_timeout=(\d+)s", CONF.read_text())[1])
FRONT_PORT = 8080
UPSTREAM_PORTS = (8081, 8082, 8083)
CLIENTS = 8


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(port: int, path: str, timeout: float = 2.0) -> tuple[int, str] | None:
    """(status, body) of a GET, or None when the connection is refused or breaks."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
            data = bytearray()
            while chunk := sock.recv(65536):
                data += chunk
    except OSError:
        return None
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 "):
        return None
    return int(head.split()[1]), body.decode("utf-8", "replace")


def _metric(text: str, name: str, labels: str = "") -> float:
    """The sum of a metric's samples whose labels contain `labels`, from Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample.split("{")[0] == name and labels in sample:
            total += float(value)
    return total


@dataclass
class Instance:
    """One `tinyllm-trio serve` process on a fixed port, restartable on that port."""

    port: int
    checkpoint: Path
    logdir: Path
    proc: subprocess.Popen | None = None
    pids: list[int] = field(default_factory=list)

    def start(self) -> None:
        log = open(self.logdir / f"server-{self.port}-{len(self.pids)}.log", "wb")  # noqa: SIM115
        with log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tinyllm_trio",
                    "serve",
                    "--model",
                    str(self.checkpoint),
                    "--port",
                    str(self.port),
                    "--workers",
                    "1",
                    "--pin-workers",
                    "false",
                    "--shutdown-grace",
                    "10",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TINYLLM_ACCESS_LOG": "false"},
            )
        self.pids.append(self.proc.pid)

    def healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"server on {self.port} exited: {self.log_text()}")
        answer = _get(self.port, "/health", timeout=1.0)
        return answer is not None and answer[0] == 200

    async def wait_healthy(self, timeout: float = 30.0) -> None:
        with trio.fail_after(timeout):
            while not await trio.to_thread.run_sync(self.healthy):
                await trio.sleep(0.05)

    def log_text(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.logdir.glob(f"server-{self.port}-*")))

    def metrics(self) -> str:
        answer = _get(self.port, "/metrics")
        assert answer is not None and answer[0] == 200, answer
        return answer[1]


@dataclass
class Fleet:
    port: int
    instances: list[Instance]
    nginx: subprocess.Popen
    prefix: Path

    def nginx_log(self) -> str:
        return "\n".join(
            f"--- {name}\n" + (self.prefix / name).read_text()
            for name in ("error.log", "access.log")
            if (self.prefix / name).exists()
        )

    def error_log(self) -> str:
        """nginx's own complaints (no live upstreams, refused, reset, ...), which say why a
        request failed where the access log only has its status."""
        log = self.prefix / "error.log"
        return log.read_text() if log.exists() else ""

    def passed_on(self) -> int:
        """Requests nginx sent on to another server after the first refused the connection
        (or reset it): its access log lists every server tried, "upstream=A, B"."""
        log = self.prefix / "access.log"
        tried = re.findall(r"upstream=(.*?) upstream_status=", log.read_text())
        return sum(", " in servers for servers in tried)

    async def wait_all_healthy(self) -> None:
        for instance in self.instances:
            await instance.wait_healthy()


def nginx_conf(front: int, upstreams: list[int]) -> str:
    """The shipped file with its ports swapped; nothing else changes."""
    text = CONF.read_text()
    mapping = {FRONT_PORT: front, **dict(zip(UPSTREAM_PORTS, upstreams, strict=True))}
    for old, new in mapping.items():
        needle = f"127.0.0.1:{old}"
        assert needle in text, needle
        text = re.sub(rf"127\.0\.0\.1:{old}\b", f"127.0.0.1:{new}", text)
    return text


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(nginx).exists(), "nginx is needed (.ci/run installs it with apt-get)"
    base = tmp_path_factory.mktemp("fleet")
    # wide enough that a 300-token stream lasts about a second; small enough to load in one
    checkpoint = save_random_checkpoint(
        base / "model", seed=5, n_embd=384, n_head=6, n_layer=8, max_context=512
    )
    instances = [Instance(_free_port(), checkpoint, base) for _ in UPSTREAM_PORTS]
    for instance in instances:
        instance.start()
    prefix = base / "nginx"
    prefix.mkdir()
    front = _free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(front, [i.port for i in instances]))
    # As root, nginx's workers would switch to an unprivileged user that cannot enter
    # tmp_path; the file itself names no user, so that it runs as whoever starts it.
    globals_ = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")
    proc = subprocess.Popen(
        [nginx, "-p", str(prefix), "-c", str(conf), "-g", globals_],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    fleet = Fleet(front, instances, proc, prefix)
    stopped: list[Instance] = []  # the ones this fixture stops (a test may have killed one)
    try:
        deadline = time.monotonic() + 30
        while not all(i.healthy() for i in instances) or _get(front, "/ping") is None:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, fleet.nginx_log()
            time.sleep(0.05)
        yield fleet
    finally:
        for instance in instances:
            if instance.proc is not None and instance.proc.poll() is None:
                instance.proc.send_signal(signal.SIGTERM)
                stopped.append(instance)
        proc.send_signal(signal.SIGQUIT)  # nginx's graceful stop
        for p in [proc, *(i.proc for i in instances if i.proc is not None)]:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    for instance in stopped:
        assert instance.proc is not None and instance.proc.returncode == 0, instance.log_text()
    for instance in instances:
        for pid in instance.pids:  # every run, killed ones too, left nothing in /dev/shm
            assert shm_entries(pid) == [], instance.log_text()


# ---- clients --------------------------------------------------------------------------------

STREAM = {
    "prompt": "once upon a time",
    "max_tokens": 40,
    "ignore_eos": True,
    "stream": True,
    "stream_options": {"include_usage": True},
}


@dataclass
class Outcome:
    ok: bool
    detail: str = ""


async def completion_stream(
    port: int, body: dict, client: HTTPClient | None = None, started: list | None = None
) -> Outcome:
    """One streamed /v1/completions through nginx; ok only for 200, every token and [DONE].
    Appends to `started` once the first bytes of the body arrived."""
    own = client is None
    try:
        if client is None:
            client = await HTTPClient.connect("127.0.0.1", port)
        response = await client.request("POST", "/v1/completions", json=body)
        pieces = []
        async for chunk in response.chunks():
            if started is not None and not pieces:
                started.append(chunk)
            pieces.append(chunk)
        data = b"".join(pieces)
    except Exception as exc:  # a broken stream, whatever the layer says
        return Outcome(False, f"{type(exc).__name__}: {exc}")
    finally:
        if own and client is not None:
            await client.aclose()
    if response.status != 200:
        return Outcome(False, f"HTTP {response.status}: {data[:200]!r}")
    events = sse_events(bytearray(), data)
    if len(events) < 3 or events[-1] != "[DONE]":
        return Outcome(False, f"no [DONE]: {data[-200:]!r}")
    chunks = [json.loads(event) for event in events[:-1]]
    if any("error" in chunk for chunk in chunks):
        return Outcome(False, f"ended with {events[-2]}")
    usage, last = chunks[-1]["usage"], chunks[-2]["choices"][0]  # include_usage: usage last
    if last["finish_reason"] != "length" or usage["completion_tokens"] != body["max_tokens"]:
        return Outcome(False, f"cut short: {events[-3:]}")
    return Outcome(True)


async def closed_loop(port: int, outcomes: list[Outcome], stop: trio.Event) -> None:
    """One client: a stream, then the next at once, on a keep-alive connection (a new one
    after a failure or a `Connection: close`), until `stop`."""
    client: HTTPClient | None = None
    try:
        while not stop.is_set():
            if client is None or not client.reusable:
                if client is not None:
                    await client.aclose()
                client = await HTTPClient.connect("127.0.0.1", port)
            outcome = await completion_stream(port, STREAM, client)
            outcomes.append(outcome)
            if not outcome.ok:
                await client.aclose()
                client = None
    finally:
        if client is not None:
            await client.aclose()


# ---- the tests ------------------------------------------------------------------------------


async def test_every_instance_serves_part_of_the_load(fleet: Fleet) -> None:
    def served(instance: Instance) -> float:
        return _metric(instance.metrics(), "tinyllm_http_requests_total", 'status="200"')

    before = [served(i) for i in fleet.instances]
    outcomes: list[Outcome] = []
    async with trio.open_nursery() as nursery:
        for _ in range(12):  # 12 at once: least_conn spreads concurrent streams
            nursery.start_soon(_append, outcomes, completion_stream(fleet.port, STREAM))
    assert all(o.ok for o in outcomes), [o.detail for o in outcomes if not o.ok]
    shares = [served(i) - b for i, b in zip(fleet.instances, before, strict=True)]
    assert sum(shares) >= 12  # /metrics requests count as well; only the 12 streams matter
    assert all(share >= 2 for share in shares), shares


async def _append(outcomes: list[Outcome], pending) -> None:
    outcomes.append(await pending)


async def test_first_token_arrives_long_before_the_last(fleet: Fleet) -> None:
    """/process sends no X-Accel-Buffering: only `proxy_buffering off` keeps it a stream."""
    async with await HTTPClient.connect("127.0.0.1", fleet.port) as client:
        start = trio.current_time()
        response = await client.request(
            "POST", "/process", json={"message": "once", "max_tokens": 300, "ignore_eos": True}
        )
        assert response.status == 200
        arrivals = []
        async for chunk in response.chunks():
            arrivals.append((trio.current_time() - start, chunk))
    assert len(arrivals) > 100  # a chunk per token (a spelled word's letters may share one)
    # nginx forwards what it has read: a chunk can carry two of the server's JSON objects
    assert raw_decode_all(arrivals[-1][1])[-1]["is_last"] is True
    first, last = arrivals[0][0], arrivals[-1][0]
    assert last > 0.3, last  # the generation takes a while ...
    assert first < 0.2 * last, (first, last)  # ... and its first token is not held back
    halfway = sum(1 for t, _ in arrivals if t < last / 2)
    assert 0.2 * len(arrivals) < halfway < 0.8 * len(arrivals), halfway  # and tokens trickle


async def test_rolling_sigterm_restart_under_load_fails_no_request(fleet: Fleet) -> None:
    outcomes: list[Outcome] = []
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        for _ in range(CLIENTS):
            nursery.start_soon(closed_loop, fleet.port, outcomes, stop)
        await trio.sleep(0.5)
        for instance in fleet.instances:
            assert instance.proc is not None
            before = len(outcomes)
            instance.proc.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                while instance.proc.poll() is None:
                    await trio.sleep(0.02)
            assert instance.proc.returncode == 0, instance.log_text()
            instance.start()
            await instance.wait_healthy()
            # nginx keeps a server it saw refuse out of rotation for fail_timeout after that
            # (passive checks only): stopping the next one sooner can leave none in rotation.
            await trio.sleep(FAIL_TIMEOUT + 0.5)
            assert len(outcomes) > before  # the clients kept getting answers meanwhile
        await trio.sleep(0.5)
        stop.set()
    failed = [o.detail for o in outcomes if not o.ok]
    print(f"\nrolling restart: {len(outcomes)} requests, {len(failed)} failed")
    print(f"nginx passed {fleet.passed_on()} request(s) on to another instance")
    assert failed == [], f"{failed[:5]}\n{fleet.error_log()[-6000:]}"
    assert len(outcomes) >= 3 * CLIENTS


async def test_sigkill_fails_only_the_streams_it_held(fleet: Fleet) -> None:
    await fleet.wait_all_healthy()
    long = {**STREAM, "max_tokens": 200}
    outcomes: list[Outcome] = []
    started: list[bytes] = []
    async with trio.open_nursery() as nursery:
        for _ in range(CLIENTS):
            stream = completion_stream(fleet.port, long, started=started)
            nursery.start_soon(_append, outcomes, stream)
        # every stream running somewhere and already streaming to its client: one whose
        # response has not begun is one nginx may still send on to another instance (so it
        # would not fail at all, which is better, but not what this test counts)
        with trio.fail_after(20):
            while True:
                running = [
                    _metric(i.metrics(), "tinyllm_num_requests_running") for i in fleet.instances
                ]
                if sum(running) == CLIENTS and len(started) == CLIENTS:
                    break
                await trio.sleep(0.02)
        victim = max(range(len(running)), key=lambda k: running[k])
        held = int(running[victim])
        assert 0 < held < CLIENTS, running
        proc = fleet.instances[victim].proc
        assert proc is not None
        proc.kill()
        proc.wait()
    failed = [o for o in outcomes if not o.ok]
    assert len(failed) == held, ([o.detail for o in failed], running)
    # later requests all succeed: nginx is refused by the dead port and goes elsewhere
    later: list[Outcome] = []
    async with trio.open_nursery() as nursery:
        for _ in range(2 * CLIENTS):
            nursery.start_soon(_append, later, completion_stream(fleet.port, STREAM))
    assert all(o.ok for o in later), [o.detail for o in later if not o.ok]
    # back to three: the new process also sweeps the killed one's /dev/shm leftovers
    fleet.instances[victim].start()
    await fleet.instances[victim].wait_healthy()

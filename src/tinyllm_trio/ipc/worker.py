"""The worker process: one model, one continuous batcher, two rings.

Run by the pool as ``python -m tinyllm_trio.ipc.worker --requests NAME --responses NAME ...``
(never by hand). The server has already created both rings; the worker attaches, loads the
checkpoint once, announces `Ready` on its response ring, then loops:

- idle (nothing active or waiting): block on the request ring, in bounded slices so that the
  death of the server is noticed (``os.getppid()`` changes when the parent dies);
- busy: take every request already waiting without blocking, then run one batcher step, which
  admits new sequences (prefill), advances every active one by a token and drops finished or
  cancelled ones; write its events to the response ring, all of them as one `Batch` message.

Writing blocks while the response ring is full: a slow server slows the worker down, and no
event is ever dropped or reordered. A cancel reaches the batcher before the next step, so its
sequence is gone within one decode step.

Signals: the pool starts workers in their own session, so the terminal's Ctrl+C never reaches
them; SIGINT is also ignored here, in case someone signals the process group by hand. The
server stops a worker with a `Shutdown` message (then SIGKILL if it does not exit in time).
If the server itself dies (SIGKILL, OOM), the worker notices within a wait slice, unlinks the
rings it was given (nobody else will) and exits, so no orphan survives its server.

BLAS runs single-threaded (the pool sets ``OPENBLAS_NUM_THREADS`` etc. in the environment, and
this module sets them too before numpy is imported): the parallelism is one process per core.
The same place picks OpenBLAS's kernel set where ours is faster (`model/blas.py`).
"""

from __future__ import annotations

import os

from tinyllm_trio.model.blas import blas_env

for _var, _value in blas_env().items():  # before anything imports numpy
    os.environ.setdefault(_var, _value)

import argparse  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402

from tinyllm_trio.errors import kind_of  # noqa: E402
from tinyllm_trio.ipc.messages import (  # noqa: E402
    Batch,
    Cancel,
    MessageError,
    Ready,
    Shutdown,
    Submit,
    decode,
    encode,
)
from tinyllm_trio.ipc.ring import Frame, PeerGoneError, Ring  # noqa: E402
from tinyllm_trio.protocol import DoneEvent, ErrorEvent, ErrorKind, Event, TokenEvent  # noqa: E402

EXIT_LOAD_FAILED = 3
ALIVE_EVERY = 0.02  # seconds between checks of the parent while computing


class Worker:
    """The request loop of one worker process (separate from `main` so it reads as a loop)."""

    def __init__(
        self,
        requests: Ring,
        responses: Ring,
        make_batcher: Callable[[], object],
        alive: Callable[[], bool],
        name: str,
    ) -> None:
        self.requests = requests
        self.responses = responses
        self._make_batcher = make_batcher
        self.batcher = make_batcher()
        self.alive = alive
        self.name = name
        self.inflight: set[int] = set()
        self.unstarted: set[int] = set()  # admitted requests that have shown no text yet

    def send(self, event: object, *, urgent: bool = True) -> None:
        """Write one event; blocks while the server is behind (back-pressure, never a drop).
        One that is not `urgent` may wait for the server's next busy tick (`Ring.pump`)."""
        self.responses.put(*encode(event), alive=self.alive, urgent=urgent)

    def run(self) -> int:
        """Serve until a Shutdown message (returns 0); PeerGoneError if the server dies."""
        next_check = 0.0
        while True:
            for frame in self._incoming(block=self.batcher.idle):
                if not self._handle(frame):
                    return 0
            # Checked while computing too, so an orphan stops; every ALIVE_EVERY seconds, not
            # every step, as it costs a system call and a step can take a fraction of a ms.
            if (now := time.monotonic()) >= next_check:
                if not self.alive():
                    raise PeerGoneError("the server is gone")
                next_check = now + ALIVE_EVERY
            if not self.batcher.idle:
                self._step()

    def _incoming(self, *, block: bool) -> list[Frame]:
        frames: list[Frame] = []
        if block:
            frame = self.requests.get(alive=self.alive)  # bounded slices, checks the parent
            if frame is not None:
                frames.append(frame)
        while (frame := self.requests.get(timeout=0)) is not None:
            frames.append(frame)
        return frames

    def _handle(self, frame: Frame) -> bool:
        """Apply one request message; False means shut down."""

        try:
            msg = decode(frame.msg_type, frame.request_id, frame.payload)
        except MessageError as e:
            self.send(
                ErrorEvent(frame.request_id, f"bad request message: {e}", ErrorKind.INVALID_REQUEST)
            )
            return True
        if isinstance(msg, Shutdown):
            return False
        if isinstance(msg, Batch):  # a request's n choices: submitted in one go, admitted as one
            for item in msg.messages:
                self._apply(item)
            return True
        self._apply(msg)
        return True

    def _apply(self, msg: object) -> None:
        """Apply one decoded request message (not Shutdown, not a Batch)."""
        if isinstance(msg, Cancel):
            if msg.request_id in self.inflight:
                self.batcher.cancel(msg.request_id)
        elif isinstance(msg, Submit):
            try:
                self.batcher.submit(msg.request_id, msg.prompt, msg.params)
            except Exception as e:
                self.send(ErrorEvent(msg.request_id, str(e), kind_of(e)))
            else:
                self.inflight.add(msg.request_id)
                self.unstarted.add(msg.request_id)
        else:
            rid = getattr(msg, "request_id", 0)
            self.send(ErrorEvent(rid, f"unexpected {type(msg).__name__}", ErrorKind.INTERNAL))

    def _step(self) -> None:

        try:
            events = self.batcher.step()
        except Exception as e:
            # A bug in the model code: fail what is running, start from a clean batcher (its
            # cache may be half-updated), and keep serving.
            traceback.print_exc(file=sys.stderr)
            message = f"internal error in {self.name}: {type(e).__name__}: {e}"
            events = [ErrorEvent(rid, message, ErrorKind.INTERNAL) for rid in sorted(self.inflight)]
            self.batcher = self._make_batcher()
        if events:  # one message per step: the server wakes once, not once per token
            urgent = self._urgent(events)
            self.send(events[0] if len(events) == 1 else Batch(events), urgent=urgent)
        for event in events:
            if isinstance(event, DoneEvent | ErrorEvent):
                self.inflight.discard(event.request_id)
                self.unstarted.discard(event.request_id)

    def _urgent(self, events: list[Event]) -> bool:
        """Whether a step's message must wake the server even while it reads on its busy
        tick: it carries a request's first token with text or logprobs, the first thing its
        client sees (its time to first token; a token whose text is held back, a word still
        being spelled or a possible stop string, shows nothing, so those before it are urgent
        too), or a final event (the answer ends, and a batch slot frees for the next request).
        Later tokens of running requests can wait for the tick."""
        urgent = False
        unstarted = self.unstarted
        for event in events:
            if type(event) is not TokenEvent:
                urgent = True
            elif unstarted and event.request_id in unstarted:
                urgent = True
                if event.text or event.logprobs:
                    unstarted.discard(event.request_id)
        return urgent


def build_parser() -> argparse.ArgumentParser:
    from tinyllm_trio.model.batching import MAX_BATCH  # numpy: after the BLAS settings above

    p = argparse.ArgumentParser(prog="python -m tinyllm_trio.ipc.worker")
    p.add_argument("--requests", required=True, help="request ring name (created by the server)")
    p.add_argument("--responses", required=True, help="response ring name")
    p.add_argument(
        "--responses-doorbell",
        type=int,
        default=None,
        help="inherited eventfd to ring after each response message (the server waits on it)",
    )
    p.add_argument("--parent-pid", type=int, required=True, help="exit when this process dies")
    p.add_argument("--model", default=None, help="checkpoint directory (default: packaged)")
    p.add_argument("--attention-scale", choices=["head", "embd"], default=None)
    p.add_argument("--weights", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH)
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false")
    p.add_argument("--index", type=int, default=0, help="worker number, for messages")
    p.add_argument("--cpu", type=int, default=None, help="pin this process to that core")
    return p


def pin_to(cpu: int, name: str) -> None:
    """Keep this process on one core (see `pool.worker_cpus` for why); a core that is no
    longer allowed (cpuset changed, CPU offline) only costs the pinning, with a warning."""
    try:
        os.sched_setaffinity(0, {cpu})
    except (OSError, AttributeError) as e:
        print(f"tinyllm: {name} could not pin itself to CPU {cpu}: {e}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    name = f"worker {args.index} (pid {os.getpid()})"
    if args.cpu is not None:  # while single-threaded: threads started later inherit it
        pin_to(args.cpu, name)

    def alive() -> bool:
        return os.getppid() == args.parent_pid

    requests = Ring.attach(args.requests)
    responses = Ring.attach(args.responses, doorbell_fd=args.responses_doorbell)
    try:
        from tinyllm_trio.model.batching import ContinuousBatcher
        from tinyllm_trio.model.checkpoint import load_model

        try:
            loaded = load_model(
                args.model, attention_scale=args.attention_scale, weights_format=args.weights
            )
        except Exception as e:
            msg = f"{name} could not load the model: {type(e).__name__}: {e}"
            print(f"tinyllm: {msg}", file=sys.stderr)
            responses.put(
                *encode(ErrorEvent(0, msg, ErrorKind.LOAD_FAILED)), alive=alive, timeout=5
            )
            return EXIT_LOAD_FAILED

        def make_batcher() -> ContinuousBatcher:
            return ContinuousBatcher(
                loaded.transformer,
                loaded.tokenizer,
                args.max_batch,
                prefix_cache=args.prefix_cache,
            )

        worker = Worker(requests, responses, make_batcher, alive, name)
        info = {"index": args.index, "max_batch": args.max_batch, "model": str(loaded.path)}
        info["prefix_cache"] = args.prefix_cache
        info["weights"] = loaded.transformer.weights_format
        worker.send(Ready(os.getpid(), info))
        return worker.run()
    except PeerGoneError:
        # The server died without cleaning up: nobody else will unlink these names.
        requests.unlink()
        responses.unlink()
        return 0
    finally:
        requests.close()
        responses.close()


if __name__ == "__main__":
    raise SystemExit(main())

"""The worker's loop: which of its step messages wake a server that reads on its busy tick."""

from __future__ import annotations

import os
from pathlib import Path

from tinyllm_trio.ipc.messages import Submit
from tinyllm_trio.ipc.ring import BELL_URGENT, BELL_WANTED, Ring, new_prefix
from tinyllm_trio.ipc.worker import Worker
from tinyllm_trio.model.batching import ContinuousBatcher
from tinyllm_trio.model.checkpoint import load_model
from tinyllm_trio.model.sampling import SamplingParams
from tinyllm_trio.protocol import TokenEvent


def test_a_step_rings_a_ticking_server_for_first_tokens_and_ends_only(
    tiny_checkpoint: Path,
) -> None:
    """A request's tokens up to the first that shows text (its time to first token) and its
    final event wake the server at once; a step of later tokens waits for the server's tick."""
    loaded = load_model(tiny_checkpoint)
    batcher = ContinuousBatcher(loaded.transformer, loaded.tokenizer, max_batch=4)
    steps: list[list[object]] = []
    step = batcher.step

    def recorded() -> list[object]:
        events = step()
        for event in events:  # request 1's first two tokens show no text yet (held back)
            if type(event) is TokenEvent and event.request_id == 1 and held[0] < 2:
                event.text, held[0] = "", held[0] + 1
        steps.append(events)
        return events

    held = [0]

    batcher.step = recorded  # type: ignore[method-assign]
    prefix = new_prefix()
    requests = Ring.create(prefix + "-req", n_slots=8, slot_size=4096)
    responses = Ring.create(prefix + "-resp", n_slots=64, slot_size=4096, doorbell=True)
    producer = Ring.attach(responses.name, doorbell_fd=os.dup(responses.doorbell_fd))
    try:
        worker = Worker(requests, producer, lambda: batcher, lambda: True, "worker 0")
        responses._mm[BELL_WANTED] = BELL_URGENT  # the server sleeps on its busy tick
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        rang: list[bool] = []
        shown: set[int] = set()
        want: list[bool] = []
        for i in range(14):
            if i in (0, 3):  # the second request joins a running batch
                worker._apply(Submit(i + 1, "the cat", params))
            if batcher.idle:
                break
            before = producer.doorbell_rings
            worker._step()
            rang.append(producer.doorbell_rings > before)
            events = steps[-1]
            tokens = [e for e in events if type(e) is TokenEvent]
            early = any(e.request_id not in shown for e in tokens)
            shown |= {e.request_id for e in tokens if e.text}
            want.append(early or any(type(e) is not TokenEvent for e in events))
            while responses.get(timeout=0) is not None:  # the server reads on its tick
                pass
        assert rang == want
        shows = [
            any(type(e) is TokenEvent and e.request_id == 1 and e.text for e in events)
            for events in steps
        ]
        k = shows.index(True)  # request 1's first text: after its held-back tokens
        assert k >= 1 and all(rang[: k + 1])
        assert rang.count(True) >= 4 and rang.count(False) >= 3  # two starts, two ends
        assert not worker.unstarted and not worker.inflight
    finally:
        producer.close()
        responses.destroy()
        requests.destroy()

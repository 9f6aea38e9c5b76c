"""RequestStream on its own: the queue, the token sink and the ordering rule between them.

The engine tests (tests/ipc/test_engine.py) and the HTTP tests cover it end to end; these pin
the rule itself, without a backend, and how a `Generation` takes a burst from it.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyllm_trio.protocol import DoneEvent, ErrorEvent, TokenEvent
from tinyllm_trio.stream import RequestStream


def tok(i: int, rid: int = 1) -> TokenEvent:
    return TokenEvent(rid, [i], f"t{i}")


def done(rid: int = 1, n: int = 0) -> DoneEvent:
    return DoneEvent(rid, "length", 1, n)


async def drain(stream: RequestStream) -> list:
    return [event async for event in stream]


async def test_events_queue_in_order_and_the_stream_ends_after_the_final_one() -> None:
    stream = RequestStream()
    stream.deliver(tok(1))
    stream.deliver(tok(2))
    assert stream.queued == 2
    stream.finish(done(n=2))
    assert stream.finished
    assert await drain(stream) == [tok(1), tok(2), done(n=2)]
    assert stream.queued == 0
    with pytest.raises(trio.EndOfChannel):
        await stream.receive()


async def test_a_sink_takes_tokens_and_the_final_event_is_queued_after_them() -> None:
    stream = RequestStream()
    taken: list[TokenEvent] = []
    assert stream.set_sink(taken.append)
    stream.deliver(tok(1))
    stream.deliver(tok(2))
    stream.finish(done(n=2))
    assert taken == [tok(1), tok(2)]
    assert await drain(stream) == [done(n=2)]
    stream.deliver(tok(3))  # after the end: nothing reaches the old sink
    assert taken == [tok(1), tok(2)]


async def test_a_sink_never_overtakes_queued_events() -> None:
    stream = RequestStream()
    stream.deliver(tok(1))  # queued before the sink
    taken: list[TokenEvent] = []
    stream.set_sink(taken.append)
    stream.deliver(tok(2))  # one is still queued: this one queues behind it
    assert taken == []
    assert await stream.receive() == tok(1)
    assert await stream.receive() == tok(2)
    stream.deliver(tok(3))  # the queue is empty again: the sink takes it
    assert taken == [tok(3)]


async def test_a_sink_that_raises_is_dropped_and_its_event_queued(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stream = RequestStream()
    calls: list[TokenEvent] = []

    def broken(event: TokenEvent) -> None:
        calls.append(event)
        raise RuntimeError("boom")

    stream.set_sink(broken)
    stream.deliver(tok(1))
    stream.deliver(tok(2))
    stream.finish(done(n=2))
    assert calls == [tok(1)]  # called once, then dropped
    assert await drain(stream) == [tok(1), tok(2), done(n=2)]
    assert "token sink failed" in caplog.text


async def test_set_sink_refuses_after_the_end_or_a_close() -> None:
    ended = RequestStream()
    ended.finish(done())
    assert not ended.set_sink(lambda e: None)
    closed = RequestStream()
    closed.close()
    assert not closed.set_sink(lambda e: None)
    assert closed.set_sink(None)  # removing is always fine


async def test_close_wakes_a_waiting_receive_and_discards_later_events() -> None:
    stream = RequestStream()
    taken: list[TokenEvent] = []
    stream.set_sink(taken.append)
    woke: list[type[BaseException]] = []

    async def wait() -> None:
        try:
            await stream.receive()
        except trio.ClosedResourceError as exc:
            woke.append(type(exc))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        stream.close()
    assert woke == [trio.ClosedResourceError]
    stream.deliver(tok(1))  # neither the sink nor the queue
    stream.finish(done())
    assert taken == [] and stream.queued == 0


async def test_a_stream_of_several_members_ends_after_each_final_event() -> None:
    stream = RequestStream(members=2)
    stream.deliver(tok(1, rid=1))
    stream.finish(done(rid=1, n=1))
    assert not stream.finished
    stream.deliver(tok(2, rid=2))
    stream.finish(ErrorEvent(2, "gone", "worker_died"))
    assert stream.finished
    got = await drain(stream)
    assert [type(e) for e in got] == [TokenEvent, DoneEvent, TokenEvent, ErrorEvent]
    with pytest.raises(ValueError):
        RequestStream(members=0)


async def test_a_cancelled_receive_takes_nothing_and_a_later_one_gets_the_event() -> None:
    stream = RequestStream()
    with trio.move_on_after(0.01) as scope:
        await stream.receive()  # parked: nothing has come
    assert scope.cancelled_caught
    stream.deliver(tok(1))  # no task waits any more: it queues
    assert stream.queued == 1
    assert await stream.receive() == tok(1)


async def test_a_receive_parked_before_the_event_gets_it_and_a_second_receiver_is_refused() -> None:
    stream = RequestStream()
    got: list = []

    async def wait() -> None:
        got.append(await stream.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await stream.receive()
        stream.deliver(tok(1))
    assert got == [tok(1)] and stream.queued == 0
    stream.finish(done(n=1))
    assert await drain(stream) == [done(n=1)]


async def test_the_final_event_wakes_a_parked_receive_and_then_the_stream_ends() -> None:
    stream = RequestStream()
    got: list = []

    async def wait() -> None:
        got.extend(await drain(stream))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        stream.finish(done())
    assert got == [done()]


OPS = st.lists(
    st.sampled_from(
        ["token", "fast token", "sink", "failing sink", "no sink", "receive", "close", "finish"]
    ),
    max_size=30,
)


class _Model:
    """The module docstring's rules, written plainly: what a stream must do."""

    def __init__(self, members: int) -> None:
        self.queue: list = []
        self.sink = None
        self.open = members
        self.sunk = 0
        self.closed = self.finished = False

    def token(self, event: TokenEvent) -> None:
        if self.closed or self.finished:
            return
        if self.sink is not None and not self.queue:
            try:
                self.sink(event)
                self.sunk += len(event.token_ids)
                return
            except RuntimeError:
                self.sink = None
        self.queue.append(event)

    def finish(self, event: DoneEvent) -> None:
        if not (self.closed or self.finished):
            self.sink = None
            self.queue.append(event)
        self.open -= 1
        self.finished = self.finished or self.open <= 0

    def set_sink(self, sink) -> bool:
        if sink is not None and (self.closed or self.finished):
            return False
        self.sink = sink
        return True

    def close(self) -> None:
        self.sink, self.closed, self.queue = None, True, []


def _replay(ops: list[str], model: bool) -> list:
    """What a consumer observes when `ops` happen to a stream (or to `_Model`): every sink
    call, every received event, and after each step the queue's length, the token ids the
    sinks took and whether the stream ended."""
    seen: list = []

    def sink(event: TokenEvent) -> None:
        seen.append(("sink", event.token_ids))

    def failing(event: TokenEvent) -> None:
        seen.append(("failing sink", event.token_ids))
        raise RuntimeError("a bug in the sink")

    sinks = {"sink": sink, "failing sink": failing, "no sink": None}

    async def scenario() -> None:
        stream = _Model(2) if model else RequestStream(members=2)  # "finish" twice ends it
        for i, op in enumerate(ops):
            if op == "token":
                stream.token(tok(i)) if model else stream.deliver(tok(i))
            elif op == "fast token":
                stream.token(tok(i)) if model else stream.deliver_token(tok(i))
            elif op in sinks:
                seen.append((op, stream.set_sink(sinks[op])))
            elif op == "receive":
                if model and stream.queue and not stream.closed:
                    seen.append(("received", stream.queue.pop(0)))
                elif not model and stream.queued and not stream.closed:
                    seen.append(("received", await stream.receive()))
            elif op == "close":
                stream.close()
            elif op == "finish":
                stream.finish(done())
            queued = len(stream.queue) if model else stream.queued
            seen.append((queued, stream.sunk, stream.finished))

    trio.run(scenario)
    return seen


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_the_stream_keeps_its_rules_in_any_order_of_events(ops: list[str]) -> None:
    # tokens through `deliver` and the per-token `deliver_token`, sinks set, failing and
    # removed, receives, a close and final events, in any order: as the rules say
    assert _replay(ops, model=False) == _replay(ops, model=True)


async def test_sunk_counts_the_token_ids_the_sink_took() -> None:
    stream = RequestStream()
    stream.deliver_token(TokenEvent(1, [5], "a"))  # no sink yet: queued, not counted
    stream.set_sink(lambda event: None)
    stream.deliver_token(TokenEvent(1, [5], "a"))  # one is queued: the sink may not pass it
    assert stream.sunk == 0
    await stream.receive()
    await stream.receive()
    stream.deliver_token(TokenEvent(1, [6, 7], "bc"))
    stream.deliver(TokenEvent(1, [8], "d"))
    assert stream.sunk == 3 and stream.queued == 0


# --- a Generation takes a burst of queued events ----------------------------------------------


class _OneStreamBackend:
    """The two calls a Generation makes of its backend, around one stream."""

    def __init__(self, stream: RequestStream) -> None:
        self.stream, self.id, self.released = stream, 1, False

    def admit(self, prompt_ids: list[int], params: object) -> _OneStreamBackend:
        return self

    def release(self, request: object) -> None:
        self.released = True


def _generation(stream: RequestStream):
    from tinyllm_trio.engine import Generation
    from tinyllm_trio.model.sampling import SamplingParams

    return Generation(_OneStreamBackend(stream), [2, 7], SamplingParams(max_tokens=8))


async def test_a_generation_takes_a_burst_in_one_pass_of_the_scheduler() -> None:
    """Tokens that arrived together (several steps read on one busy tick) are iterated after
    one checkpoint, not one each, while another task waits for its turn."""
    stream = RequestStream()
    for i in range(5):
        stream.deliver(tok(i))
    stream.finish(done(n=5))
    turns = [0]

    async def other() -> None:
        while True:
            turns[0] += 1
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await trio.sleep(0)
        got, start = [], turns[0]
        async with _generation(stream) as generation:
            async for event in generation:
                got.append(event)
        passes = turns[0] - start
        nursery.cancel_scope.cancel()
    assert [e.token_ids[0] for e in got[:5]] == list(range(5)) and got[5] == done(n=5)
    assert passes <= 2  # one checkpoint for the whole burst (receive's), not one per event


async def test_a_generation_is_cancellable_between_the_events_of_a_burst() -> None:
    stream = RequestStream()
    for i in range(5):
        stream.deliver(tok(i))
    got = []
    with trio.CancelScope() as scope:
        async with _generation(stream) as generation:
            async for event in generation:
                got.append(event)
                if len(got) == 2:
                    scope.cancel()  # the next event is queued, but this is a cancel point
    assert scope.cancelled_caught and len(got) == 2

"""n, echo, logit_bias and the prefix cache's reports over HTTP, on real workers, through the
official `openai` SDK (in a thread, as a user's program runs it) and raw sockets."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import openai
import pytest
import trio

from conftest import save_random_checkpoint
from http_fixtures import post, running_server
from tinyllm_trio.bench.client import HTTPClient
from tinyllm_trio.engine import Engine, open_engine
from tinyllm_trio.model.checkpoint import load_model
from tinyllm_trio.model.sampling import log_softmax

PROMPT = "once upon a time there was a little girl named lily and she liked to play with her dog"


@asynccontextmanager
async def live(checkpoint: Path, **engine_options) -> AsyncIterator[tuple[Engine, int]]:
    options = {"workers": 1, "max_batch": 8, "pin_workers": False, **engine_options}
    async with (
        open_engine(checkpoint, **options) as engine,
        running_server(engine) as (_, port),
    ):
        yield engine, port


def _client(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="any", max_retries=0)


async def test_n_choices_through_the_sdk_streaming_and_not(tiny_checkpoint: Path) -> None:
    async with live(tiny_checkpoint) as (engine, port):
        prompt_tokens = len(engine.encode_prompt(PROMPT))

        def use_sdk() -> dict:
            client = _client(port)
            sampled = {
                "temperature": 1.5,
                "seed": 5,
                "max_tokens": 6,
                "extra_body": {"ignore_eos": True},
            }
            out = {
                "first": client.completions.create(model="t", prompt=PROMPT, n=3, **sampled),
                "again": client.completions.create(model="t", prompt=PROMPT, n=3, **sampled),
            }
            chunks = list(
                client.chat.completions.create(
                    model="t",
                    messages=[{"role": "user", "content": PROMPT}],
                    n=2,
                    stream=True,
                    stream_options={"include_usage": True},
                    **sampled,
                )
            )
            out["chunks"] = chunks
            out["chat"] = client.chat.completions.create(
                model="t", messages=[{"role": "user", "content": PROMPT}], n=2, **sampled
            )
            return out

        out = await trio.to_thread.run_sync(use_sdk)
        stats = engine.stats()["prefix_cache"]

    first, again = out["first"], out["again"]
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.text for c in first.choices]
    assert len(set(texts)) == 3  # the samples of one request differ
    assert [c.text for c in again.choices] == texts  # and the seed reproduces the set
    assert first.usage.prompt_tokens == prompt_tokens  # the prompt once
    assert first.usage.completion_tokens == 18  # every choice's tokens
    assert first.usage.prompt_tokens_details.cached_tokens == 0  # choice 0 computed it
    assert again.usage.prompt_tokens_details.cached_tokens == prompt_tokens - 1
    assert stats["hits"] >= 2 * prompt_tokens  # choices 1 and 2 of the first request forked

    chunks = out["chunks"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    streamed: dict[int, str] = {0: "", 1: ""}
    finished: dict[int, str] = {}
    roles = set()
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        if choice.delta.role:
            roles.add(choice.index)
        streamed[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            assert choice.index not in finished  # one finish per choice
            finished[choice.index] = choice.finish_reason
    assert roles == {0, 1} and finished == {0: "length", 1: "length"}
    assert [streamed[0], streamed[1]] == [c.message.content for c in out["chat"].choices]
    assert out["chat"].usage.prompt_tokens_details.cached_tokens == prompt_tokens - 1
    assert streamed[0] != streamed[1]


async def test_echo_returns_the_prompt_and_its_logprobs(tiny_checkpoint: Path) -> None:
    loaded = load_model(tiny_checkpoint)
    async with live(tiny_checkpoint) as (engine, port):
        ids = engine.encode_prompt(PROMPT)
        expected = log_softmax(loaded.transformer.forward(ids))

        def use_sdk() -> dict:
            client = _client(port)
            greedy = {"temperature": 0, "max_tokens": 5, "extra_body": {"ignore_eos": True}}
            return {
                "plain": client.completions.create(model="t", prompt=PROMPT, **greedy),
                "echo": client.completions.create(model="t", prompt=PROMPT, echo=True, **greedy),
                "scored": client.completions.create(
                    model="t", prompt=PROMPT, echo=True, logprobs=2, n=2, **greedy
                ),
                "stream": list(
                    client.completions.create(
                        model="t", prompt=PROMPT, echo=True, stream=True, **greedy
                    )
                ),
                "stream_scored": list(
                    client.completions.create(
                        model="t", prompt=PROMPT, echo=True, logprobs=1, stream=True, **greedy
                    )
                ),
            }

        out = await trio.to_thread.run_sync(use_sdk)

    completion = out["plain"].choices[0].text
    assert out["echo"].choices[0].text == PROMPT + completion
    for choice in out["scored"].choices:
        assert choice.text == PROMPT + completion
        lp = choice.logprobs
        assert len(lp.tokens) == len(ids) + 5
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for j in range(1, len(ids)):  # the model's own, from the prefill
            assert lp.token_logprobs[j] == pytest.approx(expected[j - 1, ids[j]], abs=1e-4)
        assert all(len(top) == 2 for top in lp.top_logprobs[1:])
        assert lp.text_offset[len(ids)] == len(PROMPT)  # the completion starts after the echo
    # streaming: the prompt is the first chunk (vLLM's choice), then the completion as usual
    stream = out["stream"]
    assert stream[0].choices[0].text == PROMPT and stream[0].choices[0].logprobs is None
    assert "".join(c.choices[0].text for c in stream[1:]) == completion
    scored = out["stream_scored"]
    head = scored[0].choices[0]
    assert head.text == PROMPT and head.logprobs.token_logprobs[0] is None
    assert len(head.logprobs.tokens) == len(ids)
    assert "".join(c.choices[0].text for c in scored[1:]) == completion


async def test_logit_bias_reaches_the_workers_and_cache_reports(tiny_checkpoint: Path) -> None:
    """+100 on one token makes greedy pick it every time; a repeated prompt reports the cached
    tokens in usage (streaming too) and /metrics counts them; cache_prompt false bypasses."""
    async with live(tiny_checkpoint) as (engine, port):
        favourite = engine.tokenizer.encode("cat")[-1]
        prompt_tokens = len(engine.encode_prompt(PROMPT))

        def use_sdk() -> dict:
            client = _client(port)
            greedy = {"temperature": 0, "max_tokens": 4}
            biased = client.completions.create(
                model="t", prompt=PROMPT, logprobs=0, logit_bias={str(favourite): 100}, **greedy
            )
            streamed = list(
                client.completions.create(
                    model="t",
                    prompt=PROMPT,
                    stream=True,
                    stream_options={"include_usage": True},
                    **greedy,
                )
            )
            bypass = client.completions.create(
                model="t", prompt=PROMPT, extra_body={"cache_prompt": False}, **greedy
            )
            chat = list(
                client.chat.completions.create(
                    model="t",
                    messages=[{"role": "user", "content": PROMPT}],
                    stream=True,
                    stream_options={"include_usage": True},
                    **greedy,
                )
            )
            return {"biased": biased, "streamed": streamed, "bypass": bypass, "chat": chat}

        out = await trio.to_thread.run_sync(use_sdk)
        async with await HTTPClient.connect("127.0.0.1", port) as client:
            metrics = (await (await client.request("GET", "/metrics")).read()).decode()
        stats = engine.stats()["prefix_cache"]

    biased = out["biased"].choices[0]
    token = engine.tokenizer.token_text(favourite)
    assert biased.logprobs.tokens == [token] * 4
    assert all(lp < 0 for lp in biased.logprobs.token_logprobs)  # the model's own, unbiased
    usage = out["streamed"][-1].usage
    assert usage.prompt_tokens_details.cached_tokens == prompt_tokens - 1
    assert out["bypass"].usage.prompt_tokens_details.cached_tokens == 0
    chat_usage = out["chat"][-1].usage  # the chat template's prompt is the same text
    assert chat_usage.prompt_tokens_details.cached_tokens == prompt_tokens - 1
    assert stats["queries"] == 3 * prompt_tokens  # the bypassed request is no query
    assert stats["hits"] == 2 * (prompt_tokens - 1)
    found = dict(re.findall(r"^(tinyllm_prefix_cache_\w+_total) (\S+)$", metrics, re.M))
    assert float(found["tinyllm_prefix_cache_queries_total"]) == stats["queries"]
    assert float(found["tinyllm_prefix_cache_hits_total"]) == stats["hits"]


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TinyLLM's real shapes: generations last long enough to leave in the middle."""
    return save_random_checkpoint(tmp_path_factory.mktemp("slow-choices"), seed=3)


async def test_leaving_an_n_stream_frees_every_row(slow_checkpoint: Path) -> None:
    async with live(slow_checkpoint) as (engine, port):
        body = {"prompt": PROMPT, "n": 3, "max_tokens": 400, "stream": True, "ignore_eos": True}
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(post("/v1/completions", json.dumps(body).encode()))
        seen = b""
        with trio.fail_after(30):
            while seen.count(b'"index":') < 6:  # tokens of the choices are flowing
                seen += await stream.receive_some(65536)
        assert engine.stats()["running"] == 3
        await stream.aclose()
        with trio.fail_after(10):
            while engine.stats()["running"]:
                await trio.sleep(0.02)

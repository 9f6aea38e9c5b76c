"""The OpenAI-compatible API over real sockets, against the scripted fake engine.

Shapes and framing are checked on the raw bytes (SSE events, `[DONE]`, headers) and through
the official `openai` SDK (run in a thread, as a user's program would run it). The SDK against
the real engine is in test_http_integration.py.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
import trio

from http_fixtures import FakeEngine, post, raw_request, running_server, split_response
from tinyllm_trio.bench.client import HTTPClient, sse_events
from tinyllm_trio.http.openai_api import chat_prompt


async def _post_json(port: int, path: str, body: dict[str, Any]) -> tuple[int, dict, Any]:
    raw = await raw_request(port, post(path, json.dumps(body).encode()))
    status, headers, payload = split_response(raw)
    return status, headers, json.loads(payload)


async def _stream(port: int, path: str, body: dict[str, Any]) -> tuple[dict, list[str]]:
    async with await HTTPClient.connect("127.0.0.1", port) as client:
        response = await client.request("POST", path, json=body)
        assert response.status == 200, await response.read()
        buffer = bytearray()
        events: list[str] = []
        async for chunk in response.chunks():
            events.extend(sse_events(buffer, chunk))
        assert not buffer
        return response.headers, events


def _sdk(port: int, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key=kw.pop("api_key", "unused"), max_retries=0
    )


async def test_completion_non_streaming_shape() -> None:
    engine = FakeEngine(words=(" once", " upon"))
    async with running_server(engine) as (_, port):
        status, headers, body = await _post_json(
            port, "/v1/completions", {"model": "x", "prompt": "hi", "max_tokens": 3, "foo": 1}
        )
    assert status == 200 and headers["content-type"] == "application/json"
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == "tinyllm" and isinstance(body["created"], int)
    assert body["choices"] == [
        {"index": 0, "text": " once upon once", "logprobs": None, "finish_reason": "length"}
    ]
    prompt_tokens = len(engine.tokenizer.encode("hi"))
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 3,
        "total_tokens": prompt_tokens + 3,
    }
    assert engine.calls[0][1].max_tokens == 3


async def test_completion_defaults_and_extras_reach_the_engine() -> None:
    engine = FakeEngine()
    body = {
        "prompt": [2, 7, 9],
        "temperature": 0.5,
        "top_p": 0.8,
        "top_k": 4,
        "min_p": 0.1,
        "repetition_penalty": 1.2,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "seed": 11,
        "stop": "END",
        "ignore_eos": True,
    }
    async with running_server(engine) as (_, port):
        status, _, _ = await _post_json(port, "/v1/completions", body)
    assert status == 200
    prompt, params = engine.calls[0]
    assert prompt == [2, 7, 9]  # token ids are taken as given
    assert params.max_tokens == 16
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.5, 0.8, 4, 0.1)
    assert (params.repetition_penalty, params.presence_penalty, params.frequency_penalty) == (
        1.2,
        0.5,
        -0.5,
    )
    assert (params.seed, params.stop, params.ignore_eos) == (11, ("END",), True)


async def test_completion_stream_framing_and_usage() -> None:
    async with running_server(FakeEngine(words=(" a", " b"))) as (_, port):
        headers, events = await _stream(
            port,
            "/v1/completions",
            {
                "prompt": "x",
                "max_tokens": 3,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
    assert headers["content-type"] == "text/event-stream"
    assert headers["cache-control"] == "no-cache" and headers["x-accel-buffering"] == "no"
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == [" a", " b", " a"]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None, None, "length"]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert len({c["id"] for c in chunks}) == 1


async def test_completion_stream_without_usage_has_no_usage_field() -> None:
    async with running_server(FakeEngine(eos_after=2)) as (_, port):
        _, events = await _stream(port, "/v1/completions", {"prompt": "x", "stream": True})
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c for c in chunks)
    # EOS: the content chunks carry no finish_reason; an empty final chunk says "stop".
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "text": "",
        "logprobs": None,
        "finish_reason": "stop",
    }


async def test_chat_stream_starts_with_the_role() -> None:
    async with running_server(FakeEngine(words=(" hi",))) as (_, port):
        _, events = await _stream(
            port,
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, "stream": True},
        )
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"] for c in chunks[1:]] == [{"content": " hi"}] * 2
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_template_joins_message_texts() -> None:
    messages = [
        {"role": "system", "content": "A story."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Lily"}, {"type": "text", "text": "and"}],
        },
        {"role": "assistant", "content": None},
        {"role": "assistant", "content": "Tom"},
    ]
    assert chat_prompt(messages) == "A story.\nLily\nand\nTom"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "x", "n": 9}, "n"),
        ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": "3"}, "n"),
        ("/v1/completions", {"prompt": "x", "echo": "yes"}, "echo"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "echo": True},
            "echo",
        ),
        ("/v1/completions", {"prompt": "x", "best_of": 2}, "best_of"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"cat": 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"99999": 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "min_tokens": 20, "max_tokens": 5}, "min_tokens"),
        ("/v1/completions", {"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
        ("/v1/completions", {"prompt": "x", "cache_prompt": "no"}, "cache_prompt"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 65}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
        ("/v1/completions", {"prompt": "x", "logprobs": 50}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
        ("/v1/completions", {"prompt": [1, 99999]}, "prompt"),
        ("/v1/completions", {"prompt": 5}, "prompt"),
        ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0]"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1},
            "max_completion_tokens",
        ),
    ],
)
async def test_invalid_requests_are_400_with_param(path: str, body: dict, param: str) -> None:
    engine = FakeEngine()
    async with running_server(engine) as (_, port):
        status, _, payload = await _post_json(port, path, body)
    assert status == 400
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["param"] == param
    assert payload["error"]["type"] == "invalid_request_error"
    assert engine.calls == []


async def test_context_overflow_and_overload_errors() -> None:
    async with running_server(FakeEngine()) as (_, port):
        status, _, payload = await _post_json(port, "/v1/completions", {"prompt": "the cat " * 40})
        assert status == 400 and payload["error"]["code"] == "context_length_exceeded"
    async with running_server(FakeEngine(overloaded=True)) as (_, port):
        raw = await raw_request(port, post("/v1/completions", b'{"prompt": "x"}'))
        status, headers, _ = split_response(raw)
        assert status == 429 and headers["retry-after"] == "1"


async def test_error_after_the_stream_started_is_an_sse_error_then_done() -> None:
    async with running_server(FakeEngine(fail_after=1)) as (_, port):
        _, events = await _stream(
            port, "/v1/completions", {"prompt": "x", "max_tokens": 5, "stream": True}
        )
    assert json.loads(events[0])["choices"][0]["text"] == " worried"
    error = json.loads(events[1])["error"]
    assert error["message"] == "the worker died" and error["code"] == "worker_died"
    assert events[2:] == ["[DONE]"]


async def test_logprobs_shapes() -> None:
    async with running_server(FakeEngine()) as (_, port):
        _, _, body = await _post_json(
            port, "/v1/completions", {"prompt": "x", "max_tokens": 2, "logprobs": 2}
        )
        logprobs = body["choices"][0]["logprobs"]
        assert logprobs["tokens"] == [" worried", " worried"]
        assert logprobs["token_logprobs"] == [-0.25, -0.25]
        assert logprobs["top_logprobs"][0] == {"t0": -0.5, "t1": -1.5}
        assert logprobs["text_offset"] == [0, 8]
        _, _, body = await _post_json(
            port,
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 1,
                "logprobs": True,
                "top_logprobs": 1,
            },
        )
        content = body["choices"][0]["logprobs"]["content"]
        assert content[0]["token"] == " worried" and content[0]["logprob"] == -0.25
        assert content[0]["bytes"] == list(b" worried")
        assert content[0]["top_logprobs"] == [{"token": "t0", "logprob": -0.5, "bytes": [116, 48]}]


async def test_models_endpoints() -> None:
    async with (
        running_server(FakeEngine(), model_name="story-1") as (_, port),
        await HTTPClient.connect("127.0.0.1", port) as client,
    ):
        listing = await (await client.request("GET", "/v1/models")).json()
        assert [m["id"] for m in listing["data"]] == ["story-1"]
        assert listing["data"][0]["object"] == "model"
        card = await client.request("GET", "/v1/models/story-1")
        assert card.status == 200 and (await card.json())["max_model_len"] == 64
        missing = await client.request("GET", "/v1/models/gpt-4")
        assert missing.status == 404
        assert (await missing.json())["error"]["code"] == "model_not_found"


async def test_openai_sdk_against_the_fake_engine() -> None:
    async with running_server(FakeEngine(words=(" one", " two")), api_key="k") as (_, port):

        def use_sdk() -> None:
            client = _sdk(port, api_key="k")
            models = client.models.list()
            assert [m.id for m in models.data] == ["tinyllm"]
            done = client.completions.create(model="tinyllm", prompt="hi", max_tokens=3)
            assert done.choices[0].text == " one two one"
            assert done.usage.completion_tokens == 3
            chat = client.chat.completions.create(
                model="tinyllm",
                messages=[{"role": "user", "content": "hi"}],
                max_completion_tokens=2,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"top_k": 3},
            )
            parts, usage = [], None
            for chunk in chat:
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
                if chunk.usage:
                    usage = chunk.usage
            assert "".join(parts) == " one two" and usage.completion_tokens == 2
            with pytest.raises(openai.BadRequestError) as info:
                client.completions.create(model="tinyllm", prompt="hi", n=9)
            assert info.value.body["param"] == "n"
            with pytest.raises(openai.AuthenticationError):
                _sdk(port, api_key="wrong").models.list()

        await trio.to_thread.run_sync(use_sdk)


async def test_n_choices_framing_streaming_and_not() -> None:
    """n=2 on the fake engine: each choice's chunks carry its index, each choice its own
    finish, usage the prompt once and both completions; the plain answer lists both."""
    engine = FakeEngine(words=(" a", " b"))
    async with running_server(engine) as (_, port):
        body = {"prompt": "hi", "max_tokens": 2, "n": 2}
        status, _, plain = await _post_json(port, "/v1/completions", body)
        stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        _, events = await _stream(port, "/v1/completions", stream_body)
        _, chat = await _stream(
            port,
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "hi"}],
                "n": 2,
                "max_tokens": 1,
                "stream": True,
            },
        )
    prompt_tokens = len(engine.tokenizer.encode("hi"))
    assert status == 200 and [c["index"] for c in plain["choices"]] == [0, 1]
    assert [c["text"] for c in plain["choices"]] == [" a b", " a b"]
    assert plain["usage"]["completion_tokens"] == 4
    assert plain["usage"]["prompt_tokens"] == prompt_tokens
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    texts: dict[int, str] = {0: "", 1: ""}
    finishes = []
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"]:
            finishes.append(choice["index"])
    assert texts == {0: " a b", 1: " a b"} and sorted(finishes) == [0, 1]
    roles = [json.loads(e)["choices"][0]["index"] for e in chat[:2]]
    assert roles == [0, 1]  # each choice's role chunk first
    assert chat[-1] == "[DONE]"

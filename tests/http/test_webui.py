"""The playground at / and CORS: HTTP tests on the fake engine, then the page in real Chromium.

The browser tests drive Debian's chromium (`.ci/run` installs it) through Playwright, in a
thread beside the Trio server; the fake engine's slow tokens make growth and Stop observable.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import trio

from http_fixtures import FakeEngine, get, post, raw_request, running_server, split_response
from tinyllm_trio.config import ServerConfig, add_server_arguments

CHROMIUM = "/usr/bin/chromium"
ORIGIN = "http://app.example:3000"


def options(path: str, origin: str, method: str = "POST") -> bytes:
    return (
        f"OPTIONS {path} HTTP/1.1\r\nHost: t\r\nOrigin: {origin}\r\n"
        f"Access-Control-Request-Method: {method}\r\n"
        "Access-Control-Request-Headers: content-type, authorization\r\nConnection: close\r\n\r\n"
    ).encode()


async def test_page_is_served_at_root_without_the_api_key() -> None:
    async with running_server(FakeEngine(), api_key="k") as (_, port):
        status, headers, body = split_response(await raw_request(port, get("/")))
        assert status == 200
        assert headers["content-type"] == "text/html; charset=utf-8"
        for element in ("prompt", "max_tokens", "generate", "stop", "output", "stats"):
            assert f'id="{element}"' in body.decode()
        assert "http://" not in body.decode() and "https://" not in body.decode()  # offline
        status, _, _ = split_response(await raw_request(port, post("/v1/completions", b"{}")))
        assert status == 401


async def test_no_webui_answers_404() -> None:
    async with running_server(FakeEngine(), no_webui=True) as (_, port):
        status, _, _ = split_response(await raw_request(port, get("/")))
        assert status == 404


def test_cors_origins_flag_parses_and_refuses_paths() -> None:
    config = ServerConfig(cors_origins=("HTTP://App.Example:3000/", " https://b.example"))
    assert config.cors_origins == ("http://app.example:3000", "https://b.example")
    assert ServerConfig.from_args(
        argparse.Namespace(), {"TINYLLM_CORS_ORIGINS": "*"}
    ).cors_origins == ("*",)
    with pytest.raises(ValueError, match="not an origin"):
        ServerConfig(cors_origins=("https://a.example/path",))


def test_no_webui_flag_and_its_environment_variable() -> None:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    assert ServerConfig.from_args(parser.parse_args([]), {}).no_webui is False
    assert ServerConfig.from_args(parser.parse_args(["--no-webui"]), {}).no_webui is True
    env = {"TINYLLM_NO_WEBUI": "true"}
    assert ServerConfig.from_args(parser.parse_args([]), env).no_webui is True
    given = parser.parse_args(["--cors-origins", "http://a.example,*"])
    assert ServerConfig.from_args(given, {}).cors_origins == ("http://a.example", "*")


async def test_preflight_and_responses_carry_cors_for_allowed_origins_only() -> None:
    async with running_server(FakeEngine(), cors_origins=(ORIGIN,), api_key="k") as (_, port):
        status, headers, body = split_response(
            await raw_request(port, options("/v1/completions", ORIGIN))
        )
        assert status == 204 and body == b""
        assert "content-length" not in headers
        assert headers["access-control-allow-origin"] == ORIGIN
        assert headers["access-control-allow-methods"] == "POST, OPTIONS"
        assert headers["access-control-allow-headers"] == (
            "Content-Type, Authorization, X-Request-Id"
        )
        assert int(headers["access-control-max-age"]) > 0
        # Another origin: the same 204, but nothing the browser would accept.
        status, headers, _ = split_response(
            await raw_request(port, options("/v1/completions", "http://evil.example"))
        )
        assert status == 204
        assert not [name for name in headers if name.startswith("access-control-")]
        # A streamed response, authorised, carries the origin too; so does a 401.
        body = json.dumps({"prompt": "lily", "max_tokens": 3, "stream": True}).encode()
        extra = f"Origin: {ORIGIN}\r\nAuthorization: Bearer k\r\n"
        raw = await raw_request(port, post("/v1/completions", body, extra=extra))
        status, headers, _ = split_response(raw)
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        assert headers["access-control-allow-origin"] == ORIGIN
        assert "Retry-After" in headers["access-control-expose-headers"]
        raw = await raw_request(port, post("/v1/completions", body, extra=f"Origin: {ORIGIN}\r\n"))
        status, headers, _ = split_response(raw)
        assert status == 401 and headers["access-control-allow-origin"] == ORIGIN
        extra = "Origin: http://evil.example\r\nAuthorization: Bearer k\r\n"
        raw = await raw_request(port, post("/v1/completions", body, extra=extra))
        status, headers, _ = split_response(raw)
        assert status == 200 and "access-control-allow-origin" not in headers
        assert headers["vary"] == "Origin"


async def test_without_cors_options_stays_405_and_no_headers() -> None:
    async with running_server(FakeEngine()) as (_, port):
        status, headers, _ = split_response(
            await raw_request(port, options("/v1/completions", ORIGIN))
        )
        assert status == 405
        assert not [name for name in headers if name.startswith("access-control-")]


# ---- the page in a real browser ------------------------------------------------------------


def _browser(playwright):
    return playwright.chromium.launch(
        executable_path=CHROMIUM,
        args=[
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ],
    )


def _error_after_generate(page) -> str:
    """Generate, wait for the run to end, and return what the error box says."""
    page.click("#generate")
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    page.wait_for_function("!document.getElementById('generate').disabled")
    return page.text_content("#error") or ""


def _drive_page(port: int, screenshot: Path, engine: FakeEngine) -> dict:
    from playwright.sync_api import sync_playwright

    seen: dict = {}
    with sync_playwright() as playwright:
        browser = _browser(playwright)
        try:
            # bypass_csp: the page forbids eval, which wait_for_function needs
            page = browser.new_page(viewport={"width": 1100, "height": 720}, bypass_csp=True)
            page.goto(f"http://127.0.0.1:{port}/")
            page.fill("#api_key", "k")
            page.fill("#prompt", "lily and tom")
            page.fill("#max_tokens", "12")
            page.fill("#seed", "1")
            page.focus("#prompt")
            page.keyboard.press("Control+Enter")  # the keyboard path to Generate
            lengths = []
            page.wait_for_function("document.getElementById('output').textContent.length > 0")
            while True:
                lengths.append(len(page.text_content("#output") or ""))
                if "finish:" in (page.text_content("#stats") or ""):
                    break
                page.wait_for_timeout(30)
            seen["lengths"] = lengths
            seen["output"] = page.text_content("#output")
            seen["stats"] = page.text_content("#stats")
            page.screenshot(path=str(screenshot), full_page=True)

            # Stop during a long generation: the engine must see the cancel.
            page.fill("#max_tokens", "60")
            page.click("#generate")
            page.wait_for_function("document.getElementById('output').textContent.length > 8")
            page.click("#stop")
            page.wait_for_function(
                "document.getElementById('stats').textContent.includes('finish: stopped')"
            )
            seen["stopped_output"] = page.text_content("#output")

            # A bad API key: a visible 401.
            page.fill("#api_key", "wrong")
            page.dispatch_event("#api_key", "change")
            page.click("#generate")
            page.wait_for_function("document.getElementById('error').textContent.length > 0")
            seen["error"] = page.text_content("#error")
            seen["stored_key"] = page.evaluate("localStorage.getItem('tinyllm_api_key')")

            # The other errors the API answers with: 400 with its message, 429 with
            # Retry-After, and an error event inside the stream.
            page.fill("#api_key", "k")
            page.dispatch_event("#api_key", "change")
            page.fill("#max_tokens", "-1")
            seen["bad_request"] = _error_after_generate(page)
            page.fill("#max_tokens", "6")
            engine.overloaded = True  # a plain attribute, read by the next generate
            seen["overloaded"] = _error_after_generate(page)
            engine.overloaded = False
            engine.fail_after = 2
            seen["stream_error"] = _error_after_generate(page)
            engine.fail_after = None

            # Chat mode shows the conversation.
            page.click("#mode-chat")
            page.fill("#max_tokens", "4")
            page.fill("#prompt", "hello there")
            page.click("#generate")
            page.wait_for_function(
                "document.getElementById('stats').textContent.includes('finish:')"
            )
            seen["bubbles"] = page.eval_on_selector_all(
                "#messages .msg", "els => els.map(e => e.className + ':' + e.textContent)"
            )
            page.set_viewport_size({"width": 390, "height": 800})
            seen["phone_overflow"] = page.evaluate(
                "document.documentElement.scrollWidth > window.innerWidth"
            )
        finally:
            browser.close()
    return seen


@pytest.mark.slow
async def test_playground_in_chromium(tmp_path: Path) -> None:
    assert Path(CHROMIUM).exists(), ".ci/run installs Debian's chromium"
    words = (" lily", " ran", " to", " the", " park")
    engine = FakeEngine(words=words, delay=0.05, max_context=128)
    async with running_server(engine, api_key="k") as (_, port):
        shot = tmp_path / "playground.png"
        seen = await trio.to_thread.run_sync(_drive_page, port, shot, engine)
        # The output grew in several steps, and the stats line filled in.
        steps = sorted(set(seen["lengths"]))
        assert len(steps) >= 3, seen["lengths"]
        assert seen["output"].startswith(" lily ran to the park")
        assert re.search(r"TTFT \d+ ms · [\d.]+ tok/s · 12 tokens · finish: length", seen["stats"])
        # Stop cancelled the generation in the engine: running back to 0.
        assert 8 < len(seen["stopped_output"]) < 60 * 4
        with trio.fail_after(5):
            while engine.running:
                await trio.sleep(0.01)
        assert engine.cancelled >= 1
        metrics = (await raw_request(port, get("/metrics"))).decode()
        assert re.search(r"^tinyllm_num_requests_running 0\.0$", metrics, re.M)
        assert shot.stat().st_size > 10_000
        if os.environ.get("TINYLLM_SAVE_SCREENSHOT"):  # how docs/playground.png is made
            shutil.copyfile(shot, os.environ["TINYLLM_SAVE_SCREENSHOT"])
    assert "401" in seen["error"] and "API key" in seen["error"]
    assert seen["stored_key"] == "wrong"
    assert seen["bad_request"].startswith("400: ") and "max_tokens" in seen["bad_request"]
    assert seen["overloaded"].startswith("429: ") and "Retry after 1 s" in seen["overloaded"]
    assert seen["stream_error"].startswith("error during generation: ")
    assert seen["bubbles"][0] == "msg user:userhello there"
    assert seen["bubbles"][1].startswith("msg assistant:assistant lily")
    assert not seen["phone_overflow"]

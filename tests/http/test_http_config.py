"""ServerConfig: flags, environment variables, defaults, validation, and `serve --help`."""

from __future__ import annotations

import argparse

import pytest

from tinyllm_trio.cli import build_parser
from tinyllm_trio.config import ServerConfig, add_server_arguments


def _parse(argv: list[str], env: dict[str, str] | None = None) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    return ServerConfig.from_args(parser.parse_args(argv), env or {})


def test_defaults() -> None:
    config = _parse([])
    assert (config.host, config.port) == ("127.0.0.1", 8080)
    assert config.max_body_size == 1024 * 1024 and config.shutdown_grace == 10.0
    assert config.workers is None and config.model is None and config.api_key is None
    assert config.pin_workers is True
    assert config.weights == "float32"
    assert config.coast is True and config.engine.coast is True
    assert config.busy_tick == config.engine.busy_tick == 0.016


def test_flag_beats_environment_beats_default() -> None:
    env = {"TINYLLM_PORT": "9000", "TINYLLM_HOST": "0.0.0.0", "TINYLLM_API_KEY": "k"}
    config = _parse(["--port", "9100"], env)
    assert (config.port, config.host, config.api_key) == (9100, "0.0.0.0", "k")


def test_environment_parsing() -> None:
    env = {
        "TINYLLM_MAX_BODY_SIZE": "2M",
        "TINYLLM_MAX_HEADER_SIZE": "8k",
        "TINYLLM_WORKERS": "3",
        "TINYLLM_SHUTDOWN_GRACE": "2.5",
        "TINYLLM_ACCESS_LOG": "off",
        "TINYLLM_LOG_FORMAT": "JSON",
        "TINYLLM_MODEL": "/models/x",
        "TINYLLM_PIN_WORKERS": "no",
        "TINYLLM_WEIGHTS": "BFloat16",
    }
    config = _parse([], env)
    assert config.weights == config.engine.weights == "bfloat16"
    assert config.max_body_size == 2 * 1024 * 1024 and config.max_header_size == 8192
    assert (config.workers, config.shutdown_grace, config.access_log) == (3, 2.5, False)
    assert (config.log_format, config.model) == ("json", "/models/x")
    assert config.pin_workers is False


def test_coasting_can_be_turned_off_by_flag_or_environment() -> None:
    assert _parse(["--no-coast"]).engine.coast is False
    assert _parse([], {"TINYLLM_COAST": "false"}).engine.coast is False
    assert _parse(["--coast", "true"], {"TINYLLM_COAST": "false"}).engine.coast is True


def test_the_busy_tick_is_set_by_flag_or_environment_and_bounded() -> None:
    assert _parse(["--busy-tick", "0"]).engine.busy_tick == 0.0
    assert _parse([], {"TINYLLM_BUSY_TICK": "0.05"}).engine.busy_tick == 0.05
    for bad in ("-0.01", "2", "soon"):
        with pytest.raises((SystemExit, ValueError)):
            _parse(["--busy-tick", bad])


@pytest.mark.parametrize(
    "env",
    [
        {"TINYLLM_PORT": "eighty"},
        {"TINYLLM_PORT": "70000"},
        {"TINYLLM_LOG_FORMAT": "xml"},
        {"TINYLLM_MAX_BATCH": "0"},
        {"TINYLLM_ACCESS_LOG": "maybe"},
        {"TINYLLM_HEADER_TIMEOUT": "0"},
        {"TINYLLM_WEIGHTS": "int8"},
    ],
)
def test_invalid_environment_is_a_clear_error(env: dict[str, str]) -> None:
    with pytest.raises(ValueError, match=r"TINYLLM_|must|port"):
        _parse([], env)


def test_help_documents_every_flag_with_its_environment_variable() -> None:
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    text = serve.format_help()
    for name in ServerConfig.__dataclass_fields__:
        flag = "--" + name.replace("_", "-")
        assert flag in text, flag
        assert "TINYLLM_" + name.upper() in text, name

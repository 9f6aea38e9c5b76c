"""`tinyllm-trio generate`: the continuation (not the prompt) streamed to stdout, with the
sampling flags the issue lists, through the console script and `python -m tinyllm_trio` alike;
clear one-line errors (no traceback) for a prompt longer than the context, a directory that is
not a checkpoint and an invalid sampling flag."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinyllm_trio.cli import main
from tinyllm_trio.model.batching import ContinuousBatcher, TokenEvent
from tinyllm_trio.model.checkpoint import load_model
from tinyllm_trio.model.sampling import SamplingParams

PROMPT = "once upon a time"
SAMPLED = ["--temperature", "0.9", "--top-k", "5", "--top-p", "0.9", "--seed", "4"]


def _expected(checkpoint: Path, params: SamplingParams, attention_scale: str | None = None) -> str:
    """The continuation an in-process batcher produces for PROMPT (what the CLI must print)."""
    loaded = load_model(checkpoint, attention_scale=attention_scale)
    batcher = ContinuousBatcher(loaded.transformer, loaded.tokenizer, max_batch=1)
    batcher.submit(0, PROMPT, params)
    text = []
    while not batcher.idle:
        text += [e.text for e in batcher.step() if isinstance(e, TokenEvent)]
    return "".join(text)


@pytest.mark.slow
def test_console_script_and_python_m_stream_the_same_continuation(tiny_checkpoint: Path) -> None:
    args = ["generate", PROMPT, "--max-tokens", "8", *SAMPLED]
    args += ["--model", str(tiny_checkpoint), "--attention-scale", "embd"]
    script = Path(sys.executable).with_name("tinyllm-trio")
    assert script.exists(), "the console script is not installed next to this interpreter"
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    outputs = []
    for cmd in ([str(script), *args], [sys.executable, "-m", "tinyllm_trio", *args]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)
    cli_defaults = {"no_repeat_ngram_size": 3, "detokenize": "text"}  # generate's defaults
    params = SamplingParams(
        max_tokens=8, temperature=0.9, top_k=5, top_p=0.9, seed=4, **cli_defaults
    )
    expected = _expected(tiny_checkpoint, params, attention_scale="embd")
    assert outputs == [expected + "\n"] * 2
    # the flags mattered: greedy decoding (the default) says something else
    greedy = SamplingParams(max_tokens=8, temperature=0.0, **cli_defaults)
    assert expected != _expected(tiny_checkpoint, greedy, attention_scale="embd")
    assert not outputs[0].startswith(PROMPT)  # the continuation, not the prompt


def test_each_token_is_written_and_flushed_before_the_next_step(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log: list[str] = []

    class Stdout:
        def write(self, text: str) -> int:
            log.append("write")
            return len(text)

        def flush(self) -> None:
            log.append("flush")

    real_step = ContinuousBatcher.step

    def step(self):
        log.append("step")
        return real_step(self)

    monkeypatch.setattr(ContinuousBatcher, "step", step)
    monkeypatch.setattr(sys, "stdout", Stdout())
    args = ["generate", PROMPT, "--max-tokens", "6", "--model", str(tiny_checkpoint), *SAMPLED]
    assert main(args) == 0
    steps = [i for i, entry in enumerate(log) if entry == "step"]
    assert len(steps) >= 2
    for before, after in itertools.pairwise(steps):
        # every token of a step is on the terminal before the next step starts
        between = log[before + 1 : after]
        assert between and between == ["write", "flush"] * (len(between) // 2)


@pytest.mark.parametrize(
    ("extra", "status", "message"),
    [
        (["--prompt-is-long"], 2, "this model's context is 64 tokens"),
        (["--top-p", "2"], 2, "invalid --top-p"),
        (["--max-tokens", "0"], 2, "invalid --max-tokens"),
        (["--not-a-checkpoint"], 1, "not a checkpoint"),
    ],
)
def test_errors_are_one_clear_line(
    tiny_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    status: int,
    message: str,
) -> None:
    prompt, model = PROMPT, str(tiny_checkpoint)
    if extra == ["--prompt-is-long"]:
        prompt, extra = "the cat " * 40, []
    elif extra == ["--not-a-checkpoint"]:
        model, extra = str(tmp_path), []
    assert main(["generate", prompt, "--model", model, *extra]) == status
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("tinyllm-trio generate: ") and message in err
    assert err.count("\n") == 1  # one line, no traceback


def test_help_shows_every_default() -> None:
    import argparse
    import re

    from tinyllm_trio.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    generate = sub.choices["generate"].format_help().replace("\n", " ")
    for shown in ("(default: 60)", "(default: 3)", "(default: text)", "sample at 1.0"):
        assert shown in " ".join(generate.split()), shown

    def check(name: str, parser_: argparse.ArgumentParser) -> None:
        for action in parser_._actions:
            if isinstance(action, argparse._SubParsersAction):  # bench model, engine, http
                for sub_name, nested in action.choices.items():
                    check(f"{name} {sub_name}", nested)
            elif action.option_strings and action.nargs != 0 and action.dest != "help":
                shown = (action.help or "").replace("%(default)s", "")
                if action.required:  # a required flag has no default to show
                    assert "default" not in shown, (name, action.dest)
                else:  # shown once, not twice
                    n = len(re.findall(r"\(default|default:", shown))
                    assert n == 1, (name, action.dest, shown)

    for name, parser_ in sub.choices.items():
        check(name, parser_)
    serve = " ".join(sub.choices["serve"].format_help().split())
    assert "/process is greedy (0)" in serve and "sample at 1.0" in serve

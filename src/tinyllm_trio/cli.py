"""The `tinyllm-trio` command line.

Each subcommand's arguments are declared here, and its work lives in the module that owns the
concept (imported lazily, so `tinyllm-trio generate` never imports trio or h11, and `serve`
never imports torch).
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Sequence


def _model_args(p: argparse.ArgumentParser) -> None:
    _declare(p, "tinyllm_trio.config:add_model_arguments")  # as serve declares them


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=60)
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 = greedy; generate and /process are greedy by default, /v1/* and the Engine "
        "sample at 1.0",
    )
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    p.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        default=3,
        help="ban tokens that would repeat an n-gram of prompt + output (0 = off); on by "
        "default here because the packaged model's greedy text loops",
    )
    _detokenize_arg(p)


def _detokenize_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--detokenize",
        choices=["plain", "text"],
        default="text",
        help="text: sentence case, 'I' and English apostrophes; plain: the original's "
        "lowercase form",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinyllm-trio",
        description="TinyLLM inference server on Trio, h11 and numpy.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="stream a continuation of a prompt to stdout")
    p.add_argument("prompt")
    _model_args(p)
    _sampling_args(p)
    p.set_defaults(_run="tinyllm_trio.model.generate:run_cli")

    p = sub.add_parser("bench", help="benchmarks that print a table")
    bench = p.add_subparsers(dest="bench_target", required=True, metavar="TARGET")
    b = bench.add_parser("model", help="prefill and batched decode tokens/s of the numpy model")
    _model_args(b)
    b.add_argument("--runs", type=int, default=5, help="runs per measurement (median reported)")
    b.add_argument(
        "--batches",
        default="1,8,32,64",
        help="comma-separated decode batch sizes (default 1,8,32,64)",
    )
    b.add_argument(
        "--compare-numpy",
        action="store_true",
        help="also time the numpy reference path at the batches the compiled decode step "
        "serves, alternating run by run",
    )
    b.add_argument(
        "--breakdown",
        action="store_true",
        help="instead of rates: the share of a continuous batcher's decode step spent in "
        "BLAS, each kernel, GELU, sampling and Python, at each of --batches (cProfile)",
    )
    b.add_argument("--json", dest="json_path", default=None, help="also write results here")
    b.set_defaults(_run="tinyllm_trio.bench.model:run_cli")
    b = bench.add_parser(
        "engine", help="Engine tokens/s over worker processes vs the bare batcher loop; IPC cost"
    )
    _declare(b, "tinyllm_trio.bench.engine:add_arguments")
    b.set_defaults(_run="tinyllm_trio.bench.engine:run_cli")
    b = bench.add_parser(
        "http",
        help="streaming HTTP load generator (ours, any OpenAI-compatible server, or llama-server)",
    )
    _declare(b, "tinyllm_trio.bench.loadgen:add_arguments")
    b.set_defaults(_run="tinyllm_trio.bench.loadgen:run_cli")
    b = bench.add_parser(
        "gguf", help="write the model as an fp32 GGUF (llama.cpp's gpt2 arch) for llama-server"
    )
    _declare(b, "tinyllm_trio.bench.gguf_export:add_arguments")
    b.set_defaults(_run="tinyllm_trio.bench.gguf_export:run_cli")
    b = bench.add_parser(
        "compare", help="llama-server and tinyllm-trio serve side by side, same load, alternated"
    )
    _declare(b, "tinyllm_trio.bench.compare:add_arguments")
    b.set_defaults(_run="tinyllm_trio.bench.compare:run_cli")

    p = sub.add_parser(
        "serve",
        help="start the HTTP server",
        description="Start the HTTP server. Default temperature by surface: POST /process is "
        "greedy (0), as the original was; /v1/completions and /v1/chat/completions sample at "
        "1.0, as OpenAI's API does.",
    )
    _declare(p, "tinyllm_trio.config:add_server_arguments")  # beside ServerConfig
    p.set_defaults(_run="tinyllm_trio.http.server:run_cli")

    p = sub.add_parser("corpus", help="fetch and split the training corpus from its packages")
    p.add_argument("--out", default="data", help="directory for train.txt / heldout.txt")
    p.set_defaults(_run="tinyllm_trio.training.corpus:run_cli")

    p = sub.add_parser("train", help="train TinyLLM with PyTorch (pip install -e '.[train]')")
    p.set_defaults(_run="tinyllm_trio.training.train:run_cli")
    _declare(p, "tinyllm_trio.training.train:add_arguments")

    p = sub.add_parser("eval", help="held-out loss/perplexity and unigram/bigram baselines")
    _model_args(p)
    p.add_argument("--data", default="data", help="directory holding heldout.txt and train.txt")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(_run="tinyllm_trio.training.evaluate:run_cli")
    _show_defaults(parser)
    return parser


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every command's --help shows each flag's default (serve's flags state theirs, with
    their environment variables, in their own help text, so they are left as written)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _show_defaults(sub)
        elif (
            action.option_strings
            and action.default is not argparse.SUPPRESS
            and action.nargs != 0
            and not action.required
            and not re.search(r"\(default|default:", action.help or "")  # already says it
        ):
            shown = "unset" if action.default is None else "%(default)s"
            action.help = f"{action.help or ''} (default: {shown})".lstrip()


def _declare(p: argparse.ArgumentParser, target: str) -> None:
    """Let the module that owns a command declare its own flags (it knows its defaults)."""
    module_name, func_name = target.split(":")
    getattr(importlib.import_module(module_name), func_name)(p)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, func_name = args._run.split(":")
    run = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `tinyllm-trio generate ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    raise SystemExit(main())

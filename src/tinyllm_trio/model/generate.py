"""`tinyllm-trio generate`: one prompt, streamed to stdout, in this process.

It runs the same `ContinuousBatcher` the workers run (with a batch of one), so what you see
here is what the server produces for the same prompt and sampling parameters.
"""

from __future__ import annotations

import argparse
import sys

from tinyllm_trio.model.batching import ContinuousBatcher, ErrorEvent, TokenEvent
from tinyllm_trio.model.checkpoint import CheckpointError, load_model
from tinyllm_trio.model.sampling import InvalidParameterError, SamplingParams


def run_cli(args: argparse.Namespace) -> int:
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
            stop=tuple(args.stop),
            no_repeat_ngram_size=args.no_repeat_ngram_size,
            detokenize=args.detokenize,
        )
    except InvalidParameterError as exc:
        print(
            f"tinyllm-trio generate: invalid --{exc.param.replace('_', '-')}: {exc}",
            file=sys.stderr,
        )
        return 2
    try:
        loaded = load_model(
            args.model, attention_scale=args.attention_scale, weights_format=args.weights
        )
    except CheckpointError as exc:
        print(f"tinyllm-trio generate: {exc}", file=sys.stderr)
        return 1
    batcher = ContinuousBatcher(loaded.transformer, loaded.tokenizer, max_batch=1)
    try:
        batcher.submit(0, args.prompt, params)
    except ValueError as exc:
        print(f"tinyllm-trio generate: {exc}", file=sys.stderr)
        return 2
    out = sys.stdout
    while not batcher.idle:
        for event in batcher.step():
            if isinstance(event, TokenEvent):
                out.write(event.text)
                out.flush()
            elif isinstance(event, ErrorEvent):
                print(f"\ntinyllm-trio generate: {event.message}", file=sys.stderr)
                return 1
    out.write("\n")
    return 0

"""How long a worker is silent in its longest legitimate steps: the figures behind the default
`--worker-stall-timeout` (README, Configuration). Run: python scripts/step_times.py

One batcher, as a worker runs it (one BLAS thread): a cold, full prefill pass of
PREFILL_TOKENS_PER_PASS tokens, then decode steps at a batch of 32.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import time

from tinyllm_trio.model.batching import PREFILL_TOKENS_PER_PASS, ContinuousBatcher
from tinyllm_trio.model.checkpoint import load_model
from tinyllm_trio.model.sampling import SamplingParams


def main() -> None:
    loaded = load_model(None)
    batcher = ContinuousBatcher(loaded.transformer, loaded.tokenizer, 32)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = PREFILL_TOKENS_PER_PASS // 511
    for i in range(prompts):  # 511-token prompts fill one pass: the longest single step
        batcher.submit(i, [2] + [7] * 510, params)
    t = time.perf_counter()
    batcher.step()
    print(f"cold prefill pass of {prompts * 511} tokens: {time.perf_counter() - t:.3f} s")
    for i in range(prompts, 32):
        batcher.submit(i, [2, 7], params)
    batcher.step()
    steps = []
    for _ in range(5):
        t = time.perf_counter()
        batcher.step()
        steps.append(time.perf_counter() - t)
    print("decode steps at batch 32: " + ", ".join(f"{s * 1000:.1f} ms" for s in steps))


if __name__ == "__main__":
    main()

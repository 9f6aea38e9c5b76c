"""Shared fixtures: leak checks that run after every test, and a small random checkpoint;
and the `slow` tier.

The tests live by area (model/, ipc/, http/, integration/, bench/; test_layers.py guards the
imports). `pytest -m "not slow"` is the edit-test loop: it leaves out what starts real worker
processes, servers, proxies or browsers (the integration/ and bench/ areas, the worker pool,
fault and Engine tests, training, and single tests marked `@pytest.mark.slow`).

Every test must leave no shared-memory segment or semaphore of this process in /dev/shm and no
worker subprocess alive: the autouse `_no_ipc_leaks` fixture asserts both, so a cleanup bug in
any module shows up in whichever test triggered it. Only this process's names are checked
(the pid is part of every name), so test runs of other checkouts on the same machine do not
interfere.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tinyllm_trio.ipc.ring import shm_entries

STORY = (
    "once upon a time there was a little cat. the cat liked to play in the sun, "
    "and the dog liked to run! one day the cat and the dog went to the park together. "
    "they saw a big tree; it was very tall. 'look,' said the cat, 'a bird!' "
    "the bird sang a happy song and the children laughed. lily and tom were friends. "
)


def _worker_children() -> list[int]:
    """Pids of live (non-zombie) worker processes whose parent is this test process."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, ppid = fields[0], int(fields[1])
        if ppid == me and state != "Z" and b"tinyllm_trio.ipc.worker" in cmdline:
            found.append(int(entry))
    return found


SLOW_AREAS = frozenset({"integration", "bench"})
SLOW_MODULES = frozenset(
    {"test_worker_pool", "test_ipc_faults", "test_engine", "test_training", "test_http_fuzz"}
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.parent.name in SLOW_AREAS or item.path.stem in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _no_ipc_leaks() -> Iterator[None]:
    yield
    deadline = time.monotonic() + 2.0  # a worker being killed may need a moment to be reaped
    while _worker_children() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _worker_children() == [], "worker processes outlived the test"
    assert shm_entries(os.getpid()) == [], "shared memory / semaphores left in /dev/shm"


def save_random_checkpoint(path: Path, *, seed: int, **dims: int) -> Path:
    """A random model (weights std 0.2, float32) over a vocabulary built from STORY, saved in
    our format at `path`; `dims` are ModelConfig fields (default: TinyLLM's real shapes)."""
    from tinyllm_trio.model.checkpoint import save_checkpoint
    from tinyllm_trio.model.tokenizer import build_vocab
    from tinyllm_trio.model.transformer import ModelConfig, Transformer

    tokenizer = build_vocab([STORY], n_words=60, n_chars=30)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, **dims)
    model = Transformer.random(config, seed=seed, std=0.2)
    save_checkpoint(path, model, tokenizer, dtype="float32")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random model saved in our checkpoint format (fast to load and to run)."""
    return save_random_checkpoint(
        tmp_path_factory.mktemp("tiny-model"),
        seed=7,
        n_embd=32,
        n_head=2,
        n_layer=2,
        max_context=64,
    )


@pytest.fixture(scope="session")
def long_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model with a 512-token context whose generations last long enough (hundreds of ms)
    that a cancel or a SIGKILL reliably lands while they are still running: 500 tokens take
    ~0.34 s on the compiled batch-1 step (at 8 layers, since the tiled weight products, 0.21 s;
    at 128 wide, ~0.08 s: too short to catch)."""
    return save_random_checkpoint(
        tmp_path_factory.mktemp("long-model"),
        seed=11,
        n_embd=192,
        n_head=4,
        n_layer=12,
        max_context=512,
    )

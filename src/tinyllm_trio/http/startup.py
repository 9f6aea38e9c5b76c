"""The server's start-up summary: one log line that says what is serving, where, and how.

Kept apart from `http/server.py`'s run loop so the loop calls it with one line: a new user (and
an operator reading a fleet's logs) sees the version, the model, the workers and their cores,
the batch and queue limits and the URL without reading the flags back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tinyllm_trio.config import ServerConfig
from tinyllm_trio.version import __version__

if TYPE_CHECKING:
    from tinyllm_trio.engine import Engine


def ready_line(config: ServerConfig, engine: Engine, model_name: str, port: int) -> str:
    """``tinyllm-trio 0.1.0 ready, listening on URL: model NAME (PATH), N workers ...``."""
    host = f"[{config.host}]" if ":" in config.host else config.host
    url = f"http://{host}:{port}"
    stats = engine.stats()
    workers: list[dict[str, object]] = stats.get("workers", [])  # type: ignore[assignment]
    cpus = [w.get("cpu") for w in workers]
    if cpus and all(c is not None for c in cpus):
        cores = "pinned to cores " + ",".join(str(c) for c in cpus)
    else:
        cores = "not pinned"
    return (
        f"tinyllm-trio {__version__} ready, listening on {url}: model {model_name} "
        f"({engine.model_path or 'packaged default'}), "
        f"{len(workers)} worker(s) {cores}, max batch {stats.get('max_batch')} per worker, "
        f"queue {stats.get('max_queue')}, detokenize {config.detokenize}, "
        f"/process no_repeat_ngram_size {config.no_repeat_ngram_size}"
    )

"""BLAS pinned to one thread per process, in one place for everything that needs it.

The server runs one worker process per core; a worker whose BLAS started its own thread pool
would fight its neighbours for the cores. OpenBLAS (and OpenMP / MKL builds) read these
variables once, when numpy is first imported, so they must be in a process's environment before
that: the pool starts workers with them, a worker sets them before importing numpy, and the
benchmarks re-run themselves in a child process with them. This module imports nothing but
`os`, so importing it never imports numpy. (`threadpoolctl` could do it in-process, but it is
not a dependency.)
"""

from __future__ import annotations

import os

BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
SINGLE_THREAD_ENV = dict.fromkeys(BLAS_THREAD_VARS, "1")


def blas_pinned() -> bool:
    """Whether this process's environment already asks every BLAS for one thread."""
    return all(os.environ.get(var) == "1" for var in BLAS_THREAD_VARS)


def single_threaded_env() -> dict[str, str]:
    """This process's environment with every BLAS pinned to one thread (for a child process)."""
    return {**os.environ, **SINGLE_THREAD_ENV}

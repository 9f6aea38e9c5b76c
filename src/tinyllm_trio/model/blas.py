"""How BLAS is set up in every process that runs the model, in one place.

Two settings, both read by OpenBLAS once, when numpy is first imported, so they must be in a
process's environment before that: the pool starts workers with them, a worker sets them before
importing numpy, and the benchmarks re-run themselves in a child process with them. This module
imports nothing but `os`, so importing it never imports numpy. (`threadpoolctl` could set the
thread count in-process, but it is not a dependency, and it cannot change the kernels.)

- One thread. The server runs one worker process per core; a worker whose BLAS started its own
  thread pool would fight its neighbours for the cores.
- The kernel set, on AMD Zen 4 only. OpenBLAS (0.3.x, as numpy's wheels ship it) sees AVX-512
  there and runs its Intel SkylakeX kernels; for this model's decode shapes (a few to 64 rows
  times 192 to 3266 columns) its Zen kernels, which use AVX2, are faster on Zen 4 (the README
  has the `tinyllm-trio bench model` numbers and how to compare). Elsewhere OpenBLAS's own
  choice stands, and an ``OPENBLAS_CORETYPE`` already in the environment always wins.
"""

from __future__ import annotations

import os

BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
SINGLE_THREAD_ENV = dict.fromkeys(BLAS_THREAD_VARS, "1")
CORETYPE_VAR = "OPENBLAS_CORETYPE"
ZEN4_FAMILY = 0x19  # AMD family 19h: Zen 3 (no AVX-512) and Zen 4 (AVX-512)


def preferred_coretype(cpuinfo: str | None = None) -> str | None:
    """The OpenBLAS kernel set to ask for on this CPU, or None for OpenBLAS's own choice.

    `cpuinfo` is the text of /proc/cpuinfo (read when None; no file means no opinion).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read(64 * 1024)  # the first CPU's fields are enough
        except OSError:
            return None
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # end of the first processor's block
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    try:
        family = int(fields.get("cpu family", ""))
    except ValueError:
        return None
    amd = fields.get("vendor_id") == "AuthenticAMD"
    if amd and family == ZEN4_FAMILY and "avx512f" in fields.get("flags", "").split():
        return "Zen"
    return None


def blas_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables a model process needs set: one thread, and the kernel set if we pick one
    (an ``OPENBLAS_CORETYPE`` already in `environ`, default os.environ, is kept)."""
    environ = os.environ if environ is None else environ
    env = dict(SINGLE_THREAD_ENV)
    coretype = environ.get(CORETYPE_VAR) or preferred_coretype()
    if coretype:
        env[CORETYPE_VAR] = coretype
    return env


def blas_pinned() -> bool:
    """Whether this process's environment already holds every setting of `blas_env`."""
    return all(os.environ.get(var) == value for var, value in blas_env().items())


def single_threaded_env() -> dict[str, str]:
    """This process's environment plus `blas_env` (for a child process that runs the model)."""
    return {**os.environ, **blas_env()}

"""Which OpenBLAS kernel set a model process asks for, and that the user's choice wins."""

from __future__ import annotations

import pytest

from tinyllm_trio.model import blas


def _cpuinfo(vendor: str, family: int, flags: str) -> str:
    first = f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nflags\t\t: {flags}\n"
    # a second processor block with other values must not be read
    return first + "\nprocessor\t: 1\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nflags\t\t: fpu\n"


@pytest.mark.parametrize(
    ("vendor", "family", "flags", "expected"),
    [
        ("AuthenticAMD", 25, "fpu avx2 fma avx512f avx512bw", "Zen"),  # Zen 4
        ("AuthenticAMD", 25, "fpu avx2 fma", None),  # Zen 3: OpenBLAS already picks Zen
        ("AuthenticAMD", 26, "fpu avx2 avx512f", None),  # Zen 5: full-width AVX-512, unmeasured
        ("GenuineIntel", 6, "fpu avx2 avx512f", None),  # Intel AVX-512: its own kernels
        ("AuthenticAMD", 23, "fpu avx2", None),  # Zen 1/2
    ],
)
def test_zen4_alone_gets_the_zen_kernels(vendor, family, flags, expected) -> None:
    assert blas.preferred_coretype(_cpuinfo(vendor, family, flags)) == expected


def test_unreadable_cpuinfo_means_openblas_decides() -> None:
    assert blas.preferred_coretype("") is None
    assert blas.preferred_coretype("cpu family\t: zen\nvendor_id\t: AuthenticAMD\n") is None


def test_blas_env_pins_one_thread_and_keeps_a_user_coretype(monkeypatch) -> None:
    monkeypatch.setattr(blas, "preferred_coretype", lambda cpuinfo=None: "Zen")
    env = blas.blas_env({})
    assert env == {**blas.SINGLE_THREAD_ENV, "OPENBLAS_CORETYPE": "Zen"}
    assert blas.blas_env({"OPENBLAS_CORETYPE": "SkylakeX"})["OPENBLAS_CORETYPE"] == "SkylakeX"
    monkeypatch.setattr(blas, "preferred_coretype", lambda cpuinfo=None: None)
    assert blas.blas_env({}) == blas.SINGLE_THREAD_ENV


def test_child_environment_carries_the_settings(monkeypatch) -> None:
    monkeypatch.setattr(blas, "preferred_coretype", lambda cpuinfo=None: "Zen")
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
    env = blas.single_threaded_env()
    assert env["OPENBLAS_NUM_THREADS"] == "1" and env["OPENBLAS_CORETYPE"] == "Zen"
    assert not blas.blas_pinned()  # this process still has 4 threads: benchmarks re-exec

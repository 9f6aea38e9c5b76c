"""A CLOCK_MONOTONIC timerfd: a wake-up at a chosen microsecond that Trio's epoll loop can wait on.

Trio's own timeouts reach epoll in whole milliseconds (CPython rounds a poll timeout up to the
next one), too coarse to aim at a decode step that takes a fraction of a millisecond. A timerfd
becomes readable at its deadline to the nanosecond, and `trio.lowlevel.wait_readable` waits on
it like on any fd. Python 3.11 has no ``os.timerfd_create`` (3.13 does), so this calls libc
through ctypes; `TimerFd.open` returns None where libc has no timerfd (not Linux), and the
caller does without.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import Self

CLOCK_MONOTONIC = 1  # the clock of time.monotonic_ns on Linux
TFD_TIMER_ABSTIME = 1
_NS = 1_000_000_000


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_LibcFunction = Callable[..., int]


def _libc_functions() -> tuple[_LibcFunction, _LibcFunction] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime
    except (OSError, AttributeError):
        return None
    create.argtypes = [ctypes.c_int, ctypes.c_int]
    create.restype = ctypes.c_int
    settime.argtypes = [
        ctypes.c_int,
        ctypes.c_int,
        ctypes.POINTER(_Itimerspec),
        ctypes.POINTER(_Itimerspec),
    ]
    settime.restype = ctypes.c_int
    return create, settime


_FUNCTIONS = _libc_functions()


class TimerFd:
    """One non-blocking, close-on-exec timerfd on the monotonic clock."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._spec = _Itimerspec()  # no interval; reused by every `arm_at`, no allocation each
        self._spec_ref = ctypes.byref(self._spec)

    @classmethod
    def open(cls) -> Self | None:
        """A new timer, or None where this platform has none."""
        if _FUNCTIONS is None:
            return None
        create, _ = _FUNCTIONS
        fd = create(CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)  # TFD_NONBLOCK | TFD_CLOEXEC
        if fd < 0:
            return None
        return cls(fd)

    def fileno(self) -> int:
        return self._fd

    def arm_at(self, deadline_ns: int) -> None:
        """Become readable once, at `deadline_ns` on time.monotonic_ns's clock (at once if it
        passed); a later `arm_at` replaces the deadline."""
        spec = self._spec
        spec.it_value.tv_sec, spec.it_value.tv_nsec = divmod(max(deadline_ns, 1), _NS)  # 0: off
        self._settime()

    def _settime(self) -> None:
        assert _FUNCTIONS is not None  # `open` made this timer
        if _FUNCTIONS[1](self._fd, TFD_TIMER_ABSTIME, self._spec_ref, None) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))

    def clear(self) -> int:
        """Consume the expiries so far (their number), so the fd is not readable until the next."""
        try:
            return int.from_bytes(os.read(self._fd, 8), "little")
        except BlockingIOError:
            return 0

    def close(self) -> None:
        os.close(self._fd)

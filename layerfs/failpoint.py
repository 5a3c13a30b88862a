"""Crash-injection points for the kill -9 tests.

``hit(name)`` marks a point in a multi-step store change where a crash must be survivable
(or, in a reader, where another process may change the store). It costs one dict lookup
unless the environment or a test asks for something:

- ``LAYERFS_FAILPOINT_TRACE=FILE`` appends every point reached to FILE (one name a line);
- ``LAYERFS_FAILPOINT_KILL=N`` sends SIGKILL to this process at the N-th point reached
  (1-based), i.e. a real ``kill -9`` at a precise step, with nothing flushed or cleaned up;
- ``LAYERFS_FAILPOINT_SIGNAL=SIGTERM`` (or another name) sends that signal there instead,
  to test that a polite stop (``timeout``, a service manager) cleans up like Ctrl-C;
- ``LAYERFS_FAILPOINT_ERROR=NAME:ERRNO[:N]`` (ERRNO a name or a number) makes ``fault(NAME)``
  raise ``OSError(ERRNO)`` the N-th time (default: every time) it is reached: fault
  injection at the store's syscall boundary (``store.write``, ``store.fsync``,
  ``store.rename``: EIO, ENOSPC), just before the real call;
- ``on(name, fn)`` (in-process tests) runs ``fn()`` when ``name`` is reached, e.g. another
  process' rmi between two reads of a reader.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import os
import signal
from collections.abc import Callable, Iterator

_count = 0
_trace = os.environ.get("LAYERFS_FAILPOINT_TRACE")
_kill_at = int(os.environ.get("LAYERFS_FAILPOINT_KILL", "0") or 0)
_signal = signal.Signals[os.environ.get("LAYERFS_FAILPOINT_SIGNAL", "SIGKILL")]
_hooks: dict[str, Callable[[], None]] = {}


def _parse_error(spec: str) -> tuple[str, int, int] | None:
    if not spec:
        return None
    name, _, rest = spec.partition(":")
    code, _, nth = rest.partition(":")
    number = int(code) if code.isdigit() else int(getattr(_errno, code, _errno.EIO))
    return name, number, int(nth or 0)


_error = _parse_error(os.environ.get("LAYERFS_FAILPOINT_ERROR", ""))
_error_hits = 0


def fault(name: str, path: str | None = None) -> None:
    """A syscall of the store's (``store.write``, ``store.fsync``, ``store.rename``) is
    about to run on ``path``: raise the error ``LAYERFS_FAILPOINT_ERROR`` asks for there.
    Not a crash point (not counted by ``LAYERFS_FAILPOINT_KILL``, not traced)."""
    global _error_hits
    if _error is not None and _error[0] == name:
        _error_hits += 1
        if not _error[2] or _error_hits == _error[2]:
            raise OSError(_error[1], os.strerror(_error[1]), path)


def hit(name: str) -> None:
    """Crash point ``name`` is reached."""
    global _count
    if _hooks:
        fn = _hooks.get(name)
        if fn is not None:
            fn()
    if not (_trace or _kill_at):
        return
    _count += 1
    if _trace:
        with open(_trace, "a") as f:
            f.write(f"{name}\n")
    if _kill_at and _count == _kill_at:
        os.kill(os.getpid(), _signal)


@contextlib.contextmanager
def on(name: str, fn: Callable[[], None]) -> Iterator[None]:
    """Run ``fn()`` whenever point ``name`` is reached, inside the block (tests only)."""
    _hooks[name] = fn
    try:
        yield
    finally:
        _hooks.pop(name, None)

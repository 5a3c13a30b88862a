"""Crash-injection points for the kill -9 tests.

``hit(name)`` marks a point in a multi-step store change where a crash must be survivable.
It costs one dict lookup unless the environment asks for something:

- ``LAYERFS_FAILPOINT_TRACE=FILE`` appends every point reached to FILE (one name a line);
- ``LAYERFS_FAILPOINT_KILL=N`` sends SIGKILL to this process at the N-th point reached
  (1-based), i.e. a real ``kill -9`` at a precise step, with nothing flushed or cleaned up;
- ``LAYERFS_FAILPOINT_SIGNAL=SIGTERM`` (or another name) sends that signal there instead,
  to test that a polite stop (``timeout``, a service manager) cleans up like Ctrl-C.
"""

from __future__ import annotations

import os
import signal

_count = 0
_trace = os.environ.get("LAYERFS_FAILPOINT_TRACE")
_kill_at = int(os.environ.get("LAYERFS_FAILPOINT_KILL", "0") or 0)
_signal = signal.Signals[os.environ.get("LAYERFS_FAILPOINT_SIGNAL", "SIGKILL")]


def hit(name: str) -> None:
    global _count
    if not (_trace or _kill_at):
        return
    _count += 1
    if _trace:
        with open(_trace, "a") as f:
            f.write(f"{name}\n")
    if _kill_at and _count == _kill_at:
        os.kill(os.getpid(), _signal)

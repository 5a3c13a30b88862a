"""Timing one sample: named metrics, wall time by ``perf_counter_ns``, daemon CPU alongside.

A workload's measure function gets a ``Meter`` and times each operation in a ``with
meter.time(metric):`` block, around the operation only (set-up, syncs that are not part of
the metric, and checks stay outside). For a FUSE backend the meter also reads the daemon's
CPU seconds (utime + stime) before and after, so the report can show where a slow number
comes from (the daemon working, or the kernel waiting on it).

Values are seconds: for a ``per_op`` metric, the block's time divided by its ``ops`` (the
same for its CPU seconds), so the CPU column reads in the same unit as the time column.

Besides times, a sample records what it cost in memory and disk: ``peak_rss(pids)`` is the
peak resident set (``VmHWM`` of ``/proc/PID/status``) of the daemon(s) and every process
below them, summed (an upper bound of their joint peak), read at the end of the sample; the
runner adds the upper layer's allocated bytes and inodes after the unmount (``upper``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from bench.machine import process_cpu
from layerfs.linux.proc import stat_fields


def _descendants(pids: Sequence[int]) -> list[int]:
    """``pids`` and every live process below them (by parent pid, ``/proc/PID/stat`` field 4)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields is not None and len(fields) > 1:
                children.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.append(pid)
            todo += children.get(pid, [])
    return out


def _vm_hwm(pid: int) -> int | None:
    """Peak resident set size of ``pid`` in bytes (``VmHWM``), None without such a process."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None  # a kernel thread or a zombie has no memory of its own


def peak_rss(pids: Sequence[int]) -> int | None:
    """The summed peak RSS of ``pids`` and their descendants, None if none of them has one."""
    if not pids:
        return None
    readings = [r for r in (_vm_hwm(p) for p in _descendants(pids)) if r is not None]
    return sum(readings) if readings else None


@dataclass(frozen=True)
class Metric:
    """One number a workload reports per sample.

    ``group`` and ``x`` place it on a plot (a series and its x value: "append +sync" at
    1 GiB, "first stat" at 64 layers); ``per_op`` marks a latency averaged over ``ops``.
    """

    name: str
    group: str | None = None
    x: float | None = None
    per_op: bool = False

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "group": self.group, "x": self.x, "per_op": self.per_op}


@dataclass
class Timing:
    """What a ``with meter.time(...)`` block measured (readable after the block)."""

    seconds: float = 0.0
    cpu: float | None = None


@dataclass
class Meter:
    """Collects one sample's metrics; ``pids`` are the FUSE daemon(s) of the mount, if any."""

    pids: Sequence[int] = ()
    values: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Metric] = field(default_factory=dict)
    rss_bytes: int | None = None  # the daemons' peak RSS over the sample
    upper: dict[str, int] | None = None  # allocated_bytes, inodes: what the sample left in the upper

    def daemon_cpu(self) -> float | None:
        if not self.pids:
            return None
        readings = [process_cpu(p) for p in self.pids]
        return sum(r for r in readings if r is not None)

    @contextmanager
    def time(self, metric: Metric | None, ops: int = 1) -> Iterator[Timing]:
        """Time the block as ``metric`` (per op if ``metric.per_op``); yields its ``Timing``.

        With ``metric`` None nothing is recorded: the ``Timing`` is for the caller to combine
        (a create and the sync after it, recorded as one metric).
        """
        timing = Timing()
        cpu0 = self.daemon_cpu()
        start = time.perf_counter_ns()
        yield timing
        elapsed = (time.perf_counter_ns() - start) / 1e9
        cpu1 = self.daemon_cpu()
        timing.seconds = elapsed
        timing.cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
        if metric is not None:
            divisor = ops if metric.per_op else 1
            self.record(metric, elapsed / divisor, None if timing.cpu is None else timing.cpu / divisor)

    def record(self, metric: Metric, seconds: float, cpu: float | None = None) -> None:
        """Record a value measured elsewhere (a mount time, a sum of two timed blocks)."""
        self.metrics[metric.name] = metric
        self.values[metric.name] = seconds
        if cpu is not None:
            self.cpu[metric.name] = cpu

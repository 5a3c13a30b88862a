"""Running workloads on backends: interleaved rounds, fresh mounts, cleanup whatever happens.

Order: for each workload, for each of its cases, ``rounds`` times: every backend once
(round 1: native, kernel, kernel-plain, layerfs-fuse, fuse-overlayfs, unionfs-fuse; later
rounds in a seeded shuffle of that order), so a noisy moment hurts all alike and no backend
always runs right after the same one (the store and pull workloads: ``store_rounds`` times,
1 with --quick). Every sample gets a fresh scratch directory (upper,
work, mount point), a fresh mount, ``sync`` before it, ``drop_caches`` after mounting when
the case is cold, and an unmount (daemon stopped), the scratch removed and ``sync`` after
it; after a write case's sample the runner also waits for the disk to go idle (at most 20 s, 0.25 s
with --quick). Each sample also records the daemons' peak RSS and, after the unmount, the
upper layer's allocated bytes and inodes (for native, what a write case added to the tree).

Failures are data, not crashes: a backend that cannot run here is *skipped* (with the
reason, for all cases), a case it cannot take (too many layers) is skipped for it, and a
sample that raises marks that case *failed* for that backend (its later rounds are not
tried). KeyboardInterrupt (Ctrl-C, or SIGTERM turned into one by the CLI) is never caught:
it unwinds through the ``finally`` blocks that unmount and stop daemons.

Scratch layout under the run's work dir::

    data/<workload>/...      layer data and native trees, written once (``prepare``)
    run/<n>/{upper,work,mnt} one sample's writable layer and mount point
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TypeVar

from bench.backends import PAIRS, Backend, MountFailed, Stack, sweep
from bench.datagen import write_small
from bench.machine import drop_caches, is_root, settle_disk
from bench.measure import Meter, Metric, peak_rss
from bench.storeops import StoreOps
from bench.workloads import Case, MountWorkload
from layerfs.store.core import disk_usage

Log = Callable[[str], None]
Workload = MountWorkload | StoreOps


@dataclass
class Status:
    state: str  # "ok", "skipped" or "failed"
    reason: str = ""


@dataclass
class WorkloadResult:
    """Everything one workload produced: its metrics, raw samples and per-case status."""

    name: str
    title: str
    kind: str  # "mount" or "store"
    subjects: list[str]
    reference: str
    pairs: dict[str, str]
    description: str = ""
    metrics: dict[str, Metric] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    status: dict[str, dict[str, Status]] = field(default_factory=dict)  # case -> subject -> status
    prepare_seconds: float = 0.0
    seconds: float = 0.0  # the whole workload, data writing included
    error: str | None = None  # the workload could not be prepared
    facts: dict[str, Any] = field(default_factory=dict)  # what a store workload measured besides times

    def values(self, metric: str, subject: str) -> list[float]:
        return [s["values"][metric] for s in self.samples if s["subject"] == subject and metric in s["values"]]

    def cpu(self, metric: str, subject: str) -> list[float]:
        return [s["cpu"][metric] for s in self.samples if s["subject"] == subject and metric in s["cpu"]]

    def set_status(self, case: str, subject: str, state: str, reason: str = "") -> None:
        self.status.setdefault(case, {})[subject] = Status(state, reason)

    def failed(self, case: str, subject: str) -> bool:
        return self.status.get(case, {}).get(subject, Status("ok")).state != "ok"

    def add(self, case: str, subject: str, round_: int, meter: Meter) -> None:
        for name, metric in meter.metrics.items():
            self.metrics.setdefault(name, metric)
        sample: dict[str, Any] = {"case": case, "subject": subject, "round": round_,
                                  "values": dict(meter.values), "cpu": dict(meter.cpu)}
        if meter.rss_bytes is not None:
            sample["rss_bytes"] = meter.rss_bytes
        if meter.upper is not None:
            sample["upper"] = dict(meter.upper)
        self.samples.append(sample)
        self.status.setdefault(case, {}).setdefault(subject, Status("ok"))

    def not_measured(self) -> list[tuple[str, str, Status]]:
        """(case, subject, status) for every case a subject was skipped in or failed."""
        return [(c, s, st) for c, by in self.status.items() for s, st in by.items() if st.state != "ok"]


class SampleTimeout(Exception):
    """A sample took longer than the runner allows (a hung daemon, most likely)."""


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise ``SampleTimeout`` in the main thread after ``seconds`` (SIGALRM)."""

    def fire(signum: int, frame: FrameType | None) -> None:
        raise SampleTimeout(f"sample took more than {seconds:.0f}s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


T = TypeVar("T")


def round_order(items: Sequence[T], round_: int) -> list[T]:
    """The order of round ``round_``: every item once; the first round as given, later rounds
    shuffled (seeded by the round, so reproducible). A fixed or merely rotated order keeps
    the same neighbours: a backend that always follows a quick one (native) would always run
    while the disk still works off the cleanup of the heavy one before that."""
    order = list(items)
    if round_:
        random.Random(round_).shuffle(order)
    return order


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}" if not isinstance(e, MountFailed) else str(e)
    return text if len(text) < 400 else text[:400] + "..."


def _fmt(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f}s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f}ms"
    return f"{seconds * 1e6:.1f}µs"


class Runner:
    """Runs workloads inside one work directory; ``rounds`` samples per case and subject."""

    def __init__(self, workdir: str, rounds: int, log: Log, *, sample_timeout: float,
                 settle_timeout: float = 20.0, prepare_settle_timeout: float = 60.0,
                 store_rounds: int | None = None) -> None:
        self.workdir = workdir
        # how long to wait for an idle disk after a write sample and after writing layer data
        # (--quick waits briefly: on a disk other work keeps busy, waiting is most of the run)
        self.settle_timeout = settle_timeout
        self.prepare_settle_timeout = prepare_settle_timeout
        self.rounds = rounds
        self.store_rounds = rounds if store_rounds is None else store_rounds  # store and pull samples
        self.log = log
        self.sample_timeout = sample_timeout
        self.data = os.path.join(workdir, "data")
        self.scratch_root = os.path.join(workdir, "run")
        os.makedirs(self.data, exist_ok=True)
        os.makedirs(self.scratch_root, exist_ok=True)
        self._n = 0
        self.cold_is_cold = is_root()

    def _scratch(self) -> str:
        self._n += 1
        path = os.path.join(self.scratch_root, str(self._n))
        os.makedirs(path)
        return path

    def _remove_scratch(self, path: str, settle: bool = False) -> None:
        # never delete through a mount that is still there (it could be a view of the layers)
        if sweep(path):
            self.log(f"warning: had to clean up mounts or daemons under {path}")
        shutil.rmtree(path, ignore_errors=True)
        # the freeing (and, with -o discard, the trimming) of a big upper happens now, in
        # the untimed gap, not inside the next backend's sample
        os.sync()
        if settle:
            settle_disk(self.scratch_root, timeout=self.settle_timeout)

    # --- backends -----------------------------------------------------------------------

    def check_backends(self, backends: Sequence[Backend]) -> dict[str, str]:
        """Why each unusable backend cannot run here: its own check, then a trial mount."""
        reasons: dict[str, str] = {}
        probe_dir = os.path.join(self.data, "probe")
        lowers = [os.path.join(probe_dir, "l1"), os.path.join(probe_dir, "l0")]
        for layer in lowers:
            os.makedirs(layer, exist_ok=True)
            write_small(os.path.join(layer, os.path.basename(layer)))
        stack = Stack(tuple(lowers), probe_dir)
        for backend in backends:
            reason = backend.unavailable()
            if reason is None and backend.name != "native":
                reason = self._trial(backend, stack)
            if reason is not None:
                reasons[backend.name] = reason
                self.log(f"backend {backend.name}: skipped: {reason}")
        return reasons

    def _trial(self, backend: Backend, stack: Stack) -> str | None:
        scratch = self._scratch()
        upper, work, target = (os.path.join(scratch, d) for d in ("upper", "work", "mnt"))
        for d in (upper, work, target):
            os.makedirs(d)
        try:
            with _deadline(60):
                mounted = backend.mount(stack, upper, work, target)
                try:
                    if sorted(os.listdir(target)) != ["l0", "l1"]:
                        return f"trial mount shows {sorted(os.listdir(target))}, expected ['l0', 'l1']"
                    write_small(os.path.join(target, "l0"), b"written\n")
                finally:
                    backend.unmount(mounted)
        except Exception as e:
            return f"trial mount failed: {_short(e)}"
        finally:
            self._remove_scratch(scratch)
        return None

    # --- mount workloads -------------------------------------------------------------------

    def run_mount(self, workload: MountWorkload, backends: Sequence[Backend],
                  unavailable: dict[str, str]) -> WorkloadResult:
        result = WorkloadResult(workload.name, workload.title, "mount", [b.name for b in backends], "native",
                                {k: v for k, v in PAIRS.items()})
        result.description = workload.describe()
        data = os.path.join(self.data, workload.name)
        os.makedirs(data)
        self.log(f"[{workload.name}] writing layer data ...")
        start = time.monotonic()
        cases = workload.prepare(data, self.log)
        os.sync()
        settle_disk(data, quiet=0.5, timeout=self.prepare_settle_timeout)  # the data's writeback is not the first sample's
        result.prepare_seconds = time.monotonic() - start
        self.log(f"[{workload.name}] layer data ready in {result.prepare_seconds:.1f}s")
        for case in cases:
            active: list[Backend] = []
            for b in backends:
                reason = unavailable.get(b.name) or b.too_deep(case.layers)
                if reason:
                    result.set_status(case.name, b.name, "skipped", reason)
                else:
                    active.append(b)
            for r in range(self.rounds):
                for b in round_order(active, r):
                    if result.failed(case.name, b.name):
                        continue
                    try:
                        meter = self._mount_sample(case, b)
                    except Exception as e:  # recorded; Ctrl-C (not an Exception) unwinds
                        result.set_status(case.name, b.name, "failed", _short(e))
                        self.log(f"[{workload.name}] {case.name} {r + 1}/{self.rounds} {b.name}: FAILED: {_short(e)}")
                        continue
                    result.add(case.name, b.name, r, meter)
                    shown = ", ".join(f"{k} {_fmt(v)}" for k, v in list(meter.values.items())[:3])
                    self.log(f"[{workload.name}] {case.name} {r + 1}/{self.rounds} {b.name}: {shown}")
        return result

    def _mount_sample(self, case: Case, backend: Backend) -> Meter:
        scratch = self._scratch()
        upper, work, target = (os.path.join(scratch, d) for d in ("upper", "work", "mnt"))
        for d in (upper, work, target):
            os.makedirs(d)
        mounted = None
        native = backend.name == "native"
        try:
            with _deadline(self.sample_timeout):
                mounted = backend.mount(case.stack, upper, work, target)
                meter = Meter(pids=mounted.pids)
                if case.mount_metric is not None and mounted.mount_seconds is not None:
                    meter.record(case.mount_metric, mounted.mount_seconds)
                before = disk_usage(case.stack.native) if native and case.writes else None
                os.sync()
                if case.cold and self.cold_is_cold:
                    drop_caches()
                case.measure(mounted.root, meter)
                meter.rss_bytes = peak_rss(meter.pids)
                if before is not None:  # native has no upper: what the workload added to the tree
                    after = disk_usage(case.stack.native)
                    meter.upper = {"allocated_bytes": after[0] - before[0], "inodes": after[1] - before[1]}
            try:
                backend.unmount(mounted)
            finally:
                mounted = None
            if not native:  # after the unmount: a daemon has written everything it will
                allocated, inodes = disk_usage(upper)
                meter.upper = {"allocated_bytes": allocated, "inodes": inodes}
            return meter
        finally:
            try:
                if mounted is not None:
                    backend.unmount(mounted)
            finally:
                if backend.name == "native" and case.reset_native is not None:
                    case.reset_native(case.stack.native)
                self._remove_scratch(scratch, settle=case.writes)

    # --- store workload --------------------------------------------------------------------

    def run_store(self, workload: StoreOps) -> WorkloadResult:
        result = WorkloadResult(workload.name, workload.title, "store", list(workload.subjects),
                                workload.reference, {})
        data = os.path.join(self.data, workload.name)
        os.makedirs(data)
        self.log(f"[{workload.name}] building the image ...")
        start = time.monotonic()
        workload.prepare(data, self.log)
        result.prepare_seconds = time.monotonic() - start
        result.description = workload.describe()
        self.log(f"[{workload.name}] image ready in {result.prepare_seconds:.1f}s: {result.description}")
        active = []
        for subject in workload.subjects:
            reason = workload.unavailable(subject)
            if reason:
                result.set_status(workload.name, subject, "skipped", reason)
            else:
                active.append(subject)
        rounds = self.store_rounds
        for r in range(rounds):
            for subject in round_order(active, r):
                if result.failed(workload.name, subject):
                    continue
                scratch = self._scratch()
                meter = Meter()
                try:
                    with _deadline(self.sample_timeout * 3):
                        workload.sample(subject, scratch, meter)
                except Exception as e:  # recorded; Ctrl-C (not an Exception) unwinds
                    result.set_status(workload.name, subject, "failed", _short(e))
                    self.log(f"[{workload.name}] {r + 1}/{rounds} {subject}: FAILED: {_short(e)}")
                    continue
                finally:
                    self._remove_scratch(scratch, settle=True)
                result.add(workload.name, subject, r, meter)
                shown = ", ".join(f"{k} {_fmt(v)}" for k, v in meter.values.items())
                self.log(f"[{workload.name}] {r + 1}/{rounds} {subject}: {shown}")
        facts = getattr(workload, "facts", None)  # e.g. bytes moved (pull); described again with them
        if facts is not None:
            result.facts = facts()
            result.description = workload.describe()
        return result

    def run(self, workload: Workload, backends: Sequence[Backend], unavailable: dict[str, str]) -> WorkloadResult:
        """Run one workload; a workload that cannot even be prepared comes back with ``error``."""
        start = time.monotonic()
        try:
            if isinstance(workload, StoreOps):
                result = self.run_store(workload)
            else:
                result = self.run_mount(workload, backends, unavailable)
            result.seconds = time.monotonic() - start
            self.log(f"[{workload.name}] done in {result.seconds:.1f}s")
            return result
        except Exception as e:
            self.log(f"[{workload.name}] FAILED to prepare: {_short(e)}")
            subjects = list(workload.subjects) if isinstance(workload, StoreOps) else [b.name for b in backends]
            result = WorkloadResult(workload.name, workload.title,
                                    "store" if isinstance(workload, StoreOps) else "mount", subjects,
                                    workload.reference if isinstance(workload, StoreOps) else "native", {})
            result.error = _short(e)
            return result
        finally:
            shutil.rmtree(os.path.join(self.data, workload.name), ignore_errors=True)

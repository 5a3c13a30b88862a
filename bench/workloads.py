"""The mounted-filesystem workloads: layer data they build, and what they time on a mount.

A workload builds its layer data once per run (``prepare``) and returns ``Case``s. A case is
one fresh mount per sample (per backend, per round) of one ``Stack``; its ``measure`` times
one or more metrics on the mounted root. ``cold`` cases run after ``drop_caches`` on the
fresh mount, so their first metric is cold and a second run of the same operation is warm.
For ``native`` the same measure runs on the plain merged directory, and ``reset_native``
undoes what a write workload changed there (untimed), so every sample starts alike.

| workload | what is timed (full size; ``--quick`` shrinks every count) |
|---|---|
| read | sequential read of a 1 GiB file in the bottom of 3 layers, cold then warm; 4 KiB random preads, warm |
| metadata | ``find -printf`` (an lstat per entry) and ``ls -lR`` over 50k files in 5k dirs spread over 4 layers; listing a 10k-entry dir merged from 2 layers; each cold then warm |
| copyup | first append (4 KiB) to, and chmod of, bottom-layer files of 4 KiB, 1 MiB, 100 MiB, 1 GiB; each as the op alone, op + fsync of the file, op + sync |
| depth | first stat and first open of bottom-layer files under 1, 16, 64, 128, 500, 1000 layers (averaged over 100 files), warm stat, mount time |
| writes | create 10k files of 100 bytes, then sync; create one file in each of 1000 directories that live in lower layers, then sync |
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from bench.backends import Stack
from bench.datagen import SMALL, tree, write_file, write_small
from bench.measure import Meter, Metric, Timing
from layerfs.text import human_size

Log = Callable[[str], None]


@dataclass
class Case:
    """One mount per sample of ``stack``, timed by ``measure(root, meter)``."""

    name: str
    stack: Stack
    measure: Callable[[str, Meter], None]
    cold: bool = False
    mount_metric: Metric | None = None  # record the mount time under this metric
    reset_native: Callable[[str], None] | None = None
    writes: bool = False  # leaves big uppers behind: let the disk settle after each sample

    @property
    def layers(self) -> int:
        return len(self.stack.lowers)


class MountWorkload(ABC):
    """A workload run on every mount backend."""

    name: ClassVar[str]
    title: ClassVar[str]

    def __init__(self, quick: bool) -> None:
        self.quick = quick

    @abstractmethod
    def describe(self) -> str:
        """The sizes this run uses, for the report."""

    @abstractmethod
    def prepare(self, data: str, log: Log) -> list[Case]:
        """Write the layer data under ``data`` (an empty directory) and return the cases."""


def _layers(data: str, count: int) -> list[str]:
    """``count`` empty layer directories ``data/l0`` (bottom) ... and their list, top first."""
    dirs = [os.path.join(data, f"l{i}") for i in range(count)]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    return dirs[::-1]


def _read_all(path: str) -> int:
    buf = bytearray(1 << 20)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total


def _record_sum(meter: Meter, metric: Metric, *parts: Timing) -> None:
    cpus = [p.cpu for p in parts if p.cpu is not None]
    meter.record(metric, sum(p.seconds for p in parts), sum(cpus) if cpus else None)


def _check(what: str, got: int, want: int) -> None:
    """A backend that shows a different tree than native is wrong, not fast: fail the sample."""
    if got != want:
        raise RuntimeError(f"{what}: saw {got}, expected {want}")


# --- read ------------------------------------------------------------------------------


class Read(MountWorkload):
    name = "read"
    title = "large sequential read (cold, warm) and 4 KiB random reads of a bottom-layer file"

    def __init__(self, quick: bool) -> None:
        super().__init__(quick)
        self.size = (32 << 20) if quick else (1 << 30)
        self.random_reads = 2000 if quick else 20000

    def describe(self) -> str:
        return (f"one {human_size(self.size, binary=True)} file in the bottom of 3 layers; sequential read with 1 MiB "
                f"reads, cold (after drop_caches on a fresh mount) then warm; {self.random_reads} random "
                "4 KiB preads, warm")

    def prepare(self, data: str, log: Log) -> list[Case]:
        lowers = _layers(data, 3)
        write_file(os.path.join(lowers[-1], "big.bin"), self.size, seed=1)
        for i, layer in enumerate(lowers[:-1]):
            write_small(os.path.join(layer, f"small{i}"))
        native = os.path.join(data, "native")
        write_file(os.path.join(native, "big.bin"), self.size, seed=1)
        rng = random.Random(6)
        offsets = [rng.randrange(self.size // 4096) * 4096 for _ in range(self.random_reads)]

        def measure(root: str, meter: Meter) -> None:
            path = os.path.join(root, "big.bin")
            with meter.time(Metric("seq read cold")):
                got = _read_all(path)
            _check("bytes read", got, self.size)
            with meter.time(Metric("seq read warm")):
                _read_all(path)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                with meter.time(Metric("4KiB random read warm", per_op=True), ops=len(offsets)):
                    for off in offsets:
                        os.pread(fd, 4096, off)
            finally:
                os.close(fd)

        return [Case("read", Stack(tuple(lowers), native), measure, cold=True)]


# --- metadata --------------------------------------------------------------------------


class Metadata(MountWorkload):
    name = "metadata"
    title = "find/stat and ls -lR of a tree spread over layers, readdir of a big directory"

    LAYERS = 4

    def __init__(self, quick: bool) -> None:
        super().__init__(quick)
        self.top, self.sub, self.files = (4, 10, 8) if quick else (50, 100, 10)
        self.big = 500 if quick else 10000

    @property
    def n_dirs(self) -> int:
        return self.top * self.sub

    def describe(self) -> str:
        n_files = self.n_dirs * self.files
        return (f"{n_files} files in {self.n_dirs + self.top} dirs over {self.LAYERS} layers (every leaf dir "
                f"in 2 layers); `find -printf '%s %m'` (an lstat per entry) and `ls -lR` as subprocesses; "
                f"os.listdir of a {self.big}-entry dir merged from 2 layers; each cold, then warm")

    def prepare(self, data: str, log: Log) -> list[Case]:
        lowers = _layers(os.path.join(data, "tree"), self.LAYERS)
        bottom_first = lowers[::-1]
        native = os.path.join(data, "tree-native")
        entries = 1  # find prints the root too
        for t in range(self.top):
            for s in range(self.sub):
                i = t * self.sub + s
                rel = os.path.join(f"t{t:03}", f"s{s:03}")
                half = self.files // 2
                for k, layer in enumerate((bottom_first[i % self.LAYERS], bottom_first[(i + 1) % self.LAYERS])):
                    names = range(half) if k == 0 else range(half, self.files)
                    tree(os.path.join(layer, rel), [], [f"f{j}" for j in names])
                tree(os.path.join(native, rel), [], [f"f{j}" for j in range(self.files)])
                entries += 1 + self.files
            entries += 1
        big_lowers = _layers(os.path.join(data, "big"), 2)
        big_native = os.path.join(data, "big-native")
        for k, layer in enumerate(big_lowers):
            tree(os.path.join(layer, "big"), [], [f"e{j:05}" for j in range(k, self.big, 2)])
        tree(os.path.join(big_native, "big"), [], [f"e{j:05}" for j in range(self.big)])
        stack = Stack(tuple(lowers), native)

        def walk(metric: str) -> Callable[[str, Meter], None]:
            def measure(root: str, meter: Meter) -> None:
                for temp in ("cold", "warm"):
                    if metric == "find":
                        with meter.time(Metric(f"find {temp}")):
                            out = subprocess.run(["find", root, "-printf", "%s %m\n"], check=True,
                                                 stdout=subprocess.PIPE).stdout
                        _check("find entries", out.count(b"\n"), entries)
                    else:
                        with meter.time(Metric(f"ls -lR {temp}")):
                            subprocess.run(["ls", "-lR", root], check=True, stdout=subprocess.DEVNULL)
            return measure

        def readdir(root: str, meter: Meter) -> None:
            path = os.path.join(root, "big")
            for temp in ("cold", "warm"):
                with meter.time(Metric(f"readdir {temp}")):
                    names = os.listdir(path)
                _check("directory entries", len(names), self.big)

        return [
            Case("find", stack, walk("find"), cold=True),
            Case("ls -lR", stack, walk("ls"), cold=True),
            Case("readdir", Stack(tuple(big_lowers), big_native), readdir, cold=True),
        ]


# --- copy-up ---------------------------------------------------------------------------

SYNC_MODES = ("", " +fsync", " +sync")


class CopyUp(MountWorkload):
    name = "copyup"
    title = "copy-up latency: first append to, and chmod of, a lower file, by size"

    def __init__(self, quick: bool) -> None:
        super().__init__(quick)
        self.sizes = [4 << 10, 1 << 20, 4 << 20] if quick else [4 << 10, 1 << 20, 100 << 20, 1 << 30]

    def describe(self) -> str:
        sizes = ", ".join(human_size(s, binary=True) for s in self.sizes)
        return (f"files of {sizes} in the bottom of 2 layers, one per (op, size, sync mode), page cache warm; "
                "`append` = open O_APPEND + write 4 KiB + close, `chmod` = chmod 0600; alone, "
                "`+fsync` (fsync of the file) and `+sync` (sync(2)); everything synced before each op")

    @staticmethod
    def file_name(op: str, mode: str, size: int) -> str:
        return f"cu/{op}{mode.replace(' +', '-')}-{size}"

    def prepare(self, data: str, log: Log) -> list[Case]:
        lowers = _layers(data, 2)
        native = os.path.join(data, "native")
        files = [(op, mode, size) for op in ("append", "chmod") for mode in SYNC_MODES for size in self.sizes]
        for n, (op, mode, size) in enumerate(files):
            name = self.file_name(op, mode, size)
            for root in (lowers[-1], native):
                write_file(os.path.join(root, name), size, seed=n)
        write_small(os.path.join(lowers[0], "cu-top-layer"))
        os.makedirs(os.path.join(lowers[0], "cu"), exist_ok=True)

        def measure(root: str, meter: Meter) -> None:
            payload = SMALL * 41  # 4100 bytes
            for op, mode, size in files:
                path = os.path.join(root, self.file_name(op, mode, size))
                os.sync()  # nothing dirty from the previous op may slow this one
                metric = Metric(f"{op} {human_size(size, binary=True)}{mode}", group=f"{op}{mode}", x=size)
                with meter.time(metric):
                    if op == "append":
                        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                        os.write(fd, payload)
                    else:
                        os.chmod(path, 0o600)
                        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC) if mode == " +fsync" else -1
                    if mode == " +fsync":
                        os.fsync(fd)
                    if fd >= 0:
                        os.close(fd)
                    if mode == " +sync":
                        os.sync()

        def reset(root: str) -> None:
            for op, mode, size in files:
                path = os.path.join(root, self.file_name(op, mode, size))
                os.truncate(path, size)
                os.chmod(path, 0o644)

        return [Case("copy-up", Stack(tuple(lowers), native), measure, reset_native=reset, writes=True)]


# --- layer depth -----------------------------------------------------------------------


class Depth(MountWorkload):
    name = "depth"
    title = "layer depth: first lookup of a bottom-layer file, and mount time, by number of layers"

    def __init__(self, quick: bool) -> None:
        super().__init__(quick)
        self.depths = [1, 64] if quick else [1, 16, 64, 128, 500, 1000]
        self.files = 20 if quick else 100

    def describe(self) -> str:
        return (f"{', '.join(map(str, self.depths))} layers, each with a file in d/; {self.files} files in d/ of "
                "the bottom layer: first stat and first open+close of each on a fresh mount (per file), "
                "then 10 warm stats of each; mount time (until the mount is live)")

    def prepare(self, data: str, log: Log) -> list[Case]:
        deepest = max(self.depths)
        layers = [os.path.join(data, "layers", str(k)) for k in range(deepest)]  # bottom first
        for k, layer in enumerate(layers):
            tree(layer, ["d"], [f"d/k{k}"])
        native = os.path.join(data, "native")
        names = [f"s{i}" for i in range(self.files)] + [f"o{i}" for i in range(self.files)]
        for root in (layers[0], native):
            tree(root, ["d"], [f"d/{n}" for n in names])

        def measure_for(depth: int) -> Callable[[str, Meter], None]:
            label = f"{depth} layer" + ("s" if depth != 1 else "")

            def measure(root: str, meter: Meter) -> None:
                d = os.path.join(root, "d")
                stats = [os.path.join(d, f"s{i}") for i in range(self.files)]
                opens = [os.path.join(d, f"o{i}") for i in range(self.files)]
                with meter.time(Metric(f"first stat, {label}", "first stat", depth, True), ops=len(stats)):
                    for p in stats:
                        os.stat(p)
                with meter.time(Metric(f"first open, {label}", "first open", depth, True), ops=len(opens)):
                    for p in opens:
                        os.close(os.open(p, os.O_RDONLY | os.O_CLOEXEC))
                with meter.time(Metric(f"warm stat, {label}", "warm stat", depth, True),
                                ops=10 * len(stats)):
                    for _ in range(10):
                        for p in stats:
                            os.stat(p)
            return measure

        return [
            Case(f"{depth} layers", Stack(tuple(layers[:depth][::-1]), native), measure_for(depth),
                 mount_metric=Metric(f"mount, {depth} layer" + ("s" if depth != 1 else ""), "mount", depth))
            for depth in self.depths
        ]


# --- small writes ----------------------------------------------------------------------


class Writes(MountWorkload):
    name = "writes"
    title = "small writes: create many files, then sync; create inside lower-layer directories"

    def __init__(self, quick: bool) -> None:
        super().__init__(quick)
        self.creates = 200 if quick else 10000
        self.lower_dirs = 50 if quick else 1000

    def describe(self) -> str:
        return (f"create {self.creates} files of 100 bytes (open O_CREAT|O_EXCL, write, close) in a new dir, then "
                f"sync(2); create one such file in each of {self.lower_dirs} dirs that live in the 2 lower "
                "layers (a directory copy-up each), then sync(2)")

    def prepare(self, data: str, log: Log) -> list[Case]:
        lowers = _layers(data, 2)
        native = os.path.join(data, "native")
        dirs = [f"lower/d{i:04}" for i in range(self.lower_dirs)]
        for i, d in enumerate(dirs):
            tree(lowers[i % 2], [d], [f"{d}/existing"])
            tree(native, [d], [f"{d}/existing"])

        def create(paths: list[str]) -> None:
            for p in paths:
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                os.write(fd, SMALL)
                os.close(fd)

        def measure(root: str, meter: Meter) -> None:
            os.mkdir(os.path.join(root, "new"))
            os.sync()
            paths = [os.path.join(root, "new", f"f{i:05}") for i in range(self.creates)]
            with meter.time(Metric("create files")) as made:
                create(paths)
            with meter.time(None) as synced:
                os.sync()
            _record_sum(meter, Metric("create files + sync"), made, synced)
            _check("files created", len(os.listdir(os.path.join(root, "new"))), self.creates)
            in_lower = [os.path.join(root, d, "created") for d in dirs]
            with meter.time(Metric("create in lower dirs")) as made:
                create(in_lower)
            with meter.time(None) as synced:
                os.sync()
            _record_sum(meter, Metric("create in lower dirs + sync"), made, synced)

        def reset(root: str) -> None:
            shutil.rmtree(os.path.join(root, "new"), ignore_errors=True)
            for d in dirs:
                try:
                    os.unlink(os.path.join(root, d, "created"))
                except FileNotFoundError:
                    pass

        return [Case("writes", Stack(tuple(lowers), native), measure, reset_native=reset, writes=True)]


ALL: tuple[type[MountWorkload], ...] = (Read, Metadata, CopyUp, Depth, Writes)

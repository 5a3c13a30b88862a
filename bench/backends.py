"""The union implementations under test, each able to show a ``Stack`` at a mount point.

Every backend mounts the same layer data writable (a fresh upper and work dir per sample),
the way a container's root filesystem is mounted:

- ``native``: no union at all, the merged tree as a plain directory (the physical limit);
- ``kernel``: layerfs' kernel backend, ``layerfs.mount.kernel.mount(MountSpec.overlay(...))``
  with the options layerfs mounts containers with;
- ``kernel-plain``: the same overlay mounted by ``/bin/mount -t overlay`` with the same
  options (relative layer paths from their common parent when absolute ones would not fit in
  one page, as containerd does): the reference for "within 5% of plain kernel overlayfs";
- ``layerfs-fuse`` (layerfs-fuse on pyfuse3), ``layerfs-kernel`` (layerfs-fuse on its own
  kernel-protocol transport) and its lever variants ``layerfs-kernel-nodircache``,
  ``layerfs-kernel-nopassthrough``, ``layerfs-kernel-nosplice`` and
  ``layerfs-kernel-writeback``, ``fuse-overlayfs``, ``unionfs-fuse``: FUSE programs that return once the
  mount is live and keep serving from a daemon. The daemon's PID is found from its command
  line (it names the mount point) so that its CPU time can be read and it can be stopped.

Lifecycle: ``mount`` returns a ``Mounted``; ``unmount`` undoes it and, for FUSE, waits for
the daemon to exit (SIGTERM, then SIGKILL, by PID, if it does not). ``sweep(workdir)`` is
the safety net run in ``finally``: it unmounts everything below the work dir and stops every
process whose command line names a path inside it (only this run's daemons can).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from bench.machine import is_root, processes_mentioning
from layerfs.linux.proc import command_line, pid_alive
from layerfs.mount.spec import MountSpec, escape_path

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
KERNEL_MAX_LAYERS = 500  # overlayfs' OVL_MAX_STACK
MOUNT_TIMEOUT = 300.0
DAEMON_EXIT_TIMEOUT = 10.0


def container_options() -> tuple[str, ...]:
    """The overlay options layerfs mounts writable containers with (both kernel backends use them)."""
    import layerfs.mount.spec
    import layerfs.mounting

    for module, name in ((layerfs.mount.spec, "WRITABLE_OVERLAY_OPTIONS"), (layerfs.mounting, "CONTAINER_OPTIONS")):
        options = getattr(module, name, None)
        if options is not None:
            return tuple(options)
    return ("redirect_dir=on", "index=off")


@dataclass(frozen=True)
class Stack:
    """One set of layer data: the layer directories (top first) and the same merged tree as a
    plain directory (what ``native`` measures)."""

    lowers: tuple[str, ...]
    native: str


@dataclass
class Mounted:
    """A live mount (or, for ``native``, the plain directory)."""

    backend: str
    root: str
    target: str | None = None
    pids: list[int] = field(default_factory=list)
    mount_seconds: float | None = None

    @property
    def pid(self) -> int | None:
        return self.pids[0] if self.pids else None


class MountFailed(Exception):
    """A backend could not mount; the message says why (the program's own words if it gave any)."""


class Backend(ABC):
    """One way of showing a ``Stack`` as a single tree."""

    name: ClassVar[str]
    fuse: ClassVar[bool] = False
    max_layers: ClassVar[int | None] = None

    def unavailable(self) -> str | None:
        """Why this backend cannot run here, or None."""
        return None

    def too_deep(self, layers: int) -> str | None:
        if self.max_layers is not None and layers > self.max_layers:
            return f"{layers} layers exceed the limit of {self.max_layers}"
        return None

    @abstractmethod
    def mount(self, stack: Stack, upper: str, work: str, target: str) -> Mounted:
        """Show ``stack`` writable (into ``upper``) at ``target``; time the mount itself."""

    @abstractmethod
    def unmount(self, mounted: Mounted) -> None:
        """Undo ``mount``; a FUSE daemon is gone when this returns."""


class Native(Backend):
    name = "native"

    def mount(self, stack: Stack, upper: str, work: str, target: str) -> Mounted:
        return Mounted(self.name, stack.native)

    def unmount(self, mounted: Mounted) -> None:
        pass


def _kernel_unmount(target: str) -> None:
    from layerfs.errors import InUse
    from layerfs.mount import kernel

    for _ in range(20):
        try:
            kernel.unmount(target)
            return
        except InUse:
            time.sleep(0.05)
    kernel.unmount(target, detach=True)


class Kernel(Backend):
    name = "kernel"
    max_layers = KERNEL_MAX_LAYERS

    def unavailable(self) -> str | None:
        if not is_root():
            return "mounting overlayfs needs root"
        from layerfs.mount.probe import probe

        info = probe()
        if not info.overlay_available:
            return f"kernel overlayfs is not available: {info.why.get('overlay_available', '')}"
        return None

    def mount(self, stack: Stack, upper: str, work: str, target: str) -> Mounted:
        from layerfs.errors import LayerfsError
        from layerfs.mount import kernel

        spec = MountSpec.overlay(list(stack.lowers), upper, work, extra=container_options())
        start = time.perf_counter_ns()
        try:
            kernel.mount(spec, target)
        except LayerfsError as e:
            raise MountFailed(str(e)) from e
        elapsed = (time.perf_counter_ns() - start) / 1e9
        return Mounted(self.name, target, target, [], elapsed)

    def unmount(self, mounted: Mounted) -> None:
        assert mounted.target is not None
        _kernel_unmount(mounted.target)


class KernelPlain(Backend):
    name = "kernel-plain"
    max_layers = KERNEL_MAX_LAYERS

    def unavailable(self) -> str | None:
        if not is_root():
            return "mounting overlayfs needs root"
        if shutil.which("mount") is None:
            return "mount(8) is not installed"
        return Kernel().unavailable()

    @staticmethod
    def options(stack: Stack, upper: str, work: str) -> tuple[str, str | None]:
        """The ``-o`` string and the directory to run mount(8) in (for relative layer paths)."""
        extra = ",".join(container_options())

        def data(lowers: Sequence[str]) -> str:
            return (f"lowerdir={':'.join(escape_path(p) for p in lowers)},upperdir={escape_path(upper)},"
                    f"workdir={escape_path(work)},{extra}")

        absolute = data(stack.lowers)
        if len(absolute.encode()) < PAGE_SIZE:
            return absolute, None
        base = os.path.commonpath(stack.lowers)
        return data([os.path.relpath(p, base) for p in stack.lowers]), base

    def mount(self, stack: Stack, upper: str, work: str, target: str) -> Mounted:
        options, cwd = self.options(stack, upper, work)
        start = time.perf_counter_ns()
        proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, target], cwd=cwd,
                              capture_output=True, text=True, timeout=MOUNT_TIMEOUT)
        elapsed = (time.perf_counter_ns() - start) / 1e9
        if proc.returncode != 0:
            raise MountFailed(f"mount -t overlay failed ({proc.returncode}): {proc.stderr.strip()}")
        return Mounted(self.name, target, target, [], elapsed)

    def unmount(self, mounted: Mounted) -> None:
        assert mounted.target is not None
        _kernel_unmount(mounted.target)


class FuseProgram(Backend):
    """A FUSE union run as a program that returns once the mount is live."""

    fuse = True
    program: ClassVar[str]

    @abstractmethod
    def command(self, stack: Stack, upper: str, work: str, target: str) -> list[str]:
        """The command line that mounts ``stack`` at ``target``."""

    def unavailable(self) -> str | None:
        if shutil.which(self.program) is None:
            return f"{self.program} is not installed"
        if not os.path.exists("/dev/fuse"):
            return "/dev/fuse is missing"
        if shutil.which("fusermount3") is None:
            return "fusermount3 is not installed"
        return None

    def mount(self, stack: Stack, upper: str, work: str, target: str) -> Mounted:
        cmd = self.command(stack, upper, work, target)
        start = time.perf_counter_ns()
        # a new session: a Ctrl-C on the terminal reaches this process, not the daemon, so
        # the daemon keeps serving until the cleanup unmounts it in order
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=MOUNT_TIMEOUT, start_new_session=True)
        elapsed = (time.perf_counter_ns() - start) / 1e9
        pids = [p for p in processes_mentioning(target) if _has_arg(p, target)]
        mounted = Mounted(self.name, target, target, pids, elapsed)
        if proc.returncode != 0 or not os.path.ismount(target):
            if os.path.ismount(target):
                self.unmount(mounted)
            else:
                _stop(pids)
            words = (proc.stderr or proc.stdout).strip().splitlines()
            raise MountFailed(f"{self.program} exited {proc.returncode}"
                              + (f": {' / '.join(words[-3:])}" if words else "")
                              + ("" if proc.returncode else " without mounting"))
        return mounted

    def unmount(self, mounted: Mounted) -> None:
        assert mounted.target is not None
        fuse_unmount(mounted.target)
        _stop(mounted.pids)


def _has_arg(pid: int, arg: str) -> bool:
    argv = command_line(pid)
    return argv is not None and arg.encode() in argv


def fuse_unmount(target: str) -> None:
    """``fusermount3 -u``, retried while busy; lazily (``-uz``) as the last resort."""
    for _ in range(20):
        if not os.path.ismount(target):
            return
        proc = subprocess.run(["fusermount3", "-u", target], capture_output=True, text=True)
        if proc.returncode == 0:
            return
        time.sleep(0.05)
    subprocess.run(["fusermount3", "-uz", target], capture_output=True)
    if os.path.ismount(target):
        _kernel_unmount(target)


def _stop(pids: Sequence[int], grace: float = DAEMON_EXIT_TIMEOUT) -> None:
    """Wait up to ``grace`` seconds for processes to exit on their own (daemons after their
    unmount); then SIGTERM, then SIGKILL the ones that do not."""
    deadline = time.monotonic() + grace
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            for pid in pids:
                if pid_alive(pid):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + 5.0
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.01)
        if not any(pid_alive(p) for p in pids):
            return


class LayerfsFuse(FuseProgram):
    """layerfs-fuse on its pyfuse3 (libfuse) transport."""

    name = "layerfs-fuse"
    program = "layerfs-fuse"
    options: ClassVar[tuple[str, ...]] = ("--transport", "pyfuse3")

    def unavailable(self) -> str | None:
        if not os.path.exists("/dev/fuse"):
            return "/dev/fuse is missing"
        if shutil.which("fusermount3") is None:
            return "fusermount3 is not installed"
        return None

    def command(self, stack: Stack, upper: str, work: str, target: str) -> list[str]:
        lowers = ":".join(escape_path(p) for p in stack.lowers)
        opts = f"lowerdir={lowers},upperdir={escape_path(upper)},workdir={escape_path(work)}"
        return [sys.executable, "-m", "layerfs.fuse.main", *self.options, "-o", opts, target]


class LayerfsKernel(LayerfsFuse):
    """layerfs-fuse on its own kernel-protocol transport, every lever on (readdir cache,
    passthrough when root)."""

    name = "layerfs-kernel"
    options = ("--transport", "kernel")


class LayerfsKernelNoDirCache(LayerfsFuse):
    """The kernel transport without the kernel's readdir cache (the lever, measured)."""

    name = "layerfs-kernel-nodircache"
    options = ("--transport", "kernel", "--dir-cache", "off")


class LayerfsKernelNoPassthrough(LayerfsFuse):
    """The kernel transport without passthrough (every read and write through the daemon)."""

    name = "layerfs-kernel-nopassthrough"
    options = ("--transport", "kernel", "--passthrough", "off")


class LayerfsKernelNoSplice(LayerfsFuse):
    """The kernel transport answering READ from a buffer (preadv + writev) instead of splice."""

    name = "layerfs-kernel-nosplice"
    options = ("--transport", "kernel", "--splice", "off")


class LayerfsKernelWriteback(LayerfsFuse):
    """The kernel transport with the kernel's writeback cache (off by default: it excludes
    passthrough, and creates cost more requests, not fewer)."""

    name = "layerfs-kernel-writeback"
    options = ("--transport", "kernel", "--writeback", "on")


class FuseOverlayfs(FuseProgram):
    name = "fuse-overlayfs"
    program = "fuse-overlayfs"

    def command(self, stack: Stack, upper: str, work: str, target: str) -> list[str]:
        lowers = ":".join(escape_path(p) for p in stack.lowers)
        opts = f"lowerdir={lowers},upperdir={escape_path(upper)},workdir={escape_path(work)}"
        return [self.program, "-o", opts, target]


class UnionfsFuse(FuseProgram):
    name = "unionfs-fuse"
    program = "unionfs-fuse"

    def command(self, stack: Stack, upper: str, work: str, target: str) -> list[str]:
        branches = ":".join([f"{upper}=RW", *(f"{p}=RO" for p in stack.lowers)])
        return [self.program, "-o", "cow,allow_other,use_ino,suid,dev", branches, target]


ALL: tuple[type[Backend], ...] = (Native, Kernel, KernelPlain, LayerfsFuse, LayerfsKernel, LayerfsKernelNoDirCache,
                                  LayerfsKernelNoPassthrough, LayerfsKernelNoSplice, LayerfsKernelWriteback,
                                  FuseOverlayfs, UnionfsFuse)
NAMES = tuple(b.name for b in ALL)
LAYERFS_FUSE = tuple(b.name for b in ALL if issubclass(b, LayerfsFuse))
# the lever variants of the kernel transport: full runs measure them, --quick leaves them out
LEVERS = (LayerfsKernelNoDirCache.name, LayerfsKernelNoPassthrough.name, LayerfsKernelNoSplice.name,
          LayerfsKernelWriteback.name)
# --quick also leaves out unionfs-fuse (a peer no target is stated against) and kernel-plain (only
# the "kernel within 5% of mount(8)" check needs it): under a minute, with every workload
QUICK_NAMES = tuple(n for n in NAMES if n not in (*LEVERS, UnionfsFuse.name, KernelPlain.name))
# comparisons printed beside the ratio to native: (backend, its reference)
PAIRS = {**{name: "fuse-overlayfs" for name in LAYERFS_FUSE}, "kernel": "kernel-plain"}


def by_name(names: Sequence[str]) -> list[Backend]:
    """Backends in the canonical order (native first), for the given names."""
    wanted = set(names)
    return [cls() for cls in ALL if cls.name in wanted]


def sweep(workdir: str) -> list[str]:
    """Unmount everything at or below ``workdir`` and stop every process naming a path in it.

    Returns a line per thing it had to clean up (empty when everything was already tidy).
    """
    from layerfs.mount import kernel

    done: list[str] = []
    real = os.path.realpath(workdir)
    for point in reversed(kernel.mounts_under(real)):
        try:
            if _is_fuse(point):
                subprocess.run(["fusermount3", "-uz", point], capture_output=True)
            if os.path.ismount(point):
                kernel.unmount(point, detach=True)
            done.append(f"unmounted {point}")
        except Exception as e:  # keep sweeping; report it
            done.append(f"could not unmount {point}: {e}")
    pids = processes_mentioning(real)
    if pids:
        _stop(pids, grace=0)
        done.append("stopped processes " + ", ".join(map(str, pids)))
    return done


def _is_fuse(point: str) -> bool:
    from layerfs.linux.mountinfo import mount_table

    return any(e.mount_point == point and e.fs_type.startswith("fuse") for e in mount_table())

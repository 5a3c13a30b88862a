"""The three ways to run a union: kernel overlayfs, the ``layerfs-fuse`` program, the model.

Each ``Backend`` mounts ``MountParams`` (lowers top first, optional upper/work, a target
directory) and hands back a ``Mounted`` whose ``facade`` the cases drive. A backend
remembers everything it has live; ``close()`` (called from the pytest fixture finalizers,
whatever happened) unmounts it all, reaps FUSE daemons and then asserts that nothing is
left: no mount on any target, no daemon process.

- ``KernelBackend``: ``layerfs.mount.kernel`` with ``redirect_dir=on,index=off`` (the oracle),
  or ``index=on`` where ``MountParams.index`` asks (cases about lower hardlinks: the FUSE
  model keeps them one file across copy-up, as the kernel does with an index).
- ``FuseBackend``: ``python -m layerfs.fuse.main --print-pid --transport T --log L -o lowerdir=..,upperdir=..,
  workdir=.. TARGET``, which returns once the mount is live and leaves a daemon behind. The
  test process is a child subreaper while it starts, so the detached daemon becomes our
  child and is reaped after ``fusermount3 -u``; its log stays in the test's workspace.
- ``ModelBackend``: ``layerfs.union.fs.UnionFS`` in-process; "unmount" is ``destroy()``.

``model_unavailable()``/``fuse_unavailable()`` give the reason to skip while the other
engineers' modules have not landed yet (None once they have).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerfs.errors import FailedPrecondition
from layerfs.linux.mountinfo import mount_table
from layerfs.mount import kernel
from layerfs.mount.spec import MountSpec

from .facade import Facade, OsFacade
from .model_facade import ModelFacade

KERNEL_OPTIONS = ("redirect_dir=on", "index=off")
INDEX_OPTIONS = ("redirect_dir=on", "index=on")
INDEX_BUSY_SECONDS = 5.0
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37
DAEMON_EXIT_TIMEOUT = 15.0
MOUNT_TIMEOUT = 60.0

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class MountParams:
    """What to mount where. ``upper``/``work`` None: a read-only union of ``lowers``."""

    lowers: tuple[Path, ...]
    upper: Path | None
    work: Path | None
    target: Path
    index: bool = False  # kernel overlayfs with index=on (lower hardlinks stay one file)

    def __post_init__(self) -> None:
        for p in (*self.lowers, self.upper, self.work, self.target):
            if p is not None and any(c in str(p) for c in ":,\\"):
                raise ValueError(f"test paths must not need escaping: {p}")


@dataclass
class Mounted:
    params: MountParams
    facade: Facade
    handle: Any = None  # backend-specific: daemon pid, UnionFS object
    live: bool = True


def overlay_listed() -> bool:
    try:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1] == "overlay" for line in f if line.strip())
    except OSError:
        return False


def kernel_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (kernel overlay mounts, device nodes, trusted.* xattrs)"
    if not overlay_listed():
        return "kernel overlayfs not available: 'overlay' missing from /proc/filesystems"
    return None


def model_unavailable() -> str | None:
    return None  # the model is plain Python: it runs wherever the tests run


def fuse_unavailable() -> str | None:
    reason = kernel_unavailable() or model_unavailable()
    if reason:
        return reason
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 not installed (Debian package fuse3)"
    return None


def is_mounted(target: Path | str) -> bool:
    real = os.path.realpath(target)
    return any(e.mount_point == real for e in mount_table())


class Backend(ABC):
    """Mounts unions one way and cleans up after itself (see the module docstring)."""

    name: str

    def __init__(self) -> None:
        self.mounted: list[Mounted] = []

    def mount(self, params: MountParams) -> Mounted:
        m = self._mount(params)
        self.mounted.append(m)
        return m

    def unmount(self, m: Mounted) -> None:
        if m.live:
            m.live = False
            self._unmount(m)

    def remount(self, m: Mounted) -> Mounted:
        """Unmount and mount the same layers again (the same upper: state must survive)."""
        self.unmount(m)
        return self.mount(m.params)

    def close(self) -> None:
        """Finalizer: unmount whatever is still live, then assert nothing is left behind."""
        errors: list[str] = []
        for m in reversed(self.mounted):
            try:
                self.unmount(m)
            except Exception as e:  # keep going: every mount must be cleaned up
                errors.append(f"{self.name}: unmounting {m.params.target}: {e!r}")
        errors.extend(self._leftovers())
        self.mounted.clear()
        if errors:
            raise AssertionError("backend cleanup problems:\n" + "\n".join(errors))

    def _leftovers(self) -> list[str]:
        return [f"{self.name}: {m.params.target} still mounted" for m in self.mounted
                if is_mounted(m.params.target)]

    @abstractmethod
    def _mount(self, params: MountParams) -> Mounted: ...

    @abstractmethod
    def _unmount(self, m: Mounted) -> None: ...


class KernelBackend(Backend):
    name = "kernel"

    def _mount(self, params: MountParams) -> Mounted:
        spec = MountSpec.overlay(
            [str(p) for p in params.lowers],
            str(params.upper) if params.upper else None,
            str(params.work) if params.work else None,
            extra=list(INDEX_OPTIONS if params.index else KERNEL_OPTIONS),
        )
        deadline = time.monotonic() + (INDEX_BUSY_SECONDS if params.index else 0)
        while True:
            try:
                kernel.mount(spec, str(params.target))
                break
            except FailedPrecondition as e:
                # index=on claims the upper and work dirs exclusively; the superblock of the
                # mount just unmounted from them may let go a moment after umount2 returned
                if "busy" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        return Mounted(params, OsFacade(str(params.target)))

    def _unmount(self, m: Mounted) -> None:
        target = str(m.params.target)
        try:
            kernel.unmount(target)
        except Exception:
            kernel.unmount(target, detach=True)
            raise


class ModelBackend(Backend):
    name = "model"

    def _mount(self, params: MountParams) -> Mounted:
        from layerfs.union.fs import UnionFS

        fs = UnionFS(
            [str(p) for p in params.lowers],
            str(params.upper) if params.upper else None,
            str(params.work) if params.work else None,
        )
        return Mounted(params, ModelFacade(fs), handle=fs)

    def _unmount(self, m: Mounted) -> None:
        m.handle.destroy()

    def _leftovers(self) -> list[str]:
        return []


def fuse_options(params: MountParams) -> str:
    opts = "lowerdir=" + ":".join(str(p) for p in params.lowers)
    if params.upper is not None:
        opts += f",upperdir={params.upper},workdir={params.work}"
    return opts


def _set_subreaper(on: bool) -> bool:
    """Make this process a child subreaper (or not); returns whether it was one before."""
    was = ctypes.c_int(0)
    _libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(was), 0, 0, 0)
    _libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)
    return bool(was.value)


def _proc_ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return int(data[data.rindex(b")") + 2 :].split()[1])


def daemon_pids(target: Path) -> list[int]:
    """Live (non-zombie) processes whose command line names ``target`` and layerfs."""
    want = os.fsencode(str(target))
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if want in argv and any(b"layerfs" in a for a in argv):
            found.append(int(entry))
    return found


class FuseBackend(Backend):
    """``transport``: pyfuse3 (backend ``fuse``) or kernel (backend ``fuse-kernel``)."""

    name = "fuse"

    def __init__(self, log_dir: Path, transport: str = "pyfuse3") -> None:
        super().__init__()
        self.log_dir = log_dir
        self.count = 0
        self.transport = transport
        if transport != "pyfuse3":
            self.name = f"fuse-{transport}"

    def _mount(self, params: MountParams) -> Mounted:
        self.count += 1
        stem = self.log_dir / f"layerfs-fuse-{self.count}"
        out_path, err_path, daemon_log = (stem.with_suffix(s) for s in (".out", ".err", ".log"))
        cmd = [sys.executable, "-m", "layerfs.fuse.main", "--print-pid", "--log", str(daemon_log),
               "--transport", self.transport, "-o", fuse_options(params), str(params.target)]
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            was_subreaper = _set_subreaper(True)
            try:
                # files, not pipes: a daemon that kept a pipe open would hang run()
                rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    timeout=MOUNT_TIMEOUT).returncode
            finally:
                _set_subreaper(was_subreaper)
        printed = out_path.read_text(errors="replace").split()
        pids = [int(printed[-1])] if printed and printed[-1].isdigit() else daemon_pids(params.target)
        m = Mounted(params, OsFacade(str(params.target)), handle=pids)
        if rc != 0 or not is_mounted(params.target):
            self.mounted.append(m)  # whatever got started is cleaned up by close()
            logs = "".join(p.read_text(errors="replace")[-3000:] for p in (err_path, daemon_log) if p.exists())
            raise AssertionError(
                f"layerfs-fuse exited {rc}, mounted={is_mounted(params.target)}: {' '.join(cmd)}\n{logs}"
            )
        return m

    def _unmount(self, m: Mounted) -> None:
        target = str(m.params.target)
        problems = []
        pids: list[int] = list(m.handle or []) or daemon_pids(m.params.target)
        if is_mounted(target):
            r = subprocess.run(["fusermount3", "-u", target], capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                problems.append(f"fusermount3 -u {target}: {r.stderr.strip()}")
                subprocess.run(["fusermount3", "-u", "-z", target], capture_output=True, timeout=30)
        for pid in pids:
            if not _reap(pid, DAEMON_EXIT_TIMEOUT):
                problems.append(f"layerfs-fuse daemon {pid} still running {DAEMON_EXIT_TIMEOUT}s after unmount")
                _kill(pid)
        if not pids:
            problems.append(f"no layerfs-fuse daemon process found for {target}")
        if problems:
            raise AssertionError("; ".join(problems))

    def _leftovers(self) -> list[str]:
        out = super()._leftovers()
        for m in self.mounted:
            for pid in daemon_pids(m.params.target):
                out.append(f"fuse: daemon {pid} for {m.params.target} still running")
                _kill(pid)
        return out


def _reap(pid: int, timeout: float) -> bool:
    """Wait for ``pid`` to exit (reaping it if it is our child); False on timeout."""
    deadline = time.monotonic() + timeout
    ours = _proc_ppid(pid) == os.getpid()
    while time.monotonic() < deadline:
        if ours:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return True
            if done:
                return True
        elif not os.path.exists(f"/proc/{pid}") or _is_zombie(pid):
            return True
        time.sleep(0.02)
    return False


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return True
    return data[data.rindex(b")") + 2 :].split()[0] == b"Z"


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    _reap(pid, 5.0)


BACKEND_NAMES = ("kernel", "fuse", "fuse-kernel", "model")


def make_dirs(base: Path, *names: str) -> list[Path]:
    """Create fresh 0755 directories below ``base``."""
    out = []
    for n in names:
        p = base / n
        p.mkdir(parents=True)
        os.chmod(p, 0o755)
        out.append(p)
    return out


def params_for(base: Path, lowers: Sequence[Path], *, upper: Path | None = None, readonly: bool = False,
               tag: str = "", index: bool = False) -> MountParams:
    """Describe a mount of ``lowers`` on a fresh ``base/mnt<tag>``: read-only, or writable into
    ``upper`` (a fresh ``base/upper<tag>`` unless given) with a fresh ``base/work<tag>``."""
    (target,) = make_dirs(base, f"mnt{tag}")
    if readonly:
        return MountParams(tuple(lowers), None, None, target)
    if upper is None:
        (upper,) = make_dirs(base, f"upper{tag}")
    (work,) = make_dirs(base, f"work{tag}")
    return MountParams(tuple(lowers), upper, work, target, index)

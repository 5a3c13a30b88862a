"""The FUSE backend: execute a ``MountSpec`` by starting the ``layerfs-fuse`` program.

Lifecycle: ``mount(spec, target)`` runs ``[sys.executable, "-m", "layerfs.fuse.main", ...]``
(no PATH lookup), which returns once the mount is live and leaves a detached daemon
serving it; ``mount`` returns that daemon's pid. The daemon lives until its mount goes:
``unmount(target, pid)`` unmounts and waits for that pid to exit, escalating to SIGTERM
and then SIGKILL if it lingers. Nothing here remembers pids: callers record them (the
``mounts`` table's ``pid`` column).

Specs it takes: overlay and the layerfs-fuse types (``fuse3.layerfs-fuse``,
``fuse.layerfs-fuse``, or either prefix before the program's absolute path: see
``spec.is_fuse_type``; same options: ``lowerdir=``, ``upperdir=``, ``workdir=``, flags and
overlay parameters, which the program accepts as fuse-overlayfs does), and a read-only bind
(served as a one-layer union). A writable bind needs no union at all: that is the kernel
backend's job. Whatever program path a type names, this very ``layerfs`` serves it.

``program_path()`` finds the ``layerfs-fuse`` program for mounts that others execute (the
snapshotter's descriptions for containerd): they name it absolutely.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

from layerfs.errors import InvalidArgument, LayerfsError, NotFound, Unsupported
from layerfs.linux.fusedev import FUSERMOUNT
from layerfs.linux.proc import command_line, pid_alive
from layerfs.mount import kernel
from layerfs.mount.spec import BIND, FUSE, FUSE_PROGRAM, OVERLAY, MountSpec, escape_path, is_fuse_type

PROGRAM = "layerfs.fuse.main"
# the union types by name; is_union_type also takes the ones naming the program absolutely
UNION_TYPES = frozenset({OVERLAY, FUSE, f"fuse.{FUSE_PROGRAM}"})


def is_union_type(fstype: str) -> bool:
    """An overlay or a layerfs-fuse type (``fuse3.layerfs-fuse``, ``fuse3./abs/layerfs-fuse`` ...)."""
    return fstype == OVERLAY or is_fuse_type(fstype)


def program_path() -> str:
    """The absolute path of the ``layerfs-fuse`` program: the console script installed
    beside this Python (``sys.executable``'s directory, e.g. a venv's ``bin``, not resolved
    through symlinks), else the one on PATH. ``Unsupported`` when there is none."""
    if sys.executable:
        beside = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), FUSE_PROGRAM)
        if os.path.isfile(beside) and os.access(beside, os.X_OK):
            return beside
    found = shutil.which(FUSE_PROGRAM)
    if found is not None:
        return os.path.abspath(found)
    raise Unsupported(
        f"cannot find the {FUSE_PROGRAM} program: it is neither beside {sys.executable or 'this Python'} "
        f"nor on PATH; install layerfs (pip install, which makes the {FUSE_PROGRAM} console script) "
        "into this Python's environment")


def program_options(spec: MountSpec, layer_format: str | None = None) -> list[str]:
    """The ``-o`` options that make ``layerfs-fuse`` serve ``spec``; ``layer_format`` (a
    ``whiteout.FORMATS`` name, the store's) says how its upper is written."""
    fmt = [f"layer_format={layer_format}"] if layer_format is not None else []
    if is_union_type(spec.type):
        if not spec.lowers:
            raise InvalidArgument(f"{spec.type} spec without lowerdir: {spec}")
        return [*spec.options, *fmt]
    if spec.type == BIND:
        if not spec.readonly:
            raise InvalidArgument(f"a writable bind mount of {spec.source} is the kernel backend's job, not FUSE's")
        extra = [o for o in spec.options if o not in ("ro", "rw", "bind", "rbind")]
        return ["lowerdir=" + escape_path(spec.source), "ro", *extra, *fmt]
    raise InvalidArgument(f"the FUSE backend cannot mount type {spec.type!r}")


def command(spec: MountSpec, target: str, *, log: str | None = None, layer_format: str | None = None) -> list[str]:
    """The argv that mounts ``spec`` on ``target`` and prints the daemon's pid.

    ``-P``: the caller's working directory is not put on the program's import path (a
    stray ``layerfs`` there must not be what serves the mount); ``program_env`` points
    the import path at this very ``layerfs`` instead.
    """
    argv = [sys.executable, "-P", "-m", PROGRAM, "--print-pid", "-o", ",".join(program_options(spec, layer_format))]
    if log is not None:
        argv += ["--log", log]
    return [*argv, os.path.abspath(target)]


def program_env() -> dict[str, str]:
    """The environment for the program: ours, with this ``layerfs`` first on PYTHONPATH."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env


def mount(spec: MountSpec, target: str, *, log: str | None = None, timeout: float = 60.0,
          layer_format: str | None = None) -> int:
    """Mount ``spec`` on the existing directory ``target``; returns the serving daemon's pid.

    Raises ``NotFound`` (no target), ``InvalidArgument`` (a spec or option the program
    refuses), ``Unsupported`` (no /dev/fuse) and ``LayerfsError`` with the program's own
    message for anything else.
    """
    target = os.path.abspath(target)
    if not os.path.isdir(target):
        raise NotFound(f"cannot mount {spec.type} on {target}: the target does not exist or is not a directory")
    if not os.path.exists("/dev/fuse"):
        raise Unsupported("/dev/fuse does not exist: this machine cannot serve FUSE mounts")
    argv = command(spec, target, log=log, layer_format=layer_format)
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                           env=program_env())
    except subprocess.TimeoutExpired as e:
        # the program was killed; its daemon, if it got that far, finds nobody to report
        # to and unmounts itself (see layerfs.fuse.main.Readiness)
        raise LayerfsError(f"layerfs-fuse did not mount {target} within {timeout:.0f}s") from e
    message = " ".join(line.removeprefix("layerfs-fuse: ") for line in r.stderr.splitlines()
                       if "warning:" not in line).strip()
    if r.returncode == 2:
        raise InvalidArgument(f"layerfs-fuse refused to mount {target}: {message}")
    if r.returncode != 0:
        raise LayerfsError(f"layerfs-fuse could not mount {target}: {message or f'exit status {r.returncode}'}")
    try:
        return int(r.stdout.split()[-1])
    except (IndexError, ValueError) as e:
        raise LayerfsError(f"layerfs-fuse mounted {target} but printed no pid: {r.stdout!r}") from e


def is_daemon(pid: int, target: str | None = None) -> bool:
    """Whether ``pid`` is a layerfs-fuse daemon (serving ``target``, if given), so that a
    recycled pid is never signalled."""
    argv = command_line(pid)
    if argv is None:
        return False
    if not any(a.endswith((b"layerfs.fuse.main", b"layerfs-fuse")) for a in argv):
        return False
    return target is None or os.fsencode(os.path.abspath(target)) in argv


def wait_gone(pid: int, timeout: float) -> bool:
    """Poll until ``pid`` has exited; False if it still runs after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    return True


def stop(pid: int, target: str | None = None, timeout: float = 5.0) -> bool:
    """End the daemon ``pid`` (of ``target``): SIGTERM (it unmounts itself), then SIGKILL.

    True when it is gone; False when ``pid`` is alive but not that daemon (never signalled).
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not pid_alive(pid):
            return True
        if not is_daemon(pid, target):
            return False
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        if wait_gone(pid, timeout):
            return True
    return not pid_alive(pid)


def _fusermount(target: str, detach: bool) -> None:
    prog = next((p for p in FUSERMOUNT if os.path.exists(p)), None)
    if prog is None:
        raise Unsupported(f"cannot unmount {target}: fusermount3 is not installed")
    r = subprocess.run([prog, "-uz" if detach else "-u", target], capture_output=True, text=True)
    if r.returncode != 0:
        raise LayerfsError(f"cannot unmount {target}: {r.stderr.strip()}")


def unmount(target: str, pid: int | None, *, detach: bool = False, timeout: float = 10.0) -> None:
    """Unmount ``target`` and wait until its daemon ``pid`` has exited.

    The daemon exits by itself once its mount is gone; if it does not within ``timeout``
    it gets SIGTERM, then SIGKILL (only that pid, and only if it is a layerfs-fuse). With
    ``detach`` the mount leaves the namespace at once but the daemon keeps serving open
    files until the last one closes, so it is not waited for. Raises ``InUse`` for a busy
    mount (the daemon keeps running).
    """
    target = os.path.abspath(target)
    if kernel.is_mountpoint(target):
        if os.geteuid() == 0:
            kernel.unmount(target, detach=detach)
        else:
            _fusermount(target, detach)
    if pid is None or detach:
        return
    if not wait_gone(pid, timeout) and not stop(pid, target):
        raise LayerfsError(f"the layerfs-fuse daemon {pid} of {target} does not exit, even after SIGKILL")


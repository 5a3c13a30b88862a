"""Processes for the snapshotter tests: our gRPC server, a private containerd, ``ctr``.

Everything lives under one base directory the test owns (a pytest tmp dir): the store, the
sockets, containerd's root and state, runc's state and ctr's FIFOs. Every process is started
here and stopped by its PID (SIGTERM, then SIGKILL); ``Teardown`` also finds what containerd
started for us (shims, FUSE daemons: processes whose command line names the base directory or
our containerd socket), unmounts whatever is still mounted under the base directory, and
reports what it had to clean up so the test can assert that nothing was left behind.

containerd 1.6 puts its shims' sockets in ``/run/containerd/s`` whatever the config says;
``Teardown`` removes that directory (and ``/run/containerd``) again if they did not exist
before and are empty.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from snapshotter.proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from tests.support.paths import REPO

MNT_DETACH = 2
# the PATH of a stock containerd (and of the shims it starts): nothing of ours, no venv bin
# directory; mount.fuse3 is in /sbin, and FUSE mount types name layerfs-fuse absolutely
DEFAULT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_libc = ctypes.CDLL(None, use_errno=True)


# -- processes -----------------------------------------------------------------------------


def stop_pid(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    """SIGTERM ``proc``, SIGKILL it after ``timeout``; returns its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def kill_pid(pid: int) -> None:
    """SIGTERM, then SIGKILL, a process we did not start ourselves (a shim, a FUSE daemon)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            os.kill(pid, 0)
            if _is_zombie(pid):
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def pids_mentioning(needle: str) -> list[int]:
    """PIDs (not ours) whose command line contains ``needle`` (a unique temp path)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline and not _is_zombie(int(entry)):
            out.append(int(entry))
    return out


class SnapshotterServer:
    """``layerfs snapshotter serve`` in a subprocess, logging to ``log``."""

    def __init__(self, base: Path, root: Path, *, backend: str = "kernel", address: Path | None = None) -> None:
        self.base = base
        self.root = root
        self.backend = backend
        self.address = address or base / "layerfs.sock"
        self.log = base / "layerfs-snapshotter.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "layerfs", "--root", str(self.root), "snapshotter", "serve",
                "--address", str(self.address), "--backend", self.backend, "--log-level", "debug"]

    def start(self, timeout: float = 20.0) -> SnapshotterServer:
        # a default PATH: the server finds layerfs-fuse beside its Python, not on PATH
        env = dict(os.environ, PATH=DEFAULT_PATH)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         cwd=REPO, env=env)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"snapshotter server exited {self.proc.returncode}:\n{self.log_text()}")
            if self.address.exists():
                with grpc.insecure_channel(f"unix://{self.address}") as ch:
                    try:
                        grpc.channel_ready_future(ch).result(timeout=1)
                        return self
                    except grpc.FutureTimeoutError:
                        pass
            if time.monotonic() > deadline:
                raise AssertionError(f"snapshotter server not ready after {timeout}s:\n{self.log_text()}")
            time.sleep(0.05)

    def stop(self) -> int:
        """SIGTERM (a clean shutdown) and the exit status; -9 means it had to be killed."""
        if self.proc is None:
            return 0
        code = stop_pid(self.proc)
        self.proc = None
        return code

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the server to exit by itself (after a signal sent by the test)."""
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"unix://{self.address}")

    def stub(self, channel: grpc.Channel) -> snapshots_pb2_grpc.SnapshotsStub:
        return snapshots_pb2_grpc.SnapshotsStub(channel)


# -- containerd ----------------------------------------------------------------------------


def containerd_version() -> tuple[int, ...] | None:
    """containerd's version (``(1, 6, 20)``), or None when it is not installed."""
    if shutil.which("containerd") is None:
        return None
    out = subprocess.run(["containerd", "--version"], capture_output=True, text=True).stdout
    m = re.search(r"\s+v?(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else None


CONFIG_TEMPLATE = """\
# A private containerd for the layerfs tests (config version 2, containerd >= 1.5).
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{address}"

[debug]
  level = "debug"

[plugins."io.containerd.gc.v1.scheduler"]
  # collect after every deletion, so removed containers reach the snapshotter promptly
  deletion_threshold = 1

[proxy_plugins]
  [proxy_plugins.layerfs]
    type = "snapshot"
    address = "{snapshotter}"
"""


class Containerd:
    """A private containerd: its own root, state and socket under ``base``."""

    namespace = "test"

    def __init__(self, base: Path, snapshotter_socket: Path) -> None:
        self.base = base
        self.address = base / "containerd.sock"
        self.runc_root = base / "runc"
        self.fifo_dir = base / "fifo"
        self.config = base / "config.toml"
        self.state = base / "containerd-state"
        self.log = base / "containerd.log"
        self.config.write_text(CONFIG_TEMPLATE.format(
            root=base / "containerd-root", state=self.state, address=self.address,
            snapshotter=snapshotter_socket))
        (base / "tmp").mkdir(exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        """For containerd and ctr, and so for the shims, runc and mount.fuse3 they run: a
        minimal default environment, ``DEFAULT_PATH`` and nothing of ours (FUSE mounts run
        ``mount.fuse3 ... -t /abs/path/to/layerfs-fuse``: no PATH entry needed). TMPDIR:
        ctr's own temporary mounts (it mounts the rootfs to read /etc/passwd) go under
        ``base/tmp`` instead of /tmp."""
        return {"PATH": DEFAULT_PATH, "TMPDIR": str(self.base / "tmp")}

    def start(self, timeout: float = 30.0) -> Containerd:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["containerd", "--config", str(self.config)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, env=self.env())
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"containerd exited {self.proc.returncode}:\n{self.log_tail()}")
            if self.address.exists() and self.ctr("version", check=False).returncode == 0:
                return self
            if time.monotonic() > deadline:
                raise AssertionError(f"containerd not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> int:
        if self.proc is None:
            return 0
        code = stop_pid(self.proc)
        self.proc = None
        return code

    def log_tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def ctr(self, *args: str, check: bool = True, timeout: float = 60.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """``ctr -a SOCKET -n test ARGS``; on failure (with ``check``) raise with both logs."""
        cmd = ["ctr", "-a", str(self.address), "-n", self.namespace, *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env(), input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n"
                                 f"--- containerd log ---\n{self.log_tail()}")
        return proc

    def rootfs(self, cid: str) -> Path:
        """Where the shim mounts a container's root filesystem."""
        return self.state / "io.containerd.runtime.v2.task" / self.namespace / cid / "rootfs"

    def run_detached(self, image: str, cid: str, *command: str) -> None:
        """``ctr run -d --null-io``: the task keeps running; stop it with ``kill_task``."""
        self.ctr("run", "-d", "--null-io", "--snapshotter", "layerfs", "--runc-root", str(self.runc_root),
                 "--fifo-dir", str(self.fifo_dir), "--cgroup", "", image, cid, *command)

    def kill_task(self, cid: str, timeout: float = 20.0) -> None:
        """SIGKILL a task, wait for it to stop, delete it (the container stays)."""
        self.ctr("tasks", "kill", "--signal", "SIGKILL", cid)
        wait_until(lambda: self.task_status(cid) in (None, "STOPPED"), f"task {cid} to stop", timeout)
        self.ctr("tasks", "delete", cid)

    def task_status(self, cid: str) -> str | None:
        """The STATUS column of ``ctr tasks ls`` for ``cid`` (None: no such task)."""
        for line in self.ctr("tasks", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == cid:
                return fields[-1]
        return None

    def snapshots(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.ctr("snapshots", "--snapshotter", "layerfs", *args, check=check)

    def run(self, image: str, cid: str, *command: str, rm: bool = True,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``ctr run [--rm]`` on layerfs, runc's state and the FIFOs under ``base``.

        ``--cgroup ""``: runc makes (and on delete removes) a cgroup named after the container
        instead of ``/test/ID``, which would leave a ``test`` cgroup in every hierarchy."""
        return self.ctr("run", "--snapshotter", "layerfs", *(["--rm"] if rm else []),
                        "--runc-root", str(self.runc_root), "--fifo-dir", str(self.fifo_dir), "--cgroup", "",
                        image, cid, *command, timeout=timeout)


def environ_of(pid: int) -> dict[str, str]:
    """The environment ``pid`` was started with (``/proc/PID/environ``)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(entry.split("=", 1) for entry in raw.decode(errors="replace").split("\0") if "=" in entry)


def argv_of(pid: int) -> list[str]:
    """``/proc/PID/cmdline`` as a list (empty if the process is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def mount_fstype(target: Path) -> str | None:
    """The filesystem type mounted at ``target`` (the last mount there), or None."""
    found = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, tail = line.partition(" - ")
        if fields.split()[4] == str(target):
            found = tail.split()[0]
    return found


def retry(fn: Callable[[], subprocess.CompletedProcess[str]], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Call ``fn`` until it succeeds (a client reconnecting after a restart); the last error if not."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll ``cond`` (containerd's garbage collector runs in the background)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


# -- leftovers -----------------------------------------------------------------------------


def mounts_under(base: Path) -> list[str]:
    """Mount points at or below ``base`` (from /proc/self/mountinfo), deepest first."""
    prefix = str(base).rstrip("/") + "/"
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = line.split()[4].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
        target = target.replace("\\134", "\\")
        if target == str(base) or target.startswith(prefix):
            found.append(target)
    return sorted(found, key=lambda t: t.count("/"), reverse=True)


class Teardown:
    """Stops and unmounts whatever the test left under ``base``; ``leftovers`` says what."""

    def __init__(self, base: Path, containerd_socket: Path) -> None:
        self.base = base
        self.containerd_socket = containerd_socket
        self.leftovers: list[str] = []
        self._run_dirs = [p for p in (Path("/run/containerd/s"), Path("/run/containerd")) if not p.exists()]

    def runc_containers(self, runc_root: Path) -> None:
        """Containers still known to runc (the shim keeps them under ``ROOT/NAMESPACE``):
        ``runc delete -f`` kills their processes and removes their cgroups."""
        if shutil.which("runc") is None:
            return
        for root in [runc_root, *(p for p in runc_root.glob("*") if p.is_dir())]:
            listing = subprocess.run(["runc", "--root", str(root), "list", "-q"], capture_output=True, text=True)
            for cid in listing.stdout.split():
                self.leftovers.append(f"runc container {cid}")
                subprocess.run(["runc", "--root", str(root), "delete", "-f", cid], capture_output=True)

    def shim_sockets(self, namespace: str, ids: Sequence[str]) -> None:
        """The shims' sockets: containerd 1.6 names them ``/run/containerd/s/<sha256 of
        ADDRESS/NAMESPACE/ID>``, outside any directory of ours; a killed shim leaves its own."""
        for cid in ids:
            digest = hashlib.sha256(os.path.join(str(self.containerd_socket), namespace, cid).encode()).hexdigest()
            path = Path("/run/containerd/s") / digest
            if os.path.lexists(path):
                self.leftovers.append(f"shim socket {path} ({cid})")
                path.unlink()

    def processes(self, needles: Sequence[str]) -> None:
        for needle in needles:
            for pid in pids_mentioning(needle):
                self.leftovers.append(f"process {pid}: {_cmdline(pid)}")
                kill_pid(pid)

    def mounts(self) -> None:
        for target in mounts_under(self.base):
            self.leftovers.append(f"mount {target}")
            if _libc.umount2(target.encode(), MNT_DETACH) != 0:
                err = ctypes.get_errno()
                self.leftovers.append(f"umount {target}: {os.strerror(err)}")

    def cgroups(self, names: Sequence[str]) -> None:
        """cgroups runc made for our containers (``--cgroup ""``: ``/<id>`` per hierarchy)."""
        roots = [Path("/sys/fs/cgroup")] + [p for p in Path("/sys/fs/cgroup").iterdir() if p.is_dir()]
        for root in roots:
            for name in names:
                path = root / name
                if path.is_dir():
                    self.leftovers.append(f"cgroup {path}")
                    with contextlib.suppress(OSError):
                        path.rmdir()

    def run_dirs(self) -> None:
        """Remove ``/run/containerd{/s,}`` if we made them; only when empty (a shim that is
        just exiting may still be removing its socket: give it a moment)."""
        deadline = time.monotonic() + 5
        for d in self._run_dirs:
            while d.exists():
                try:
                    d.rmdir()
                except OSError:
                    if time.monotonic() > deadline:
                        break  # not empty: someone else's now, never ours to delete
                    time.sleep(0.1)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"

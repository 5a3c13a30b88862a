"""What the benchmark ran on, and the few host-wide levers it pulls.

- ``machine_info(workdir)``: kernel, CPU model, cores, memory, the filesystem under the work
  directory and the versions of the peers (Debian packages fuse-overlayfs, unionfs-fuse,
  containerd, fuse3, util-linux; Python packages pyfuse3, layerfs), for the JSON report.
- ``drop_caches()``: ``sync; echo 3 > /proc/sys/vm/drop_caches`` (page cache, dentries,
  inodes), what "cold" means in every cold measurement. Needs root.
- ``process_cpu(pid)``: user + system CPU seconds of a process, all its threads, from
  ``/proc/PID/stat`` fields 14 and 15 in clock ticks (``SC_CLK_TCK``, usually 100 Hz: a
  resolution of 10 ms).
- ``settle_disk(path)``: wait until the disk holding ``path`` is idle (no I/O completed for a
  moment), so one sample's cleanup does not land in the next one's time.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import signal
import subprocess
import time
from importlib import metadata
from typing import Any

from layerfs.linux.libc import libc
from layerfs.linux.proc import command_lines, stat_fields

CLOCK_TICK = os.sysconf("SC_CLK_TCK")
DEBIAN_PACKAGES = ("fuse-overlayfs", "unionfs-fuse", "containerd", "fuse3", "util-linux")
PYTHON_PACKAGES = ("pyfuse3", "layerfs", "trio", "matplotlib")


def is_root() -> bool:
    return os.geteuid() == 0


def drop_caches() -> None:
    """Write back dirty data, then drop the page cache, dentries and inodes (needs root)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")




def syncfs(path: str) -> None:
    """``syncfs(2)`` of the filesystem holding ``path`` (os has no wrapper for it)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


def _block_stat(path: str) -> str | None:
    """The block-layer counters (``/sys/dev/block/M:m/stat``) of the device holding ``path``."""
    dev = os.stat(path).st_dev
    try:
        with open(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat") as f:
            return f.read()
    except OSError:
        return None


def settle_disk(path: str, quiet: float = 0.03, timeout: float = 20.0) -> float:
    """Wait until the disk under ``path`` has done no I/O for ``quiet`` seconds (at most
    ``timeout``); returns the seconds waited.

    Freeing a gigabyte-sized upper keeps the disk busy (writeback, journal, discards) after
    ``sync`` returns; without this the next sample would pay for the previous one's cleanup.
    """
    start = time.monotonic()
    last = _block_stat(path)
    if last is None:
        return 0.0
    quiet_since = time.monotonic()
    while time.monotonic() - start < timeout:
        time.sleep(quiet / 3)
        now = _block_stat(path)
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= quiet:
            break
    return time.monotonic() - start


def process_cpu(pid: int | None) -> float | None:
    """utime + stime of ``pid`` in seconds (None if there is no such process)."""
    if pid is None:
        return None
    fields = stat_fields(pid)
    if fields is None:
        return None
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def terminate(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    """Stop a process the bench started: SIGTERM by PID, SIGKILL after ``timeout`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def processes_mentioning(text: str) -> list[int]:
    """Live processes (not this one) with ``text`` in one of their command-line arguments."""
    needle = text.encode()
    return [pid for pid, args in command_lines() if any(needle in a for a in args)]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def filesystem_of(path: str) -> dict[str, str]:
    """Mount point, type, source and options of the filesystem holding ``path``."""
    from layerfs.linux.mountinfo import mount_table

    real = os.path.realpath(path)
    best: dict[str, str] = {}
    for e in mount_table():
        inside = real == e.mount_point or real.startswith(e.mount_point.rstrip("/") + "/")
        if inside and len(e.mount_point) >= len(best.get("mount_point", "")):
            best = {"mount_point": e.mount_point, "type": e.fs_type, "source": e.source,
                    "options": ",".join(e.super_options)}
    return best


def debian_versions(packages: tuple[str, ...] = DEBIAN_PACKAGES) -> dict[str, str | None]:
    """Installed versions of Debian packages (None where not installed or no dpkg)."""
    out: dict[str, str | None] = dict.fromkeys(packages)
    if shutil.which("dpkg-query") is None:
        return out
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package}\t${Status}\t${Version}\n", *packages],
        capture_output=True, text=True,
    )
    for line in proc.stdout.splitlines():
        name, status, version = (line.split("\t") + ["", ""])[:3]
        if name in out and status.endswith("installed") and version:
            out[name] = version
    return out


def python_versions(packages: tuple[str, ...] = PYTHON_PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(path: str) -> str | None:
    """The commit of the layerfs checkout (with ``+dirty`` for local changes), if it is one."""
    if shutil.which("git") is None:
        return None
    head = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", path, "status", "--porcelain"], capture_output=True, text=True)
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine_info(workdir: str) -> dict[str, Any]:
    """Everything about the host that the numbers depend on, JSON-ready."""
    uname = os.uname()
    return {
        "hostname": uname.nodename,
        "kernel": uname.release,
        "kernel_version": uname.version,
        "arch": uname.machine,
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_bytes": _mem_total(),
        "clock_tick": CLOCK_TICK,
        "python": platform.python_version(),
        "root": is_root(),
        "workdir": workdir,
        "workdir_filesystem": filesystem_of(workdir),
        "debian_packages": debian_versions(),
        "python_packages": python_versions(),
        "layerfs_commit": git_commit(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    }


def describe(info: dict[str, Any]) -> str:
    """One paragraph for the top of the report."""
    fs = info.get("workdir_filesystem") or {}
    pkgs = ", ".join(f"{k} {v}" for k, v in {**info["debian_packages"], **info["python_packages"]}.items() if v)
    return (
        f"{info['cpu_model']}, {info['cores']} cores, {info['memory_bytes'] / 2**30:.1f} GiB RAM, "
        f"kernel {info['kernel']}, work dir on {fs.get('type', '?')} ({fs.get('source', '?')})\n{pkgs}"
    )

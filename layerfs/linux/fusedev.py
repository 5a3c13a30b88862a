"""The FUSE device: opening ``/dev/fuse``, mounting it, its ioctls.

- ``open_device``: a non-blocking, close-on-exec fd of ``/dev/fuse``;
- ``mount_fuse``/``detach``: mount(2) of a FUSE filesystem on that fd (root), lazy umount2;
- ``fusermount_mount``/``fusermount_unmount``: the unprivileged way, through the setuid
  ``fusermount3`` and its fd-passing protocol (a socketpair, ``_FUSE_COMMFD`` in its
  environment, the device fd back as ``SCM_RIGHTS``);
- ``backing_open``/``backing_close``: ``FUSE_DEV_IOC_BACKING_OPEN``/``_CLOSE`` (FUSE
  passthrough: register a real file the kernel then reads and writes itself);
- ``has_cap_sys_admin``: whether this process may register backing files at all;
- ``set_readahead``: the readahead window of a FUSE mount's backing device info (the kernel
  starts every FUSE mount at 128 KiB and INIT can only lower it; root may raise it in sysfs).

Errors are ``OSError`` with the kernel's errno (``fusermount_*``: ``OSError`` carrying
fusermount3's message).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct

from layerfs.linux.libc import check, libc

# socket, subprocess and the mount table are imported where they are used (fusermount3,
# readahead): a mount as root needs none of them, and importing them costs ~15 ms of its time

DEVICE = "/dev/fuse"
FUSERMOUNT = ("/usr/bin/fusermount3", "/bin/fusermount3")

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_DIRSYNC = 128
MS_NOATIME = 1024
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

# the kernel mount flags layerfs-fuse passes on (libfuse's table); "atime" only clears noatime
MOUNT_FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
               "sync": MS_SYNCHRONOUS, "dirsync": MS_DIRSYNC, "noatime": MS_NOATIME}


def _ioc(direction: int, magic: int, number: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (magic << 8) | number


_IOC_WRITE = 1
FUSE_DEV_IOC_MAGIC = 229
BACKING_MAP = struct.Struct("<iIQ")  # struct fuse_backing_map: fd flags padding
FUSE_DEV_IOC_BACKING_OPEN = _ioc(_IOC_WRITE, FUSE_DEV_IOC_MAGIC, 1, BACKING_MAP.size)
FUSE_DEV_IOC_BACKING_CLOSE = _ioc(_IOC_WRITE, FUSE_DEV_IOC_MAGIC, 2, 4)

CAP_SYS_ADMIN = 21


def open_device() -> int:
    """A fresh connection to the FUSE driver (non-blocking, close-on-exec)."""
    return os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)


def mount_fuse(fd: int, target: str, *, source: str, subtype: str, flags: int, options: list[str]) -> None:
    """mount(2) a FUSE filesystem served on ``fd`` at ``target`` (needs CAP_SYS_ADMIN).

    ``options`` are FUSE's own (``default_permissions``, ``allow_other``, ``max_read=N``);
    ``fd``, ``rootmode``, ``user_id`` and ``group_id`` are added here, as libfuse does.
    The type is ``fuse.SUBTYPE`` (mountinfo shows it), the source ``source``.
    """
    st = os.stat(target)
    data = [f"fd={fd}", f"rootmode={st.st_mode & 0o170000:o}", f"user_id={os.geteuid()}",
            f"group_id={os.getegid()}", *options]
    check(libc.mount(source.encode(), target.encode(), f"fuse.{subtype}".encode(), flags,
                     ",".join(data).encode()), f"mount fuse on {target}")


def detach(target: str) -> None:
    """Lazily unmount ``target`` (umount2 ``MNT_DETACH``); a target no longer mounted is fine."""
    if libc.umount2(target.encode(), MNT_DETACH | UMOUNT_NOFOLLOW) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"{os.strerror(err)}: umount {target}")


def fusermount_path() -> str:
    for path in FUSERMOUNT:
        if os.path.exists(path):
            return path
    raise OSError(errno.ENOENT, "fusermount3 not found (Debian package fuse3)")


def fusermount_mount(target: str, options: list[str]) -> int:
    """Mount through the setuid ``fusermount3``: returns the device fd it opened.

    fusermount3 opens /dev/fuse, mounts it with ``options`` (it adds fd, rootmode, user_id
    and group_id itself) and sends the fd back over the socket named by ``_FUSE_COMMFD``.
    """
    import socket
    import subprocess

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = {"_FUSE_COMMFD": str(theirs.fileno()), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        proc = subprocess.run([fusermount_path(), "-o", ",".join(options), "--", target],
                              env=env, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=60)
        theirs.close()
        if proc.returncode != 0:
            message = proc.stderr.decode(errors="replace").strip() or f"exit status {proc.returncode}"
            raise OSError(errno.EPERM, f"fusermount3: {message}")
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        if not fds:
            raise OSError(errno.EIO, "fusermount3 mounted but sent no device fd")
        fd = fds[0]
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
        return fd
    finally:
        ours.close()
        if theirs.fileno() >= 0:
            theirs.close()


def fusermount_unmount(target: str, lazy: bool = True) -> None:
    """Unmount a FUSE mount made by this user (``fusermount3 -u [-z]``)."""
    import subprocess

    args = [fusermount_path(), "-u", *(["-z"] if lazy else []), "--", target]
    proc = subprocess.run(args, capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
    if proc.returncode != 0:
        raise OSError(errno.EINVAL, f"fusermount3 -u: {proc.stderr.decode(errors='replace').strip()}")


def backing_open(dev_fd: int, file_fd: int) -> int:
    """Register ``file_fd`` as a passthrough backing file; returns its backing id (> 0).

    EPERM without CAP_SYS_ADMIN or when passthrough was not negotiated, ELOOP when the file
    sits on a filesystem stacked too deep (``max_stack_depth``), EINVAL for non-regular files.
    """
    buf = bytearray(BACKING_MAP.pack(file_fd, 0, 0))
    return int(fcntl.ioctl(dev_fd, FUSE_DEV_IOC_BACKING_OPEN, buf, True))


def backing_close(dev_fd: int, backing_id: int) -> None:
    """Drop a backing id (open passthrough files keep their backing file)."""
    buf = bytearray(struct.pack("<I", backing_id))
    fcntl.ioctl(dev_fd, FUSE_DEV_IOC_BACKING_CLOSE, buf, True)


def has_cap_sys_admin() -> bool:
    """Whether CAP_SYS_ADMIN is in this process's effective set (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << CAP_SYS_ADMIN))
    except (OSError, ValueError):
        pass
    return False


def set_readahead(mountpoint: str, kib: int) -> bool:
    """Set the readahead window of the FUSE mount on ``mountpoint`` (the newest mount there)
    to ``kib`` KiB through ``/sys/class/bdi/MAJOR:MINOR/read_ahead_kb``; False when it
    cannot (not root, no such mount, no sysfs). Reads the mount table only: it never touches
    the mount itself, so a daemon may call it for its own mount from its serving loop."""
    from layerfs.linux.mountinfo import mount_table

    entries = [e for e in mount_table() if e.mount_point == mountpoint and e.fs_type.startswith("fuse")]
    if not entries:
        return False
    major, minor = entries[-1].dev
    try:
        with open(f"/sys/class/bdi/{major}:{minor}/read_ahead_kb", "w", encoding="ascii") as f:
            f.write(f"{kib}\n")
    except OSError:
        return False
    return True

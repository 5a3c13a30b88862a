"""A backend-neutral filesystem facade: the operations the conformance cases are written in.

Paths are relative to the union's root (``"dir/a"``; ``""`` is the root) and are resolved the
way the kernel's VFS resolves them. Every operation returns a plain, comparable value or
raises ``OSError``; the cases compare errnos, never messages.

Two implementations:

- ``OsFacade(root)`` (here): a mounted directory (kernel overlayfs or the FUSE mount),
  through the real system calls.
- ``model_facade.ModelFacade(fs)``: the union model (``layerfs.union.api.UnionOps``) driven
  directly, with the kernel VFS's part emulated.

Normalized values: ``Stat`` (a subset of ``stat`` that means the same on every backend: no
inode numbers, no times, no directory sizes) and ``Node`` (one entry of ``tree()``, the
full snapshot of a tree). ``scan_dir`` produces the same snapshot from a directory on disk
(a mount, or a raw upper directory for ``dump_upper``), walking with directory fds so that
trees deeper than PATH_MAX are read too.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC  # open(2) flags the cases use most
APPEND = os.O_WRONLY | os.O_APPEND
EXCL = os.O_WRONLY | os.O_CREAT | os.O_EXCL
AT_FDCWD = -100
UMASK = 0o022  # the suite runs with this umask (set by the conftest), and tells the model so
READ_CHUNK = 128 * 1024
MAX_SYMLINK_HOPS = 40

# Overlay-private xattrs that record bookkeeping, not tree contents, dropped from the upper
# dump: the kernel's (origin file handles, impure/uuid/nlink/upper/index markers) and
# layerfs' own origin record (``trusted.overlay.layerfs.origin``: private to overlayfs, so
# the kernel never shows or copies it). Opaque and redirect are kept: they are semantics.
IGNORED_OVERLAY_XATTRS = frozenset(
    prefix + name
    for prefix in ("trusted.overlay.", "user.overlay.")
    for name in ("origin", "impure", "uuid", "nlink", "upper", "index", "layerfs.origin")
)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


class Unsupported(Exception):
    """The facade cannot express this operation (not an errno: the case must be skipped)."""


def errno_name(err: int | None) -> str:
    return errno.errorcode.get(err or 0, f"errno{err}")


def type_name(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "reg"),
        (stat.S_ISDIR, "dir"),
        (stat.S_ISLNK, "lnk"),
        (stat.S_ISCHR, "chr"),
        (stat.S_ISBLK, "blk"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "sock"),
    ):
        if test(mode):
            return name
    return f"?{stat.S_IFMT(mode):o}"


def short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True)
class Stat:
    """The comparable part of a ``stat``: what a user sees the same on every backend.

    ``size`` is None for directories (the backing filesystem's business); ``rdev`` is
    ``(major, minor)`` for device nodes only; ``target`` is the symlink target of ``lstat``.
    """

    type: str
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int | None
    rdev: tuple[int, int] | None
    target: str | None = None

    def __repr__(self) -> str:
        parts = [self.type, f"{self.mode:04o}", f"n{self.nlink}", f"{self.uid}:{self.gid}"]
        if self.size is not None:
            parts.append(f"s{self.size}")
        if self.rdev is not None:
            parts.append(f"dev{self.rdev[0]},{self.rdev[1]}")
        if self.target is not None:
            parts.append(f"->{self.target}")
        return "Stat(" + " ".join(parts) + ")"


def make_stat(mode: int, nlink: int, uid: int, gid: int, size: int, rdev: int, target: str | None) -> Stat:
    is_dir = stat.S_ISDIR(mode)
    is_dev = stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
    return Stat(
        type=type_name(mode),
        mode=stat.S_IMODE(mode),
        nlink=nlink,
        uid=uid,
        gid=gid,
        size=None if is_dir else size,
        rdev=(os.major(rdev), os.minor(rdev)) if is_dev else None,
        target=target,
    )


@dataclass(frozen=True)
class Node:
    """One entry of a tree snapshot.

    ``sha`` is a content hash for regular files; ``nlink`` is kept for non-directories only
    (a directory's link count is a property of the backing filesystem); ``xattrs`` are
    ``(name, value)`` pairs sorted by name, as the view lists them.
    """

    type: str
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int | None = None
    sha: str | None = None
    target: str | None = None
    rdev: tuple[int, int] | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()
    nlink: int | None = None

    def __repr__(self) -> str:
        if self.type == "whiteout":
            return "Node(whiteout)"
        parts = [self.type, f"{self.mode:04o}", f"{self.uid}:{self.gid}"]
        if self.nlink is not None:
            parts.append(f"n{self.nlink}")
        if self.size is not None:
            parts.append(f"s{self.size}")
        if self.sha is not None:
            parts.append(f"#{self.sha}")
        if self.target is not None:
            parts.append(f"->{self.target}")
        if self.rdev is not None:
            parts.append(f"dev{self.rdev[0]},{self.rdev[1]}")
        if self.xattrs:
            parts.append("xattrs=" + ",".join(f"{k}={v!r}" for k, v in self.xattrs))
        return "Node(" + " ".join(parts) + ")"


WHITEOUT_NODE = Node("whiteout")


def error_node(e: OSError) -> Node:
    """What a snapshot records where reading an entry failed (path ``dir/*``: listing ``dir``)."""
    return Node(f"<{errno_name(e.errno)}>")
Tree = dict[str, Node]


def make_node(
    mode: int,
    nlink: int,
    uid: int,
    gid: int,
    size: int,
    rdev: int,
    content: bytes | None,
    target: str | None,
    xattrs: dict[str, bytes],
) -> Node:
    st = make_stat(mode, nlink, uid, gid, size, rdev, target)
    return Node(
        type=st.type,
        mode=st.mode,
        uid=uid,
        gid=gid,
        size=st.size,
        sha=short_hash(content) if content is not None else None,
        target=target,
        rdev=st.rdev,
        xattrs=tuple(sorted(xattrs.items())),
        nlink=None if st.type == "dir" else nlink,
    )


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def split(path: str) -> tuple[str, str]:
    """``"a/b/c"`` -> ``("a/b", "c")``."""
    head, _, tail = path.rpartition("/")
    return head, tail


# --- the interface -------------------------------------------------------------------


class Facade(ABC):
    """Path-based filesystem operations over one union (see the module docstring)."""

    name: str = "?"

    # attributes
    @abstractmethod
    def lstat(self, path: str) -> Stat: ...
    @abstractmethod
    def stat(self, path: str) -> Stat: ...
    @abstractmethod
    def ino(self, path: str) -> int:
        """``st_ino`` (lstat): compared only with itself (stability), never across backends."""
    @abstractmethod
    def dev(self, path: str) -> int:
        """``st_dev`` (lstat): compared only within one mount."""
    @abstractmethod
    def mtime_ns(self, path: str) -> int: ...

    # file contents
    @abstractmethod
    def read_file(self, path: str) -> bytes: ...
    @abstractmethod
    def write_file(self, path: str, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                   mode: int = 0o644) -> int:
        """open(path, flags, mode), write all of ``data``, close; returns bytes written."""
    @abstractmethod
    def open_unlink_read(self, path: str) -> tuple[bytes, int]:
        """Open read-only, unlink the name, then read the open file: ``(content, fstat nlink)``."""

    # directories and names
    @abstractmethod
    def listdir(self, path: str) -> list[str]:
        """Names in the directory, sorted, without ``.`` and ``..``."""
    @abstractmethod
    def mkdir(self, path: str, mode: int = 0o755) -> None: ...
    @abstractmethod
    def rmdir(self, path: str) -> None: ...
    @abstractmethod
    def unlink(self, path: str) -> None: ...
    @abstractmethod
    def rename(self, old: str, new: str, flags: int = 0) -> None: ...
    @abstractmethod
    def link(self, src: str, dst: str) -> None: ...
    @abstractmethod
    def symlink(self, target: str, path: str) -> None: ...
    @abstractmethod
    def readlink(self, path: str) -> str: ...
    @abstractmethod
    def mkfifo(self, path: str, mode: int = 0o644) -> None: ...
    @abstractmethod
    def mknod(self, path: str, mode: int, major: int, minor: int) -> None:
        """A character device node."""
    @abstractmethod
    def mksock(self, path: str, mode: int = 0o644) -> None:
        """A socket node (mknod S_IFSOCK)."""
    @abstractmethod
    def readdir_rewind(self, path: str, create: str) -> tuple[list[str], list[str]]:
        """List ``path`` through one open directory, create the file ``path/create``, rewind
        the same open directory and list it again: ``(before, after)``, sorted."""

    # metadata
    @abstractmethod
    def chmod(self, path: str, mode: int) -> None: ...
    @abstractmethod
    def fallocate(self, path: str, mode: int, offset: int, length: int) -> tuple[int, int]:
        """open(path, O_RDWR), fallocate(2) with ``mode``, close: ``(st_size, space allocated
        in 32 KiB units, rounded)`` after it (fstat of the open file). Loose on purpose:
        ext4 may allocate a block more or less for its extent tree (ZERO_RANGE)."""
    @abstractmethod
    def ctime_bumped(self, path: str, op: str, *args: Any) -> bool:
        """Whether ``op(path, *args)`` (a method of this facade, e.g. ``chown``) moves the
        lstat ctime of ``path`` forward (its own result or errno is not recorded)."""
    @abstractmethod
    def chown(self, path: str, uid: int, gid: int) -> None:
        """-1 leaves that id alone (follows symlinks, like chown(2))."""
    @abstractmethod
    def truncate(self, path: str, size: int) -> None: ...
    @abstractmethod
    def utime(self, path: str, atime_ns: int, mtime_ns: int) -> None: ...

    # extended attributes (never following a final symlink)
    @abstractmethod
    def setxattr(self, path: str, name: str, value: bytes, flags: int = 0) -> None: ...
    @abstractmethod
    def getxattr(self, path: str, name: str) -> bytes: ...
    @abstractmethod
    def listxattr(self, path: str) -> list[str]:
        """Sorted names."""
    @abstractmethod
    def removexattr(self, path: str, name: str) -> None: ...

    # the filesystem
    @abstractmethod
    def statfs_namemax(self) -> int: ...
    @abstractmethod
    def access_as(self, path: str, uid: int, gid: int) -> tuple[tuple[str, str], ...]:
        """What another user may do with ``path``: ``(("r", "ok"|errno), ("w", ...), ...)``."""
    @abstractmethod
    def tree(self) -> Tree:
        """Every entry of the union (root ``""`` included), path -> ``Node``."""

    def long_path_roundtrip(self, start: str, components: list[str], leaf: str, data: bytes) -> dict[str, Any]:
        """Walk ``start/components...`` with directory fds (deeper than PATH_MAX) and work there."""
        raise Unsupported("dir_fd walks below PATH_MAX are an OS-path concept")


# --- the mounted directory -----------------------------------------------------------


class OsFacade(Facade):
    """A mounted union at ``root``, through the real system calls."""

    name = "os"

    def __init__(self, root: str, helper_python: str | None = None) -> None:
        self.root = root
        self.helper_python = helper_python or _helper_python()

    def _p(self, path: str) -> str:
        return os.path.join(self.root, path) if path else self.root

    def _stat(self, path: str, follow: bool) -> Stat:
        p = self._p(path)
        st = os.stat(p, follow_symlinks=follow)
        target = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
        return make_stat(st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_size, st.st_rdev, target)

    def lstat(self, path: str) -> Stat:
        return self._stat(path, follow=False)

    def stat(self, path: str) -> Stat:
        return self._stat(path, follow=True)

    def ino(self, path: str) -> int:
        return os.lstat(self._p(path)).st_ino

    def dev(self, path: str) -> int:
        return os.lstat(self._p(path)).st_dev

    def mtime_ns(self, path: str) -> int:
        return os.lstat(self._p(path)).st_mtime_ns

    def read_file(self, path: str) -> bytes:
        # O_NONBLOCK: a fifo must not hang the suite (no effect on regular files)
        fd = os.open(self._p(path), os.O_RDONLY | os.O_NONBLOCK)
        try:
            return _read_all(fd)
        finally:
            os.close(fd)

    def write_file(self, path: str, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                   mode: int = 0o644) -> int:
        fd = os.open(self._p(path), flags | os.O_NONBLOCK, mode)
        try:
            return _write_all(fd, data)
        finally:
            os.close(fd)

    def open_unlink_read(self, path: str) -> tuple[bytes, int]:
        fd = os.open(self._p(path), os.O_RDONLY)
        try:
            os.unlink(self._p(path))
            nlink = os.fstat(fd).st_nlink
            return _read_all(fd), nlink
        finally:
            os.close(fd)

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(self._p(path)))

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        os.mkdir(self._p(path), mode)

    def rmdir(self, path: str) -> None:
        os.rmdir(self._p(path))

    def unlink(self, path: str) -> None:
        os.unlink(self._p(path))

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        if not flags:
            os.rename(self._p(old), self._p(new))
            return
        if _libc.renameat2(AT_FDCWD, os.fsencode(self._p(old)), AT_FDCWD, os.fsencode(self._p(new)), flags) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), old)

    def link(self, src: str, dst: str) -> None:
        os.link(self._p(src), self._p(dst), follow_symlinks=False)

    def symlink(self, target: str, path: str) -> None:
        os.symlink(target, self._p(path))

    def readlink(self, path: str) -> str:
        return os.readlink(self._p(path))

    def mkfifo(self, path: str, mode: int = 0o644) -> None:
        os.mkfifo(self._p(path), mode)

    def mknod(self, path: str, mode: int, major: int, minor: int) -> None:
        os.mknod(self._p(path), stat.S_IFCHR | mode, os.makedev(major, minor))

    def mksock(self, path: str, mode: int = 0o644) -> None:
        os.mknod(self._p(path), stat.S_IFSOCK | mode)

    def readdir_rewind(self, path: str, create: str) -> tuple[list[str], list[str]]:
        fd = os.open(self._p(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            before = sorted(os.listdir(fd))  # listdir(fd) rewinds the open directory first
            self.write_file(join(path, create), b"created while open\n")
            return before, sorted(os.listdir(fd))
        finally:
            os.close(fd)

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._p(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self._p(path), uid, gid)

    def fallocate(self, path: str, mode: int, offset: int, length: int) -> tuple[int, int]:
        from layerfs.linux.files import fallocate

        fd = os.open(self._p(path), os.O_RDWR)
        try:
            fallocate(fd, mode, offset, length)
            st = os.fstat(fd)
            return st.st_size, round(st.st_blocks * 512 / 32768)
        finally:
            os.close(fd)

    def ctime_bumped(self, path: str, op: str, *args: Any) -> bool:
        before = os.lstat(self._p(path)).st_ctime_ns
        time.sleep(0.02)  # past the filesystem's timestamp granularity
        getattr(self, op)(path, *args)
        return os.lstat(self._p(path)).st_ctime_ns > before

    def truncate(self, path: str, size: int) -> None:
        os.truncate(self._p(path), size)

    def utime(self, path: str, atime_ns: int, mtime_ns: int) -> None:
        os.utime(self._p(path), ns=(atime_ns, mtime_ns))

    def setxattr(self, path: str, name: str, value: bytes, flags: int = 0) -> None:
        os.setxattr(self._p(path), name, value, flags, follow_symlinks=False)

    def getxattr(self, path: str, name: str) -> bytes:
        return os.getxattr(self._p(path), name, follow_symlinks=False)

    def listxattr(self, path: str) -> list[str]:
        return sorted(os.listxattr(self._p(path), follow_symlinks=False))

    def removexattr(self, path: str, name: str) -> None:
        os.removexattr(self._p(path), name, follow_symlinks=False)

    def statfs_namemax(self) -> int:
        return os.statvfs(self.root).f_namemax

    def access_as(self, path: str, uid: int, gid: int) -> tuple[tuple[str, str], ...]:
        r = subprocess.run(
            [self.helper_python, "-c", _ACCESS_HELPER, self._p(path)],
            user=uid, group=gid, extra_groups=[], cwd="/", capture_output=True, text=True, timeout=30,
        )
        if r.returncode != 0:
            raise AssertionError(f"access helper as {uid}:{gid} failed: {r.stderr}")
        return tuple(sorted(json.loads(r.stdout).items()))

    def tree(self) -> Tree:
        return scan_dir(self.root, upper=False)

    def long_path_roundtrip(self, start: str, components: list[str], leaf: str, data: bytes) -> dict[str, Any]:
        """mkdir -p and walk ``start/components`` with dir fds, then create/append/read/rename
        ``leaf`` at the bottom. Returns what happened (comparable across backends)."""
        out: dict[str, Any] = {}
        fd = os.open(self._p(start), os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in components:
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)
                    out.setdefault("created", 0)
                    out["created"] += 1
                except FileExistsError:
                    pass
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = sub
            out["listdir"] = sorted(os.listdir(fd))
            wfd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644, dir_fd=fd)
            try:
                out["written"] = _write_all(wfd, data)
            finally:
                os.close(wfd)
            rfd = os.open(leaf, os.O_RDONLY, dir_fd=fd)
            try:
                out["content"] = _read_all(rfd)
            finally:
                os.close(rfd)
            st = os.stat(leaf, dir_fd=fd, follow_symlinks=False)
            out["stat"] = make_stat(st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_size, st.st_rdev, None)
            os.rename(leaf, leaf + ".renamed", src_dir_fd=fd, dst_dir_fd=fd)
            os.mkdir("newdir", 0o700, dir_fd=fd)
            out["listdir_after"] = sorted(os.listdir(fd))
        finally:
            os.close(fd)
        full = self._p("/".join([start, *components, leaf + ".renamed"]))
        out["path_len"] = len(full.encode()) > 4096
        try:
            os.lstat(full)
            out["full_path_lstat"] = "ok"
        except OSError as e:
            out["full_path_lstat"] = errno_name(e.errno)
        return out


_ACCESS_HELPER = r"""
import json, os, sys
p = sys.argv[1]
out = {}
for key, mode in (("r", os.R_OK), ("w", os.W_OK), ("x", os.X_OK)):
    out[key] = "ok" if os.access(p, mode) else "EACCES"
def attempt(key, fn):
    try:
        fn()
        out[key] = "ok"
    except OSError as e:
        import errno
        out[key] = errno.errorcode.get(e.errno, str(e.errno))
if os.path.isdir(p):
    attempt("listdir", lambda: os.listdir(p))
else:
    attempt("open_r", lambda: os.close(os.open(p, os.O_RDONLY | os.O_NONBLOCK)))
print(json.dumps(out))
"""


def _helper_python() -> str:
    """A Python another uid may execute (the venv's lives below /root, mode 0700)."""
    for candidate in ("/usr/bin/python3", shutil.which("python3") or ""):
        if candidate and os.access(candidate, os.X_OK) and not candidate.startswith("/root"):
            return candidate
    return sys.executable


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = os.read(fd, READ_CHUNK)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _write_all(fd: int, data: bytes) -> int:
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])
    return done


# --- snapshots of directories on disk ------------------------------------------------


def scan_dir(root: str, *, upper: bool) -> Tree:
    """Snapshot the tree at ``root`` with directory fds (no PATH_MAX limit).

    ``upper=False``: a union's merged view, every xattr the view lists (a leaked
    overlay-private name shows up, as it should). ``upper=True``: a raw upper directory:
    whiteouts become ``WHITEOUT_NODE`` (their owner, mode and link count are kernel
    bookkeeping: overlayfs shares one whiteout inode) and the overlay xattrs in
    ``IGNORED_OVERLAY_XATTRS`` are dropped, while opaque and redirect stay.
    """
    out: Tree = {}
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        return {"": error_node(e)}
    try:
        st = os.fstat(fd)
        out[""] = make_node(st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_size, st.st_rdev, None, None,
                            _xattrs_of(f"/proc/self/fd/{fd}", upper))
        _scan_at(fd, "", out, upper)
    finally:
        os.close(fd)
    return dict(sorted(out.items()))


def _scan_at(dir_fd: int, prefix: str, out: Tree, upper: bool) -> None:
    try:
        names = sorted(os.listdir(dir_fd))
    except OSError as e:
        out[join(prefix, "*")] = error_node(e)
        return
    for name in names:
        rel = join(prefix, name)
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as e:
            out[rel] = error_node(e)
            continue
        if upper and stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            out[rel] = WHITEOUT_NODE
            continue
        proc_path = f"/proc/self/fd/{dir_fd}/{name}"
        content: bytes | None = None
        target: str | None = None
        try:
            if stat.S_ISREG(st.st_mode):
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
                try:
                    content = _read_all(fd)
                finally:
                    os.close(fd)
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(name, dir_fd=dir_fd)
        except OSError as e:
            content = f"<{errno_name(e.errno)}>".encode()
        out[rel] = make_node(st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_size, st.st_rdev, content,
                             target, _xattrs_of(proc_path, upper))
        if stat.S_ISDIR(st.st_mode):
            try:
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            except OSError as e:
                out[join(rel, "*")] = error_node(e)
                continue
            try:
                _scan_at(sub, rel, out, upper)
            finally:
                os.close(sub)


def _xattrs_of(path: str, upper: bool) -> dict[str, bytes]:
    out = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        return {"<listxattr>": errno_name(e.errno).encode()}
    for name in names:
        if upper and name in IGNORED_OVERLAY_XATTRS:
            continue
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            out[name] = f"<{errno_name(e.errno)}>".encode()
    return out


def dump_upper(upper: str) -> Tree:
    """The normalized on-disk state of an upper directory (see ``scan_dir``)."""
    return scan_dir(upper, upper=True)


def call_logged(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args)``, or the errno name of the OSError it raised (for observation logs)."""
    try:
        return fn(*args, **kwargs)
    except OSError as e:
        return errno_name(e.errno)

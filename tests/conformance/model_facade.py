"""``ModelFacade``: the union model driven through ``UnionOps``, as the kernel would drive it.

It resolves paths by ``lookup`` from ``ROOT_INODE`` and adds what the kernel's VFS does on
top of a FUSE filesystem before the filesystem is asked: the existence checks of
create/mkdir/link/rename (EEXIST, EISDIR, ENOTDIR, the rename "trap" checks EINVAL and
ENOTEMPTY, RENAME_NOREPLACE/RENAME_EXCHANGE), umask, O_APPEND positioning, setuid/setgid
removal on chown, the user.* xattr rule for special files, EISDIR for read() of a
directory. Permission checks (``default_permissions``) are the kernel's, not the model's:
operations that exist only to test them (``access_as``) raise ``Unsupported``, and so do
the dir_fd walks past PATH_MAX (the model has no paths).
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .facade import (
    MAX_SYMLINK_HOPS,
    READ_CHUNK,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    UMASK,
    Facade,
    Node,
    Stat,
    Tree,
    Unsupported,
    errno_name,
    error_node,
    join,
    make_node,
    make_stat,
    split,
)

if TYPE_CHECKING:
    from layerfs.union.api import Attr, UnionOps


class ModelFacade(Facade):
    """The union model driven through ``UnionOps``, with the kernel VFS's part emulated.

    Lookup counts: every ``lookup`` (and every entry-creating call, and every ``readdir``
    entry if the model says ``readdir_counts_lookups``, as ``layerfs.fuse.ops`` asks) made
    during one facade operation is ``forget``-ed when the operation ends, as if the kernel
    dropped its dentries at once (what memory pressure may always do).
    """

    name = "model"

    def __init__(self, fs: UnionOps) -> None:
        from layerfs.union.api import ROOT_INODE, Ctx

        self.fs = fs
        self.root_ino = ROOT_INODE
        self.ctx = Ctx(uid=0, gid=0, umask=UMASK, pid=os.getpid())
        self._held: list[int] | None = None

    # -- lookup bookkeeping and path resolution --

    @contextmanager
    def _op(self) -> Iterator[None]:
        outer = self._held is None
        if outer:
            self._held = []
        try:
            yield
        finally:
            if outer:
                held, self._held = self._held or [], None
                counts: dict[int, int] = {}
                for ino in held:
                    counts[ino] = counts.get(ino, 0) + 1
                for ino, n in counts.items():
                    self.fs.forget(ino, n)

    def _hold(self, attr: Attr) -> Attr:
        assert self._held is not None
        self._held.append(attr.st_ino)
        return attr

    def _lookup(self, parent: int, name: str) -> Attr:
        return self._hold(self.fs.lookup(parent, os.fsencode(name)))

    def _resolve(self, path: str, follow: bool) -> tuple[Attr, int, str]:
        """``(attr, parent inode, final name)`` of ``path``, following symlinks on the way (and
        at the end if ``follow``). The root resolves to ``(root attr, ROOT_INODE, "")``."""
        pending = [p for p in path.split("/") if p and p != "."]
        stack = [self.fs.getattr(self.root_ino)]
        parent, last_name = self.root_ino, ""
        hops = 0
        while pending:
            name = pending.pop(0)
            cur = stack[-1]
            if not stat.S_ISDIR(cur.st_mode):
                raise OSError(errno.ENOTDIR, "not a directory", path)
            if name == "..":
                if len(stack) > 1:
                    stack.pop()
                continue
            child = self._lookup(cur.st_ino, name)
            if stat.S_ISLNK(child.st_mode) and (pending or follow):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise OSError(errno.ELOOP, "too many symlinks", path)
                target = os.fsdecode(self.fs.readlink(child.st_ino))
                if target.startswith("/"):
                    raise Unsupported(f"absolute symlink {target!r} points outside the union")
                pending[:0] = [p for p in target.split("/") if p and p != "."]
                continue
            parent, last_name = cur.st_ino, name
            stack.append(child)
        return stack[-1], parent, last_name

    def _parent_of(self, path: str) -> tuple[int, str]:
        """Resolve the parent directory of ``path`` (following symlinks); returns (inode, name)."""
        head, name = split(path)
        attr = self._resolve(head, follow=True)[0]
        if not stat.S_ISDIR(attr.st_mode):
            raise OSError(errno.ENOTDIR, "not a directory", path)
        return attr.st_ino, name

    def _child_or_none(self, parent: int, name: str) -> Attr | None:
        try:
            return self._lookup(parent, name)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise

    def _attr_stat(self, a: Attr) -> Stat:
        target = os.fsdecode(self.fs.readlink(a.st_ino)) if stat.S_ISLNK(a.st_mode) else None
        return make_stat(a.st_mode, a.st_nlink, a.st_uid, a.st_gid, a.st_size, a.st_rdev, target)

    def _setattr(self, ino: int, **changes: Any) -> None:
        from layerfs.union.api import SetAttr

        self.fs.setattr(ino, SetAttr(**changes), None, self.ctx)

    def _read_fh(self, fh: int) -> bytes:
        chunks: list[bytes] = []
        offset = 0
        while True:
            chunk = self.fs.read(fh, offset, READ_CHUNK)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            offset += len(chunk)

    # -- attributes --

    def lstat(self, path: str) -> Stat:
        with self._op():
            return self._attr_stat(self._resolve(path, follow=False)[0])

    def stat(self, path: str) -> Stat:
        with self._op():
            return self._attr_stat(self._resolve(path, follow=True)[0])

    def ino(self, path: str) -> int:
        with self._op():
            return self._resolve(path, follow=False)[0].st_ino

    def dev(self, path: str) -> int:
        with self._op():
            self._resolve(path, follow=False)
            return 0  # one model, one device

    def mtime_ns(self, path: str) -> int:
        with self._op():
            return self._resolve(path, follow=False)[0].st_mtime_ns

    # -- contents --

    def read_file(self, path: str) -> bytes:
        with self._op():
            a = self._resolve(path, follow=True)[0]
            if stat.S_ISDIR(a.st_mode):
                # open(O_RDONLY) of a directory succeeds (it is an opendir); read() fails
                raise OSError(errno.EISDIR, "is a directory", path)
            fh = self.fs.open(a.st_ino, os.O_RDONLY)
            try:
                return self._read_fh(fh)
            finally:
                self.fs.release(fh)

    def _open_for_write(self, path: str, flags: int, mode: int) -> tuple[int, int]:
        """open(2) for writing as the VFS does it; returns (fh, inode)."""
        excl = flags & os.O_CREAT and flags & os.O_EXCL
        try:
            a = self._resolve(path, follow=not excl)[0]
        except OSError as e:
            if e.errno != errno.ENOENT or not flags & os.O_CREAT:
                raise
            parent, name = self._parent_of(path)
            if self._child_or_none(parent, name) is not None:
                raise Unsupported("O_CREAT through a dangling symlink") from e
            fh, attr = self.fs.create(parent, os.fsencode(name), mode & ~UMASK & 0o7777, flags & ~os.O_NOCTTY,
                                      self.ctx)
            self._hold(attr)
            return fh, attr.st_ino
        if excl:
            raise OSError(errno.EEXIST, "exists", path)
        if stat.S_ISDIR(a.st_mode) and flags & os.O_ACCMODE != os.O_RDONLY:
            raise OSError(errno.EISDIR, "is a directory", path)
        return self.fs.open(a.st_ino, flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY)), a.st_ino

    def write_file(self, path: str, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                   mode: int = 0o644) -> int:
        with self._op():
            fh, ino = self._open_for_write(path, flags, mode)
            try:
                # the kernel positions O_APPEND writes at the current size
                offset = self.fs.getattr(ino).st_size if flags & os.O_APPEND else 0
                done = 0
                while done < len(data):
                    n = self.fs.write(fh, offset + done, data[done:])
                    if n <= 0:
                        raise AssertionError(f"model write returned {n}")
                    done += n
                self.fs.flush(fh)
                return done
            finally:
                self.fs.release(fh)

    def open_unlink_read(self, path: str) -> tuple[bytes, int]:
        with self._op():
            a, parent, name = self._resolve(path, follow=True)
            fh = self.fs.open(a.st_ino, os.O_RDONLY)
            try:
                self._unlink(parent, name, path)
                nlink = self.fs.getattr(a.st_ino).st_nlink
                return self._read_fh(fh), nlink
            finally:
                self.fs.release(fh)

    # -- names --

    def listdir(self, path: str) -> list[str]:
        with self._op():
            a = self._resolve(path, follow=True)[0]
            if not stat.S_ISDIR(a.st_mode):
                raise OSError(errno.ENOTDIR, "not a directory", path)
            return sorted(os.fsdecode(n) for n in self._readdir(a.st_ino))

    def _readdir(self, ino: int) -> list[bytes]:
        fh = self.fs.opendir(ino)
        try:
            return self._readdir_names(fh)
        finally:
            self.fs.releasedir(fh)

    def _readdir_fh(self, fh: int) -> list[str]:
        return sorted(os.fsdecode(n) for n in self._readdir_names(fh))

    def _readdir_names(self, fh: int) -> list[bytes]:
        """Every name of an open directory handle, read from offset 0 to the end."""
        # a model may count one lookup per returned entry (the FUSE adapter asks it the same way)
        counted = bool(getattr(self.fs, "readdir_counts_lookups", False))
        names: list[bytes] = []
        offset = 0
        while True:
            batch = self.fs.readdir(fh, offset)
            if not batch:
                return names
            for entry in batch:
                if entry.name not in (b".", b".."):
                    names.append(entry.name)
                    if counted:
                        self._hold(entry.attr)
                offset = entry.next_offset

    def _create_check(self, path: str) -> tuple[int, str]:
        parent, name = self._parent_of(path)
        if self._child_or_none(parent, name) is not None:
            raise OSError(errno.EEXIST, "exists", path)
        return parent, name

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        with self._op():
            parent, name = self._create_check(path)
            self._hold(self.fs.mkdir(parent, os.fsencode(name), mode & ~UMASK & 0o7777, self.ctx))

    def rmdir(self, path: str) -> None:
        with self._op():
            parent, name = self._parent_of(path)
            if not stat.S_ISDIR(self._lookup(parent, name).st_mode):
                raise OSError(errno.ENOTDIR, "not a directory", path)
            self.fs.rmdir(parent, os.fsencode(name))

    def _unlink(self, parent: int, name: str, path: str) -> None:
        if stat.S_ISDIR(self._lookup(parent, name).st_mode):
            raise OSError(errno.EISDIR, "is a directory", path)
        self.fs.unlink(parent, os.fsencode(name))

    def unlink(self, path: str) -> None:
        with self._op():
            parent, name = self._parent_of(path)
            self._unlink(parent, name, path)

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        with self._op():
            op, oname = self._parent_of(old)
            np, nname = self._parent_of(new)  # do_renameat2(): both parents before either name
            src = self._lookup(op, oname)
            dst = self._child_or_none(np, nname)
            if flags & RENAME_NOREPLACE and dst is not None:
                raise OSError(errno.EEXIST, "exists", new)
            if flags & RENAME_EXCHANGE and dst is None:
                raise OSError(errno.ENOENT, "no such file", new)
            # do_renameat2()'s "trap" checks, by path (cases never rename through symlinks)
            o, n = self._canonical(old), self._canonical(new)
            if len(n) > len(o) and n[: len(o)] == o:
                raise OSError(errno.EINVAL, "source is an ancestor of the target", new)
            if len(o) > len(n) and o[: len(n)] == n:
                err = errno.EINVAL if flags & RENAME_EXCHANGE else errno.ENOTEMPTY
                raise OSError(err, "target is an ancestor of the source", new)
            if dst is not None and dst.st_ino == src.st_ino:
                return  # vfs_rename(): the same inode, nothing to do
            src_dir = stat.S_ISDIR(src.st_mode)
            if dst is not None and not flags & RENAME_EXCHANGE:
                # may_delete() of the target
                if src_dir and not stat.S_ISDIR(dst.st_mode):
                    raise OSError(errno.ENOTDIR, "not a directory", new)
                if not src_dir and stat.S_ISDIR(dst.st_mode):
                    raise OSError(errno.EISDIR, "is a directory", new)
            self.fs.rename(op, os.fsencode(oname), np, os.fsencode(nname), flags)

    @staticmethod
    def _canonical(path: str) -> list[str]:
        return [p for p in path.split("/") if p and p != "."]

    def link(self, src: str, dst: str) -> None:
        with self._op():
            a = self._resolve(src, follow=False)[0]
            parent, name = self._parent_of(dst)
            if self._child_or_none(parent, name) is not None:
                raise OSError(errno.EEXIST, "exists", dst)
            if stat.S_ISDIR(a.st_mode):
                raise OSError(errno.EPERM, "hard link to a directory", src)
            self._hold(self.fs.link(a.st_ino, parent, os.fsencode(name)))

    def symlink(self, target: str, path: str) -> None:
        with self._op():
            parent, name = self._create_check(path)
            self._hold(self.fs.symlink(parent, os.fsencode(name), os.fsencode(target), self.ctx))

    def readlink(self, path: str) -> str:
        with self._op():
            a = self._resolve(path, follow=False)[0]
            if not stat.S_ISLNK(a.st_mode):
                raise OSError(errno.EINVAL, "not a symlink", path)
            return os.fsdecode(self.fs.readlink(a.st_ino))

    def _mknod(self, path: str, mode: int, rdev: int) -> None:
        with self._op():
            parent, name = self._create_check(path)
            perm = stat.S_IMODE(mode) & ~UMASK
            self._hold(self.fs.mknod(parent, os.fsencode(name), stat.S_IFMT(mode) | perm, rdev, self.ctx))

    def mkfifo(self, path: str, mode: int = 0o644) -> None:
        self._mknod(path, stat.S_IFIFO | mode, 0)

    def mknod(self, path: str, mode: int, major: int, minor: int) -> None:
        self._mknod(path, stat.S_IFCHR | mode, os.makedev(major, minor))

    def mksock(self, path: str, mode: int = 0o644) -> None:
        self._mknod(path, stat.S_IFSOCK | mode, 0)

    def readdir_rewind(self, path: str, create: str) -> tuple[list[str], list[str]]:
        with self._op():
            a = self._resolve(path, follow=True)[0]
            if not stat.S_ISDIR(a.st_mode):
                raise OSError(errno.ENOTDIR, "not a directory", path)
            fh = self.fs.opendir(a.st_ino)
            try:
                before = self._readdir_fh(fh)
                self.write_file(join(path, create), b"created while open\n")
                # rewinddir(): the kernel asks the same handle again from offset 0
                return before, self._readdir_fh(fh)
            finally:
                self.fs.releasedir(fh)

    # -- metadata --

    def chmod(self, path: str, mode: int) -> None:
        with self._op():
            a = self._resolve(path, follow=True)[0]
            self._setattr(a.st_ino, mode=mode & 0o7777)

    def chown(self, path: str, uid: int, gid: int) -> None:
        with self._op():
            a = self._resolve(path, follow=True)[0]
            changes: dict[str, Any] = {"uid": None if uid == -1 else uid, "gid": None if gid == -1 else gid}
            if not stat.S_ISDIR(a.st_mode):
                # chown_common() + notify_change(): ATTR_KILL_SUID/SGID on every non-directory
                perm = stat.S_IMODE(a.st_mode)
                killed = perm & ~stat.S_ISUID
                if perm & (stat.S_ISGID | stat.S_IXGRP) == stat.S_ISGID | stat.S_IXGRP:
                    killed &= ~stat.S_ISGID
                if killed != perm:
                    changes["mode"] = killed
            self._setattr(a.st_ino, **changes)

    def fallocate(self, path: str, mode: int, offset: int, length: int) -> tuple[int, int]:
        with self._op():
            fh, ino = self._open_for_write(path, os.O_RDWR, 0)
            try:
                self.fs.fallocate(fh, mode, offset, length)
                a = self.fs.getattr(ino)
                return a.st_size, round(a.st_blocks * 512 / 32768)
            finally:
                self.fs.release(fh)

    def ctime_bumped(self, path: str, op: str, *args: Any) -> bool:
        before = self.lstat_ctime_ns(path)
        time.sleep(0.02)
        getattr(self, op)(path, *args)
        return self.lstat_ctime_ns(path) > before

    def lstat_ctime_ns(self, path: str) -> int:
        with self._op():
            return self._resolve(path, follow=False)[0].st_ctime_ns

    def truncate(self, path: str, size: int) -> None:
        with self._op():
            a = self._resolve(path, follow=True)[0]
            if stat.S_ISDIR(a.st_mode):
                raise OSError(errno.EISDIR, "is a directory", path)
            if not stat.S_ISREG(a.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", path)
            self._setattr(a.st_ino, size=size)

    def utime(self, path: str, atime_ns: int, mtime_ns: int) -> None:
        with self._op():
            a = self._resolve(path, follow=True)[0]
            self._setattr(a.st_ino, atime_ns=atime_ns, mtime_ns=mtime_ns)

    # -- xattrs --

    def _xattr_target(self, path: str, name: str, writing: bool) -> Attr:
        a = self._resolve(path, follow=False)[0]
        # xattr_permission(): user.* only on regular files and directories
        if name.startswith("user.") and not (stat.S_ISREG(a.st_mode) or stat.S_ISDIR(a.st_mode)):
            raise OSError(errno.EPERM if writing else errno.ENODATA, "user xattr on a special file", path)
        return a

    def setxattr(self, path: str, name: str, value: bytes, flags: int = 0) -> None:
        with self._op():
            a = self._xattr_target(path, name, writing=True)
            self.fs.setxattr(a.st_ino, name.encode(), value, flags)

    def getxattr(self, path: str, name: str) -> bytes:
        with self._op():
            a = self._xattr_target(path, name, writing=False)
            return self.fs.getxattr(a.st_ino, name.encode())

    def listxattr(self, path: str) -> list[str]:
        with self._op():
            a = self._resolve(path, follow=False)[0]
            return sorted(n.decode() for n in self.fs.listxattr(a.st_ino))

    def removexattr(self, path: str, name: str) -> None:
        with self._op():
            a = self._xattr_target(path, name, writing=True)
            self.fs.removexattr(a.st_ino, name.encode())

    # -- the filesystem --

    def statfs_namemax(self) -> int:
        return self.fs.statfs().f_namemax

    def access_as(self, path: str, uid: int, gid: int) -> tuple[tuple[str, str], ...]:
        raise Unsupported("permission checks are the kernel's (default_permissions), not the model's")

    def tree(self) -> Tree:
        with self._op():
            out: Tree = {}
            try:
                root = self.fs.getattr(self.root_ino)
            except OSError as e:
                return {"": error_node(e)}
            out[""] = self._node(root)
            self._tree_at(root.st_ino, "", out)
            return dict(sorted(out.items()))

    def _tree_at(self, ino: int, prefix: str, out: Tree) -> None:
        try:
            names = sorted(self._readdir(ino))
        except OSError as e:
            out[join(prefix, "*")] = error_node(e)
            return
        for raw in names:
            name = os.fsdecode(raw)
            rel = join(prefix, name)
            try:
                a = self._lookup(ino, name)
            except OSError as e:
                out[rel] = error_node(e)
                continue
            out[rel] = self._node(a)
            if stat.S_ISDIR(a.st_mode):
                self._tree_at(a.st_ino, rel, out)

    def _node(self, a: Attr) -> Node:
        content: bytes | None = None
        target: str | None = None
        try:
            if stat.S_ISREG(a.st_mode):
                fh = self.fs.open(a.st_ino, os.O_RDONLY)
                try:
                    content = self._read_fh(fh)
                finally:
                    self.fs.release(fh)
            elif stat.S_ISLNK(a.st_mode):
                target = os.fsdecode(self.fs.readlink(a.st_ino))
        except OSError as e:
            content = f"<{errno_name(e.errno)}>".encode()
        xattrs = {}
        try:
            names = self.fs.listxattr(a.st_ino)
        except OSError as e:
            names = []
            xattrs["<listxattr>"] = errno_name(e.errno).encode()
        for raw in names:
            try:
                xattrs[raw.decode()] = self.fs.getxattr(a.st_ino, raw)
            except OSError as e:
                xattrs[raw.decode()] = f"<{errno_name(e.errno)}>".encode()
        return make_node(a.st_mode, a.st_nlink, a.st_uid, a.st_gid, a.st_size, a.st_rdev, content, target, xattrs)

"""``UnionFS``: the read-write union filesystem model (implements ``api.UnionOps``).

Semantics are kernel overlayfs' with ``redirect_dir=on,index=off`` (the oracle: the
conformance suite runs the same cases on both), and the upper it writes is the upper the
kernel writes for the same operations, so either backend mounts what the other wrote.
The on-disk formats are owned by the modules that write them: ``upper`` (whiteouts,
opaque, redirect, the workdir), ``copyup`` (copied entries), ``inodes`` (the origin
record), ``xattrs`` (escaped overlay names); ``dirindex`` reads every lower convention.

Choices worth knowing (deviations from the kernel are listed in the report of issue 4):

- ``mode`` of new entries: ``ctx.umask`` is applied here. The FUSE kernel module already
  applies the caller's umask unless the filesystem asks for ``FUSE_DONT_MASK``; applying
  it twice changes nothing, so the model is right either way (and when called directly).
  Owner: ``ctx.uid``; group: the parent's if it is setgid (directories then inherit the
  bit), else ``ctx.gid``.
- ``readdir`` does not take lookup references. pyfuse3's ``readdir_reply`` tells the
  kernel it holds one more reference for each accepted entry, so the adapter calls
  ``lookup(parent, name)`` for each accepted entry: a dict hit, since readdir already made
  the node (kept alive by the open directory handle until ``releasedir``).
- a file unlinked while open reports the link count of its real file, as the kernel does:
  0 for an upper file, the lower file's own count (1, or more for a lower hardlink) for a
  file still served from a lower layer.
- names starting with ``.wh.`` are whiteout markers: never shown, not creatable (EINVAL).
- rename never fails with EXDEV (the kernel does when a redirect would exceed
  ``redirect_max``, 256 bytes): long absolute redirects are written (the kernel follows
  them when it mounts the upper); one too long for an xattr of the upper's filesystem
  makes the model copy the directory's whole tree up and move it as an opaque directory.
"""

from __future__ import annotations

import errno
import os
import stat

from layerfs.linux.files import fallocate, utimensat
from layerfs.union import xattrs
from layerfs.union.api import Attr, Ctx, DirEntry, SetAttr, StatFS
from layerfs.union.core import DirHandle, FileHandle, oserror
from layerfs.union.inodes import Node
from layerfs.union.namespace import NamespaceOps

READDIR_CHUNK = 128
# flags that reach the real file on open; the rest are the kernel's business
_OPEN_FLAGS = os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_SYNC | os.O_DSYNC | os.O_NONBLOCK


class UnionFS(NamespaceOps):
    """A union of ``lowers`` (top first), writable into ``upper`` (with ``work``), or
    read-only (every change fails with EROFS) without them."""

    # ``readdir`` counts one lookup per entry it returns when this is true (see
    # ``layerfs.union.api``): set by an adapter that keeps the entries the kernel has no room
    # for (``layerfs.fuse.dispatch``), which then needs no ``lookup`` per entry it sends
    readdir_counts_lookups = False
    readdir_can_count_lookups = True

    # --- lookups and attributes ---------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> Attr:
        with self._lock:
            p = self._dir(parent)
            if name == b".":
                node: Node | None = p
            elif name == b"..":
                node = p.parent or p
            else:
                self._check_name(name)
                node = self._child(p, name)
            if node is None:
                raise oserror(errno.ENOENT, "no such entry", name)
            attr = self._attr(node)
            node.nlookup += 1
            return attr

    def forget(self, inode: int, nlookup: int) -> None:
        with self._lock:
            node = self._table.nodes.get(inode)
            if node is not None and node is not self._root:
                node.nlookup = max(0, node.nlookup - nlookup)
                self._table.maybe_drop(node)

    def getattr(self, inode: int) -> Attr:
        with self._lock:
            return self._attr(self._node(inode))

    def readlink(self, inode: int) -> bytes:
        with self._lock:
            node = self._node(inode)
            if node.kind != stat.S_IFLNK:
                raise oserror(errno.EINVAL, "not a symlink")
            if node.upper:
                fd, name = self._at(node)
                return os.readlink(name, dir_fd=fd) if name is not None else os.readlink(b"/proc/self/fd/%d" % fd)
            assert node.lower is not None
            return self._lowers.readlink(node.lower.dir, node.lower.name)

    def setattr(self, inode: int, changes: SetAttr, fh: int | None, ctx: Ctx) -> Attr:
        with self._lock:
            while True:
                node = self._node(inode)
                self._writable()  # even a change of nothing (chown -1 -1) copies up, as the kernel
                if changes.size is not None:
                    if node.is_dir:
                        raise oserror(errno.EISDIR, "cannot truncate a directory")
                    if node.kind != stat.S_IFREG:
                        raise oserror(errno.EINVAL, "can only truncate regular files")
                if self._ensure_upper(node, truncate=changes.size):
                    continue
                self._apply_setattr(node, changes, fh)
                return self._attr(node)

    def _apply_setattr(self, node: Node, changes: SetAttr, fh: int | None) -> None:
        handle = self._fhs.get(fh) if fh is not None else None
        fd, name = self._at(node)
        if changes.size is not None:
            if handle is not None and handle.writable and handle.upper:
                os.ftruncate(handle.fd, changes.size)
            else:
                tfd = (os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd) if name is not None
                       else os.open(b"/proc/self/fd/%d" % fd, os.O_WRONLY | os.O_CLOEXEC))
                try:
                    os.ftruncate(tfd, changes.size)
                finally:
                    os.close(tfd)
        if changes.uid is not None or changes.gid is not None:
            uid = -1 if changes.uid is None else changes.uid
            gid = -1 if changes.gid is None else changes.gid
            if name is None:
                os.fchown(fd, uid, gid)
            else:
                os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
        if changes.mode is not None:  # after chown, which clears setuid/setgid
            if node.kind == stat.S_IFLNK:
                raise oserror(errno.EOPNOTSUPP, "symlinks have no mode of their own")
            if name is None:
                os.fchmod(fd, stat.S_IMODE(changes.mode))
            else:
                os.chmod(name, stat.S_IMODE(changes.mode), dir_fd=fd)
        if changes.atime_ns is not None or changes.mtime_ns is not None or changes.atime_now or changes.mtime_now:
            utimensat(fd, name, changes.atime_ns, changes.mtime_ns, changes.atime_now, changes.mtime_now)
        if changes == SetAttr():
            # chown(path, -1, -1) changes nothing but is still a change: the kernel's
            # notify_change moves ctime, and so does the same call on the upper entry
            if name is None:
                os.fchown(fd, -1, -1)
            else:
                os.chown(name, -1, -1, dir_fd=fd, follow_symlinks=False)

    # --- directories --------------------------------------------------------------------

    def opendir(self, inode: int) -> int:
        with self._lock:
            node = self._dir(inode)
            handle = self._handle_id()
            upper_names: set[bytes] = set()
            self._dhs[handle] = DirHandle(node, self._list(node, upper_names), upper_names, self._gen)
            node.pins += 1
            return handle

    def readdir(self, fh: int, offset: int) -> list[DirEntry]:
        with self._lock:
            dh = self._dhs.get(fh)
            if dh is None:
                raise oserror(errno.EBADF, "no such directory handle")
            out: list[DirEntry] = []
            if dh.node.dead:
                return out
            if offset <= 0 and dh.served and dh.gen != self._gen:
                # rewinddir(3): the kernel shows the directory as it is now, not as it was
                # at opendir; take a new snapshot (nodes pinned so far stay pinned)
                dh.upper_names = set()
                dh.names = self._list(dh.node, dh.upper_names)
                dh.gen = self._gen
            dh.served = True
            i = max(0, offset)
            fresh = dh.gen == self._gen  # nothing changed since opendir: skip upper lookups
            while i < len(dh.names) and len(out) < READDIR_CHUNK:
                name = dh.names[i]
                i += 1
                child = self._child(dh.node, name, fresh and name not in dh.upper_names)
                if child is None:
                    continue  # removed since opendir: skipped, offsets stay put
                try:
                    attr = self._attr(child)
                except OSError:
                    continue
                if child not in dh.pinned:
                    child.pins += 1
                    dh.pinned.add(child)
                if self.readdir_counts_lookups:
                    child.nlookup += 1
                out.append(DirEntry(name, attr, i))
            return out

    def releasedir(self, fh: int) -> None:
        with self._lock:
            dh = self._dhs.pop(fh, None)
            if dh is None:
                return
            for node in (*dh.pinned, dh.node):
                node.pins -= 1
            for node in (*dh.pinned, dh.node):
                self._table.maybe_drop(node)

    # --- files --------------------------------------------------------------------------

    def open(self, inode: int, flags: int) -> int:
        with self._lock:
            while True:
                node = self._node(inode)
                if node.is_dir:
                    raise oserror(errno.EISDIR, "directories are opened with opendir")
                if node.kind == stat.S_IFLNK:
                    raise oserror(errno.ELOOP, "a symlink is not opened (O_NOFOLLOW)")
                if node.kind != stat.S_IFREG:
                    raise oserror(errno.EINVAL, "the kernel opens device, fifo and socket nodes itself")
                writing = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
                if writing:
                    self._writable()
                    if self._ensure_upper(node, truncate=0 if flags & os.O_TRUNC else None):
                        continue
                elif self._wait_idle(node):
                    continue
                fd, is_upper = self._open_fd(node, flags & _OPEN_FLAGS if writing else os.O_RDONLY)
                handle = self._handle_id()
                self._fhs[handle] = FileHandle(node, fd, (flags & os.O_ACCMODE) != os.O_RDONLY, is_upper, node.gen)
                node.pins += 1
                node.handles.add(handle)
                return handle

    def create(self, parent: int, name: bytes, mode: int, flags: int, ctx: Ctx) -> tuple[int, Attr]:
        with self._lock:
            p = self._dir(parent)
            self._check_name(name, creating=True)
            self._writable()
            self._refuse_existing(p, name)
            node, fd = self._make(p, name, stat.S_IFREG, mode, ctx, open_flags=flags & _OPEN_FLAGS & ~os.O_TRUNC)
            assert fd is not None
            node.nlookup += 1
            handle = self._handle_id()
            self._fhs[handle] = FileHandle(node, fd, (flags & os.O_ACCMODE) != os.O_RDONLY, True, node.gen)
            node.pins += 1
            node.handles.add(handle)
            return handle, self._attr(node)

    def _handle(self, fh: int) -> FileHandle:
        h = self._fhs.get(fh)
        if h is None:
            raise oserror(errno.EBADF, "no such file handle")
        return h

    def read(self, fh: int, offset: int, size: int) -> bytes:
        h = self._handle(fh)
        if not h.upper and h.gen != h.node.gen:
            self._refresh(h)
        return os.pread(h.fd, size, offset)

    def write(self, fh: int, offset: int, data: bytes) -> int:
        h = self._handle(fh)
        if not h.writable:
            raise oserror(errno.EBADF, "file handle not open for writing")
        return os.pwrite(h.fd, data, offset)  # O_APPEND on the fd appends wherever asked

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        h = self._handle(fh)
        if not h.writable:
            raise oserror(errno.EBADF, "file handle not open for writing")
        # a writable handle was opened after copy-up: its fd is the upper file
        fallocate(h.fd, mode, offset, length)  # the upper filesystem's answer, errno and all

    def flush(self, fh: int) -> None:
        self._handle(fh)  # data goes straight to the real file: nothing is buffered here

    def fsync(self, fh: int, datasync: bool) -> None:
        h = self._handle(fh)
        if h.upper and not self.volatile:  # volatile: no syncs, like the kernel option
            (os.fdatasync if datasync else os.fsync)(h.fd)

    def release(self, fh: int) -> None:
        with self._lock:
            h = self._fhs.pop(fh, None)
            if h is None:
                return
            for fd in (h.fd, *h.stale):
                os.close(fd)
            h.node.pins -= 1
            h.node.handles.discard(fh)
            self._table.maybe_drop(h.node)

    # --- extended attributes ------------------------------------------------------------

    def getxattr(self, inode: int, name: bytes) -> bytes:
        disk = self._xnames.to_disk(os.fsdecode(name))
        with self._lock:
            node = self._node(inode)
            if disk is None:
                value = None
            elif node.upper:
                value = xattrs.get(self._xattr_target(node), disk)
            else:
                value = self._lower_xattrs(node).get(disk)
            if value is None:
                raise oserror(errno.ENODATA, "no such attribute", name)
            return value

    def listxattr(self, inode: int) -> list[bytes]:
        with self._lock:
            node = self._node(inode)
            if node.upper:
                names = xattrs.list_names(self._xattr_target(node))
            else:
                names = list(self._lower_xattrs(node))
            return [os.fsencode(u) for u in map(self._xnames.to_user, names) if u is not None]

    def setxattr(self, inode: int, name: bytes, value: bytes, flags: int) -> None:
        disk = self._xnames.to_disk(os.fsdecode(name))
        if disk is None:
            raise oserror(errno.EPERM, "overlay state is not set through the union", name)
        with self._lock:
            while True:
                node = self._node(inode)
                self._writable()
                if self._ensure_upper(node):
                    continue
                target = self._xattr_target(node)
                os.setxattr(target, disk, value, flags, follow_symlinks=isinstance(target, int))
                return

    def removexattr(self, inode: int, name: bytes) -> None:
        disk = self._xnames.to_disk(os.fsdecode(name))
        with self._lock:
            while True:
                node = self._node(inode)
                self._writable()
                if disk is None or (not node.upper and disk not in self._lower_xattrs(node)):
                    raise oserror(errno.ENODATA, "no such attribute", name)  # no copy-up for that
                if self._ensure_upper(node):
                    continue
                target = self._xattr_target(node)
                os.removexattr(target, disk, follow_symlinks=isinstance(target, int))
                return

    # --- filesystem ---------------------------------------------------------------------

    def statfs(self) -> StatFS:
        with self._lock:
            fd = self._upper.root_fd if self._upper is not None else self._lowers.root_fds[0]
            st = os.statvfs(fd)
            return StatFS(st.f_bsize, st.f_frsize, st.f_blocks, st.f_bfree, st.f_bavail,
                          st.f_files, st.f_ffree, st.f_favail, 255)

    def backing_fd(self, fh: int) -> int | None:
        """The fd of the real file behind the open file ``fh`` when the kernel may read and
        write that file directly (FUSE passthrough) for the handle's whole life: an upper
        file (it stays the same file through renames, links and unlinks), or any file of a
        union without an upper (nothing can copy it up). None for a lower file of a writable
        union: a copy-up would move the handle to the upper copy (``_refresh``), which a
        kernel reading the lower file directly would never see. Not part of ``UnionOps``
        (see ``api.BackingFiles``); the fd stays the handle's, closed by ``release``."""
        with self._lock:
            h = self._fhs.get(fh)
            if h is None or h.node.kind != stat.S_IFREG:
                return None
            return h.fd if h.upper or self._upper is None else None

    def drain_invalidations(self) -> list[int]:
        """Inodes whose attributes changed as a side effect since the last call: the
        directories copied up on the way to an entry a request changed (their link count,
        size and ctime now come from the upper copy). Not part of ``UnionOps``: an adapter
        that lets the kernel cache attributes passes these to ``pyfuse3.invalidate_inode``
        (outside the request that caused them)."""
        with self._lock:
            out, self._invalidations = self._invalidations, []
            return out

    def destroy(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._close_all()

"""Namespace changes of the union: create, link, unlink, rmdir, rename.

Each decides, as ``ovl_create_object``, ``ovl_do_remove`` and ``ovl_rename`` do
(fs/overlayfs/dir.c), what the upper must hold afterwards, and writes it through
``layerfs.union.upper`` (which owns the on-disk form):

- a removed name that a lower layer still provides (``ovl_lower_positive``: the name is
  looked up in the parent's lower directories, not following the entry's own redirect)
  becomes a whiteout; otherwise it simply goes;
- a new entry over a whiteout replaces it atomically; a new directory there is opaque;
- a moved directory that lower layers merge into gets a redirect (its old name when it
  stays in its directory, else the absolute path the lowers know it by; a redirect that
  stays right is kept); a pure upper directory moved into a merged directory becomes
  opaque; the upper rename itself leaves the whiteout (``RENAME_WHITEOUT``) or swaps with
  the whiteout already at the new name (``RENAME_EXCHANGE``), as the kernel does;
- ``RENAME_EXCHANGE`` works on any two entries (both are copied up, both directories get
  redirects as above); ``RENAME_NOREPLACE`` gives EEXIST; other flags EINVAL.
"""

from __future__ import annotations

import errno
import os
import stat

from layerfs.linux.files import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, renameat2, rmtree_at
from layerfs.union.api import Attr, Ctx
from layerfs.union.core import UnionCore, oserror
from layerfs.union.inodes import Node
from layerfs.union.whiteout import DEVICE_WHITEOUT, FILE_WHITEOUT, NO_WHITEOUT, REDIRECT_NAMES

PATH_MAX = 4096


class NamespaceOps(UnionCore):
    # --- new entries --------------------------------------------------------------------

    def mkdir(self, parent: int, name: bytes, mode: int, ctx: Ctx) -> Attr:
        return self._create_entry(parent, name, stat.S_IFDIR, mode, ctx)

    def symlink(self, parent: int, name: bytes, target: bytes, ctx: Ctx) -> Attr:
        if len(target) >= PATH_MAX:
            raise oserror(errno.ENAMETOOLONG, "symlink target longer than PATH_MAX")
        return self._create_entry(parent, name, stat.S_IFLNK, 0o777, ctx, target=target)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: Ctx) -> Attr:
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        if kind not in (stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            raise oserror(errno.EINVAL, "mknod makes files, devices, fifos and sockets")
        if kind == stat.S_IFCHR and rdev == 0:
            raise oserror(errno.EPERM, "a 0/0 character device is a whiteout", name)  # as the kernel
        return self._create_entry(parent, name, kind, mode, ctx, rdev=rdev)

    def _create_entry(self, parent: int, name: bytes, kind: int, mode: int, ctx: Ctx,
                      rdev: int = 0, target: bytes | None = None) -> Attr:
        with self._lock:
            p = self._dir(parent)
            self._check_name(name, creating=True)
            self._writable()
            self._refuse_existing(p, name)
            node, _ = self._make(p, name, kind, mode, ctx, rdev=rdev, target=target)
            node.nlookup += 1
            return self._attr(node)

    def _make(self, p: Node, name: bytes, kind: int, mode: int, ctx: Ctx, *, rdev: int = 0,
              target: bytes | None = None, open_flags: int | None = None,
              link: tuple[Node, int, bytes] | None = None) -> tuple[Node, int | None]:
        """Create ``name`` in the upper of ``p`` (copied up first): in place, or in the
        workdir and renamed over a whiteout. ``link``: (node, dir fd, name) of an upper
        file to hardlink instead. Returns the node and, for a regular file, its open fd."""
        upper = self._writable()
        self._copy_up_dirs(p)
        pfd = self._upper_fd(p)
        over = upper.whiteout_at(pfd, name, self._upper_has_markers(p, pfd))
        at_fd, at = (upper.work_fd, upper.tmp_name()) if over != NO_WHITEOUT else (pfd, name)
        is_dir = kind == stat.S_IFDIR
        pst = os.fstat(pfd)
        perm = stat.S_IMODE(mode) & ~ctx.umask if kind != stat.S_IFLNK else 0o777
        gid = ctx.gid
        if pst.st_mode & stat.S_ISGID:
            gid = pst.st_gid
            if is_dir:
                perm |= stat.S_ISGID
        fd: int | None = None
        made = False
        try:
            if link is not None:
                os.link(link[2], at, src_dir_fd=link[1], dst_dir_fd=at_fd, follow_symlinks=False)
            elif kind == stat.S_IFREG:
                flags = (open_flags if open_flags is not None else os.O_WRONLY) | os.O_CREAT | os.O_EXCL
                fd = os.open(at, flags | os.O_NOFOLLOW | os.O_CLOEXEC, perm & 0o777, dir_fd=at_fd)
            elif is_dir:
                os.mkdir(at, perm & 0o777, dir_fd=at_fd)
            elif kind == stat.S_IFLNK:
                assert target is not None
                os.symlink(target, at, dir_fd=at_fd)
            else:
                os.mknod(at, kind | (perm & 0o777), rdev, dir_fd=at_fd)
            made = True
            if link is None:
                os.chown(at, ctx.uid, gid, dir_fd=at_fd, follow_symlinks=False)
            st = os.stat(at, dir_fd=at_fd, follow_symlinks=False)
            if link is None and kind != stat.S_IFLNK and stat.S_IMODE(st.st_mode) != perm:
                os.chmod(at, perm, dir_fd=at_fd)  # the process umask cut bits, or set-id bits
            opaque = is_dir and (over != NO_WHITEOUT or bool(p.chain))
            if opaque:  # over a whiteout: must be; in a merged parent: the kernel's habit
                dfd = os.open(at, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=at_fd)
                try:
                    upper.set_opaque(dfd)
                finally:
                    os.close(dfd)
            if over != NO_WHITEOUT:
                upper.install(at, pfd, name, is_dir, over)
        except BaseException:
            if fd is not None:
                os.close(fd)
            if made:
                rmtree_at(at_fd, at)
            raise
        # the inode is the same after the rename into place: its (st_dev, st_ino) holds
        if link is not None:
            node = link[0]
            node.add_link(p, name)
        else:
            node = Node(kind, p, name)
            node.upper = True
            if is_dir:
                node.opaque = opaque
                node.upper_wh = opaque and not self.fmt.device_whiteouts
            else:
                node.backing = (st.st_dev, st.st_ino)
            self._table.register(node, self._table.number_for(st.st_dev, st.st_ino))
        p.children[name] = node
        return node, fd

    def link(self, inode: int, new_parent: int, new_name: bytes) -> Attr:
        with self._lock:
            while True:
                node = self._node(inode)
                p = self._dir(new_parent)
                self._check_name(new_name, creating=True)
                self._writable()
                if node.is_dir:
                    raise oserror(errno.EPERM, "cannot hardlink a directory")
                if node.dead:
                    raise oserror(errno.ENOENT, "the file has no name left")
                self._refuse_existing(p, new_name)
                if self._ensure_upper(node):
                    continue
                src_fd, src_name = self._at(node)
                if src_name is None:
                    raise oserror(errno.ENOENT, "the file has no name left")
                self._make(p, new_name, node.kind, 0, Ctx(), link=(node, src_fd, src_name))
                node.nlookup += 1
                return self._attr(node)

    # --- removal ------------------------------------------------------------------------

    def unlink(self, parent: int, name: bytes) -> None:
        self._remove(parent, name, want_dir=False)

    def rmdir(self, parent: int, name: bytes) -> None:
        self._remove(parent, name, want_dir=True)

    def _remove(self, parent: int, name: bytes, want_dir: bool) -> None:
        with self._lock:
            while True:
                p = self._dir(parent)
                self._check_name(name)
                self._writable()
                child = self._child(p, name)
                if child is None:
                    raise oserror(errno.ENOENT, "no such entry", name)
                try:
                    if want_dir and not child.is_dir:
                        raise oserror(errno.ENOTDIR, "not a directory", name)
                    if not want_dir and child.is_dir:
                        raise oserror(errno.EISDIR, "is a directory", name)
                    if self._wait_idle(child):
                        continue
                    if want_dir and self._list(child):
                        raise oserror(errno.ENOTEMPTY, "directory not empty", name)
                    if child.lower_key is not None and self._ensure_upper(child):
                        continue  # a lower hardlink: its other names keep the count (kernel: index=on)
                    self._remove_entry(p, name, child)
                    return
                finally:
                    self._done_with(child)

    def _remove_entry(self, p: Node, name: bytes, child: Node) -> None:
        upper = self._writable()
        needs_whiteout = not child.upper or self._lower_positive(p, name)
        self._copy_up_dirs(p)
        pfd = self._upper_fd(p)
        alive = False
        if child.upper:
            if not child.is_dir:
                alive = os.stat(name, dir_fd=pfd, follow_symlinks=False).st_nlink > 1 + child.indexed
            if needs_whiteout:
                upper.replace_with_whiteout(pfd, name)
            else:
                upper.remove(pfd, name, child.is_dir)
        else:
            upper.make_whiteout(pfd, name)
        if not self.fmt.device_whiteouts and needs_whiteout:
            p.upper_wh = True
        self._unlinked(p, name, child, alive)

    def _unlinked(self, p: Node, name: bytes, child: Node, alive: bool) -> None:
        """Bookkeeping after the name ``name`` of ``child`` left ``p``."""
        if p.children.get(name) is child:
            del p.children[name]
        child.remove_link(p, name)
        if not child.links and not alive:
            child.dead = True
            self._table.unbind_backing(child)
            if child.is_dir:
                self._fds.drop(child)
        self._table.maybe_drop(child)

    # --- rename -------------------------------------------------------------------------

    def rename(self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes, flags: int) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise oserror(errno.EINVAL, "unsupported rename flags")  # RENAME_WHITEOUT too, as the kernel
        with self._lock:
            while True:
                po, pn = self._dir(parent_old), self._dir(parent_new)
                self._check_name(name_old)
                self._check_name(name_new, creating=True)
                self._writable()
                src = self._child(po, name_old)
                if src is None:
                    raise oserror(errno.ENOENT, "no such entry", name_old)
                tgt = self._child(pn, name_new)
                try:
                    if self._rename_once(po, name_old, src, pn, name_new, tgt, flags):
                        return
                finally:
                    self._done_with(src, tgt)

    def _rename_once(self, po: Node, name_old: bytes, src: Node, pn: Node, name_new: bytes,
                     tgt: Node | None, flags: int) -> bool:
        """One attempt; False when the lock was released and everything must be looked up
        again (a copy-up, or a wait for one)."""
        exchange = bool(flags & RENAME_EXCHANGE)
        if tgt is None and exchange:
            raise oserror(errno.ENOENT, "no such entry to exchange with", name_new)
        if tgt is not None and flags & RENAME_NOREPLACE:
            raise oserror(errno.EEXIST, "already exists", name_new)
        if tgt is src:
            return True  # the same inode (or name): rename does nothing, as rename(2)
        if src.is_dir and self._is_ancestor(src, pn):
            raise oserror(errno.EINVAL, "cannot move a directory into itself", name_old)
        if exchange and tgt is not None and tgt.is_dir and self._is_ancestor(tgt, po):
            raise oserror(errno.EINVAL, "cannot move a directory into itself", name_new)
        if tgt is not None and not exchange:
            if src.is_dir and not tgt.is_dir:
                raise oserror(errno.ENOTDIR, "not a directory", name_new)
            if not src.is_dir and tgt.is_dir:
                raise oserror(errno.EISDIR, "is a directory", name_new)
            if tgt.is_dir and self._list(tgt):
                raise oserror(errno.ENOTEMPTY, "directory not empty", name_new)
        if self._wait_idle(src, tgt):
            return False
        self._copy_up_dirs(po)
        self._copy_up_dirs(pn)
        if self._ensure_upper(src) or (exchange and tgt is not None and self._ensure_upper(tgt)):
            return False
        if tgt is not None and tgt.lower_key is not None and self._ensure_upper(tgt):
            return False  # a lower hardlink replaced: as unlink
        if src.is_dir and self._mark_moved_dir(src, pn, po is pn):
            return False
        if exchange and tgt is not None and tgt.is_dir and self._mark_moved_dir(tgt, po, po is pn):
            return False
        if exchange:
            assert tgt is not None
            self._exchange(po, name_old, src, pn, name_new, tgt)
        else:
            self._move(po, name_old, src, pn, name_new, tgt)
        return True

    def _is_ancestor(self, a: Node, d: Node | None) -> bool:
        while d is not None:
            if d is a:
                return True
            d = d.parent
        return False

    def _mark_moved_dir(self, node: Node, new_parent: Node, samedir: bool) -> bool:
        """What the kernel writes on a directory before moving it (ovl_rename): a redirect
        if lower layers merge into it, else opaque if it lands in a merged directory.
        True when the caller must start over (see ``_materialize``)."""
        upper = self._writable()
        if node.chain and not self.fmt.redirects:
            # a userxattr store has no redirects (the kernel follows none there): copy it up
            self._materialize(node)
            return True
        if node.chain:
            value = self._redirect_for(node, samedir)
            if value is not None:
                try:
                    upper.set_redirect(self._upper_fd(node), value)
                except OSError as e:
                    if e.errno not in (errno.ENOSPC, errno.E2BIG, errno.ERANGE):
                        raise
                    # The absolute path does not fit in an xattr of this filesystem (ext4:
                    # one block). Where the kernel says EXDEV and mv copies the tree, copy
                    # it up here, keeping inode numbers, and move it as an upper directory.
                    self._materialize(node)
                    return True
                node.redirect = value
        elif not node.opaque and new_parent.merged:
            upper.set_opaque(self._upper_fd(node))
            node.opaque = True
            if not self.fmt.device_whiteouts:
                node.upper_wh = True
        return False

    def _materialize(self, top: Node) -> None:
        """Copy up everything visible below the directory ``top``, then make it opaque (its
        lower layers have nothing left to add). May release the lock (large copy-ups):
        callers start over afterwards."""
        upper = self._writable()
        visited: list[Node] = []
        stack = [top]
        while stack:
            d = stack.pop()
            for name in self._list(d):
                child = self._child(d, name)
                if child is None:
                    continue
                visited.append(child)
                if child.is_dir:
                    if not child.upper:
                        self._copy_up_dir(child)
                    stack.append(child)
                elif self._ensure_upper(child):
                    return  # the lock was released: the caller starts over, we resume then
        fd = self._upper_fd(top)
        upper.set_opaque(fd)
        for xname in REDIRECT_NAMES:  # a stale redirect would be ignored; leave none
            try:
                os.removexattr(fd, xname)
            except OSError as e:
                if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                    raise
        top.opaque, top.redirect, top.chain = True, None, ()
        if not self.fmt.device_whiteouts:
            top.upper_wh = True
        # below an opaque directory only absolute redirects still reach the lowers
        todo = [top]
        while todo:
            d = todo.pop()
            for c in d.children.values():
                if c.is_dir and not c.dead:
                    c.chain = () if c.opaque else self._lowers.continue_dir(d.chain, c.name, c.redirect)
                    todo.append(c)
        for node in reversed(visited):
            self._table.maybe_drop(node)

    def _redirect_for(self, node: Node, samedir: bool) -> bytes | None:
        """ovl_set_redirect/ovl_get_redirect: keep a redirect that stays right, else the
        old name (same parent) or the absolute path the lowers know the directory by."""
        if node.redirect is not None and (samedir or node.redirect.startswith(b"/")):
            return None
        if samedir:
            return node.name
        parts: list[bytes] = []
        cur: Node | None = node
        while cur is not None and cur is not self._root:
            part = cur.redirect if cur.redirect is not None else cur.name
            if part.startswith(b"/"):
                parts.append(part[1:])
                break
            parts.append(part)
            cur = cur.parent
        return b"/" + b"/".join(reversed(parts))

    def _move(self, po: Node, a: bytes, src: Node, pn: Node, b: bytes, tgt: Node | None) -> None:
        upper = self._writable()
        nfd = self._upper_fd(pn)
        needs_whiteout = self._lower_positive(po, a)
        new_wh = upper.whiteout_at(nfd, b, self._upper_has_markers(pn, nfd)) if tgt is None else NO_WHITEOUT
        tgt_alive = False
        if tgt is not None and tgt.upper:
            if tgt.is_dir:
                upper.empty_dir(nfd, b)  # only whiteouts left in it: rename(2) needs it empty
            else:
                tgt_alive = os.stat(b, dir_fd=nfd, follow_symlinks=False).st_nlink > 1
        ofd, nfd = self._upper_fd(po), self._upper_fd(pn)
        cleanup = False
        if not self.fmt.device_whiteouts:
            renameat2(ofd, a, nfd, b, 0)
            if needs_whiteout:
                upper.make_whiteout(ofd, a)
                po.upper_wh = True
            if new_wh == FILE_WHITEOUT:
                upper.remove_file_whiteout(nfd, b)
        else:
            rflags = 0
            if needs_whiteout:
                rflags = RENAME_EXCHANGE if new_wh == DEVICE_WHITEOUT else RENAME_WHITEOUT
            elif src.is_dir and new_wh == DEVICE_WHITEOUT:
                rflags, cleanup = RENAME_EXCHANGE, True
            try:
                renameat2(ofd, a, nfd, b, rflags)
            except OSError as e:
                if rflags != RENAME_WHITEOUT or e.errno not in (errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP):
                    raise
                renameat2(ofd, a, nfd, b, 0)  # a filesystem without RENAME_WHITEOUT
                upper.make_whiteout(ofd, a)
            if cleanup:
                os.unlink(a, dir_fd=ofd)
            if new_wh == FILE_WHITEOUT:
                upper.remove_file_whiteout(nfd, b)
        if tgt is not None:
            self._unlinked(pn, b, tgt, tgt_alive)
        if po.children.get(a) is src:
            del po.children[a]
        src.remove_link(po, a)
        src.add_link(pn, b)
        pn.children[b] = src

    def _exchange(self, po: Node, a: bytes, src: Node, pn: Node, b: bytes, tgt: Node) -> None:
        renameat2(self._upper_fd(po), a, self._upper_fd(pn), b, RENAME_EXCHANGE)
        src.remove_link(po, a)
        tgt.remove_link(pn, b)
        src.add_link(pn, b)
        tgt.add_link(po, a)
        po.children[a] = tgt
        pn.children[b] = src

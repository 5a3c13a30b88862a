"""Conformance cases that change the namespace: mkdir, rmdir, unlink, rename, link, symlink, mknod.

Registered by importing ``cases`` (which imports this module). Conventions as in ``cases``:
no branching on results, paths from ``layers.BOTTOM``/``MIDDLE``/``TOP``.
"""

from __future__ import annotations

import os

from .facade import APPEND, CREATE, RENAME_EXCHANGE, RENAME_NOREPLACE
from .layers import DEEP, LONG_NAME
from .runner import Session, case

# --- mkdir, rmdir, unlink -------------------------------------------------------------


@case()
def mkdir_new_dirs(s: Session) -> None:
    """mkdir: new names, over whiteouts (an opaque directory), existing names fail."""
    s.mkdir("newdir", 0o750)
    s.mkdir("newdir/sub")
    s.mkdir("dir/sub/newsub", 0o700)
    s.mkdir("dir")  # EEXIST
    s.mkdir("file")  # EEXIST
    s.mkdir("link_dangling")  # EEXIST: the symlink is there
    s.mkdir("hidden")
    s.listdir("hidden")
    s.mkdir("missing/x")
    s.lstat("newdir")
    s.lstat("dir/sub/newsub")
    s.lstat("hidden")
    s.listxattr("hidden")


@case()
def unlink_lower_file(s: Session) -> None:
    """Unlinking a lower file leaves a whiteout: the name is gone, lower versions stay hidden."""
    s.unlink("file")
    s.lstat("file")
    s.unlink("file")  # ENOENT
    s.read_file("link_rel")  # dangling now
    s.unlink("dir/a")
    s.listdir("dir")
    s.unlink("merged/both")  # exists in two lower layers: neither may reappear
    s.lstat("merged/both")
    s.listdir("merged")
    s.unlink("dir")  # EISDIR
    s.unlink("hidden")  # ENOENT
    s.listdir("")


@case(index=True)
def unlink_special_entries(s: Session) -> None:
    """Symlinks, fifos, devices, long names and one name of a hardlink are unlinked alike."""
    for p in ("link_rel", "fifo", "chardev", "blockdev", LONG_NAME, "dir/hl3", "top"):
        s.unlink(p)
        s.lstat(p)
    s.lstat("file")
    s.lstat("hl1")
    s.listdir("")
    s.listdir("dir")


@case()
def unlink_then_recreate(s: Session) -> None:
    """A recreated name shows the new file, never the lower one."""
    s.unlink("file")
    s.write_file("file", b"reborn\n", CREATE, 0o600)
    s.read_file("file")
    s.lstat("file")
    s.unlink("merged/both")
    s.write_file("merged/both", b"new both\n", CREATE)
    s.read_file("merged/both")
    s.unlink("dir/c")
    s.symlink("a", "dir/c")
    s.read_file("dir/c")


@case()
def rmdir_lower_empty_dir(s: Session) -> None:
    """rmdir of an empty lower directory whites it out."""
    s.rmdir("emptydir")
    s.lstat("emptydir")
    s.rmdir("emptydir")
    s.listdir("")


@case()
def rmdir_not_empty(s: Session) -> None:
    """rmdir of merged or lower directories with visible children fails with ENOTEMPTY."""
    for p in ("merged", "dir", "opaque", "deep", "mid_only_dir", "xattr_dir", "file", "missing", "link_dir"):
        s.rmdir(p)
    s.listdir("merged")


@case()
def rmdir_emptied_merged_dir(s: Session) -> None:
    """A merged directory whose visible children are all gone can be removed."""
    for name in ("toponly", "midonly", "lowonly", "both"):
        s.unlink("merged/" + name)
    s.listdir("merged")
    s.rmdir("merged")
    s.lstat("merged")
    s.listdir("")


@case()
def mkdir_after_rmdir_is_opaque(s: Session) -> None:
    """A directory created where a merged one was removed is empty (opaque)."""
    for name in ("toponly", "midonly", "lowonly", "both"):
        s.unlink("merged/" + name)
    s.rmdir("merged")
    s.mkdir("merged", 0o700)
    s.listdir("merged")
    s.lstat("merged/lowonly")
    s.write_file("merged/new", b"new\n", CREATE)
    s.listdir("merged")
    s.listxattr("merged")
    s.lstat("merged")


@case(index=True)
def rmdir_dirs_with_whiteouts(s: Session) -> None:
    """Removing directories whose lower children were unlinked (whiteouts below)."""
    s.unlink("opaque/kept")
    s.rmdir("opaque")
    for p in ("dir/a", "dir/c", "dir/hl3"):
        s.unlink(p)
    s.rmdir("dir/sub")  # ENOTEMPTY
    s.unlink("dir/sub/deep")
    s.rmdir("dir/sub")
    s.rmdir("dir")
    s.mkdir("dir")
    s.listdir("dir")
    s.listdir("")


@case()
def rmdir_whole_deep_tree(s: Session) -> None:
    """Tearing down a deep lower tree from the leaves up."""
    s.unlink(DEEP + "/leaf")
    parts = DEEP.split("/")
    for depth in range(len(parts), 0, -1):
        s.rmdir("/".join(parts[:depth]))
    s.lstat("deep")
    s.listdir("")


# --- rename ----------------------------------------------------------------------------


@case()
def rename_lower_file(s: Session) -> None:
    """Renaming lower files: the content moves, the old name is whited out."""
    s.rename("file", "renamed")
    s.lstat("file")
    s.read_file("renamed")
    s.rename("dir/a", "merged/a_moved")
    s.read_file("merged/a_moved")
    s.listdir("dir")
    s.listdir("merged")
    s.listdir("")


@case()
def rename_over_existing_file(s: Session) -> None:
    """Renaming onto a visible file replaces it."""
    s.rename("shadowed", "top")
    s.read_file("top")
    s.lstat("shadowed")
    s.rename("merged/both", "merged/lowonly")
    s.read_file("merged/lowonly")
    s.listdir("merged")
    s.rename("fifo", "chardev")
    s.lstat("chardev")


@case()
def rename_noreplace(s: Session) -> None:
    """RENAME_NOREPLACE: EEXIST on a visible target; a whited-out name counts as free."""
    s.rename("file", "top", RENAME_NOREPLACE)
    s.rename("file", "hidden", RENAME_NOREPLACE)
    s.rename("top", "fresh", RENAME_NOREPLACE)
    s.read_file("hidden")
    s.read_file("fresh")
    s.rename("dir", "merged", RENAME_NOREPLACE)
    s.listdir("")


@case()
def rename_lower_dir(s: Session) -> None:
    """A directory merged from three lower layers renames (redirect_dir), it is not EXDEV."""
    s.rename("dir", "dir2")
    s.lstat("dir")
    s.listdir("dir2")
    s.read_file("dir2/sub/deep")
    s.read_file("dir2/c")
    s.read_file("dir2/a")
    s.lstat("dir2/b")  # still whited out
    s.listdir("dir2/sub")
    s.listxattr("dir2")
    s.lstat("dir2")
    s.mkdir("dir")
    s.listdir("dir")


@case()
def rename_nested_lower_dir(s: Session) -> None:
    """Nested lower directories move to other parents and keep their subtrees."""
    s.rename("nest/a/b", "moved")
    s.listdir("moved")
    s.listdir("moved/c")
    s.read_file("moved/c/leaf")
    s.listdir("nest/a")
    s.rename("movable/inner", "dir/inner")
    s.listdir("dir/inner")
    s.read_file("dir/inner/y")
    s.listdir("movable")
    s.rename("merged", "nest/a/merged")
    s.listdir("nest/a/merged")
    s.read_file("nest/a/merged/both")
    s.remount()  # the redirects must be on disk
    for p in ("moved/c", "dir/inner", "nest/a/merged", "nest/a", "movable"):
        s.listdir(p)


@case()
def rename_dir_back(s: Session) -> None:
    """A renamed lower directory renamed back shows its merged contents again."""
    s.rename("dir", "dir2")
    s.rename("dir2", "dir")
    s.listdir("dir")
    s.read_file("dir/a")
    s.rename("movable", "mv")
    s.write_file("mv/new", b"new\n", CREATE)
    s.rename("mv", "movable")
    s.listdir("movable")
    s.read_file("movable/new")


@case()
def rename_dir_then_modify(s: Session) -> None:
    """Changes inside a renamed lower directory: create, unlink, rmdir, mkdir."""
    s.rename("movable", "mv")
    s.write_file("mv/new", b"new\n", CREATE)
    s.unlink("mv/x")
    s.rmdir("mv/inner")  # ENOTEMPTY
    s.unlink("mv/inner/y")
    s.rmdir("mv/inner")
    s.mkdir("mv/inner")
    s.listdir("mv")
    s.listdir("mv/inner")
    s.lstat("movable")
    s.lstat("mv/x")


@case()
def rename_dir_errors(s: Session) -> None:
    """EINVAL into itself, ENOTEMPTY, ENOTDIR, EISDIR; onto an empty lower dir works."""
    s.rename("movable", "movable/inner/x")
    s.rename("dir", "merged")
    s.rename("movable", "file")
    s.rename("file", "dir")
    s.rename("missing", "x")
    s.rename("movable", "emptydir")
    s.listdir("emptydir")
    s.lstat("movable")
    s.rename("file", "missingdir/x")


@case()
def rename_exchange(s: Session) -> None:
    """RENAME_EXCHANGE swaps two lower files, and two lower directories."""
    s.rename("file", "top", RENAME_EXCHANGE)
    s.read_file("file")
    s.read_file("top")
    s.rename("movable", "mid_only_dir", RENAME_EXCHANGE)
    s.listdir("movable")
    s.listdir("mid_only_dir")
    s.rename("file", "nothing", RENAME_EXCHANGE)


@case(index=True)
def rename_same_inode_is_noop(s: Session) -> None:
    """rename between two names of one inode does nothing and succeeds."""
    s.rename("hl1", "hl2")
    s.lstat("hl1")
    s.lstat("hl2")
    s.listdir("")


@case()
def rename_into_whiteouts_and_opaque(s: Session) -> None:
    """Renames onto whited-out names and into opaque directories."""
    s.rename("file", "hidden")
    s.read_file("hidden")
    s.rename("top", "opaque/gone")
    s.read_file("opaque/gone")
    s.listdir("opaque")
    s.rename("mid_only_dir", "dir/b")
    s.listdir("dir/b")
    s.listdir("dir")


@case()
def rename_file_away_and_back(s: Session) -> None:
    """A lower file renamed to another directory and back is the same file again."""
    s.rename("dir/a", "a_top")
    s.listdir("dir")
    s.rename("a_top", "dir/a")
    s.read_file("dir/a")
    s.listdir("dir")
    s.listdir("")


# --- hardlinks -------------------------------------------------------------------------


@case()
def link_lower_file(s: Session) -> None:
    """link() to a lower file: both names share content and count each other, across a remount."""
    s.link("file", "file_link")
    s.lstat("file")
    s.lstat("file_link")
    s.write_file("file_link", b"via link\n", APPEND)
    s.read_file("file")
    s.unlink("file")
    s.lstat("file_link")
    s.remount()
    s.lstat("file_link")
    s.read_file("file_link")


@case(index=True)
def lower_hardlinks(s: Session) -> None:
    """Hardlinks within a lower layer: link counts, contents and st_ino before and after one
    name is copied up, and after a remount: they stay one file (kernel: index=on)."""
    for p in ("hl1", "hl2", "dir/hl3"):
        s.lstat(p)
    before = s.quiet.ino("hl1")
    s.note("hl1 and hl2 share st_ino", before == s.quiet.ino("hl2"))
    s.write_file("hl1", b"changed\n", APPEND)
    for p in ("hl1", "hl2", "dir/hl3"):
        s.read_file(p)
        s.lstat(p)
    s.note_ino_kept("hl1 after its copy-up", before, s.quiet.ino("hl1"))
    s.note("hl1 and hl2 share st_ino after the copy-up", s.quiet.ino("hl1") == s.quiet.ino("hl2"))
    s.remount()
    for p in ("hl1", "hl2", "dir/hl3"):
        s.lstat(p)
        s.read_file(p)
    s.note("hl1 and dir/hl3 share st_ino after the remount", s.quiet.ino("hl1") == s.quiet.ino("dir/hl3"))
    s.note_ino_kept("hl1 across the remount", before, s.quiet.ino("hl1"))
    s.write_file("dir/hl3", b"again\n", APPEND)
    for p in ("hl1", "hl2", "dir/hl3"):
        s.read_file(p)


@case(index=True)
def lower_hardlinks_below_renamed_dir(s: Session) -> None:
    """A name of a lower hardlink below a directory renamed before the copy-up (and looked
    up there) stays the same file after writing another name, and after a remount."""
    s.rename("dir", "dir2")
    s.lstat("dir2/hl3")
    s.write_file("hl2", b"changed\n", APPEND)
    for p in ("hl1", "hl2", "dir2/hl3"):
        s.read_file(p)
        s.lstat(p)
    s.remount()
    s.write_file("dir2/hl3", b"again\n", APPEND)
    for p in ("hl1", "hl2", "dir2/hl3"):
        s.read_file(p)
        s.lstat(p)
    s.note("hl1 and dir2/hl3 share st_ino after the remount", s.quiet.ino("hl1") == s.quiet.ino("dir2/hl3"))


@case(index=True)
def lower_hardlinks_partly_visible(s: Session) -> None:
    """Copy-up of a lower hardlink when one of its names is whited out and another renamed:
    the visible names stay one file, in this mount and after a remount (kernel: index=on)."""
    s.unlink("hl2")
    s.rename("dir/hl3", "dir/moved")
    for p in ("hl1", "dir/moved"):
        s.lstat(p)
    s.write_file("hl1", b"changed\n", APPEND)
    for p in ("hl1", "hl2", "dir/moved"):
        s.read_file(p)
        s.lstat(p)
    s.note("hl1 and dir/moved share st_ino", s.quiet.ino("hl1") == s.quiet.ino("dir/moved"))
    s.remount()
    s.write_file("dir/moved", b"again\n", APPEND)
    for p in ("hl1", "hl2", "dir/moved"):
        s.read_file(p)
        s.lstat(p)
    s.note("hl1 and dir/moved share st_ino after the remount", s.quiet.ino("hl1") == s.quiet.ino("dir/moved"))


@case(index=True)
def lower_hardlinks_below_dir_moved_unseen(s: Session) -> None:
    """A name of a lower hardlink below a directory moved into another one (an absolute
    redirect) and not looked up since: copying up another name keeps every name's link
    count (kernel: index=on), before and after a remount, and the moved name reads the copy."""
    s.rename("dir", "merged/dir2")
    s.write_file("hl1", b"changed\n", APPEND)
    s.lstat("hl1")
    s.lstat("hl2")
    s.remount()
    s.lstat("hl2")
    s.read_file("merged/dir2/hl3")
    s.lstat("merged/dir2/hl3")
    s.write_file("merged/dir2/hl3", b"again\n", APPEND)  # the kernel links this name up now
    for p in ("hl1", "hl2", "merged/dir2/hl3"):
        s.read_file(p)
        s.lstat(p)
    s.note("hl1 and merged/dir2/hl3 share st_ino", s.quiet.ino("hl1") == s.quiet.ino("merged/dir2/hl3"))
    s.unlink("hl2")
    s.lstat("hl1")


@case()
def link_errors(s: Session) -> None:
    """link(): EPERM on directories, EEXIST, ENOENT; a symlink is linked, not followed."""
    s.link("dir", "dirlink")
    s.link("file", "top")
    s.link("missing", "x")
    s.link("file", "missingdir/x")
    s.link("file", "hidden")  # over a whiteout: works
    s.lstat("hidden")
    s.link("link_rel", "link_copy")
    s.lstat("link_copy")
    s.lstat("link_rel")


@case()
def link_new_file_survives_remount(s: Session) -> None:
    """Hardlinks between new files keep their count and inode number across a remount."""
    s.write_file("new", b"new\n", CREATE)
    s.link("new", "new2")
    s.mkdir("newdir")
    s.link("new", "newdir/new3")
    for p in ("new", "new2", "newdir/new3"):
        s.lstat(p)
    before = s.quiet.ino("new")
    s.note("new and new2 share st_ino", before == s.quiet.ino("new2"))
    s.remount()
    for p in ("new", "new2", "newdir/new3"):
        s.lstat(p)
    s.note_ino_kept("new across remount", before, s.quiet.ino("new2"))
    s.unlink("new")
    s.lstat("new2")


# --- symlinks and special files ---------------------------------------------------------


@case()
def symlink_create(s: Session) -> None:
    """symlink(): new links, through a symlinked directory, over a whiteout, EEXIST."""
    s.symlink("file", "s1")
    s.readlink("s1")
    s.read_file("s1")
    s.lstat("s1")
    s.stat("s1")
    s.symlink("x", "top")
    s.symlink("dir/sub", "sl_dir")
    s.listdir("sl_dir")
    s.write_file("sl_dir/via_link", b"through a symlink\n", CREATE)
    s.lstat("dir/sub/via_link")
    s.symlink("whatever", "hidden")
    s.readlink("hidden")
    s.symlink("../" * 3 + "x" * 200, "longtarget")
    s.readlink("longtarget")


@case()
def symlink_loops_and_dangling(s: Session) -> None:
    """Loops give ELOOP, dangling links ENOENT, through the union as on any filesystem."""
    s.symlink("loop2", "loop1")
    s.symlink("loop1", "loop2")
    s.stat("loop1")
    s.read_file("loop2")
    s.read_file("link_dangling")
    s.write_file("link_dangling", b"x", os.O_WRONLY)
    s.lstat("loop1")


@case()
def mkfifo_and_mknod(s: Session) -> None:
    """Fifos, character devices and sockets are created in the upper layer, also over whiteouts."""
    s.mkfifo("p", 0o640)
    s.mknod("c", 0o600, 1, 5)
    s.lstat("p")
    s.lstat("c")
    s.mkfifo("p")
    s.mknod("hidden", 0o644, 1, 7)
    s.lstat("hidden")
    s.mkfifo("dir/sub/p")
    s.listdir("dir/sub")
    s.mksock("sock", 0o600)
    s.lstat("sock")
    s.unlink("p")
    s.lstat("p")

"""The conformance cases: union semantics as a user of the mount sees them.

Each case is a function of a ``Session`` (see ``runner``) registered with ``@case``; it runs
on a fresh union of the layer set it names (``layers.standard`` unless said otherwise),
and everything it does is recorded. Cases never branch on results: the same sequence of
operations runs on every backend, and kernel overlayfs' results are the expected ones.
Comments state what the kernel is expected to do where it matters, but the assertions are
made by comparing logs, not here.

This module holds lookup, read, write, metadata, xattr, limit and cache cases;
``cases_namespace`` (imported at the end, so importing this module registers every case)
holds mkdir/rmdir/unlink, rename, hardlinks, symlinks and special files.

Paths below refer to ``layers.BOTTOM``/``MIDDLE``/``TOP``: e.g. ``hidden`` is whited out
in the middle layer, ``opaque`` is an opaque directory in the middle layer, ``merged`` and
``dir`` are merged across all three layers, ``hl1``/``hl2``/``dir/hl3`` are one inode.
"""

from __future__ import annotations

import os

from .facade import APPEND, CREATE, EXCL
from .layers import DEEP, LONG_DEPTH, LONG_NAME, long_component
from .runner import Session, case

XATTR_CREATE = os.XATTR_CREATE
XATTR_REPLACE = os.XATTR_REPLACE
OTHER_USERS = ((1000, 1000), (65534, 65534))
NO_MODEL_ACCESS = "permission checks are the kernel's (default_permissions); the model does not do them"
NO_MODEL_DIRFD = "dir_fd walks past PATH_MAX are an OS-path test; the model has no paths"


# --- lookup and read -------------------------------------------------------------------


@case()
def lookup_through_layers(s: Session) -> None:
    """A name resolves in the topmost layer that has it; directories merge across layers."""
    for p in ("top", "shadowed", "file", "dir/sub/deep", "dir/c", "dir/a", "merged/toponly",
              "merged/midonly", "merged/lowonly", "merged/both", "mid_only_dir/m"):
        s.lstat(p)
    s.read_file("shadowed")
    s.read_file("merged/both")
    s.read_file("dir/a")
    s.lstat("nonexistent")
    s.lstat("dir/nonexistent")
    s.lstat("file/child")  # ENOTDIR


@case()
def whiteouts_hide_lower_entries(s: Session) -> None:
    """0/0 character devices hide the name in every layer below."""
    s.lstat("hidden")
    s.lstat("dir/b")
    s.lstat("merged/wh_me")
    s.read_file("hidden")
    s.listdir("dir")
    s.listdir("merged")
    s.listdir("")


@case()
def opaque_dir_hides_lower_children(s: Session) -> None:
    """trusted.overlay.opaque=y stops the merge: lower children vanish, the directory stays."""
    s.lstat("opaque")
    s.listdir("opaque")
    s.lstat("opaque/gone")
    s.read_file("opaque/kept")


@case()
def file_hides_lower_dir(s: Session) -> None:
    """A non-directory above a directory hides the whole directory below it."""
    s.lstat("replaced")
    s.read_file("replaced")
    s.lstat("replaced/child")
    s.listdir("replaced")


@case()
def merged_readdir(s: Session) -> None:
    """readdir merges all layers, drops whiteouts and never lists a name twice."""
    for p in ("", "dir", "merged", "deep", DEEP, "nest/a", "emptydir", "sticky", "dir/sub", "mid_only_dir"):
        s.listdir(p)
    s.listdir("file")  # ENOTDIR


@case()
def read_contents(s: Session) -> None:
    """Reads come from the providing layer, whatever the mode (root reads 000 files)."""
    for p in ("file", "big", LONG_NAME, "setuid", "mode000", "link_rel", "dir/hl3", "private", "owned"):
        s.read_file(p)
    s.read_file("dir")  # EISDIR
    s.read_file("link_dangling")  # ENOENT
    s.read_file("missing")


@case()
def stat_special_files(s: Session) -> None:
    """Modes, owners, device numbers, link counts and symlink targets of lower entries."""
    for p in ("fifo", "chardev", "blockdev", "link_rel", "link_abs", "link_dangling", "link_dir", "hl1", "hl2",
              "dir/hl3", "setuid", "setgid", "owned", "mode000", "private", "exec.sh", "big", LONG_NAME,
              "sticky/owned_by_1000"):
        s.lstat(p)


@case()
def stat_directories(s: Session) -> None:
    """Directory attributes, including the link count of merged and pure directories."""
    for p in ("", "dir", "merged", "emptydir", "mid_only_dir", "opaque", "xattr_dir", "deep", "sticky", "dir/sub",
              "movable", "replaced"):
        s.lstat(p)


@case()
def symlinks_are_followed(s: Session) -> None:
    """Relative symlinks resolve inside the union; readlink gives targets back verbatim."""
    s.stat("link_rel")
    s.stat("link_dir")
    s.listdir("link_dir")
    s.read_file("link_dir/a")
    s.lstat("link_dir/c")
    s.stat("link_dangling")
    for p in ("link_rel", "link_dir", "link_dangling", "link_abs"):
        s.readlink(p)
    s.readlink("file")  # EINVAL


# --- write, create, truncate ---------------------------------------------------------


@case()
def write_truncate_lower_file(s: Session) -> None:
    """O_TRUNC on a lower file copies it up empty and writes the new content."""
    s.write_file("file", b"rewritten\n", os.O_WRONLY | os.O_TRUNC)
    s.read_file("file")
    s.lstat("file")
    s.write_file("merged/lowonly", b"new low\n", CREATE)
    s.read_file("merged/lowonly")


@case()
def append_lower_file(s: Session) -> None:
    """O_APPEND on a lower file copies it up and appends after the old content."""
    s.write_file("file", b"more\n", APPEND)
    s.write_file("file", b"and more\n", APPEND)
    s.read_file("file")
    s.write_file("shadowed", b"appended to the middle version\n", APPEND)
    s.read_file("shadowed")
    s.lstat("file")
    s.lstat("shadowed")


@case()
def overwrite_without_truncate(s: Session) -> None:
    """O_WRONLY without O_TRUNC overwrites the start of the copied-up content."""
    s.write_file("file", b"XY", os.O_WRONLY)
    s.read_file("file")
    s.write_file("dir/sub/deep", b"D", os.O_RDWR)
    s.read_file("dir/sub/deep")


@case()
def create_exclusive(s: Session) -> None:
    """O_CREAT|O_EXCL: new and whited-out names succeed, visible ones fail with EEXIST."""
    s.write_file("new", b"1\n", EXCL)
    s.write_file("new", b"2\n", EXCL)
    s.write_file("file", b"x", EXCL)
    s.write_file("link_rel", b"x", EXCL)  # the symlink itself exists
    s.write_file("link_dangling", b"x", EXCL)
    s.write_file("hidden", b"over a whiteout\n", EXCL)
    s.write_file("dir/b", b"over a middle whiteout\n", EXCL)
    s.write_file("merged/wh_me", b"over a top whiteout\n", EXCL)
    s.write_file("opaque/gone", b"below an opaque dir\n", EXCL)
    for p in ("new", "hidden", "dir/b", "merged/wh_me", "opaque/gone"):
        s.read_file(p)
    s.listdir("merged")


@case()
def create_in_lower_dirs(s: Session) -> None:
    """Creating below lower directories copies the parents up with their metadata."""
    for p in ("dir/sub/new", DEEP + "/new", "opaque/new", "emptydir/new", "mid_only_dir/new", "sticky/new"):
        s.write_file(p, b"created\n", CREATE, 0o640)
    for p in ("dir/sub", DEEP, "opaque", "emptydir", "mid_only_dir", "sticky"):
        s.listdir(p)
        s.lstat(p)
    s.lstat("dir/sub/new")


@case()
def copy_up_big_file(s: Session) -> None:
    """Copy-up of a file larger than one read/write buffer keeps every byte."""
    s.write_file("big", b"tail\n", APPEND)
    s.read_file("big")
    s.lstat("big")
    s.truncate("big", 100_000)
    s.read_file("big")
    s.write_file("big", b"!" * 70_000, os.O_WRONLY)
    s.read_file("big")


@case()
def truncate_lower_files(s: Session) -> None:
    """truncate(2) shrinks and extends (with zeros) lower files after copy-up."""
    s.truncate("file", 3)
    s.read_file("file")
    s.truncate("shadowed", 0)
    s.read_file("shadowed")
    s.truncate("top", 20)
    s.read_file("top")
    s.truncate("link_rel", 1)  # follows the symlink: truncates file
    s.read_file("file")
    s.lstat("link_rel")
    s.truncate("dir", 0)  # EISDIR
    s.truncate("fifo", 0)  # EINVAL
    s.truncate("missing", 0)


# fallocate(2) modes (linux/falloc.h)
KEEP_SIZE, PUNCH_HOLE, COLLAPSE_RANGE, ZERO_RANGE, INSERT_RANGE = 0x01, 0x02, 0x08, 0x10, 0x20


@case()
def fallocate_modes(s: Session) -> None:
    """fallocate reaches the upper file with its mode: sizes, allocated blocks and the
    zeroes of punched and zeroed ranges are the upper filesystem's, and so are the errnos
    (the VFS refuses bad combinations before any filesystem sees them)."""
    s.write_file("falloc", bytes(range(256)) * 256)  # 64 KiB
    s.fallocate("falloc", 0, 0, 131072)  # grows the file to 128 KiB
    s.fallocate("falloc", KEEP_SIZE, 131072, 65536)  # blocks beyond EOF, size kept
    s.fallocate("falloc", PUNCH_HOLE | KEEP_SIZE, 4096, 8192)
    s.fallocate("falloc", ZERO_RANGE, 16384, 4096)
    s.fallocate("falloc", ZERO_RANGE | KEEP_SIZE, 196608, 4096)
    s.fallocate("falloc", ZERO_RANGE, 200000, 1000)  # grows the file
    s.read_file("falloc")
    s.lstat("falloc")
    s.fallocate("falloc", PUNCH_HOLE, 0, 4096)  # EOPNOTSUPP: a hole must keep the size
    s.fallocate("falloc", PUNCH_HOLE | ZERO_RANGE | KEEP_SIZE, 0, 4096)  # EOPNOTSUPP
    s.fallocate("falloc", 0, -1, 4096)  # EINVAL
    s.fallocate("falloc", 0, 0, 0)  # EINVAL
    s.fallocate("falloc", 0x1000, 0, 4096)  # EOPNOTSUPP: no such mode
    s.fallocate("dir", 0, 0, 4096)  # EISDIR (the open)
    s.read_file("falloc")


@case()
def fallocate_lower_file(s: Session) -> None:
    """Opening a lower file for writing copies it up; fallocate then changes the copy."""
    s.fallocate("file", 0, 0, 8192)
    s.read_file("file")
    s.fallocate("merged/both", PUNCH_HOLE | KEEP_SIZE, 0, 4096)
    s.read_file("merged/both")
    s.fallocate("dir/a", ZERO_RANGE | KEEP_SIZE, 0, 2)
    s.read_file("dir/a")


@case()
def fallocate_collapse_insert(s: Session) -> None:
    """COLLAPSE_RANGE and INSERT_RANGE shift data by whole blocks (ext4, xfs)."""
    s.write_file("shift", b"".join(bytes([i]) * 4096 for i in range(16)))
    s.fallocate("shift", COLLAPSE_RANGE, 4096, 8192)
    s.read_file("shift")
    s.fallocate("shift", INSERT_RANGE, 0, 4096)
    s.read_file("shift")
    s.fallocate("shift", COLLAPSE_RANGE, 1, 4096)  # EINVAL: not block aligned
    s.fallocate("shift", COLLAPSE_RANGE | KEEP_SIZE, 0, 4096)  # EINVAL: collapse goes alone
    s.lstat("shift")


@case()
def chown_nothing_changes_ctime(s: Session) -> None:
    """chown(path, -1, -1) changes no owner but is still a change: ctime moves (the kernel's
    overlay copies a lower file up and passes the empty change to the upper)."""
    s.ctime_bumped("owned", "chown", -1, -1)  # lower: copied up
    s.ctime_bumped("owned", "chown", -1, -1)  # upper now
    s.write_file("upperfile", b"data")
    s.ctime_bumped("upperfile", "chown", -1, -1)
    s.ctime_bumped("dir", "chown", -1, -1)
    s.ctime_bumped("dir", "chown", -1, -1)
    s.lstat("owned")


@case()
def open_errors(s: Session) -> None:
    """open(2) errors: missing parents, directories, files used as directories."""
    s.write_file("missingdir/x", b"x", CREATE)
    s.write_file("dir", b"x", os.O_WRONLY)
    s.write_file("file/x", b"x", CREATE)
    s.write_file("missing", b"x", os.O_WRONLY)
    s.write_file("hidden", b"x", os.O_WRONLY)
    s.write_file("replaced/child", b"x", CREATE)


@case()
def chmod_then_write(s: Session) -> None:
    """Root writes files whatever their mode; the mode survives the copy-up."""
    s.chmod("file", 0o400)
    s.write_file("file", b"root may\n", os.O_WRONLY | os.O_TRUNC)
    s.read_file("file")
    s.lstat("file")
    s.write_file("mode000", b"still root\n", APPEND)
    s.read_file("mode000")
    s.lstat("mode000")


# --- metadata and copy-up ---------------------------------------------------------------


@case()
def chmod_lower_file_copies_up(s: Session) -> None:
    """chmod copies up: content, owner, xattrs and mtime stay; the mode changes."""
    before = s.quiet.ino("file")
    s.chmod("file", 0o600)
    s.lstat("file")
    s.read_file("file")
    s.mtime_ns("file")
    s.note_ino_kept("file after chmod", before, s.quiet.ino("file"))
    s.chmod("setuid", 0o755)
    s.lstat("setuid")
    s.chmod("file", 0o4711)
    s.lstat("file")
    s.chmod("link_rel", 0o640)  # follows the link
    s.lstat("file")
    s.lstat("link_rel")
    s.chmod("xattr_file", 0o600)
    s.listxattr("xattr_file")
    s.getxattr("xattr_file", "user.color")


@case()
def chmod_directories(s: Session) -> None:
    """chmod of merged, lower and root directories; the merge is unaffected."""
    s.chmod("dir", 0o700)
    s.lstat("dir")
    s.listdir("dir")
    s.chmod("merged", 0o1777)
    s.lstat("merged")
    s.chmod("", 0o750)
    s.lstat("")
    s.chmod("deep/d1/d2", 0o500)
    s.lstat("deep/d1/d2")
    s.lstat("deep/d1")


@case()
def chown_lower_files(s: Session) -> None:
    """chown copies up; setuid and (group-executable) setgid bits are cleared like on any fs."""
    s.chown("file", 1000, 2000)
    s.lstat("file")
    s.read_file("file")
    s.chown("setuid", 1000, -1)
    s.lstat("setuid")
    s.chown("setgid", -1, 1000)
    s.lstat("setgid")
    s.chown("owned", -1, -1)
    s.lstat("owned")
    s.chown("dir", 1234, 1234)
    s.lstat("dir")
    s.listdir("dir")


@case()
def utime_lower_file(s: Session) -> None:
    """utimensat sets exact times on a copied-up file; untouched files keep the layer's."""
    s.utime("file", 1_000_000_000_000_000_001, 1_100_000_000_000_000_002)
    s.mtime_ns("file")
    s.read_file("file")
    s.lstat("file")
    s.mtime_ns("top")
    s.mtime_ns("dir/a")
    s.utime("dir/sub", 5_000_000_000, 6_000_000_000)
    s.mtime_ns("dir/sub")
    s.utime("link_rel", 7_000_000_000, 8_000_000_000)  # follows to file
    s.mtime_ns("file")
    s.remount()
    s.mtime_ns("file")
    s.mtime_ns("dir/sub")


@case()
def copy_up_keeps_metadata(s: Session) -> None:
    """Opening for write copies up without changing owner, mode, xattrs or mtime."""
    for p in ("owned", "private", "setuid", "setgid", "xattr_file", "exec.sh"):
        s.write_file(p, b"", APPEND)
        s.lstat(p)
        s.mtime_ns(p)
        s.listxattr(p)
    s.getxattr("xattr_file", "trusted.note")


# --- xattrs ---------------------------------------------------------------------------


@case()
def xattrs_of_lower_entries(s: Session) -> None:
    """user.* and trusted.* xattrs of lower files and directories are visible."""
    for p in ("xattr_file", "xattr_dir", "file", "dir", "opaque", "link_rel", "fifo"):
        s.listxattr(p)
    s.getxattr("xattr_file", "user.color")
    s.getxattr("xattr_file", "trusted.note")
    s.getxattr("xattr_dir", "user.tag")
    s.getxattr("file", "user.none")


@case()
def setxattr_copies_up(s: Session) -> None:
    """setxattr/removexattr on lower entries copy up and keep everything else."""
    s.setxattr("file", "user.new", b"v")
    s.getxattr("file", "user.new")
    s.listxattr("file")
    s.setxattr("xattr_file", "user.color", b"red")
    s.removexattr("xattr_file", "trusted.note")
    s.listxattr("xattr_file")
    s.getxattr("xattr_file", "user.color")
    s.setxattr("xattr_file", "user.color", b"x", XATTR_CREATE)
    s.setxattr("file", "user.absent", b"", XATTR_REPLACE)
    s.removexattr("file", "user.absent")
    s.setxattr("dir", "trusted.dirnote", b"1")
    s.listxattr("dir")
    s.listdir("dir")
    s.setxattr("xattr_dir", "user.tag", b"", XATTR_REPLACE)
    s.getxattr("xattr_dir", "user.tag")
    s.read_file("file")
    s.read_file("xattr_file")


@case()
def overlay_private_xattrs_hidden(s: Session) -> None:
    """trusted.overlay.* (opaque, redirect) is invisible and untouchable through the union."""
    s.listxattr("opaque")
    s.getxattr("opaque", "trusted.overlay.opaque")
    s.setxattr("file", "trusted.overlay.foo", b"1")
    s.removexattr("opaque", "trusted.overlay.opaque")
    s.rename("dir", "dir2")
    s.listxattr("dir2")
    s.getxattr("dir2", "trusted.overlay.redirect")
    s.rmdir("emptydir")
    s.mkdir("emptydir")
    s.listxattr("emptydir")
    s.getxattr("emptydir", "trusted.overlay.opaque")
    s.setxattr("file", "user.overlay.x", b"1")  # private only with userxattr
    s.listxattr("file")
    s.listdir("opaque")


@case()
def xattrs_on_special_files(s: Session) -> None:
    """user.* is refused on symlinks and fifos (EPERM); trusted.* works on them."""
    s.setxattr("link_rel", "user.x", b"1")
    s.setxattr("fifo", "user.x", b"1")
    s.getxattr("fifo", "user.x")
    s.setxattr("link_rel", "trusted.x", b"1")
    s.listxattr("link_rel")
    s.setxattr("chardev", "trusted.y", b"2")
    s.getxattr("chardev", "trusted.y")
    s.readlink("link_rel")


# --- the filesystem, users, limits ------------------------------------------------------


@case()
def statfs_namemax(s: Session) -> None:
    """statfs reports NAME_MAX 255."""
    s.statfs_namemax()


@case(os_only=NO_MODEL_ACCESS)
def access_as_other_users(s: Session) -> None:
    """Other users get the permissions the modes and owners of the lower layers give."""
    for p in ("file", "private", "owned", "mode000", "exec.sh", "dir", "dir/sub", "dir/sub/deep", "sticky",
              "setuid", "emptydir"):
        for uid, gid in OTHER_USERS:
            s.access_as(p, uid, gid)


@case(os_only=NO_MODEL_ACCESS)
def access_after_copy_up(s: Session) -> None:
    """Permission changes made through the union apply to other users at once."""
    s.chmod("private", 0o644)
    s.access_as("private", 65534, 65534)
    s.chown("owned", 65534, 65534)
    s.access_as("owned", 65534, 65534)
    s.access_as("owned", 1000, 1000)
    s.chmod("dir", 0o700)
    s.access_as("dir", 1000, 1000)
    s.access_as("dir/a", 1000, 1000)
    s.mkdir("newdir", 0o700)
    s.chown("newdir", 1000, 1000)
    s.access_as("newdir", 1000, 1000)
    s.access_as("newdir", 65534, 65534)


@case()
def open_unlinked_upper_file(s: Session) -> None:
    """An open file stays readable after its (upper) name is unlinked, with nlink 0."""
    s.write_file("new", b"still here\n", CREATE)
    s.open_unlink_read("new")
    s.lstat("new")
    s.listdir("")


@case(index=True)
def open_unlinked_lower_file(s: Session) -> None:
    """An open lower file stays readable after its name is unlinked (whited out)."""
    s.open_unlink_read("file")
    s.lstat("file")
    s.open_unlink_read("hl1")
    s.lstat("hl2")
    s.open_unlink_read("big")


@case()
def name_max(s: Session) -> None:
    """Names of 255 bytes work everywhere; 256 bytes is ENAMETOOLONG."""
    n255, n256 = "m" * 255, "m" * 256
    s.write_file(n255, b"255\n", CREATE)
    s.lstat(n255)
    s.write_file(n256, b"256\n", CREATE)
    s.lstat(n256)
    s.mkdir(n256)
    s.mkdir("d" * 255)
    s.write_file("d" * 255 + "/" + n255, b"nested\n", CREATE)
    s.rename(LONG_NAME, n255)
    s.read_file(n255)
    s.rename("file", "x" * 256)
    s.symlink(n255, "s" * 255)
    s.read_file("s" * 255)
    s.unlink(n256)
    s.listdir("")


@case(layers="long_paths", os_only=NO_MODEL_DIRFD)
def paths_beyond_path_max(s: Session) -> None:
    """Deeper than PATH_MAX with directory fds: lower lookups, copy-up at depth, new trees."""
    components = [long_component(i) for i in range(LONG_DEPTH)]
    s.long_path_roundtrip("long", components, "leaf", b"appended at depth\n")
    s.long_path_roundtrip("", ["new"] + components, "leaf", b"brand new\n")
    s.listdir("long")


@case()
def inode_stable_across_copy_up(s: Session) -> None:
    """st_ino does not change when an entry or its parent is copied up."""
    paths = ("file", "dir", "dir/sub", "dir/sub/deep", "link_rel", "fifo", "merged", "setuid", "owned")
    before = {p: s.quiet.ino(p) for p in paths}
    s.chmod("file", 0o600)
    s.write_file("dir/sub/deep", b"+\n", APPEND)
    s.setxattr("dir", "user.x", b"1")
    s.chown("owned", 1000, -1)
    s.chmod("fifo", 0o600)
    s.write_file("merged/new", b"new\n", CREATE)
    s.utime("link_rel", 1, 2)
    s.truncate("setuid", 1)
    for p in paths:
        s.note_ino_kept(p, before[p], s.quiet.ino(p))


@case()
def inode_stable_across_remount(s: Session) -> None:
    """st_ino of lower, copied-up, new and renamed entries survives a remount."""
    s.chmod("file", 0o600)
    s.write_file("new", b"new\n", CREATE)
    s.mkdir("newdir")
    s.rename("movable", "moved")
    s.link("top", "top_link")
    paths = ("file", "new", "newdir", "moved", "moved/x", "top", "top_link", "dir/a", "merged", "")
    before = {p: s.quiet.ino(p) for p in paths}
    s.remount()
    for p in paths:
        s.note_ino_kept(p or "the root", before[p], s.quiet.ino(p))


@case()
def st_dev_uniform(s: Session) -> None:
    """Every inode of one mount reports the same st_dev."""
    s.write_file("new", b"new\n", CREATE)
    s.chmod("file", 0o600)
    s.mkdir("newdir")
    paths = ("", "file", "top", "new", "newdir", "dir", "dir/a", "merged", "fifo", "chardev", "link_rel", "opaque",
             "deep/d1", "hl1")
    devs = {p: s.quiet.dev(p) for p in paths}
    s.note("one st_dev for all", len(set(devs.values())) == 1 and all(isinstance(d, int) for d in devs.values()))


@case()
def deep_tree_copy_up(s: Session) -> None:
    """Changing a file eight directories down copies up the whole chain, modes included."""
    s.write_file(DEEP + "/new", b"new\n", CREATE)
    s.write_file(DEEP + "/leaf", b"+\n", APPEND)
    s.read_file(DEEP + "/leaf")
    parts = DEEP.split("/")
    for depth in range(1, len(parts) + 1):
        s.lstat("/".join(parts[:depth]))
    s.rename(DEEP + "/leaf", "deep/leaf_up")
    s.listdir("deep")
    s.listdir(DEEP)


@case()
def readdir_after_mixed_changes(s: Session) -> None:
    """readdir of a merged directory reflects creates, unlinks, renames, mkdir and symlinks."""
    s.write_file("merged/new", b"new\n", CREATE)
    s.unlink("merged/toponly")
    s.rename("merged/midonly", "merged/renamed")
    s.mkdir("merged/sub")
    s.symlink("both", "merged/sym")
    s.listdir("merged")
    s.unlink("merged/lowonly")
    s.rename("merged/both", "both_out")
    s.listdir("merged")
    s.listdir("")


# --- directories, caches, aliases ------------------------------------------------------


@case()
def large_directory(s: Session) -> None:
    """A merged directory with hundreds of entries lists completely (several readdir batches)."""
    for i in range(300):
        s.quiet.write_file(f"merged/f{i:03d}", b"%d\n" % i, CREATE)
    s.listdir("merged")
    for i in range(0, 300, 3):
        s.quiet.unlink(f"merged/f{i:03d}")
    s.unlink("merged/lowonly")
    s.listdir("merged")
    s.lstat("merged/f299")


@case()
def readdir_rewind_sees_changes(s: Session) -> None:
    """rewinddir on an open directory shows entries created since it was opened."""
    s.readdir_rewind("merged", "new_while_open")
    s.readdir_rewind("dir/sub", "x")
    s.readdir_rewind("emptydir", "first")


@case()
def cached_read_then_modify(s: Session) -> None:
    """Reads after changes see the changes, whatever an earlier read left in a cache."""
    s.read_file("file")
    s.write_file("file", b"appended\n", APPEND)
    s.read_file("file")
    s.read_file("big")
    s.truncate("big", 10)
    s.read_file("big")
    s.read_file("top")
    s.read_file("shadowed")
    s.rename("shadowed", "top")
    s.read_file("top")
    s.read_file("dir/a")
    s.unlink("dir/a")
    s.write_file("dir/a", b"new a\n", CREATE)
    s.read_file("dir/a")
    s.lstat("dir/a")


@case()
def hardlink_shares_metadata(s: Session) -> None:
    """Two names of one (copied-up) inode see each other's data and metadata changes."""
    s.link("file", "alias")
    s.chmod("file", 0o600)
    s.lstat("alias")
    s.setxattr("alias", "user.x", b"1")
    s.getxattr("file", "user.x")
    s.truncate("alias", 4)
    s.read_file("file")
    s.lstat("file")
    s.write_file("file", b"!", APPEND)
    s.read_file("alias")
    s.chown("alias", 1000, 1000)
    s.lstat("file")
    s.unlink("alias")
    s.lstat("file")


from . import cases_namespace  # noqa: E402  (registers the namespace cases)

assert cases_namespace.__name__

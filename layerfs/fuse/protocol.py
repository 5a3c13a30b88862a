"""The FUSE wire protocol (``linux/fuse.h``): opcodes, flags, structs, message builders.

Owns the bytes only: every request header and argument struct the kernel sends, every reply
and notification the daemon writes, as ``struct.Struct`` formats (little-endian, the
kernel's layout on the machines we run on), plus the flag and opcode numbers. Nothing here
does I/O or knows the union model; ``layerfs.fuse.session`` reads and writes the device and
``layerfs.fuse.dispatch`` decides what to answer.

The reference is ``/usr/include/linux/fuse.h`` (7.38 on Debian 12) and, for what came later
and the kernel already speaks (7.40: ``FUSE_PASSTHROUGH``, ``max_stack_depth`` in
``fuse_init_out``, ``backing_id`` in ``fuse_open_out``, ``FOPEN_PASSTHROUGH``; the backing
ioctls are in ``layerfs.linux.fusedev``), the upstream header of those versions.
"""

from __future__ import annotations

import enum
import os
import stat
import struct

KERNEL_VERSION = 7
# the newest minor whose messages this module knows; a newer kernel talks this one with us
KERNEL_MINOR = 40
ROOT_ID = 1
MIN_READ_BUFFER = 8192


class Op(enum.IntEnum):
    """``enum fuse_opcode``."""

    LOOKUP = 1
    FORGET = 2  # no reply
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42  # no reply
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52
    COPY_FILE_RANGE_64 = 53


_OP_NAMES = {op.value: op.name for op in Op}


def op_name(opcode: int) -> str:
    """``LOOKUP`` for 1, ``OP_99`` for an opcode this module does not know."""
    name = _OP_NAMES.get(opcode)
    return name if name is not None else f"OP_{opcode}"


class Notify(enum.IntEnum):
    """``enum fuse_notify_code`` (sent as the ``error`` of an out header with unique 0)."""

    POLL = 1
    INVAL_INODE = 2
    INVAL_ENTRY = 3
    STORE = 4
    RETRIEVE = 5
    DELETE = 6


# --- INIT flags (fuse_init_in/out .flags; bits 32..63 travel in .flags2) ----------------

ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
SPLICE_WRITE = 1 << 7
SPLICE_MOVE = 1 << 8
SPLICE_READ = 1 << 9
FLOCK_LOCKS = 1 << 10
HAS_IOCTL_DIR = 1 << 11
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
NO_OPEN_SUPPORT = 1 << 17
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19
POSIX_ACL = 1 << 20
ABORT_ERROR = 1 << 21
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
EXPLICIT_INVAL_DATA = 1 << 25
MAP_ALIGNMENT = 1 << 26
SUBMOUNTS = 1 << 27
HANDLE_KILLPRIV_V2 = 1 << 28
SETXATTR_EXT = 1 << 29
INIT_EXT = 1 << 30
SECURITY_CTX = 1 << 32
HAS_INODE_DAX = 1 << 33
CREATE_SUPP_GROUP = 1 << 34
HAS_EXPIRE_ONLY = 1 << 35
DIRECT_IO_ALLOW_MMAP = 1 << 36
PASSTHROUGH = 1 << 37
NO_EXPORT_SUPPORT = 1 << 38
HAS_RESEND = 1 << 39

INIT_FLAG_NAMES = {
    ASYNC_READ: "async_read", POSIX_LOCKS: "posix_locks", ATOMIC_O_TRUNC: "atomic_o_trunc",
    EXPORT_SUPPORT: "export_support", BIG_WRITES: "big_writes", DONT_MASK: "dont_mask",
    SPLICE_WRITE: "splice_write", SPLICE_MOVE: "splice_move", SPLICE_READ: "splice_read",
    FLOCK_LOCKS: "flock_locks", HAS_IOCTL_DIR: "ioctl_dir", AUTO_INVAL_DATA: "auto_inval_data",
    DO_READDIRPLUS: "readdirplus", READDIRPLUS_AUTO: "readdirplus_auto", ASYNC_DIO: "async_dio",
    WRITEBACK_CACHE: "writeback_cache", NO_OPEN_SUPPORT: "no_open", PARALLEL_DIROPS: "parallel_dirops",
    HANDLE_KILLPRIV: "handle_killpriv", POSIX_ACL: "posix_acl", ABORT_ERROR: "abort_error",
    MAX_PAGES: "max_pages", CACHE_SYMLINKS: "cache_symlinks", NO_OPENDIR_SUPPORT: "no_opendir",
    EXPLICIT_INVAL_DATA: "explicit_inval_data", MAP_ALIGNMENT: "map_alignment", SUBMOUNTS: "submounts",
    HANDLE_KILLPRIV_V2: "handle_killpriv_v2", SETXATTR_EXT: "setxattr_ext", INIT_EXT: "init_ext",
    SECURITY_CTX: "security_ctx", HAS_INODE_DAX: "inode_dax", CREATE_SUPP_GROUP: "create_supp_group",
    HAS_EXPIRE_ONLY: "expire_only", DIRECT_IO_ALLOW_MMAP: "direct_io_allow_mmap",
    PASSTHROUGH: "passthrough", NO_EXPORT_SUPPORT: "no_export_support", HAS_RESEND: "resend",
}


def flag_names(flags: int) -> list[str]:
    """The names of the INIT flags set in ``flags`` (unknown bits as ``bitN``)."""
    out = []
    for bit in range(64):
        if flags & (1 << bit):
            out.append(INIT_FLAG_NAMES.get(1 << bit, f"bit{bit}"))
    return out


# --- other flags ------------------------------------------------------------------------

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
FOPEN_PASSTHROUGH = 1 << 7

# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

GETATTR_FH = 1 << 0  # fuse_getattr_in.getattr_flags
FSYNC_FDATASYNC = 1 << 0  # fuse_fsync_in.fsync_flags
RELEASE_FLUSH = 1 << 0  # fuse_release_in.release_flags
EXPIRE_ONLY = 1 << 0  # fuse_notify_inval_entry_out.flags
UNIQUE_RESEND = 1 << 63

# --- structs ------------------------------------------------------------------------------

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen padding
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
# ino size blocks atime mtime ctime atimensec mtimensec ctimensec mode nlink uid gid rdev blksize flags
ATTR = struct.Struct("<QQQqqqIIIIIIIIII")
ENTRY_OUT = struct.Struct("<QQQQII" + ATTR.format[1:])  # nodeid generation entry_valid attr_valid nsecs, attr
ATTR_OUT = struct.Struct("<QII" + ATTR.format[1:])  # attr_valid attr_valid_nsec dummy, attr
OPEN_OUT = struct.Struct("<QIi")  # fh open_flags backing_id
WRITE_OUT = struct.Struct("<II")  # size padding
GETXATTR_OUT = struct.Struct("<II")  # size padding
STATFS_OUT = struct.Struct("<QQQQQIIII6I")  # blocks bfree bavail files ffree bsize namelen frsize padding spare
DIRENT = struct.Struct("<QQII")  # ino off namelen type, then the name, padded to 8 bytes
INIT_IN = struct.Struct("<IIIII")  # major minor max_readahead flags flags2 (then unused[11])
INIT_IN_OLD = struct.Struct("<IIII")  # before 7.36: no flags2
# major minor max_readahead flags max_background congestion_threshold max_write time_gran
# max_pages map_alignment flags2 max_stack_depth unused[6]
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
FORGET_IN = struct.Struct("<Q")  # nlookup
BATCH_FORGET_IN = struct.Struct("<II")  # count dummy
FORGET_ONE = struct.Struct("<QQ")  # nodeid nlookup
GETATTR_IN = struct.Struct("<IIQ")  # getattr_flags dummy fh
# valid padding fh size lock_owner atime mtime ctime atimensec mtimensec ctimensec mode unused4 uid gid unused5
SETATTR_IN = struct.Struct("<IIQQQqqqIIIIIIII")
MKNOD_IN = struct.Struct("<IIII")  # mode rdev umask padding
MKDIR_IN = struct.Struct("<II")  # mode umask
RENAME_IN = struct.Struct("<Q")  # newdir
RENAME2_IN = struct.Struct("<QII")  # newdir flags padding
LINK_IN = struct.Struct("<Q")  # oldnodeid
OPEN_IN = struct.Struct("<II")  # flags open_flags
CREATE_IN = struct.Struct("<IIII")  # flags mode umask open_flags
RELEASE_IN = struct.Struct("<QIIQ")  # fh flags release_flags lock_owner
FLUSH_IN = struct.Struct("<QIIQ")  # fh unused padding lock_owner
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN = struct.Struct("<QQIIQII")  # fh offset size write_flags lock_owner flags padding
FSYNC_IN = struct.Struct("<QII")  # fh fsync_flags padding
FALLOCATE_IN = struct.Struct("<QQQII")  # fh offset length mode padding
SETXATTR_IN = struct.Struct("<II")  # size flags (without FUSE_SETXATTR_EXT)
SETXATTR_IN_EXT = struct.Struct("<IIII")  # size flags setxattr_flags padding
GETXATTR_IN = struct.Struct("<II")  # size padding
ACCESS_IN = struct.Struct("<II")  # mask padding
INTERRUPT_IN = struct.Struct("<Q")  # unique
NOTIFY_INVAL_INODE = struct.Struct("<Qqq")  # ino off len
NOTIFY_INVAL_ENTRY = struct.Struct("<QII")  # parent namelen flags
NOTIFY_DELETE = struct.Struct("<QQII")  # parent child namelen padding

assert IN_HEADER.size == 40 and OUT_HEADER.size == 16 and ATTR.size == 88
assert ENTRY_OUT.size == 128 and ATTR_OUT.size == 104 and OPEN_OUT.size == 16
assert INIT_OUT.size == 64 and SETATTR_IN.size == 88 and STATFS_OUT.size == 80
assert READ_IN.size == 40 and WRITE_IN.size == 40 and DIRENT.size == 24

DIRENTPLUS_FIXED = ENTRY_OUT.size + DIRENT.size


def split_timeout(seconds: float) -> tuple[int, int]:
    """A cache timeout as (seconds, nanoseconds) for ``*_valid``/``*_valid_nsec``."""
    if seconds <= 0:
        return 0, 0
    whole = int(seconds)
    return whole, min(999_999_999, int(round((seconds - whole) * 1e9)))


def attr_fields(ino: int, size: int, blocks: int, atime_ns: int, mtime_ns: int, ctime_ns: int, mode: int,
                nlink: int, uid: int, gid: int, rdev: int, blksize: int) -> tuple[int, ...]:
    """The values of a ``fuse_attr`` in struct order (times split into seconds and nanoseconds)."""
    a_s, a_ns = divmod(atime_ns, 1_000_000_000)
    m_s, m_ns = divmod(mtime_ns, 1_000_000_000)
    c_s, c_ns = divmod(ctime_ns, 1_000_000_000)
    return (ino, size, blocks, a_s, m_s, c_s, a_ns, m_ns, c_ns, mode, nlink & 0xFFFFFFFF, uid, gid,
            rdev & 0xFFFFFFFF, blksize, 0)


def entry_out(nodeid: int, entry_timeout: float, attr_timeout: float, attr: tuple[int, ...]) -> bytes:
    """A ``fuse_entry_out``; ``nodeid`` 0 with no attributes is a negative entry."""
    e_s, e_ns = split_timeout(entry_timeout)
    a_s, a_ns = split_timeout(attr_timeout)
    return ENTRY_OUT.pack(nodeid, 0, e_s, a_s, e_ns, a_ns, *attr)


NO_ATTR = (0,) * 16


def negative_entry(timeout: float) -> bytes:
    """A cached "no such entry" (``ENOENT`` without an error, for ``timeout`` seconds)."""
    return entry_out(0, timeout, 0.0, NO_ATTR)


def attr_out(timeout: float, attr: tuple[int, ...]) -> bytes:
    a_s, a_ns = split_timeout(timeout)
    return ATTR_OUT.pack(a_s, a_ns, 0, *attr)


def dirent_type(mode: int) -> int:
    """``d_type`` of a mode (``DT_DIR`` ... as the kernel's ``S_DT``)."""
    return stat.S_IFMT(mode) >> 12


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def dirent(ino: int, off: int, mode: int, name: bytes) -> bytes:
    """One ``fuse_dirent`` record (READDIR), padded to 8 bytes."""
    rec = DIRENT.pack(ino, off, len(name), dirent_type(mode)) + name
    return rec + b"\0" * (_pad8(len(rec)) - len(rec))


def dirent_size(name: bytes) -> int:
    return _pad8(DIRENT.size + len(name))


def direntplus(entry: bytes, ino: int, off: int, mode: int, name: bytes) -> bytes:
    """One ``fuse_direntplus`` record (READDIRPLUS): an entry_out, then the dirent."""
    rec = entry + DIRENT.pack(ino, off, len(name), dirent_type(mode)) + name
    return rec + b"\0" * (_pad8(len(rec)) - len(rec))


def direntplus_size(name: bytes) -> int:
    return _pad8(DIRENTPLUS_FIXED + len(name))


def reply_header(unique: int, error: int, body_len: int) -> bytes:
    """The out header of a reply (``error`` is 0 or a negative errno)."""
    return OUT_HEADER.pack(OUT_HEADER.size + body_len, error, unique)


def notification(code: Notify, body: bytes) -> bytes:
    """A complete notification message (unique 0, the code in ``error``)."""
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), int(code), 0) + body


def inval_inode(nodeid: int, offset: int = -1, length: int = 0) -> bytes:
    """Drop cached attributes of ``nodeid``; with ``offset >= 0`` also its cached pages from
    there (``length`` 0: to the end) -- for a directory, its readdir cache."""
    return notification(Notify.INVAL_INODE, NOTIFY_INVAL_INODE.pack(nodeid, offset, length))


def inval_entry(parent: int, name: bytes, expire_only: bool = False) -> bytes:
    """Drop (or with ``expire_only`` just expire) the cached dentry ``name`` in ``parent``."""
    body = NOTIFY_INVAL_ENTRY.pack(parent, len(name), EXPIRE_ONLY if expire_only else 0) + name + b"\0"
    return notification(Notify.INVAL_ENTRY, body)


def cstring(buf: bytes, start: int = 0) -> tuple[bytes, int]:
    """The NUL-terminated string at ``start`` and the offset after its NUL."""
    end = buf.index(b"\0", start)
    return buf[start:end], end + 1


def statfs_out(blocks: int, bfree: int, bavail: int, files: int, ffree: int, bsize: int, namelen: int,
               frsize: int) -> bytes:
    return STATFS_OUT.pack(blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, 0, *([0] * 6))


def open_flags_to_os(flags: int) -> int:
    """``fuse_open_in.flags`` are the caller's ``open(2)`` flags already (``os.O_*``)."""
    return flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY)

"""The one libc handle of layerfs, and raw syscalls by name.

Every ctypes call into libc goes through ``libc`` here (one ``CDLL``, argtypes declared
once); syscalls that libc does not wrap (the new mount API, getdents64) are called by
number with ``syscall(name, ...)``, which knows the numbers of the architectures we run on.
Errors come back as ``OSError`` carrying the kernel's errno.
"""

from __future__ import annotations

import ctypes
import errno
import os

# The new mount API got one number on every architecture (asm-generic, x86_64 included);
# getdents64 predates that and differs.
_GENERIC = {"open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432}
_SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {**_GENERIC, "getdents64": 217},
    "aarch64": {**_GENERIC, "getdents64": 61},
}

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.unshare.argtypes = [ctypes.c_int]


def syscall_number(name: str) -> int:
    """The number of ``name`` on this machine; OSError(ENOSYS) on an architecture we lack."""
    import platform  # (here: off the import of every layerfs.linux module)

    table = _SYSCALLS.get(platform.machine())
    if table is None:
        raise OSError(errno.ENOSYS, f"layerfs knows no syscall numbers for {platform.machine()}")
    return table[name]


def syscall(name: str, *args: object) -> int:
    """Call a raw syscall by name; raises OSError with the errno on failure."""
    result = int(libc.syscall(ctypes.c_long(syscall_number(name)), *args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def check(result: int, what: str = "") -> int:
    """Turn a libc ``-1`` return into OSError(errno)."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{os.strerror(err)}{': ' + what if what else ''}")
    return result

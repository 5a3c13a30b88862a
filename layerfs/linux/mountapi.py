"""Mount syscalls: legacy ``mount(2)``/``umount2(2)``/``unshare(2)``, and the new mount
API's fs contexts (``fsopen``/``fsconfig``) as ``FsContext``.

Every function raises ``OSError`` with the kernel's errno (and the path, where there is
one). ``fsmount`` and ``move_mount`` are plain ``syscall`` calls in ``layerfs.mount.kernel``;
the context, with its error log, is the part worth a class.
"""

from __future__ import annotations

import ctypes
import errno
import os
from types import TracebackType

from layerfs.linux.libc import libc, syscall


def _fail(path: str | None) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, os.strerror(err), path) if path is not None else OSError(err, os.strerror(err))


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    """mount(2). Strings are passed as given (no escaping: that is the caller's syntax)."""
    if libc.mount(source.encode() if source is not None else None, target.encode(),
                  fstype.encode() if fstype is not None else None, flags,
                  data.encode() if data is not None else None) != 0:
        raise _fail(target)


def umount2(target: str, flags: int) -> None:
    """umount2(2) of ``target`` with ``flags`` (MNT_DETACH, UMOUNT_NOFOLLOW, ...)."""
    if libc.umount2(target.encode(), flags) != 0:
        raise _fail(target)


def unshare(flags: int) -> None:
    """unshare(2) for the calling thread (CLONE_FS: its own cwd and root)."""
    if libc.unshare(flags) != 0:
        raise _fail(None)


FSOPEN_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_SET_FD = 5
FSCONFIG_CMD_CREATE = 6
# fsconfig() copies FSCONFIG_SET_STRING values with strndup_user(value, 256): 255 bytes max
FSCONFIG_MAX_STRING = 255


class FsContext:
    """An fs context of the new mount API (``fsopen``), closed on exit.

    Lifecycle: ``FsContext(fstype)`` → ``set_*`` per parameter → ``create()`` → the caller
    passes ``fd`` to ``fsmount``. Every failing call leaves the kernel's explanation in the
    context's log; ``messages()`` drains it (lines like ``e overlay: Unknown parameter 'x'``).
    Overlayfs reports many failures (missing layer, too few lowers) only to dmesg, so the
    log may be empty.
    """

    def __init__(self, fstype: str) -> None:
        self.fstype = fstype
        self.fd = syscall("fsopen", fstype.encode(), FSOPEN_CLOEXEC)

    def __enter__(self) -> FsContext:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def set_flag(self, key: str) -> None:
        syscall("fsconfig", self.fd, FSCONFIG_SET_FLAG, key.encode(), None, 0)

    def set_string(self, key: str, value: str) -> None:
        data = value.encode()
        if len(data) > FSCONFIG_MAX_STRING:
            raise OSError(errno.ENAMETOOLONG, f"fsconfig strings are limited to {FSCONFIG_MAX_STRING} bytes")
        syscall("fsconfig", self.fd, FSCONFIG_SET_STRING, key.encode(), data, 0)

    def set_fd(self, key: str, fd: int) -> None:
        syscall("fsconfig", self.fd, FSCONFIG_SET_FD, key.encode(), None, fd)

    def create(self) -> None:
        syscall("fsconfig", self.fd, FSCONFIG_CMD_CREATE, None, None, 0)

    def messages(self) -> list[str]:
        out: list[str] = []
        while self.fd >= 0:
            try:
                line = os.read(self.fd, 4096)
            except OSError:  # ENODATA: log empty
                break
            if not line:
                break
            out.append(line.decode(errors="replace").strip())
        return out

"""The kernel transport's request loop and its reply cache (``layerfs.fuse.session``).

No mount: the real ``Session`` loop serves one end of a ``SOCK_SEQPACKET`` socketpair (one
record per read, as ``/dev/fuse`` gives one request per read) over the real ``UnionFS``
model; the test is the kernel at the other end, writing requests and reading replies. What
is shown: answers about immutable (lower-only) nodes are sent again from the cache, and
every change that alters them -- setxattr, setattr, a copy-up by open, an unlink -- is
seen by the very next request, exactly as without the cache (the same model answers a
session that starts with an empty cache).
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from layerfs.fuse import protocol as p
from layerfs.fuse.dispatch import Dispatcher
from layerfs.fuse.session import Session
from layerfs.union.fs import UnionFS

pytestmark = pytest.mark.timeout(60)


def _user_xattrs(path: Path) -> bool:
    probe = path / ".xattr-probe"
    probe.touch()
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


class Kernel:
    """The kernel's end of the connection: numbered requests, replies matched by number."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.unique = 0

    def call(self, op: p.Op, nodeid: int, arg: bytes = b"") -> tuple[int, bytes]:
        """(error, body) of the reply (error 0 or a negative errno); notifications skipped."""
        self.unique += 1
        self.sock.send(p.IN_HEADER.pack(p.IN_HEADER.size + len(arg), op, self.unique, nodeid, 0, 0, 1, 0, 0) + arg)
        while True:
            msg = self.sock.recv(1 << 21)
            length, error, unique = p.OUT_HEADER.unpack_from(msg)
            assert length == len(msg)
            if unique == self.unique:
                return error, msg[p.OUT_HEADER.size:]
            assert unique == 0, "a reply to a request not asked"  # 0: a notification

    def lookup(self, parent: int, name: bytes) -> int:
        error, body = self.call(p.Op.LOOKUP, parent, name + b"\0")
        assert error == 0
        return int(p.ENTRY_OUT.unpack_from(body)[0])

    def getattr(self, nodeid: int) -> tuple[int, ...]:
        error, body = self.call(p.Op.GETATTR, nodeid, p.GETATTR_IN.pack(0, 0, 0))
        assert error == 0, errno.errorcode[-error]
        return p.ATTR.unpack_from(body, 16)

    def getxattr(self, nodeid: int, name: bytes, size: int = 4096) -> tuple[int, bytes]:
        return self.call(p.Op.GETXATTR, nodeid, p.GETXATTR_IN.pack(size, 0) + name + b"\0")


Serve = Callable[[Callable[[Kernel, Session], None]], None]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    """Runs a test body (in a thread) against a live session over a fresh model."""
    def run(body: Callable[[Kernel, Session], None]) -> None:
        model = UnionFS([str(tmp_path / "lower")], str(tmp_path / "upper"), str(tmp_path / "work"))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        theirs.settimeout(20)
        session = Session(ours.fileno(), Dispatcher(model))
        kernel = Kernel(theirs)

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.run)
                try:
                    error, _ = await trio.to_thread.run_sync(
                        kernel.call, p.Op.INIT, 0, p.INIT_IN_OLD.pack(7, p.KERNEL_MINOR, 1 << 17, 0))
                    assert error == 0
                    await trio.to_thread.run_sync(body, kernel, session)
                finally:
                    nursery.cancel_scope.cancel()

        try:
            trio.run(main)
        finally:
            model.destroy()
            ours.close()
            theirs.close()

    for d in ("lower/d", "upper", "work"):
        (tmp_path / d).mkdir(parents=True)
    yield run


def test_xattr_answers_of_lower_files_are_cached_and_dropped_by_setxattr(tmp_path: Path, serve: Serve) -> None:
    lower = tmp_path / "lower"
    if not _user_xattrs(lower):
        pytest.skip("the test directory's filesystem has no user xattrs")
    (lower / "d" / "f").write_bytes(b"lower data")
    os.setxattr(lower / "d" / "f", "user.color", b"blue")

    def body(k: Kernel, s: Session) -> None:
        f = k.lookup(k.lookup(p.ROOT_ID, b"d"), b"f")
        assert k.getxattr(f, b"security.selinux") == (-errno.ENODATA, b"")
        hits = s.cache.hits
        assert k.getxattr(f, b"security.selinux") == (-errno.ENODATA, b"")  # the same, from the cache
        assert k.getxattr(f, b"user.color") == (0, b"blue")
        assert k.getxattr(f, b"user.color") == (0, b"blue")
        assert k.getxattr(f, b"user.color", size=0) == (0, p.GETXATTR_OUT.pack(4, 0))
        assert k.getxattr(f, b"user.color", size=2) == (-errno.ERANGE, b"")
        assert k.getxattr(f, b"user.color", size=2) == (-errno.ERANGE, b"")
        assert s.cache.hits == hits + 3
        # setxattr copies the file up (in a worker thread): the next getxattr sees the new value
        arg = p.SETXATTR_IN.pack(3, 0) + b"user.color\0" + b"red"
        assert k.call(p.Op.SETXATTR, f, arg) == (0, b"")
        assert k.getxattr(f, b"user.color") == (0, b"red")
        assert k.getxattr(f, b"user.color") == (0, b"red")
        assert k.getxattr(f, b"security.selinux") == (-errno.ENODATA, b"")
        # an upper file is never answered from the cache
        hits = s.cache.hits
        assert k.call(p.Op.REMOVEXATTR, f, b"user.color\0") == (0, b"")
        assert k.getxattr(f, b"user.color") == (-errno.ENODATA, b"")
        assert k.getxattr(f, b"user.color") == (-errno.ENODATA, b"")
        assert s.cache.hits == hits
        stats: dict[str, Any] = s.statistics()
        assert stats["requests"]["GETXATTR"] == 12 and stats["requests"]["LOOKUP"] == 2
        assert stats["cached_replies"] == hits

    serve(body)
    assert os.getxattr(tmp_path / "lower/d/f", "user.color") == b"blue"  # the lower is untouched


def test_attribute_answers_follow_setattr_copy_up_and_unlink(tmp_path: Path, serve: Serve) -> None:
    lower = tmp_path / "lower"
    (lower / "d" / "f").write_bytes(b"lower data")
    (lower / "d" / "g").write_bytes(b"12345")
    os.chmod(lower / "d" / "f", 0o644)

    def body(k: Kernel, s: Session) -> None:
        d = k.lookup(p.ROOT_ID, b"d")
        f, g = k.lookup(d, b"f"), k.lookup(d, b"g")
        first = k.getattr(f)
        assert stat.S_IMODE(first[9]) == 0o644 and first[1] == 10
        hits = s.cache.hits
        assert k.getattr(f) == first
        assert s.cache.hits == hits + 1
        # chmod (SETATTR, copies up): the next GETATTR has the new mode
        setattr_in = p.SETATTR_IN.pack(p.FATTR_MODE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, stat.S_IFREG | 0o600, 0, 0, 0, 0)
        error, _ = k.call(p.Op.SETATTR, f, setattr_in)
        assert error == 0
        assert stat.S_IMODE(k.getattr(f)[9]) == 0o600
        # open for writing copies g up; a write grows it: GETATTR follows
        assert k.getattr(g)[1] == 5 and k.getattr(g)[1] == 5
        error, opened = k.call(p.Op.OPEN, g, p.OPEN_IN.pack(os.O_WRONLY, 0))
        assert error == 0
        fh = p.OPEN_OUT.unpack_from(opened)[0]
        data = b"more data, longer"
        error, written = k.call(p.Op.WRITE, g, p.WRITE_IN.pack(fh, 0, len(data), 0, 0, 0, 0) + data)
        assert error == 0 and p.WRITE_OUT.unpack_from(written)[0] == len(data)
        assert k.getattr(g)[1] == len(data)
        assert k.call(p.Op.RELEASE, g, p.RELEASE_IN.pack(fh, 0, 0, 0))[0] == 0
        # a lower directory's attributes: cached until a new entry changes them
        before = k.getattr(d)
        assert k.getattr(d) == before
        error, _ = k.call(p.Op.MKDIR, d, p.MKDIR_IN.pack(0o755, 0) + b"new\0")
        assert error == 0
        assert k.getattr(d) != before
        # FORGET: the node's answers go; unlink of a lower file: a whiteout, then ENOENT
        k.sock.send(p.IN_HEADER.pack(48, p.Op.FORGET, 999, f, 0, 0, 1, 0, 0) + p.FORGET_IN.pack(1))
        assert f not in s.cache.nodes or not s.cache.nodes[f]
        h = k.lookup(d, b"g")
        assert k.call(p.Op.UNLINK, d, b"g\0") == (0, b"")
        assert k.call(p.Op.LOOKUP, d, b"g\0")[1][:8] == b"\0" * 8  # a negative entry now
        del h

    serve(body)
    assert stat.S_IMODE(os.stat(tmp_path / "lower/d/f").st_mode) == 0o644
    assert (tmp_path / "upper/d/f").stat().st_mode & 0o777 == 0o600

"""Read-only access, by name, to the files of an image layout or archive.

An OCI image layout or a docker archive comes either as a directory or as a tar of one.
``open_files`` gives both the same face (``exists``, ``size``, ``open``, ``read``), so the
format readers never care which they have.

- A tar is read in place, never extracted: ``tarfile`` indexes the members once and each
  ``open`` streams one member. Uncompressed tars seek directly; gzip-compressed ones work
  too (``docker save | gzip``) but every backwards seek decompresses from the start again,
  so reading layers out of order costs time. Other compressions are refused with a hint.
- Symlinks and hardlinks inside the archive are followed (``docker save`` and skopeo write
  ``<id>/layer.tar`` as a symlink to a layer stored elsewhere in the archive), but only
  within it: an absolute target, a ``..`` above the archive root or a loop is an
  ``InvalidImage``. The same rule holds for an unpacked directory, so a layout cannot
  point us at files outside itself.

Streams returned by ``open`` are valid until the ``ImageFiles`` is closed. Not thread safe:
streams of one tar share one file object (each read seeks to its own position first).
"""

from __future__ import annotations

import os
import posixpath
import stat
import tarfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import BinaryIO, Literal

from layerfs.errors import FailedPrecondition, InvalidImage, NotFound

_MAX_LINK_HOPS = 40  # the kernel's own limit for symlink resolution (MAXSYMLINKS)

_COMPRESSED_MAGIC = {
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\xfd7zXZ\x00": "xz",
    b"BZh": "bzip2",
}


@dataclass(frozen=True)
class _Entry:
    kind: Literal["file", "dir", "symlink", "hardlink", "other"]
    size: int = 0
    target: str = ""


def _split(name: str) -> list[str]:
    return [p for p in name.split("/") if p not in ("", ".")]


class ImageFiles(ABC):
    """The files of one layout or archive; names are ``/``-separated, relative to its root."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.closed = False

    @abstractmethod
    def _lookup(self, name: str) -> _Entry | None:
        """The entry at exactly ``name`` (no link following), or None."""

    @abstractmethod
    def _open_resolved(self, name: str) -> BinaryIO: ...

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> ImageFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def resolve(self, name: str) -> str | None:
        """The regular file ``name`` leads to after following links, or None if there is none.

        Raises ``InvalidImage`` when a link (or ``name`` itself) leaves the archive or loops.
        """
        parts = _split(name)
        if "\x00" in name:
            raise InvalidImage(f"{self.path}: path {name!r} contains a NUL byte")
        if name.startswith("/"):
            raise InvalidImage(f"{self.path}: path {name!r} is absolute; it would leave the archive")
        done: list[str] = []
        hops = 0
        while parts:
            comp = parts.pop(0)
            if comp == "..":
                if not done:
                    raise InvalidImage(f"{self.path}: {name!r} leads outside the archive")
                done.pop()
                continue
            entry = self._lookup("/".join([*done, comp]))
            if entry is None or entry.kind == "other":
                return None
            if entry.kind in ("symlink", "hardlink"):
                hops += 1
                if hops > _MAX_LINK_HOPS:
                    raise InvalidImage(f"{self.path}: too many links (a loop?) resolving {name!r}")
                if entry.target.startswith("/"):
                    raise InvalidImage(
                        f"{self.path}: {'/'.join([*done, comp])!r} links to absolute path "
                        f"{entry.target!r}, outside the archive"
                    )
                if entry.kind == "hardlink":
                    done = []  # tar hardlink targets are named from the archive root
                parts = _split(entry.target) + parts
                continue
            if entry.kind == "file" and parts:
                return None  # a path through a regular file
            done.append(comp)
        final = "/".join(done)
        entry = self._lookup(final) if done else None
        return final if entry is not None and entry.kind == "file" else None

    def exists(self, name: str) -> bool:
        return self.resolve(name) is not None

    def _must_resolve(self, name: str) -> str:
        resolved = self.resolve(name)
        if resolved is None:
            raise InvalidImage(f"{self.path}: missing file {name!r}")
        return resolved

    def size(self, name: str) -> int:
        entry = self._lookup(self._must_resolve(name))
        assert entry is not None
        return entry.size

    def open(self, name: str) -> BinaryIO:
        """A stream of the file's bytes; raises ``InvalidImage`` when it is missing."""
        if self.closed:
            raise FailedPrecondition(f"{self.path}: the image source is closed")
        return self._open_resolved(self._must_resolve(name))

    def read(self, name: str, limit: int) -> bytes:
        """The whole file, refusing one larger than ``limit`` bytes (JSON metadata only)."""
        with self.open(name) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise InvalidImage(f"{self.path}: {name!r} is larger than {limit} bytes")
        return data


class DirFiles(ImageFiles):
    """An unpacked layout or archive directory."""

    def _lookup(self, name: str) -> _Entry | None:
        try:
            st = os.lstat(os.path.join(self.path, name))
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISLNK(st.st_mode):
            return _Entry("symlink", target=os.readlink(os.path.join(self.path, name)))
        if stat.S_ISDIR(st.st_mode):
            return _Entry("dir")
        if stat.S_ISREG(st.st_mode):
            return _Entry("file", size=st.st_size)
        return _Entry("other")

    def _open_resolved(self, name: str) -> BinaryIO:
        # O_NOFOLLOW: resolve() checked every component; refuse a symlink swapped in since.
        fd = os.open(os.path.join(self.path, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        return os.fdopen(fd, "rb")


class TarFiles(ImageFiles):
    """A tar of a layout or archive, read in place."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        with open(path, "rb") as f:
            head = f.read(6)
        for magic, kind in _COMPRESSED_MAGIC.items():
            if head.startswith(magic):
                raise InvalidImage(
                    f"{path}: the archive is {kind}-compressed; decompress it first "
                    "(uncompressed and gzip-compressed tars are read directly)"
                )
        gzipped = head.startswith(b"\x1f\x8b")
        try:
            self._tar = tarfile.open(path, "r:gz" if gzipped else "r:")
            members = self._tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as e:
            raise InvalidImage(f"{path}: not a readable tar archive: {e}") from e
        self._members: dict[str, tarfile.TarInfo] = {}
        self._dirs: set[str] = set()
        for m in members:
            name = posixpath.normpath(m.name.lstrip("/"))
            if name == "." or name == ".." or name.startswith("../"):
                continue  # unreachable by any lookup; never trusted
            self._members[name] = m  # a later duplicate wins, as on extraction
            parent = posixpath.dirname(name)
            while parent and parent not in self._dirs:
                self._dirs.add(parent)
                parent = posixpath.dirname(parent)

    def close(self) -> None:
        super().close()
        self._tar.close()

    def _lookup(self, name: str) -> _Entry | None:
        m = self._members.get(name)
        if m is None:
            return _Entry("dir") if name in self._dirs else None
        if m.isreg():
            return _Entry("file", size=m.size)
        if m.isdir():
            return _Entry("dir")
        if m.issym():
            return _Entry("symlink", target=m.linkname)
        if m.islnk():
            return _Entry("hardlink", target=m.linkname)
        return _Entry("other")

    def _open_resolved(self, name: str) -> BinaryIO:
        f = self._tar.extractfile(self._members[name])
        assert f is not None  # resolve() only returns regular members
        return f  # type: ignore[return-value]


def open_files(path: str) -> ImageFiles:
    """``DirFiles`` for a directory, ``TarFiles`` for anything else; ``NotFound`` if missing."""
    if os.path.isdir(path):
        return DirFiles(path)
    if not os.path.exists(path):
        raise NotFound(f"image archive or layout {path!r} does not exist")
    return TarFiles(path)

"""Validated content digests and OCI chain ids.

A digest string enters layerfs in exactly one place (``Digest.parse``) and is typed from
then on, so an id that is not ``sha256:<64 lowercase hex>`` never becomes a path in the
store. Only sha256 is accepted: it is what every image layout and docker archive in the
wild uses, and the store's ``blobs/sha256/`` directory is named for it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Protocol

from layerfs.errors import DigestMismatch, InvalidArgument


class Readable(Protocol):
    """Anything with ``read(n)``: files, pipes, layerfs' own stream wrappers."""

    def read(self, n: int = -1, /) -> bytes: ...


_HEX64 = re.compile(r"[0-9a-f]{64}")
ALGORITHM = "sha256"


class Digest(str):
    """``sha256:<hex>``; construct with ``Digest.parse`` or ``Digest.of``."""

    __slots__ = ()

    @classmethod
    def parse(cls, value: str) -> Digest:
        if isinstance(value, Digest):
            return value
        if not isinstance(value, str):
            raise InvalidArgument(f"digest must be a string, got {type(value).__name__}")
        algo, sep, hexpart = value.partition(":")
        if not sep:
            raise InvalidArgument(f"invalid digest {value!r}: expected 'sha256:<hex>'")
        if algo != ALGORITHM:
            raise InvalidArgument(f"unsupported digest algorithm {algo!r} in {value!r}")
        if not _HEX64.fullmatch(hexpart):
            raise InvalidArgument(f"invalid digest {value!r}: expected 64 lowercase hex digits")
        return cls(value)

    @classmethod
    def from_hex(cls, hexpart: str) -> Digest:
        return cls.parse(f"{ALGORITHM}:{hexpart}")

    @classmethod
    def of(cls, data: bytes) -> Digest:
        return cls(f"{ALGORITHM}:{hashlib.sha256(data).hexdigest()}")

    @property
    def hex(self) -> str:
        return self[len(ALGORITHM) + 1 :]

    def short(self, n: int = 12) -> str:
        return self.hex[:n]


def chain_ids(diff_ids: Iterable[Digest]) -> list[Digest]:
    """OCI ChainIDs: ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    out: list[Digest] = []
    for diff_id in diff_ids:
        if not out:
            out.append(Digest.parse(diff_id))
        else:
            out.append(Digest.of(f"{out[-1]} {diff_id}".encode()))
    return out


class VerifyingReader:
    """Wraps a binary stream; counts and hashes what is read through it.

    ``verify()`` raises ``DigestMismatch`` naming ``what`` when the stream's length or
    sha256 differs from the expectation. Reading past ``expected_size`` fails at once, so a
    blob that is too long is not read to its end first.
    """

    def __init__(
        self,
        raw: Readable,
        what: str,
        expected: Digest | None = None,
        expected_size: int | None = None,
    ) -> None:
        self._raw = raw
        self.what = what
        self.expected = expected
        self.expected_size = expected_size
        self._hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        if data:
            self.size += len(data)
            self._hash.update(data)
            if self.expected_size is not None and self.size > self.expected_size:
                raise DigestMismatch(
                    f"{self.what}: size mismatch: more than the expected {self.expected_size} bytes"
                )
        return data

    def readinto(self, buf: bytearray | memoryview) -> int:  # used by some stream wrappers
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def drain(self, bufsize: int = 1 << 20) -> None:
        """Read whatever is left (a tar reader may stop before the stream's end)."""
        while self.read(bufsize):
            pass

    @property
    def digest(self) -> Digest:
        return Digest(f"{ALGORITHM}:{self._hash.hexdigest()}")

    def verify(self) -> Digest:
        actual = self.digest
        if self.expected_size is not None and self.size != self.expected_size:
            raise DigestMismatch(
                f"{self.what}: size mismatch: expected {self.expected_size} bytes, got {self.size}"
            )
        if self.expected is not None and actual != self.expected:
            raise DigestMismatch(f"{self.what}: digest mismatch: expected {self.expected}, got {actual}")
        return actual

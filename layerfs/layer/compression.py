"""Bounded, streaming decompression of layer blobs.

This module owns:

- recognising a blob's compression from its first bytes (``detect``): gzip (``1f 8b``),
  zstd (``28 b5 2f fd``, or a zstd skippable frame ``5? 2a 4d 18``) or plain; bzip2 and xz
  are refused, as containerd refuses them (no OCI media type names them);
- the bounds put on decompression (``Limits``, overridable from the environment with
  ``LAYERFS_MAX_LAYER_BYTES`` and ``LAYERFS_MAX_RATIO``), so a small blob cannot expand into
  a disk-filling layer (a "bomb");
- the reader the tar parser reads from (``open_decompressed`` -> ``BoundedReader``).

Everything streams: the input is read in chunks of at most ``CHUNK`` bytes, every ``read(n)``
returns at most ``n`` bytes, and nothing ever holds the whole stream. The input need not be
seekable: the bytes peeked for detection are kept and fed to the decoder first.

Corrupt or truncated compressed data raises ``UnsafeArchive``; passing a bound raises
``LimitExceeded``. Errors raised by the underlying stream itself (an I/O error, a digest
mismatch) propagate unchanged.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, cast

import zstandard

from layerfs.digest import Readable
from layerfs.errors import InvalidArgument, LimitExceeded, UnsafeArchive

CHUNK = 1 << 17  # compressed bytes read from the underlying stream at a time
_HEAD = 6  # enough for every magic number below

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
BZIP2_MAGIC = b"BZh"
XZ_MAGIC = b"\xfd7zXZ\x00"


def _is_zstd_skippable(head: bytes) -> bool:
    # Skippable frames: magic 0x184D2A50..0x184D2A5F, little endian (RFC 8878 3.1.2).
    return len(head) >= 4 and head[1:4] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50


def detect(head: bytes) -> str:
    """``"gzip"``, ``"zstd"`` or ``"plain"`` from a stream's first bytes (6 are enough).

    Raises ``UnsafeArchive`` for bzip2 and xz, which layerfs does not accept as layers.
    """
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC) or _is_zstd_skippable(head):
        return "zstd"
    if head.startswith(BZIP2_MAGIC):
        raise UnsafeArchive("unsupported compression bzip2: layers must be plain, gzip or zstd tars")
    if head.startswith(XZ_MAGIC):
        raise UnsafeArchive("unsupported compression xz: layers must be plain, gzip or zstd tars")
    return "plain"


def _env_number(name: str, default: float, kind: type) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw.strip())
    except ValueError:
        raise InvalidArgument(f"{name}={raw!r}: expected a {kind.__name__}") from None
    if value <= 0:
        raise InvalidArgument(f"{name}={raw!r}: must be positive")
    return float(value)


@dataclass
class Limits:
    """Bounds on one decompressed layer.

    ``max_ratio`` is only enforced once the output passes ``min_ratio_bytes``: small,
    highly compressible layers (a tar of empty files) are legitimate.
    """

    max_bytes: int = 64 * 2**30
    max_ratio: float = 1000.0
    min_ratio_bytes: int = 16 * 2**20

    @classmethod
    def from_env(cls) -> Limits:
        """Defaults, overridden by ``LAYERFS_MAX_LAYER_BYTES`` and ``LAYERFS_MAX_RATIO``."""
        d = cls()
        return cls(
            max_bytes=int(_env_number("LAYERFS_MAX_LAYER_BYTES", d.max_bytes, int)),
            max_ratio=float(_env_number("LAYERFS_MAX_RATIO", d.max_ratio, float)),
        )


class _Source:
    """The compressed input: the peeked head first, then the rest of ``raw``. Counts what is
    consumed (the denominator of the ratio) and remembers whether ``raw`` itself failed, so
    its errors are not mistaken for corrupt data."""

    def __init__(self, raw: Readable, head: bytes) -> None:
        self._raw = raw
        self._head = head
        self.consumed = 0
        self.failed = False
        self.tap: Callable[[bytes], None] | None = None

    def read(self, n: int = CHUNK) -> bytes:
        if n is None or n < 0:
            n = CHUNK
        data, self._head = self._head[:n], self._head[n:]
        if len(data) < n:
            try:
                data += self._raw.read(n - len(data))
            except BaseException:
                self.failed = True
                raise
        self.consumed += len(data)
        if self.tap is not None and data:
            self.tap(data)
        return data


class _GzipDecoder:
    """Multi-member gzip over zlib (``wbits=31``: gzip wrapper, CRC32 and length checked).

    Anything after a member that is not another gzip member (zero padding included) is an
    error, as in Go's ``compress/gzip`` that containerd uses.
    """

    def __init__(self, src: _Source) -> None:
        self._src = src
        self._d = zlib.decompressobj(31)
        self._pending = b""
        self._between = False  # the last member ended; the next byte must start a new one

    def read(self, n: int) -> bytes:
        while True:
            if not self._pending:
                self._pending = self._src.read(CHUNK)
                if not self._pending:
                    if self._between:
                        return b""
                    raise EOFError("stream ends inside a gzip member")
            if self._between:
                self._d = zlib.decompressobj(31)
                self._between = False
            out = self._d.decompress(self._pending, n)
            if self._d.eof:
                self._pending = self._d.unused_data
                self._between = True
            else:
                self._pending = self._d.unconsumed_tail
            if out:
                return out


class _ZstdFrames:
    """Follows zstd frame boundaries in the compressed bytes (RFC 8878 section 3.1).

    python-zstandard's ``stream_reader`` reports a clean end of stream when the input stops
    in the middle of a frame; this tracker is how a truncated blob is told from a complete
    one. It only reads headers (frame header, 3-byte block headers, skippable frame sizes)
    and skips over block contents.
    """

    def __init__(self) -> None:
        self._state = "magic"
        self._need = 4  # header bytes still to collect in _buf
        self._buf = b""
        self._skip = 0  # content bytes to pass over before the next header
        self._checksum = False
        self.bad = False

    @property
    def at_boundary(self) -> bool:
        return not self.bad and self._state == "magic" and not self._buf and self._skip == 0

    def feed(self, data: bytes) -> None:
        i = 0
        while i < len(data) and not self.bad:
            if self._skip:
                step = min(self._skip, len(data) - i)
                self._skip -= step
                i += step
                continue
            take = min(self._need - len(self._buf), len(data) - i)
            self._buf += data[i : i + take]
            i += take
            if len(self._buf) == self._need:
                header, self._buf = self._buf, b""
                self._header(header)

    def _expect(self, state: str, need: int, skip: int = 0) -> None:
        self._state, self._need, self._skip = state, need, skip

    def _header(self, h: bytes) -> None:
        if self._state == "magic":
            if h == ZSTD_MAGIC:
                self._expect("fhd", 1)
            elif _is_zstd_skippable(h):
                self._expect("skipsize", 4)
            else:
                self.bad = True  # the decoder reports this too; never a clean end
        elif self._state == "skipsize":
            self._expect("magic", 4, int.from_bytes(h, "little"))
        elif self._state == "fhd":
            fhd = h[0]
            single_segment = bool(fhd & 0x20)
            self._checksum = bool(fhd & 0x04)
            fcs = (1 if single_segment else 0, 2, 4, 8)[fhd >> 6]
            rest = (0 if single_segment else 1) + (0, 1, 2, 4)[fhd & 0x03] + fcs
            self._expect("block", 3, rest)
        elif self._state == "block":
            v = int.from_bytes(h, "little")
            last, btype, bsize = v & 1, (v >> 1) & 3, v >> 3
            if btype == 3:
                self.bad = True
                return
            content = 1 if btype == 1 else bsize  # an RLE block stores one byte
            if not last:
                self._expect("block", 3, content)
            elif self._checksum:
                self._expect("magic", 4, content + 4)
            else:
                self._expect("magic", 4, content)


class _ZstdDecoder:
    def __init__(self, src: _Source) -> None:
        self._frames = _ZstdFrames()
        src.tap = self._frames.feed
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            cast(IO[bytes], src), read_size=CHUNK, read_across_frames=True, closefd=False
        )

    def read(self, n: int) -> bytes:
        out = self._reader.read(n)
        if not out and not self._frames.at_boundary:
            raise EOFError("stream ends inside a zstd frame")
        return out


class BoundedReader:
    """Decompressed bytes of a layer blob, within ``Limits``.

    ``compressed_bytes`` and ``decompressed_bytes`` say how far it got. Not seekable.
    Closing it does not close the underlying stream.
    """

    def __init__(self, src: _Source, compression: str, what: str, limits: Limits) -> None:
        self.compression = compression
        self.what = what
        self.limits = limits
        self._src = src
        self._decoded = 0
        self._decode: Callable[[int], bytes]
        if compression == "gzip":
            self._decode = _GzipDecoder(src).read
        elif compression == "zstd":
            self._decode = _ZstdDecoder(src).read
        else:
            self._decode = src.read

    @property
    def compressed_bytes(self) -> int:
        return self._src.consumed

    @property
    def decompressed_bytes(self) -> int:
        return self._decoded

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            parts = []
            while chunk := self.read(CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        if n == 0:
            return b""
        try:
            data = self._decode(n)
        except (zlib.error, zstandard.ZstdError, EOFError) as e:
            if self._src.failed:
                raise
            raise UnsafeArchive(f"{self.what}: corrupt or truncated {self.compression} stream: {e}") from e
        self._account(len(data))
        return data

    def readinto(self, buf: bytearray | memoryview) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        """Nothing to release: the underlying stream belongs to the caller."""

    def _account(self, n: int) -> None:
        self._decoded += n
        lim = self.limits
        if self._decoded > lim.max_bytes:
            raise LimitExceeded(
                f"{self.what}: decompressed layer exceeds the limit of {lim.max_bytes} bytes "
                "(LAYERFS_MAX_LAYER_BYTES)"
            )
        if (
            self.compression != "plain"
            and self._decoded > lim.min_ratio_bytes
            and self._decoded > lim.max_ratio * max(self._src.consumed, 1)
        ):
            raise LimitExceeded(
                f"{self.what}: {self.compression} compression ratio exceeds {lim.max_ratio:g}:1 "
                f"({self._decoded} bytes from {self._src.consumed} compressed; LAYERFS_MAX_RATIO)"
            )


def open_decompressed(raw: Readable, what: str, limits: Limits | None = None) -> BoundedReader:
    """A bounded reader of ``raw``'s decompressed bytes; ``what`` names it in errors.

    ``raw`` is read forward only; the caller keeps ownership of it.
    """
    head = b""
    while len(head) < _HEAD:
        more = raw.read(_HEAD - len(head))
        if not more:
            break
        head += more
    try:
        kind = detect(head)
    except UnsafeArchive as e:
        raise UnsafeArchive(f"{what}: {e}") from None
    return BoundedReader(_Source(raw, head), kind, what, limits or Limits())

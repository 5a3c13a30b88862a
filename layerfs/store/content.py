"""The content store: immutable, verified blobs under ``blobs/sha256/<hex>``.

A blob is written to ``tmp/ingest-*`` while it is read (``Ingest`` is a reader that
tees into the temp file and hashes), fsynced, verified against the expected size and
sha256, made read-only and renamed into place. A blob file therefore either is complete
and correct or does not exist under its name. Which blobs the store *knows* is recorded in
the ``blobs`` table by the caller's transaction; a file with no row is garbage for fsck.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import BinaryIO

from layerfs import failpoint
from layerfs.digest import Digest, Readable, VerifyingReader
from layerfs.errors import NotFound

CHUNK = 1 << 20


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        failpoint.fault("store.fsync", path)
        os.fsync(fd)
    finally:
        os.close(fd)


class Ingest:
    """Read a blob through this object to store it; then ``commit()``.

    ``commit`` drains the rest of the source, verifies size and digest (raising
    ``DigestMismatch`` naming ``what``), and renames the blob into the store. ``abort``
    (or leaving the ``with`` block on an error) deletes the temp file.
    """

    def __init__(
        self,
        content: ContentStore,
        raw: Readable,
        what: str,
        expected: Digest | None = None,
        expected_size: int | None = None,
    ) -> None:
        self.content = content
        self.reader = VerifyingReader(raw, what, expected, expected_size)
        fd, self.tmp_path = tempfile.mkstemp(prefix="ingest-", dir=content.tmp_dir)
        self._out = os.fdopen(fd, "wb")
        self.digest: Digest | None = None

    def read(self, n: int = -1) -> bytes:
        data = self.reader.read(n if n is not None and n >= 0 else CHUNK)
        if data:
            failpoint.fault("store.write", self.tmp_path)
            self._out.write(data)
        return data

    def readable(self) -> bool:
        return True

    def finish(self) -> tuple[Digest, int]:
        """Drain, fsync and verify. The blob stays staged in ``tmp/`` until ``place()``."""
        while self.read(CHUNK):
            pass
        self._out.flush()
        failpoint.fault("store.fsync", self.tmp_path)
        os.fsync(self._out.fileno())
        self._out.close()
        digest = self.reader.verify()
        os.chmod(self.tmp_path, 0o444)
        self.digest = digest
        return digest, self.reader.size

    def place(self) -> bool:
        """Rename the verified blob into the store. Returns False when it was already there."""
        assert self.digest is not None, "finish() first"
        final = self.content.path(self.digest)
        failpoint.hit("content.before-rename")
        if os.path.exists(final):
            os.unlink(self.tmp_path)  # identical content already stored
            return False
        failpoint.fault("store.rename", final)
        os.rename(self.tmp_path, final)
        failpoint.hit("content.after-rename")
        fsync_dir(self.content.blob_dir)
        return True

    def commit(self) -> tuple[Digest, int]:
        """finish() and place() in one step, for callers with nothing else to make atomic."""
        result = self.finish()
        self.place()
        return result

    def abort(self) -> None:
        if not self._out.closed:
            self._out.close()
        try:
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> Ingest:
        return self

    def __exit__(self, et: object, ev: object, tb: object) -> None:
        if et is not None:
            self.abort()


class ContentStore:
    def __init__(self, root: str, tmp_dir: str) -> None:
        self.blob_dir = os.path.join(root, "sha256")
        self.tmp_dir = tmp_dir
        os.makedirs(self.blob_dir, mode=0o700, exist_ok=True)

    def path(self, digest: Digest) -> str:
        return os.path.join(self.blob_dir, Digest.parse(digest).hex)

    def has(self, digest: Digest) -> bool:
        return os.path.exists(self.path(digest))

    def open(self, digest: Digest) -> BinaryIO:
        try:
            return open(self.path(digest), "rb")
        except FileNotFoundError as e:
            raise NotFound(f"blob {digest} not in the content store") from e

    def read(self, digest: Digest) -> bytes:
        with self.open(digest) as f:
            return f.read()

    def ingest(
        self, raw: Readable, what: str, expected: Digest | None = None, expected_size: int | None = None
    ) -> Ingest:
        return Ingest(self, raw, what, expected, expected_size)

    def stage_bytes(self, data: bytes, what: str, expected: Digest | None = None) -> Ingest:
        """Stage and verify a small blob (manifest, config); ``place()`` it in a transaction."""
        ing = self.ingest(io.BytesIO(data), what, expected, len(data))
        try:
            ing.finish()
        except BaseException:
            ing.abort()
            raise
        return ing

    def verify(self, digest: Digest) -> bool:
        """Re-hash a stored blob; False when its content no longer matches its name."""
        with self.open(digest) as f:
            r = VerifyingReader(f, str(digest))
            r.drain(CHUNK)
        return r.digest == digest

    def list_files(self) -> list[str]:
        return sorted(os.listdir(self.blob_dir))

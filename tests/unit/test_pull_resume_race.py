"""A pull that waited for another pull of the same blob (same store) and then finds the
blob complete: the other pull may rename the partial file into blobs/ at any moment (it
does so without the lock, when its image commits). The waiting pull must then see the
blob as stored, never fail on the vanished path (as it once did: ENOENT of the .partial)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from layerfs import failpoint
from layerfs.digest import Digest
from layerfs.registry.pull import _Download, _open_locked, _resume_state

BLOB = os.urandom(300_000)


def _download(tmp_path: Path) -> _Download:
    digest = Digest.from_hex(hashlib.sha256(BLOB).hexdigest())
    (tmp_path / "tmp").mkdir()
    (tmp_path / "blobs").mkdir()
    path = tmp_path / "tmp" / f"ingest-{digest.hex}.partial"
    path.write_bytes(BLOB)  # the first pull's complete download, not yet committed
    return _Download(digest, len(BLOB), str(path), str(tmp_path / "blobs" / digest.hex))


def test_renamed_while_being_read_gives_the_whole_blob(tmp_path: Path) -> None:
    dl = _download(tmp_path)
    out = _open_locked(dl)
    assert out is not None
    with out, failpoint.on("pull.resume-opened", lambda: os.rename(dl.path, dl.final)):
        state = _resume_state(dl, out)
    assert state is not None
    h, have = state
    assert have == len(BLOB) and h.hexdigest() == dl.digest.hex
    assert Path(dl.final).read_bytes() == BLOB  # untouched


def test_renamed_before_it_is_opened_counts_as_stored(tmp_path: Path) -> None:
    dl = _download(tmp_path)
    out = _open_locked(dl)
    assert out is not None
    os.rename(dl.path, dl.final)
    with out:
        assert _resume_state(dl, out) is None
    assert Path(dl.final).read_bytes() == BLOB


def test_a_partial_longer_than_the_blob_starts_again(tmp_path: Path) -> None:
    dl = _download(tmp_path)
    with open(dl.path, "ab") as f:
        f.write(b"junk")
    out = _open_locked(dl)
    assert out is not None
    with out:
        state = _resume_state(dl, out)
    assert state is not None and state[1] == 0
    assert os.path.getsize(dl.path) == 0

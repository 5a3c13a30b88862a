"""fsck: does the store on disk agree with its database? With ``repair``, remove garbage.

Garbage (repairable): staging left in ``tmp/``, snapshot directories and blob files the
database does not know — what a crash (kill -9, power loss) leaves behind, since every
change is staged first and recorded in one transaction. Damage (reported, never "repaired"
by deleting data): a known snapshot or blob whose files are missing, a blob whose content
no longer matches its digest, an image pointing at nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from layerfs import failpoint
from layerfs.digest import Digest
from layerfs.errors import NotFound
from layerfs.store.core import Store, remove_path


@dataclass
class Finding:
    problem: str
    repaired: bool = False


@dataclass
class FsckReport:
    findings: list[Finding] = field(default_factory=list)

    @property
    def unrepaired(self) -> list[Finding]:
        return [f for f in self.findings if not f.repaired]

    @property
    def clean(self) -> bool:
        return not self.findings


def fsck(store: Store, repair: bool = False, verify_blobs: bool = False) -> FsckReport:
    """Check the store (see the module docstring); with ``repair``, remove garbage under
    the exclusive store lock. Layers and blobs no image needs are not reported: they are
    not damage, and ``layerfs gc`` collects them.

    Safe beside any other command: the rows are read in one read transaction; staging,
    snapshot directories and blob files are listed only while no other command holds the
    store lock (held here meanwhile, so nothing is halfway created); and a file found
    missing counts as damage only if a fresh read, made after it was found missing, still
    records it (a concurrent rmi, gc or rm deletes rows first, files after)."""
    report = FsckReport()
    if repair:
        store.make_room()  # it frees space: it must work on a full disk
        lock: contextlib.AbstractContextManager[bool] = _held(store.exclusive_lock())
    else:
        # Reporting must not wait for an import, nor call its staging garbage.
        lock = store.exclusive_if_free()
    held = contextlib.ExitStack()
    quiescent = held.enter_context(lock)  # before the transaction: its state is then current
    with held, store.read_transaction():
        db = store.meta.db
        ok = db.execute("PRAGMA integrity_check").fetchone()[0]
        if ok != "ok":
            report.findings.append(Finding(f"meta.db integrity check failed: {ok}"))
        known_ids = {r["id"]: r for r in db.execute("SELECT * FROM snapshots")}
        known_blobs = {r["digest"] for r in db.execute("SELECT digest FROM blobs")}
        images = store.list_images()
        for entry in sorted(os.listdir(store.tmp_dir)) if quiescent else []:
            report.findings.append(Finding(f"leftover staging tmp/{entry}", repaired=repair))
            if repair:
                remove_path(os.path.join(store.tmp_dir, entry))
                failpoint.hit("fsck.repaired")
        snap_root = os.path.join(store.root, "snapshots")
        for entry in sorted(os.listdir(snap_root)) if quiescent else []:
            if not entry.isdigit() or int(entry) not in known_ids:
                report.findings.append(Finding(f"orphan snapshot directory snapshots/{entry}", repaired=repair))
                if repair:
                    remove_path(os.path.join(snap_root, entry))
                    failpoint.hit("fsck.repaired")
        for name in store.content.list_files() if quiescent else []:
            try:
                digest = Digest.from_hex(name)
            except Exception:
                digest = None
            if digest is None or digest not in known_blobs:
                report.findings.append(Finding(f"orphan blob file blobs/sha256/{name}", repaired=repair))
                if repair:
                    remove_path(os.path.join(store.content.blob_dir, name))
        if not repair:
            held.close()  # listed: the rest checks rows against files, and may take long
        failpoint.hit("fsck.listed")
        missing_dirs = [(sid, row["key"]) for sid, row in sorted(known_ids.items())
                        if not os.path.isdir(store.fs_dir(sid))]
        for _sid, row in sorted(known_ids.items()):
            if row["parent_id"] is not None and row["parent_id"] not in known_ids:
                report.findings.append(Finding(f"snapshot {row['key']}: parent id {row['parent_id']} missing"))
        missing_blobs: list[str] = []
        corrupt_blobs: list[str] = []
        for d in sorted(known_blobs):
            try:
                if not store.content.has(Digest(d)):
                    missing_blobs.append(d)
                elif verify_blobs and not store.content.verify(Digest(d)):
                    corrupt_blobs.append(d)
            except NotFound:
                missing_blobs.append(d)  # deleted while it was being read
        keys = {r["key"] for r in known_ids.values()}
        for img in images:
            for d in (img.manifest_digest, img.config_digest):
                if d not in known_blobs:
                    report.findings.append(Finding(f"image {img.name}: blob {d} missing"))
            if img.top_chain_id is not None and img.top_chain_id not in keys:
                report.findings.append(Finding(f"image {img.name}: top layer {img.top_chain_id} missing"))
        # Layers and blobs no image needs (after rmi of a name, or a re-tag) are not
        # damage: a crash never leaves them (rows are written with their image in one
        # transaction); `layerfs gc` collects them.
    # Files found missing: damage only if the database, read again now, still has them.
    for sid, key in missing_dirs:
        if store.meta.db.execute("SELECT 1 FROM snapshots WHERE id=?", (sid,)).fetchone() \
                and not os.path.isdir(store.fs_dir(sid)):
            report.findings.append(Finding(f"snapshot {key} (id {sid}): directory snapshots/{sid}/fs missing"))
    for d in missing_blobs:
        if store.blob(Digest(d)) is not None and not store.content.has(Digest(d)):
            report.findings.append(Finding(f"blob {d} recorded but its file is missing"))
    for d in corrupt_blobs:
        report.findings.append(Finding(f"blob {d}: content does not match its digest"))
    return report


@contextlib.contextmanager
def _held(lock: contextlib.AbstractContextManager[None]) -> Iterator[bool]:
    with lock:
        yield True

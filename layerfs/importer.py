"""Importing images and bare layer tars into the store, the way containerd's unpacker does.

Per layer: stream the blob once through a tee into the content store (``tmp/ingest-*``),
decompress it (bounded), hash the uncompressed stream (the diffID) and apply it into a fresh
``tmp/new-*/fs`` directory; then verify blob size, blob digest and diffID. Only when every
layer of the image verified are the layers, blobs and names recorded — in one transaction
(``Store.commit_image``). A layer whose ChainID is already in the store is not unpacked again.
On any error the staged directories and temp files are removed: nothing of the image is
committed, and what was committed before is untouched.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

from layerfs import failpoint
from layerfs.digest import Digest, Readable, VerifyingReader, chain_ids
from layerfs.errors import DigestMismatch, InvalidImage, UsageError
from layerfs.image import source as images
from layerfs.image.config import build_config
from layerfs.image.oci import OCI_CONFIG, OCI_LAYER_BY_COMPRESSION, OCI_MANIFEST
from layerfs.layer import apply as archive
from layerfs.layer import compression
from layerfs.progress import Progress
from layerfs.store import BlobRecord, StagedLayer, Store
from layerfs.store.content import Ingest


@dataclass
class ImportResult:
    names: list[str]
    manifest_digest: Digest
    config_digest: Digest
    top_chain_id: Digest | None
    new_layers: list[Digest] = field(default_factory=list)
    reused_layers: list[Digest] = field(default_factory=list)


class _Staging:
    """Everything one image import has put under tmp/, removed on failure or after commit."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.layers: list[StagedLayer] = []
        self.blobs: list[BlobRecord] = []

    def cleanup(self) -> None:
        for layer in self.layers:
            shutil.rmtree(layer.staging, ignore_errors=True)
        for blob in self.blobs:
            if blob.staged is not None:
                blob.staged.abort()  # a no-op for blobs already placed


def _apply_blob(
    store: Store,
    opener: Callable[[], BinaryIO],
    what: str,
    digest: Digest | None,
    size: int | None,
    diff_id: Digest | None,
    lowers: Sequence[str],
    limits: compression.Limits,
    progress: Progress,
    staging: str | None,
    lowers_ready: Callable[[], None] | None = None,
    check: Callable[[], None] | None = None,
) -> tuple[BlobRecord, Digest, str | None, archive.ApplyStats | None]:
    """Ingest one layer blob; if ``staging`` (a new staging dir), unpack it into it.

    Returns the blob record, the verified diffID, the staging dir (or None) and apply stats.
    ``lowers_ready``: see ``apply_layer``; ``check`` is called before each read of the blob
    and may raise to stop (another layer of the image failed).
    """
    try:
        with opener() as raw:
            # A source that stages into the content store itself (a registry pull's download)
            # is the ingest as it is, and draws its own progress.
            staged = isinstance(raw, Ingest)
            bar = (Progress(enabled=False) if staged else progress).bar(
                f"Copying blob {digest.short()}" if digest else f"Copying {what}", size)
            with raw if isinstance(raw, Ingest) else store.content.ingest(bar.wrap(raw), what, digest, size) as ing:
                head = _Peek(ing, check)
                kind = compression.detect(head.peek(8))
                plain = compression.open_decompressed(head, what, limits)
                tar_reader = VerifyingReader(plain, f"{what} (uncompressed)", diff_id)
                stats = None
                if staging is not None:
                    stats = archive.apply_layer(
                        tar_reader, os.path.join(staging, "fs"), lowers=lowers, fmt=store.fmt, what=what,
                        lowers_ready=lowers_ready,
                    )
                    failpoint.hit("import.layer-applied")
                tar_reader.drain()
                got_diff = tar_reader.verify()
                blob_digest, blob_size = ing.finish()
                failpoint.hit("import.blob-verified")
            bar.finish()
        media = OCI_LAYER_BY_COMPRESSION[kind]
        return BlobRecord(blob_digest, blob_size, media, got_diff, staged=ing), got_diff, staging, stats
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise


class _Peek:
    """Lets compression detection look at a stream's first bytes without losing them."""

    def __init__(self, raw: Readable, check: Callable[[], None] | None = None) -> None:
        self.raw = raw
        self.buf = b""
        self.check = check

    def peek(self, n: int) -> bytes:
        while len(self.buf) < n:
            more = self.raw.read(n - len(self.buf))
            if not more:
                break
            self.buf += more
        return self.buf[:n]

    def read(self, n: int = -1) -> bytes:
        if self.check is not None:
            self.check()
        if self.buf:
            if n is None or n < 0:
                data, self.buf = self.buf + bytes(self.raw.read()), b""
                return data
            data, self.buf = self.buf[:n], self.buf[n:]
            return data
        return bytes(self.raw.read(n))

    def readable(self) -> bool:
        return True


class _Stopped(Exception):  # noqa: N818 - not an error: the layer was not needed any more
    """A layer's application stopped because a layer below it failed (or an interrupt)."""


@dataclass(eq=False)
class _Job:
    """One layer to ingest (and, with ``staging``, to unpack) in an import."""

    index: int
    what: str
    layer: images.LayerBlob
    diff_id: Digest
    staging: str | None  # a new staging dir; None: the layer is stored, only its blob is not
    lowers: list[str]  # fs dirs of the layers below, top first
    done: threading.Event = field(default_factory=threading.Event)
    result: tuple[BlobRecord, Digest, str | None, archive.ApplyStats | None] | None = None
    error: BaseException | None = None


class _Jobs:
    """The layers of one import, applied at once by up to ``workers`` threads.

    Each layer goes into its own staging directory, so the layers are independent except
    where a layer's tar makes a parent directory it does not list: that looks at the layers
    below (``apply_layer``'s ``lowers_ready``), which it then waits for. The outcome is the
    serial one: when layer *k* fails, the layers above it stop (they would never have been
    reached), the ones below run to their end, and the error reported is the lowest layer's.
    """

    def __init__(self, jobs: list[_Job], failed_at: int) -> None:
        self.jobs = jobs
        self.failed_at = failed_at  # the lowest layer index that failed (len(layers): none)
        self._lock = threading.Lock()

    def stop_above(self, index: int) -> None:
        with self._lock:
            self.failed_at = min(self.failed_at, index)

    def check(self, job: _Job) -> None:
        if job.index > self.failed_at:
            raise _Stopped(job.what)

    def lowers_ready(self, job: _Job) -> None:
        for other in self.jobs:
            if other.index >= job.index or other.staging is None:
                continue
            while not other.done.wait(0.2):
                self.check(job)
            self.check(job)

    def run(self, job: _Job, run: Callable[[_Job], tuple[BlobRecord, Digest, str | None, archive.ApplyStats | None]],
            ) -> None:
        try:
            self.check(job)
            job.result = run(job)
        except BaseException as e:  # noqa: BLE001 - handed to the importing thread
            job.error = e
            if not isinstance(e, _Stopped):
                self.stop_above(job.index)
        finally:
            job.done.set()

    def run_all(self, workers: int,
                run: Callable[[_Job], tuple[BlobRecord, Digest, str | None, archive.ApplyStats | None]],
                on_interrupt: Callable[[], None] | None) -> None:
        if workers <= 1 or len(self.jobs) <= 1:
            for job in self.jobs:
                self.run(job, run)
                if job.error is not None:
                    break
            return
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="layerfs-apply") as pool:
            futures = [pool.submit(self.run, job, run) for job in self.jobs]
            try:
                for fut in futures:
                    fut.result()
            except BaseException:  # an interrupt of this thread: stop every layer, then wait
                self.stop_above(-1)
                if on_interrupt is not None:
                    on_interrupt()
                raise


def import_resolved(
    store: Store,
    img: images.ResolvedImage,
    names: Sequence[str],
    *,
    progress: Progress | None = None,
    limits: compression.Limits | None = None,
    jobs: int = 1,
    on_interrupt: Callable[[], None] | None = None,
) -> ImportResult:
    """Import one resolved image (manifest + config + layers) under ``names``.

    ``jobs``: how many layers are unpacked at once (see ``_Jobs``; worth it when each
    layer's stream is independent, as in a pull: with 1, one after the other, as streams of
    one archive must be read). ``on_interrupt`` is called when an interrupt stops the
    layers being unpacked at once (a pull cancels its downloads, which they may wait for)."""
    store.check_room(f"import {', '.join(names)}")
    progress = progress or Progress(enabled=False)
    limits = limits or compression.Limits.from_env()
    diff_ids = list(img.diff_ids)
    if len(diff_ids) != len(img.layers):
        raise InvalidImage(
            f"image config lists {len(diff_ids)} diffIDs but the manifest has {len(img.layers)} layers"
        )
    chains = chain_ids(diff_ids)
    staging = _Staging(store)
    result_new: list[Digest] = []
    reused: list[Digest] = []
    made: list[str] = []  # staging dirs made for the layers (removed, if left, at the end)
    with store.shared_lock():
        try:
            # Which layers are stored, and where each one's lowers are: in order, before any is read.
            present_recs: dict[int, BlobRecord] = {}
            first_error: tuple[int, BaseException] | None = None
            todo: list[_Job] = []
            dirs_below: list[str] = []  # fs dirs of the layers below the current one, top first
            for i, layer in enumerate(img.layers):
                what = f"layer {i + 1}/{len(img.layers)} ({layer.digest or diff_ids[i]})"
                chain = chains[i]
                present = store.get_snapshot(chain)
                if present is not None and layer.digest is not None and store.has_blob(layer.digest):
                    rec = store.blob(layer.digest)
                    assert rec is not None
                    if rec.diff_id is not None and rec.diff_id != diff_ids[i]:
                        first_error = (i, DigestMismatch(
                            f"{what}: blob {layer.digest} is stored with diffID {rec.diff_id}, "
                            f"but the image config says {diff_ids[i]}"
                        ))
                        break  # as the layers are taken in order: none above this one is read
                    present_recs[i] = rec
                    dirs_below.insert(0, store.fs_dir(present.id))
                    progress.line(f"Layer {chain.short()} already present")
                    continue
                new_dir = None
                if present is None:
                    new_dir = store.new_staging()
                    made.append(new_dir)
                todo.append(_Job(i, what, layer, diff_ids[i], new_dir, list(dirs_below)))
                dirs_below.insert(0, store.fs_dir(present.id) if present is not None
                                  else os.path.join(new_dir or "", "fs"))
            runner = _Jobs(todo, first_error[0] if first_error else len(img.layers))

            def run(job: _Job) -> tuple[BlobRecord, Digest, str | None, archive.ApplyStats | None]:
                return _apply_blob(
                    store, job.layer.open, job.what, job.layer.digest, job.layer.size, job.diff_id, job.lowers,
                    limits, progress, job.staging, lambda: runner.lowers_ready(job), lambda: runner.check(job),
                )

            runner.run_all(jobs, run, on_interrupt)
            for job in todo:  # what verified is staged: removed with the rest on failure
                if job.result is not None:
                    staging.blobs.append(job.result[0])
            errors = [(job.index, job.error) for job in todo
                      if job.error is not None and not isinstance(job.error, _Stopped)]
            if first_error is not None:
                errors.append(first_error)
            if errors:
                raise min(errors, key=lambda e: e[0])[1]
            staging.blobs.clear()
            by_index = {job.index: job for job in todo}
            layer_records: list[tuple[Digest, int, str]] = []
            for i, layer in enumerate(img.layers):
                chain = chains[i]
                if i in present_recs:
                    rec = present_recs[i]
                    reused.append(chain)
                    layer_records.append((rec.digest, rec.size, layer.media_type or rec.media_type))
                    staging.blobs.append(rec)
                    continue
                done = by_index[i]
                assert done.result is not None
                rec, got_diff, new_dir, stats = done.result
                staging.blobs.append(rec)
                layer_records.append((rec.digest, rec.size, layer.media_type or rec.media_type))
                if new_dir is None:
                    reused.append(chain)
                else:
                    assert stats is not None
                    staging.layers.append(StagedLayer(
                        chain, got_diff, chains[i - 1] if i else None, new_dir, stats.size, stats.entries
                    ))
                    result_new.append(chain)
            manifest_bytes = img.manifest_bytes
            if manifest_bytes is None:
                manifest_bytes = images.synthesize_manifest(img.config_bytes, layer_records)
            m_ing = store.content.stage_bytes(manifest_bytes, "manifest", img.manifest_digest)
            c_ing = store.content.stage_bytes(img.config_bytes, "config", img.config_digest)
            assert m_ing.digest is not None and c_ing.digest is not None
            manifest_digest, config_digest = m_ing.digest, c_ing.digest
            failpoint.hit("import.manifest-staged")
            staging.blobs.append(BlobRecord(manifest_digest, len(manifest_bytes), OCI_MANIFEST, staged=m_ing))
            staging.blobs.append(BlobRecord(config_digest, len(img.config_bytes), OCI_CONFIG, staged=c_ing))
            top = chains[-1] if chains else None
            store.commit_image(
                names, staging.layers, staging.blobs, manifest_digest, config_digest, top,
                [manifest_digest, config_digest, *(r[0] for r in layer_records)],
            )
        finally:
            staging.cleanup()
            for path in made:
                shutil.rmtree(path, ignore_errors=True)
    return ImportResult(list(names), manifest_digest, config_digest, top, result_new, reused)


def import_path(
    store: Store,
    path: str,
    *,
    name: str | Sequence[str] | None = None,
    platform: str | None = None,
    progress: Progress | None = None,
    limits: compression.Limits | None = None,
) -> list[ImportResult]:
    """Import every image found at ``path`` (OCI layout dir/tar or docker-archive).
    ``name``: one name or several for a single image; all are checked before anything is
    stored, and stored in one transaction (all or none)."""
    wanted = [name] if isinstance(name, str) else list(name or [])
    given = list(dict.fromkeys(images.normalize_ref(n) for n in wanted))
    results = []
    with images.open_source(path) as src:
        resolved = list(src.images(platform=platform))
        if not resolved:
            raise InvalidImage(f"{path}: no image found")
        if given and len(resolved) > 1:
            tags = ", ".join(n for r in resolved for n in r.names) or f"{len(resolved)} untagged images"
            raise UsageError(f"{path} holds several images ({tags}); --name needs exactly one")
        for img in resolved:
            names = given or [images.normalize_ref(n) for n in img.names]
            if not names:
                raise UsageError(f"{path} holds an untagged image; give it a name with --name REF")
            results.append(import_resolved(store, img, names, progress=progress, limits=limits))
    return results


def import_layers(
    store: Store,
    paths: Sequence[str],
    name: str,
    *,
    platform: str | None = None,
    progress: Progress | None = None,
    limits: compression.Limits | None = None,
) -> ImportResult:
    """Import bare layer tars (plain, gzip or zstd; bottom layer first) as one new image.

    The diffIDs are not known in advance: each tar is applied, hashed, and the image config
    and manifest are written from what was measured.
    """
    if not paths:
        raise UsageError("import-layer needs at least one layer tar")
    ref = images.normalize_ref(name)
    plat = images.Platform.parse(platform) if platform else images.Platform.host()
    progress = progress or Progress(enabled=False)
    limits = limits or compression.Limits.from_env()
    # First pass: compute each layer's diffID so ChainIDs (and dedup) are known.
    diff_ids = []
    for p in paths:
        if not os.path.isfile(p):
            raise UsageError(f"{p}: no such layer tar")
        with open(p, "rb") as f:
            peek = _Peek(f)
            compression.detect(peek.peek(8))
            r = VerifyingReader(compression.open_decompressed(peek, p, limits), p)
            r.drain()
        diff_ids.append(r.digest)
    config, config_bytes = build_config(
        None, diff_ids, [{"created_by": f"layerfs import-layer {os.path.basename(p)}"} for p in paths],
        created_ns=time.time_ns(), platform=plat,
    )

    def opener(p: str) -> Callable[[], BinaryIO]:
        return lambda: open(p, "rb")

    layers = [images.LayerBlob(digest=None, size=os.path.getsize(p), media_type="", open=opener(p)) for p in paths]
    img = images.ResolvedImage(
        names=[ref], config_bytes=config_bytes, config_digest=Digest.of(config_bytes), config=config,
        manifest_bytes=None, manifest_digest=None, diff_ids=diff_ids, layers=layers,
    )
    return import_resolved(store, img, [ref], progress=progress, limits=limits)


def hash_stream(f: Readable) -> Digest:
    """sha256 of everything left in a stream."""
    r = VerifyingReader(f, "stream")
    r.drain()
    return r.digest

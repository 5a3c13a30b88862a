"""``layerfs push``: an image of the store to a registry, manifest last.

The blobs are what ``exporter.export_images`` makes of the image: the stored layer blobs
byte for byte, or, for layers the store has only as directories (a committed container),
deterministic layer tars built from them, with the config and manifest rewritten to match,
so the same image always pushes the same digests. Per blob, several at once: ``HEAD``
(the registry has it: skipped); a cross-repository mount (``POST ?mount=&from=``) when the
image came from another repository of the same registry; else an upload, one streamed
``PUT`` or, with ``chunk_size``, ``PATCH`` chunks and a closing ``PUT``. Every blob is
checked against its digest while it is read. The manifest goes last, and its digest is
the result.

Foreign (non-distributable) layers whose descriptor lists ``urls`` are not uploaded, as
docker and containerd do: the manifest keeps the descriptor, and pulls fetch the blob from
its urls. ``Options.push_foreign`` (``--allow-non-distributable-blobs``) uploads them too;
the manifest, and so its digest, stays the same.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import trio

from layerfs.catalog import resolve_image
from layerfs.digest import Digest, VerifyingReader
from layerfs.errors import InvalidImage, RegistryError
from layerfs.exporter import export_images
from layerfs.image.export import ExportImage, Opener
from layerfs.image.oci import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    FOREIGN_LAYER_TYPES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    canonical_json,
    config_platform,
    parse_json,
)
from layerfs.image.ref import canonical_reference, parse_ref
from layerfs.progress import Bar, Progress
from layerfs.registry.client import Options, Registry, first_error
from layerfs.store import Store
from layerfs.store.content import CHUNK

UPLOAD_CHUNK = CHUNK


@dataclass
class PushResult:
    source: str
    destination: str  # canonical
    manifest_digest: str
    manifest_size: int
    # digest -> "uploaded" | "exists" | "mounted" | "foreign" (a non-distributable layer, not pushed)
    blobs: dict[str, str] = field(default_factory=dict)


@dataclass
class _Blob:
    digest: Digest
    size: int
    media_type: str
    open: Opener | None = None
    data: bytes | None = None
    urls: tuple[str, ...] = ()  # a foreign layer's urls: where pulls get it instead


def _body(blob: _Blob, start: int = 0, length: int | None = None,
          bar: Bar | None = None) -> Callable[[], AsyncIterator[bytes] | bytes]:
    """A fresh body for each attempt: the blob's bytes ``[start, start+length)``, verified."""
    if blob.data is not None:
        data = blob.data
        return lambda: data[start: None if length is None else start + length]
    opener = blob.open
    assert opener is not None

    async def chunks() -> AsyncIterator[bytes]:
        with opener() as f:
            whole = start == 0 and length is None
            reader = VerifyingReader(f, f"blob {blob.digest}", blob.digest if whole else None,
                                     blob.size if whole else None)
            if start:
                await trio.to_thread.run_sync(f.seek, start)
            left = blob.size - start if length is None else length
            while left > 0:
                data = await trio.to_thread.run_sync(reader.read, min(UPLOAD_CHUNK, left))
                if not data:
                    break
                left -= len(data)
                if bar is not None:
                    bar.update(len(data))
                yield data
            if whole:
                reader.verify()

    return chunks


async def _push_blob(reg: Registry, repo: str, blob: _Blob, mount_from: str | None, progress: Progress) -> str:
    what = f"blob {blob.digest}"
    resp = await reg.send("HEAD", f"/v2/{repo}/blobs/{blob.digest}", what, ok=frozenset({200, 404}), follow=True)
    if resp.status_code == 200:
        progress.line(f"Blob {blob.digest.short()} already on {reg.host}")
        return "exists"
    params = {"mount": str(blob.digest), "from": mount_from} if mount_from and mount_from != repo else None
    resp = await reg.send("POST", f"/v2/{repo}/blobs/uploads/", f"{what}: starting an upload",
                          params=params, ok=frozenset({201, 202}), body=lambda: b"")
    if resp.status_code == 201:
        progress.line(f"Blob {blob.digest.short()} mounted from {mount_from}")
        return "mounted"
    location = resp.headers.get("location")
    if not location:
        raise RegistryError(f"{what}: {reg.host} started an upload without a Location")
    bar = progress.bar(f"Copying blob {blob.digest.short()}", blob.size)
    chunk = reg.opts.chunk_size
    if chunk:
        start = 0
        while start < blob.size:
            n = min(chunk, blob.size - start)
            resp = await reg.send(
                "PATCH", location, f"{what}: uploading bytes {start}-{start + n - 1}",
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(n),
                         "Content-Range": f"{start}-{start + n - 1}"},
                body=_body(blob, start, n, bar), ok=frozenset({202}),
            )
            location = resp.headers.get("location") or location
            start += n
            if blob.data is not None:
                bar.update(n)
        body: Callable[[], AsyncIterator[bytes] | bytes] = lambda: b""  # noqa: E731
        length = 0
    else:
        body, length = _body(blob, bar=bar), blob.size
    sep = "&" if "?" in location else "?"
    await reg.send("PUT", f"{location}{sep}digest={blob.digest}", f"{what}: finishing the upload",
                   headers={"Content-Type": "application/octet-stream", "Content-Length": str(length)},
                   body=body, ok=frozenset({201, 204}))
    if not chunk and blob.data is not None:
        bar.update(blob.size)
    bar.finish()
    return "uploaded"


async def _push_blob_retrying(reg: Registry, repo: str, blob: _Blob, mount_from: str | None,
                              progress: Progress) -> str:
    """An upload that failed half way is started again (a new session), ``retries`` times."""
    attempt = 0
    while True:
        try:
            return await _push_blob(reg, repo, blob, mount_from, progress)
        except RegistryError:
            if attempt >= reg.opts.retries:
                raise
            attempt += 1
            await trio.sleep(min(reg.opts.backoff * (2 ** attempt), 10.0))


@dataclass
class _Manifest:
    """One image to push: its blobs, manifest and the repository its blobs may be mounted from."""

    name: str
    manifest_bytes: bytes
    media_type: str
    digest: Digest
    blobs: list[_Blob]
    mount_from: str | None
    platform: dict[str, str] | None


def _plan(name: str, rec: ExportImage, mount_from: str | None) -> _Manifest:
    manifest = parse_json(rec.manifest_bytes, f"image {name}: manifest")
    media_type = manifest.get("mediaType") or OCI_MANIFEST
    config_type = (manifest.get("config") or {}).get("mediaType") or OCI_CONFIG
    urls: dict[str, tuple[str, ...]] = {}
    for desc in manifest.get("layers") or []:
        if isinstance(desc, dict) and isinstance(desc.get("urls"), list):
            urls[str(desc.get("digest"))] = tuple(str(u) for u in desc["urls"])
    blobs = [_Blob(layer.digest, layer.size, layer.media_type, open=layer.open,
                   urls=urls.get(str(layer.digest), ()) if layer.media_type in FOREIGN_LAYER_TYPES else ())
             for layer in rec.layers]
    blobs.append(_Blob(Digest.of(rec.config_bytes), len(rec.config_bytes), config_type, data=rec.config_bytes))
    config = parse_json(rec.config_bytes, f"image {name}: config")
    plat = config_platform(config)
    platform = None
    if plat is not None:
        platform = {"architecture": plat.architecture, "os": plat.os, **({"variant": plat.variant} if plat.variant else {})}
    return _Manifest(name, rec.manifest_bytes, media_type, Digest.of(rec.manifest_bytes), blobs, mount_from, platform)


def _index(manifests: list[_Manifest]) -> tuple[bytes, str]:
    """An image index (a Docker manifest list when every manifest is Docker's) of ``manifests``."""
    docker = all(m.media_type == DOCKER_MANIFEST for m in manifests)
    media_type = DOCKER_LIST if docker else OCI_INDEX
    entries = []
    for m in manifests:
        if m.platform is None:
            raise InvalidImage(f"image {m.name}: its config names no os/architecture, so it cannot be in an index")
        entries.append({"mediaType": m.media_type, "digest": m.digest, "size": len(m.manifest_bytes),
                        "platform": m.platform})
    seen = [json.dumps(e["platform"], sort_keys=True) for e in entries]
    if len(set(seen)) != len(seen):
        raise InvalidImage("an index needs one image per platform; two images have the same platform")
    return canonical_json({"schemaVersion": 2, "mediaType": media_type, "manifests": entries}), media_type


def push(
    store: Store,
    source: str,
    destination: str | None = None,
    *,
    index_with: Sequence[str] = (),
    opts: Options | None = None,
    progress: Progress | None = None,
) -> PushResult:
    """Push the stored image ``source`` to ``destination`` (default: its own name).

    With ``index_with``, ``source`` and those images (one per platform) are pushed by
    digest and ``destination`` becomes an image index of them; the result is the index's digest.
    """
    opts = opts or Options()
    progress = progress or Progress(enabled=False)
    imgs = [resolve_image(store, r) for r in (source, *index_with)]
    dest = canonical_reference(parse_ref(destination or imgs[0].name))
    assert dest.domain is not None
    mounts: list[str | None] = []
    for img in imgs:
        src = canonical_reference(parse_ref(img.name))
        mounts.append(src.path if src.domain == dest.domain and src.path != dest.path else None)
    scopes = [f"repository:{dest.path}:pull,push"] + [f"repository:{m}:pull" for m in dict.fromkeys(mounts) if m]
    target = str(dest.digest) if dest.digest and not dest.tag else str(dest.tag)
    with store.shared_lock(), export_images(store, imgs) as records:
        plans = [_plan(img.name, rec, m) for img, rec, m in zip(imgs, records, mounts, strict=True)]
        if index_with:
            top_bytes, top_type = _index(plans)
        else:
            top_bytes, top_type = plans[0].manifest_bytes, plans[0].media_type
        top_digest = Digest.of(top_bytes)
        if dest.digest and dest.digest != top_digest:
            raise RegistryError(f"push {imgs[0].name}: its manifest is {top_digest}, not {dest.digest}")
        result = PushResult(imgs[0].name, str(dest), top_digest, len(top_bytes))

        async def put_manifest(reg: Registry, reference: str, data: bytes, media_type: str) -> None:
            resp = await reg.send(
                "PUT", f"/v2/{dest.path}/manifests/{reference}", f"manifest {dest.repository}:{reference}",
                headers={"Content-Type": media_type}, body=lambda: data, ok=frozenset({200, 201}),
            )
            said = resp.headers.get("docker-content-digest")
            if said and said != Digest.of(data):
                raise RegistryError(f"manifest {dest.repository}:{reference}: the registry stored {said}, "
                                    f"layerfs sent {Digest.of(data)}")

        async def main() -> None:
            async with Registry(dest.domain or "", opts, scopes) as reg:
                limiter = trio.CapacityLimiter(max(1, opts.concurrency))

                async def one(blob: _Blob, mount_from: str | None) -> None:
                    if blob.urls and not opts.push_foreign:
                        progress.line(f"Blob {blob.digest.short()} is a foreign layer: not pushed "
                                      f"(pulls fetch it from {blob.urls[0]})")
                        result.blobs[blob.digest] = "foreign"
                        return
                    async with limiter:
                        result.blobs[blob.digest] = await _push_blob_retrying(reg, dest.path, blob, mount_from,
                                                                               progress)

                async with trio.open_nursery() as nursery:
                    started: set[Digest] = set()
                    for plan in plans:
                        for blob in plan.blobs:
                            if blob.digest not in started:
                                started.add(blob.digest)
                                nursery.start_soon(one, blob, plan.mount_from)
                if index_with:  # the images by digest, then the index under the tag
                    for plan in plans:
                        await put_manifest(reg, str(plan.digest), plan.manifest_bytes, plan.media_type)
                await put_manifest(reg, target, top_bytes, top_type)

        try:
            trio.run(main)
        except BaseExceptionGroup as group:  # one failed blob cancels the others: report it
            raise first_error(group) from None
    return result

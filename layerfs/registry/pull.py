"""``layerfs pull``: an image from a registry, straight into the store's verified staging.

1. Resolve (``resolve``): the manifest by tag or digest (an index or manifest list picks
   ``--platform``, default this machine's), then the config; each checked against its
   digest before it is parsed. Schema 1 manifests are refused.
2. Decide which layer blobs to fetch: those the store does not have. (A layer whose
   ChainID the store has is not unpacked again by ``import_resolved``; a blob the store
   has without the layer, e.g. from another image, is read from the store.)
3. Download those blobs in a trio thread, several at once (a ``CapacityLimiter``, in
   layer order), each into ``tmp/ingest-<hex>.partial``: sha256 and size checked while the
   bytes arrive. A partial file left by an interrupted pull is continued with an HTTP
   ``Range`` request. A blob that does not match its digest is deleted and named.
4. Meanwhile ``import_resolved`` unpacks each layer *as it arrives*, as many layers at once
   as blobs are downloaded at once (each into its own staging dir; see ``importer._Jobs``):
   the layer's stream is a ``_Arriving`` reader over the partial file (an ``Ingest``, so
   the importer stages it as is, without another copy), which waits for bytes the download
   has not written yet. diffIDs are checked while unpacking, and nothing is committed until
   every blob and layer verified (``Store.commit_image``).

A failed pull leaves the store as it was. Partial downloads are kept for a re-run when the
failure may pass (the registry went away, an interrupt); after any other failure (a bad
digest, a missing blob, a refused login) they are deleted. ``fsck --repair`` removes them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO, cast
from urllib.parse import urlsplit

import httpx
import trio

from layerfs import failpoint
from layerfs.digest import Digest
from layerfs.errors import DigestMismatch, InvalidImage, LayerfsError, NotFound, RegistryError, Unauthorized
from layerfs.image.oci import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    FOREIGN_LAYER_TYPES,
    INDEX_TYPES,
    LAYER_TYPES,
    MANIFEST_TYPES,
    MAX_JSON_BYTES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    LayerBlob,
    Platform,
    ResolvedImage,
    check_bytes,
    config_platform,
    parse_config,
    parse_descriptor,
    parse_json,
    parse_manifest,
)
from layerfs.image.ref import Reference, canonical_reference, normalize_ref, parse_ref
from layerfs.importer import ImportResult, import_resolved
from layerfs.progress import Progress
from layerfs.registry.client import Options, Registry, first_error
from layerfs.registry.mirrors import Endpoint, endpoints
from layerfs.store import Store
from layerfs.store.content import CHUNK, ContentStore, Ingest

SCHEMA1_TYPES = frozenset({
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
})
ACCEPT = ", ".join([OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST, *sorted(SCHEMA1_TYPES)])
_ATTESTATION = "vnd.docker.reference.type"
_MAX_DEPTH = 4


@dataclass
class PullResult:
    name: str
    remote: str  # the canonical reference it was pulled from
    manifest_digest: Digest
    config_digest: Digest
    platform: str | None
    fetched: list[Digest]  # blobs downloaded (or resumed)
    imported: ImportResult
    endpoint: str = ""  # where it came from: the registry's repository, or a mirror's


# -- resolving -----------------------------------------------------------------------------


def _media_type(resp: httpx.Response, body: dict[str, Any]) -> str:
    ctype = resp.headers.get("content-type", "").split(";")[0].strip()
    own = body.get("mediaType")
    return own if isinstance(own, str) and own else ctype


async def _fetch_manifest(reg: Registry, repo: str, reference: str, what: str,
                          expected: Digest | None, size: int | None) -> tuple[bytes, str, Digest]:
    resp = await reg.send("GET", f"/v2/{repo}/manifests/{reference}", what, headers={"Accept": ACCEPT})
    data = resp.content
    if len(data) > MAX_JSON_BYTES:
        raise InvalidImage(f"{what}: {len(data)} bytes is too large for a manifest")
    digest = Digest.of(data)
    if expected is not None:
        check_bytes(data, expected, size, what)
    else:
        said = resp.headers.get("docker-content-digest")
        if said and said.startswith("sha256:") and said != digest:
            raise DigestMismatch(f"{what}: the registry says {said}, the manifest hashes to {digest}")
    body = parse_json(data, what)
    media_type = _media_type(resp, body)
    if body.get("schemaVersion") == 1 or media_type in SCHEMA1_TYPES:
        raise InvalidImage(f"{what}: a Docker schema 1 manifest, which layerfs does not pull "
                           "(deprecated since 2017: re-push the image with a current client)")
    if body.get("schemaVersion") != 2:
        raise InvalidImage(f"{what}: schemaVersion must be 2")
    return data, media_type, digest


async def fetch_blob_bytes(reg: Registry, repo: str, digest: Digest, size: int, what: str) -> bytes:
    if size > MAX_JSON_BYTES:
        raise InvalidImage(f"{what} {digest}: {size} bytes is too large for a {what}")
    resp = await reg.send("GET", f"/v2/{repo}/blobs/{digest}", f"{what} {digest}", follow=True)
    check_bytes(resp.content, digest, size, what)
    return resp.content


def _select(descs: list[Descriptor], wanted: Platform | None, what: str) -> Descriptor:
    if wanted is None and len(descs) == 1:
        return descs[0]
    target = wanted or Platform.host()
    seen = [(Platform.from_descriptor(d.platform) if d.platform else None, d) for d in descs]
    for acceptable in target.acceptable():
        for plat, d in seen:
            if plat == acceptable:
                return d
    available = ", ".join(sorted({str(p) if p else "unknown" for p, _ in seen})) or "none"
    raise NotFound(f"{what}: no image for platform {target}; available: {available}")


@dataclass
class Remote:
    """An image as the registry describes it, verified: what ``import_resolved`` needs."""

    ref: Reference  # canonical
    repo: str
    manifest_bytes: bytes
    manifest_digest: Digest
    config_bytes: bytes
    config_digest: Digest
    config: dict[str, Any]
    diff_ids: list[Digest]
    layers: list[Descriptor]
    platform: str | None


async def resolve(reg: Registry, ref: Reference, platform: str | None) -> Remote:
    repo = ref.path
    wanted = Platform.parse(platform) if platform else None
    reference = str(ref.digest) if ref.digest else str(ref.tag)
    what = f"manifest {ref}"
    data, media_type, digest = await _fetch_manifest(reg, repo, reference, what, ref.digest, None)
    depth = 0
    while media_type in INDEX_TYPES:
        index = parse_json(data, what)
        raw = index.get("manifests")
        if not isinstance(raw, list):
            raise InvalidImage(f"{what}: manifests is not a list")
        descs = [parse_descriptor(m, f"{what} manifests[{i}]") for i, m in enumerate(raw)]
        descs = [d for d in descs if (d.media_type in MANIFEST_TYPES or d.media_type in INDEX_TYPES)
                 and d.annotations.get(_ATTESTATION) != "attestation-manifest"]
        if not descs:
            raise InvalidImage(f"{what}: no image manifest in the index")
        chosen = _select(descs, wanted, f"{ref}")
        depth += 1
        if depth > _MAX_DEPTH:
            raise InvalidImage(f"{what}: image indexes nested too deep")
        what = f"manifest {ref.repository}@{chosen.digest}"
        data, media_type, digest = await _fetch_manifest(reg, repo, str(chosen.digest), what,
                                                         chosen.digest, chosen.size)
    if media_type not in MANIFEST_TYPES:
        raise InvalidImage(f"{what}: media type {media_type!r} is not an image manifest")
    cdesc, layers = parse_manifest(data, media_type, what)
    for d in layers:
        if d.media_type not in LAYER_TYPES:
            raise InvalidImage(f"{what}: layer {d.digest} has unsupported media type {d.media_type!r}")
    config_bytes = await fetch_blob_bytes(reg, repo, cdesc.digest, cdesc.size, "config")
    config, diff_ids = parse_config(config_bytes, cdesc.digest, len(layers))
    if wanted is not None:
        got = config_platform(config)
        if got is not None and got not in wanted.acceptable():
            raise NotFound(f"{ref}: the image is for {got}, not {wanted}")
    plat = config_platform(config)
    return Remote(ref, repo, data, digest, config_bytes, cdesc.digest, config, diff_ids, layers,
                  str(plat) if plat else None)


# -- downloading ---------------------------------------------------------------------------


def partial_path(content: ContentStore, digest: Digest) -> str:
    """Where a download of ``digest`` is kept until it is complete: named by digest, so a
    re-run finds it and resumes."""
    return os.path.join(content.tmp_dir, f"ingest-{digest.hex}.partial")


@dataclass(eq=False)  # hashable by identity: a CapacityLimiter borrower
class _Download:
    """One blob's download, shared by the trio thread (writer) and the importer (reader)."""

    digest: Digest
    size: int
    path: str  # tmp/ingest-<hex>.partial
    final: str  # blobs/sha256/<hex>
    media_type: str = ""
    urls: list[str] = field(default_factory=list)  # where else the blob is (foreign layers)
    cond: threading.Condition = field(default_factory=threading.Condition)
    written: int = 0
    done: bool = False
    error: BaseException | None = None

    def advance(self, written: int) -> None:
        with self.cond:
            self.written = written
            self.cond.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        with self.cond:
            if self.done:
                return
            self.done = True
            self.error = error
            self.cond.notify_all()

    def wait(self, pos: int) -> int:
        """Block until bytes past ``pos`` are written (returns how many are) or the download ended."""
        with self.cond:
            while self.written <= pos and not self.done:
                self.cond.wait(1.0)
            if self.error is not None and self.written <= pos:
                raise self.error
            return self.written


class _Arriving(Ingest):
    """The importer's view of a blob being downloaded: reads the partial file as it grows.

    It is an ``Ingest`` whose bytes are already being written to ``tmp/`` and verified by
    the download, so the importer stages it as it is: ``finish()`` waits for the download's
    verdict, ``place()`` renames the partial file into ``blobs/``, and ``abort()`` leaves the
    file (a re-run resumes it); the pull deletes it when it should not be resumed.
    """

    def __init__(self, content: ContentStore, dl: _Download) -> None:
        self.content = content
        self.dl = dl
        self.tmp_path = dl.path
        self.digest = None
        self._file: BinaryIO | None = None
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        n = CHUNK if n is None or n < 0 else n
        avail = self.dl.wait(self._pos)
        if avail <= self._pos:
            return b""  # download finished
        if self._file is None:
            try:
                self._file = open(self.dl.path, "rb")  # noqa: SIM115 - closed by finish/abort
            except FileNotFoundError:  # a concurrent pull of the same blob committed it first
                self._file = open(self.content.path(self.dl.digest), "rb")  # noqa: SIM115
        data = self._file.read(min(n, avail - self._pos))
        self._pos += len(data)
        return data

    def finish(self) -> tuple[Digest, int]:
        while self.read(CHUNK):
            pass
        self.dl.wait(self.dl.size)  # raises the download's error, if any
        self._close()
        with self.dl.cond:
            if not self.dl.done or self.dl.error is not None:
                raise RegistryError(f"blob {self.dl.digest}: download did not finish")
        with contextlib.suppress(FileNotFoundError):  # gone: another pull stored the blob
            os.chmod(self.tmp_path, 0o444)  # blobs are read-only, as Ingest leaves them
        self.digest = self.dl.digest
        return self.dl.digest, self.dl.size

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def place(self) -> bool:
        """As ``Ingest.place``; a blob listed twice in one image is placed once."""
        if os.path.exists(self.content.path(self.dl.digest)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp_path)
            return False
        return super().place()

    def abort(self) -> None:
        self._close()

    def __enter__(self) -> _Arriving:
        return self


def _open_locked(dl: _Download) -> BinaryIO | None:
    """The partial file for appending, unbuffered (what is written, the importer can read),
    flocked: a concurrent pull of the same blob into the same store waits for this one.
    None when, meanwhile, such a pull committed the blob: the store has it."""
    while True:
        if os.path.exists(dl.final):
            return None
        try:
            out = open(dl.path, "ab", buffering=0)  # noqa: SIM115 - returned
        except PermissionError:  # verified by a run whose commit then failed: made read-only
            os.chmod(dl.path, 0o600)
            continue
        try:
            fcntl.flock(out.fileno(), fcntl.LOCK_EX)
            try:
                same = os.stat(dl.path).st_ino == os.fstat(out.fileno()).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            out.close()
            raise
        if same:
            return out
        out.close()  # renamed into blobs/ by the pull that held the lock: look again


def _resume_state(dl: _Download, out: BinaryIO) -> tuple[Any, int] | None:
    """The sha256 state and length of what an earlier pull left of ``dl``'s blob (``out``:
    the partial file, locked). None when a concurrent pull placed the complete blob into
    the store meanwhile (it renames the partial file without the lock, once its download
    ended and its image verified): everything is then read through file descriptors."""
    h = hashlib.sha256()
    have = 0
    try:
        f = open(dl.path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return None if os.path.exists(dl.final) else (h, 0)
    with f:
        failpoint.hit("pull.resume-opened")  # (tests: the concurrent pull's rename here)
        st = os.fstat(f.fileno())
        if st.st_ino != os.fstat(out.fileno()).st_ino:
            return None if os.path.exists(dl.final) else (h, 0)  # renamed, then a new partial
        size = st.st_size
        while chunk := f.read(CHUNK):
            if have + len(chunk) > dl.size:
                break
            h.update(chunk)
            have += len(chunk)
    if size != have:  # longer than the blob: start again
        os.ftruncate(out.fileno(), 0)
        return hashlib.sha256(), 0
    return h, have


class _SourceFailed(RegistryError):
    """One of a foreign layer's urls did not give the blob; the next one is tried."""


@contextlib.asynccontextmanager
async def _blob_stream(reg: Registry, repo: str, dl: _Download, url: str | None,
                       headers: dict[str, str]) -> AsyncIterator[httpx.Response]:
    """The blob's bytes from the registry (``url`` None) or from one of its descriptor's
    ``urls``: plain GETs, without the registry's credentials; http and https only."""
    what = f"blob {dl.digest}"
    if url is None:
        async with reg.stream("GET", f"/v2/{repo}/blobs/{dl.digest}", what, headers=headers,
                              ok=frozenset({200, 206}), follow=True) as resp:
            yield resp
        return
    if urlsplit(url).scheme not in ("http", "https"):
        raise _SourceFailed(f"{url}: only http and https URLs are fetched")
    async with reg.client.stream("GET", url, headers=headers, follow_redirects=True) as resp:
        if resp.status_code not in (200, 206):
            raise _SourceFailed(f"{url} answered {resp.status_code} {resp.reason_phrase}")
        yield resp


def _foreign_missing(dl: _Download, reg: Registry, repo: str, tried: list[str]) -> NotFound:
    kind = "a foreign (non-distributable) layer" if dl.media_type in FOREIGN_LAYER_TYPES else "a layer"
    where = f"; its urls failed: {'; '.join(tried)}" if tried else ", and its descriptor lists no urls"
    return NotFound(f"layer {dl.digest} ({kind}) is not on {reg.host}/{repo}{where}")


async def _download(reg: Registry, repo: str, dl: _Download, progress: Progress) -> None:
    what = f"blob {dl.digest}"
    opened = await trio.to_thread.run_sync(_open_locked, dl, abandon_on_cancel=True)
    if opened is None:
        progress.line(f"Blob {dl.digest.short()} stored meanwhile by another pull")
        dl.advance(dl.size)
        return
    out = opened
    try:
        state = await trio.to_thread.run_sync(_resume_state, dl, out)
    except BaseException:
        out.close()
        raise
    if state is None:  # the whole blob was there, and a concurrent pull stored it meanwhile
        out.close()
        progress.line(f"Blob {dl.digest.short()} stored meanwhile by another pull")
        dl.advance(dl.size)
        return
    h, have = state
    if have:
        progress.line(f"Resuming blob {dl.digest.short()} at {have} of {dl.size} bytes")
    dl.advance(have)
    bar = progress.bar(f"Copying blob {dl.digest.short()}", dl.size)
    bar.update(have)
    attempts = 0
    sources: list[str | None] = [None, *dl.urls]  # the registry, then the descriptor's urls
    source = 0
    tried: list[str] = []
    url: str | None = None
    with out:
        while have < dl.size:
            headers = {"Range": f"bytes={have}-"} if have else {}
            url = sources[source]
            try:
                async with _blob_stream(reg, repo, dl, url, headers) as resp:
                    skip = 0
                    if have and resp.status_code == 200:
                        skip = have  # the registry ignored Range: drop what we already have
                    elif have and not resp.headers.get("content-range", "").startswith(f"bytes {have}-"):
                        raise RegistryError(f"{what}: the registry answered Range {have}- with "
                                            f"{resp.headers.get('content-range')!r}")
                    async for chunk in resp.aiter_raw():  # as it arrives: no re-chunking
                        if skip:
                            cut = min(skip, len(chunk))
                            chunk, skip = chunk[cut:], skip - cut
                            if not chunk:
                                continue
                        if have + len(chunk) > dl.size:
                            raise DigestMismatch(f"{what}: size mismatch: more than the expected {dl.size} bytes")
                        out.write(chunk)
                        h.update(chunk)
                        have += len(chunk)
                        dl.advance(have)
                        bar.update(len(chunk))
                if have < dl.size:
                    raise httpx.RemoteProtocolError(f"the body ended after {have} of {dl.size} bytes")
            except (NotFound, _SourceFailed) as e:
                if url is None and not dl.urls and dl.media_type not in FOREIGN_LAYER_TYPES:
                    raise
                if url is not None:
                    tried.append(str(e))
                source += 1
                if source >= len(sources):
                    raise _foreign_missing(dl, reg, repo, tried) from None
                progress.line(f"Blob {dl.digest.short()} is not on {reg.host}: fetching {sources[source]}")
            except httpx.TransportError as e:
                attempts += 1
                if attempts > reg.opts.retries:
                    raise RegistryError(f"{what}: connection to {url or reg.host} lost at byte {have} of {dl.size} "
                                        f"after {attempts} attempts ({e}); run the pull again to resume") from e
                await trio.sleep(min(reg.opts.backoff * (2 ** (attempts - 1)), 10.0))
        os.fsync(out.fileno())
    bar.finish()
    got = Digest.from_hex(h.hexdigest())
    if got != dl.digest:
        os.unlink(dl.path)
        raise DigestMismatch(f"{what} from {url or f'{reg.host}/{repo}'}: digest mismatch: the content hashes to {got}; "
                             "the download was discarded")


@dataclass
class _Downloader:
    """Runs the downloads in a thread with its own trio loop; ``cancel`` stops them."""

    host: str
    scopes: list[str]
    opts: Options
    repo: str
    downloads: list[_Download]
    progress: Progress
    error: BaseException | None = None
    _token: trio.lowlevel.TrioToken | None = None
    _scope: trio.CancelScope | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="layerfs-pull", daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as e:  # noqa: BLE001 - handed to the importer's thread
            self.error = self.error or first_error(e)
        finally:
            for dl in self.downloads:
                dl.finish(self.error or RegistryError(f"blob {dl.digest}: download stopped"))
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            self._scope = scope
            self._ready.set()
            limiter = trio.CapacityLimiter(max(1, self.opts.concurrency))
            async with Registry(self.host, self.opts, self.scopes) as reg, trio.open_nursery() as nursery:
                for dl in self.downloads:
                    await limiter.acquire_on_behalf_of(dl)  # in layer order: the importer needs them so
                    nursery.start_soon(self._one, reg, dl, limiter)

    async def _one(self, reg: Registry, dl: _Download, limiter: trio.CapacityLimiter) -> None:
        try:
            await _download(reg, self.repo, dl, self.progress)
        except BaseException as e:
            if not isinstance(e, trio.Cancelled):
                self.error = self.error or e
            dl.finish(self.error or e)
            raise
        finally:
            limiter.release_on_behalf_of(dl)
        dl.finish()

    def cancel(self) -> None:
        if self._token is not None and self._scope is not None:
            try:
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
            except trio.RunFinishedError:
                pass

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()


def _resumable(error: BaseException) -> bool:
    """Failures after which partial downloads are worth keeping for a re-run."""
    if isinstance(error, KeyboardInterrupt):
        return True
    return isinstance(error, RegistryError) and not isinstance(error, Unauthorized)


def pull(
    store: Store,
    ref: str,
    *,
    name: str | None = None,
    platform: str | None = None,
    opts: Options | None = None,
    progress: Progress | None = None,
) -> PullResult:
    """Pull ``ref`` into ``store`` under ``name`` (default: ``ref`` as written, normalised)."""
    store.check_room(f"pull {ref}")
    opts = opts or Options()
    progress = progress or Progress(enabled=False)
    parsed = parse_ref(ref)
    canon = canonical_reference(parsed)
    assert canon.domain is not None
    stored_name = normalize_ref(name) if name else str(parsed)
    async def _resolve() -> tuple[Remote, Endpoint, Options]:
        """The first endpoint (mirrors, then the registry) that has the image."""
        tried: list[str] = []
        places = endpoints(canon)
        for i, place in enumerate(places):
            where = replace(opts, tls_verify=False) if place.insecure else opts
            try:
                async with Registry(place.host, where, [f"repository:{place.path}:pull"]) as reg:
                    found = await resolve(reg, Reference(place.host, place.path, canon.tag, canon.digest), platform)
                return found, place, where
            except LayerfsError as e:
                if i == len(places) - 1:
                    if tried:
                        raise type(e)(f"{e} (mirrors tried first: {'; '.join(tried)})") from e
                    raise
                tried.append(f"{place}: {e}")
        raise AssertionError("no endpoint")

    remote, place, place_opts = trio.run(_resolve)
    if place.mirror:
        progress.line(f"Pulling {canon} from mirror {place}")
    downloads: dict[Digest, _Download] = {}
    with store.shared_lock():
        local: set[Digest] = set()
        for desc in remote.layers:
            if store.has_blob(desc.digest):
                local.add(desc.digest)  # stored already (another image has it): read from the store
                continue
            if desc.digest not in downloads:
                downloads[desc.digest] = _Download(desc.digest, desc.size, partial_path(store.content, desc.digest),
                                                     store.content.path(desc.digest), desc.media_type,
                                                     list(desc.urls))

        def opener(d: Digest) -> Callable[[], BinaryIO]:
            return lambda: cast(BinaryIO, _Arriving(store.content, downloads[d]))

        def stored(d: Digest) -> Callable[[], BinaryIO]:
            return lambda: store.content.open(d)

        layers = [LayerBlob(d.digest, d.size, d.media_type,
                            stored(d.digest) if d.digest in local else opener(d.digest),
                            f"{canon.repository}@{d.digest}") for d in remote.layers]
        img = ResolvedImage(
            names=[stored_name], config_bytes=remote.config_bytes, config_digest=remote.config_digest,
            config=remote.config, manifest_bytes=remote.manifest_bytes, manifest_digest=remote.manifest_digest,
            diff_ids=remote.diff_ids, layers=layers, platform=remote.platform,
        )
        worker = _Downloader(place.host, [f"repository:{place.path}:pull"], place_opts, place.path,
                             list(downloads.values()), progress)
        worker.start()
        try:
            imported = import_resolved(store, img, [stored_name], progress=progress,
                                       jobs=max(1, place_opts.concurrency), on_interrupt=worker.cancel)
        except BaseException as e:
            worker.cancel()
            worker.join()
            cause: BaseException = e
            if isinstance(worker.error, LayerfsError) and not isinstance(e, KeyboardInterrupt):
                cause = worker.error  # the download's own failure, not its echo in the importer
            if not _resumable(cause):
                for dl in downloads.values():
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(dl.path)
            if cause is e:
                raise
            raise cause from None
        worker.join()
    return PullResult(stored_name, str(canon), remote.manifest_digest, remote.config_digest, remote.platform,
                      list(downloads), imported, str(place))


"""Store operations: ``layerfs import`` against containerd's ``ctr images import``, and
``layerfs commit``/``export`` of a container with many changes.

The image is built locally, once per run, from files already on this machine (Python's
standard library, /usr/share/doc, git, gcc's libraries ... until the byte budget is
reached; a few hundred MB and ~10k files in the full run), split into gzip layers (level 1:
building is not what is measured), plus a last layer that deletes (OCI whiteouts), rewrites
and adds files. It is written as an OCI image layout tar named
``docker.io/library/layerfs-bench:1`` (``io.containerd.image.name``), which both tools accept.

Subjects, interleaved per round, each on a fresh store:

- ``layerfs``: ``python -m layerfs --root STORE -q import ARCHIVE`` (timed as the user runs
  it, interpreter start included); ``export`` of that image to an OCI tar; then, untimed, a
  container from it is mounted (kernel backend) and changed (files added in new dirs,
  appended to, chmod'ed, deleted, a directory removed and one renamed) and unmounted;
  ``commit`` of the container and ``export`` of the new image are timed.
- ``containerd``: a private containerd (its own root, state, socket and TMPDIR under the
  sample's scratch dir; CRI disabled) is started (untimed), ``ctr images import`` (unpacks
  with the overlayfs snapshotter) and ``ctr images export`` are timed, containerd is stopped
  by PID (SIGTERM, then SIGKILL) and anything it left mounted is unmounted.

CPU seconds: the layerfs CLI process' own (rusage of the child), containerd's daemon's.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from bench.datagen import write_file, write_small
from bench.machine import process_cpu, terminate
from bench.measure import Meter, Metric
from layerfs.image.config import build_config
from layerfs.image.oci import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, canonical_json
from layerfs.text import human_size

Log = Callable[[str], None]
IMAGE_NAME = "docker.io/library/layerfs-bench:1"
LAYERFS_NAME = "layerfs-bench:1"
COMMIT_NAME = "layerfs-bench:committed"
SOURCES = ("/usr/lib/python3.11", "/usr/share/doc", "/usr/lib/python3", "/usr/lib/git-core",
           "/usr/lib/gcc", "/usr/share/locale", "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
           "/usr/share")


@dataclass
class ImageInfo:
    archive: str
    layers: int
    files: int
    bytes: int  # uncompressed file contents
    archive_bytes: int
    regular: list[str]  # regular files of the final tree (paths inside the image), for changes


class _HashingWriter(io.RawIOBase):
    """A write-only stream that hashes and counts what goes through it into ``target``."""

    def __init__(self, target: IO[bytes]) -> None:
        self.target = target
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]  # only bytes reach it (tarfile, gzip)
        b = bytes(data)
        self.sha.update(b)
        self.size += len(b)
        self.target.write(b)
        return len(b)


def _collect(budget: int) -> list[tuple[str, str]]:
    """(source path, path inside the image) of regular files, symlinks and dirs, up to ``budget`` bytes."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    total = 0
    for src in SOURCES:
        if not os.path.isdir(src) or total >= budget:
            continue
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            rel_dir = dirpath.lstrip("/")
            if rel_dir in seen:
                continue
            seen.add(rel_dir)
            out.append((dirpath, rel_dir))
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if not (os.path.islink(path) or (os.path.isfile(path) and os.access(path, os.R_OK))):
                    continue
                out.append((path, path.lstrip("/")))
                total += st.st_size if not os.path.islink(path) else 0
                if total >= budget:
                    return out
    return out


def _add(tar: tarfile.TarFile, source: str, arcname: str, parents: set[str]) -> None:
    parts = arcname.split("/")
    for i in range(1, len(parts)):
        parent = "/".join(parts[:i])
        if parent not in parents:
            parents.add(parent)
            tar.addfile(tar.gettarinfo("/" + parent, parent))
    info = tar.gettarinfo(source, arcname)
    if info.isdir():
        if arcname in parents:
            return
        parents.add(arcname)
    if info.isreg():
        with open(source, "rb") as f:
            tar.addfile(info, f)
    else:
        tar.addfile(info)


def _write_layer(blobs: str, fill: Callable[[tarfile.TarFile], None]) -> tuple[dict[str, Any], str]:
    """A gzip layer blob into ``blobs``; returns its descriptor and diffID."""
    tmp = os.path.join(blobs, "layer.tmp")
    with open(tmp, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz:
            hashing = _HashingWriter(gz)  # type: ignore[arg-type]
            with tarfile.open(fileobj=hashing, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                fill(tar)
    digest = _sha_file(tmp)
    os.rename(tmp, os.path.join(blobs, digest))
    desc = {"mediaType": OCI_LAYER_GZIP, "digest": "sha256:" + digest, "size": os.path.getsize(os.path.join(blobs, digest))}
    return desc, "sha256:" + hashing.sha.hexdigest()


def _sha_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _put_json(blobs: str, obj: object) -> dict[str, Any]:
    return _put_bytes(blobs, canonical_json(obj, ensure_ascii=True))


def _put_bytes(blobs: str, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, digest), "wb") as f:
        f.write(data)
    return {"digest": "sha256:" + digest, "size": len(data)}


def build_image(data: str, budget: int, n_layers: int, log: Log) -> ImageInfo:
    """Build the benchmark image as an OCI layout tar under ``data``."""
    entries = _collect(budget)
    layout = os.path.join(data, "layout")
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs)
    sizes = [0 if os.path.isdir(s) or os.path.islink(s) else os.lstat(s).st_size for s, _ in entries]
    total = sum(sizes)
    chunks: list[list[tuple[str, str]]] = [[] for _ in range(n_layers)]
    acc = 0
    for (entry, size) in zip(entries, sizes, strict=True):
        chunks[min(n_layers - 1, acc * n_layers // max(total, 1))].append(entry)
        acc += size
    regular = [a for s, a in entries if os.path.isfile(s) and not os.path.islink(s)]
    # the last layer changes what the others brought: deletes, rewrites, additions
    deleted = set(regular[1::40][:50])
    rewritten = regular[3::40][:50]
    descs, diff_ids = [], []
    for n, chunk in enumerate(chunks):
        log(f"building image layer {n + 1}/{n_layers + 1} ({len(chunk)} entries)")

        def fill(tar: tarfile.TarFile, chunk: list[tuple[str, str]] = chunk) -> None:
            parents: set[str] = set()
            for source, arcname in chunk:
                _add(tar, source, arcname, parents)

        desc, diff_id = _write_layer(blobs, fill)
        descs.append(desc)
        diff_ids.append(diff_id)

    def last(tar: tarfile.TarFile) -> None:
        parents: set[str] = set()
        for path in sorted(deleted):
            head, _, name = path.rpartition("/")
            info = tarfile.TarInfo(f"{head}/.wh.{name}")
            _ensure_parents(tar, info.name, parents)
            tar.addfile(info)
        for i, path in enumerate(rewritten):
            _ensure_parents(tar, path, parents)
            body = f"rewritten by the last layer ({i})\n".encode() * 50
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(body), 0o644
            tar.addfile(info, io.BytesIO(body))
        _ensure_parents(tar, "etc/bench-release", parents)
        info = tarfile.TarInfo("etc/bench-release")
        info.size = 6
        tar.addfile(info, io.BytesIO(b"bench\n"))

    desc, diff_id = _write_layer(blobs, last)
    descs.append(desc)
    diff_ids.append(diff_id)
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    _config, config_bytes = build_config(
        {"architecture": arch, "os": "linux", "config": {"Cmd": ["/bin/sh"]}}, diff_ids,
        [{"created_by": f"bench layer {i}"} for i in range(len(descs))], created_ns=None,
    )
    config_desc = {"mediaType": OCI_CONFIG, **_put_bytes(blobs, config_bytes)}
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc, "layers": descs}
    manifest_desc = {"mediaType": OCI_MANIFEST, **_put_json(blobs, manifest)}
    manifest_desc["annotations"] = {"io.containerd.image.name": IMAGE_NAME,
                                    "org.opencontainers.image.ref.name": "1"}
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [manifest_desc]}, f)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    archive = os.path.join(data, "image.tar")
    with tarfile.open(archive, "w") as tar:
        for name in ("oci-layout", "index.json", "blobs"):
            tar.add(os.path.join(layout, name), name)
    shutil.rmtree(layout)
    final_regular = [p for p in regular if p not in deleted]
    return ImageInfo(archive, len(descs), len(entries), total, os.path.getsize(archive), final_regular)


def _ensure_parents(tar: tarfile.TarFile, path: str, parents: set[str]) -> None:
    parts = path.split("/")
    for i in range(1, len(parts)):
        parent = "/".join(parts[:i])
        if parent not in parents:
            parents.add(parent)
            info = tarfile.TarInfo(parent)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            src = "/" + parent
            if os.path.isdir(src):
                info.mode = os.stat(src).st_mode & 0o7777
            tar.addfile(info)


# --- a private containerd --------------------------------------------------------------


class PrivateContainerd:
    """containerd with its own root, state, socket and TMPDIR under ``base``; CRI disabled."""

    def __init__(self, base: str) -> None:
        self.base = base
        sock_dir = base if len(base) < 80 else tempfile.mkdtemp(prefix="lfb-", dir="/tmp")
        self.socket = os.path.join(sock_dir, "c.sock")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout: float = 30.0) -> None:
        os.makedirs(os.path.join(self.base, "tmp"), exist_ok=True)
        config = os.path.join(self.base, "config.toml")
        with open(config, "w") as f:
            f.write(
                "version = 2\n"
                f'root = "{self.base}/root"\nstate = "{self.base}/state"\n'
                'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                f'[grpc]\n  address = "{self.socket}"\n'
                f'[ttrpc]\n  address = "{self.socket}.ttrpc"\n'
                '[debug]\n  address = ""\n[metrics]\n  address = ""\n'
            )
        env = {**os.environ, "TMPDIR": os.path.join(self.base, "tmp")}
        log = open(os.path.join(self.base, "containerd.log"), "wb")
        try:
            self.proc = subprocess.Popen(["containerd", "--config", config], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, env=env, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited {self.proc.returncode} at start: {self.log_tail()}")
            if os.path.exists(self.socket) and self.ctr("version", check=False).returncode == 0:
                return
            time.sleep(0.02)
        raise RuntimeError(f"containerd did not answer on {self.socket} within {timeout:.0f}s: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.base, "containerd.log"), errors="replace") as f:
                return " / ".join(f.read().strip().splitlines()[-3:])
        except OSError:
            return ""

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["ctr", "--address", self.socket, "--namespace", "bench", *args],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL after 10 s; then unmount anything left below ``base``."""
        terminate(self.proc)
        from layerfs.mount import kernel

        kernel.unmount_all(self.base, detach=True)


# --- the workload ----------------------------------------------------------------------


def _run_child(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd`` to completion; its wall seconds and CPU seconds (user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter_ns()
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    elapsed = (time.perf_counter_ns() - start) / 1e9
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


class StoreOps:
    """Import/export against containerd; commit/export of a changed container."""

    name = "store"
    title = "store operations: import and export vs containerd's ctr, commit of a changed container"
    subjects: tuple[str, ...] = ("layerfs", "containerd")
    reference = "containerd"

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.budget = (4 << 20) if quick else (300 << 20)
        self.n_layers = 3 if quick else 5
        self.changes = 200 if quick else 5000
        self.image: ImageInfo | None = None

    def describe(self) -> str:
        if self.image is None:
            return f"an image of ~{human_size(self.budget, binary=True)} built from this machine's files"
        im = self.image
        return (f"an OCI archive of {im.layers} gzip layers, {im.files} entries, {human_size(im.bytes, binary=True)} of files "
                f"({human_size(im.archive_bytes, binary=True)} archive), from this machine's /usr; the container gets "
                f"{self.changes} new files, {self.changes // 10} appended to, chmod'ed and deleted, a directory "
                "removed and one renamed")

    def unavailable(self, subject: str) -> str | None:
        if os.geteuid() != 0:
            return "needs root (device nodes, trusted.* xattrs, mounts)"
        if subject == "containerd":
            for tool in ("containerd", "ctr"):
                if shutil.which(tool) is None:
                    return f"{tool} is not installed"
        return None

    def prepare(self, data: str, log: Log) -> None:
        self.image = build_image(data, self.budget, self.n_layers, log)

    def sample(self, subject: str, scratch: str, meter: Meter) -> None:
        assert self.image is not None
        if subject == "layerfs":
            self._layerfs(scratch, meter)
        else:
            self._containerd(scratch, meter)

    def _layerfs(self, scratch: str, meter: Meter) -> None:
        assert self.image is not None
        root = os.path.join(scratch, "store")
        cli = [sys.executable, "-m", "layerfs", "--root", root, "-q"]
        seconds, cpu = _run_child([*cli, "import", self.image.archive, "--name", LAYERFS_NAME])
        meter.record(Metric("import"), seconds, cpu)
        seconds, cpu = _run_child([*cli, "export", LAYERFS_NAME, os.path.join(scratch, "export.tar")])
        meter.record(Metric("export"), seconds, cpu)
        os.unlink(os.path.join(scratch, "export.tar"))
        self._change_container(root, os.path.join(scratch, "mnt"))
        seconds, cpu = _run_child([*cli, "commit", "bench", COMMIT_NAME, "-m", "bench changes"])
        meter.record(Metric("commit"), seconds, cpu)
        seconds, cpu = _run_child([*cli, "export", COMMIT_NAME, os.path.join(scratch, "commit.tar")])
        meter.record(Metric("export committed"), seconds, cpu)

    def _change_container(self, root: str, mnt: str) -> None:
        """Untimed: create container ``bench``, mount it, make the changes, unmount."""
        from layerfs import containers, mounting
        from layerfs.store import Store

        assert self.image is not None
        os.makedirs(mnt)
        with Store(root) as store:
            containers.create(store, "bench", store.get_image(LAYERFS_NAME))
            mounting.mount_ref(store, "bench", mnt, backend="kernel")
            try:
                self._changes(mnt)
            finally:
                mounting.umount(store, mnt)

    def _changes(self, mnt: str) -> None:
        assert self.image is not None
        regular = self.image.regular
        n = self.changes
        for i in range(n):
            path = os.path.join(mnt, "opt", "bench", f"d{i // 100:03}", f"f{i:05}")
            if i % 100 == 0:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            write_file(path, 4096 if i % 10 else 65536, seed=i)
        picks = regular[::max(1, len(regular) // (3 * (n // 10) + 1))]
        k = n // 10
        for rel in picks[:k]:
            with open(os.path.join(mnt, rel), "ab") as f:
                f.write(b"appended by the bench\n")
        for rel in picks[k:2 * k]:
            os.chmod(os.path.join(mnt, rel), 0o600)
        for rel in picks[2 * k:3 * k]:
            try:
                os.unlink(os.path.join(mnt, rel))
            except FileNotFoundError:
                pass
        dirs = sorted({os.path.dirname(r) for r in regular if r.count("/") >= 4})
        if len(dirs) >= 2:
            shutil.rmtree(os.path.join(mnt, dirs[len(dirs) // 3]), ignore_errors=True)
            src = os.path.join(mnt, dirs[2 * len(dirs) // 3])
            if os.path.isdir(src):
                os.rename(src, src + ".renamed")
        write_small(os.path.join(mnt, "etc", "bench-release"), b"changed\n")

    def _containerd(self, scratch: str, meter: Meter) -> None:
        assert self.image is not None
        daemon = PrivateContainerd(os.path.join(scratch, "containerd"))
        try:
            daemon.start()
            assert daemon.pid is not None
            for metric, args in (
                ("import", ["images", "import", "--snapshotter", "overlayfs", self.image.archive]),
                ("export", ["images", "export", os.path.join(scratch, "export.tar"), IMAGE_NAME]),
            ):
                cpu0 = process_cpu(daemon.pid) or 0.0
                start = time.perf_counter_ns()
                daemon.ctr(*args)
                elapsed = (time.perf_counter_ns() - start) / 1e9
                meter.record(Metric(metric), elapsed, (process_cpu(daemon.pid) or 0.0) - cpu0)
            images = daemon.ctr("images", "ls", "-q").stdout.split()
            if IMAGE_NAME not in images:
                raise RuntimeError(f"ctr import did not create {IMAGE_NAME} (images: {images})")
        finally:
            daemon.stop()


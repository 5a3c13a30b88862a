"""Pulling from a registry: ``layerfs pull`` against ``skopeo copy`` + ``layerfs import`` and
containerd's ``ctr images pull``.

The image is the store workload's (``storeops.build_image``: files of this machine's /usr,
gzip layers, a last layer of deletions and rewrites), plus a second image that shares all
its layers but the last. Both are pushed (by skopeo, untimed) to Debian's
``docker-registry`` on a free loopback port, with a private config and storage under the
run's data dir. The registry is started for each sample (untimed) and stopped by PID after
it; its access log says how many blob bytes each pull moved.

Per sample, each subject pulls ``:1`` into fresh storage ("pull"), then ``:2``
("pull, 1 new layer"):

- ``layerfs``: ``python -m layerfs --root STORE -q pull REF`` (plain HTTP: loopback);
- ``skopeo+import``: ``skopeo copy docker://REF oci:DIR:TAG`` then ``layerfs import DIR``
  (a fresh DIR per image, as a user copying to a file does), both timed;
- ``containerd``: ``ctr images pull --plain-http`` into a private containerd (started and
  stopped untimed, by PID), which fetches and unpacks (overlayfs snapshotter).

CPU seconds: the child processes' (layerfs, skopeo), containerd's daemon's plus ctr's.
``facts()``: the blob bytes each subject's second pull moved, and the new layer's size.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from typing import Any

from bench.datagen import write_file
from bench.machine import process_cpu, terminate
from bench.measure import Meter, Metric
from bench.storeops import Log, PrivateContainerd, StoreOps, _put_bytes, _put_json, _run_child, _write_layer
from layerfs.image.oci import canonical_json
from layerfs.text import human_size

REPO = "bench/pull"
FIRST, SECOND = "pull", "pull, 1 new layer"
_ACCESS = re.compile(r'"GET (/v2/[^ ]*/blobs/sha256:[0-9a-f]{64}) HTTP/[0-9.]+" (\d{3}) (\d+)')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BenchRegistry:
    """docker-registry on 127.0.0.1:PORT with its storage and config under ``base``; the
    access log (``registry.log``) is on, for the bytes each request moved."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = os.path.join(base, "registry.log")

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        binary = shutil.which("docker-registry")
        if binary is None:
            raise RuntimeError("docker-registry is not installed")
        os.makedirs(os.path.join(self.base, "storage"), exist_ok=True)
        config = os.path.join(self.base, "config.yml")
        with open(config, "w") as f:
            f.write("version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
                    f"    rootdirectory: {self.base}/storage\n  maintenance:\n    uploadpurging:\n"
                    f"      enabled: false\nhttp:\n  addr: {self.host}\n  secret: bench-{self.port}\n")
        out = open(self.log, "ab")  # noqa: SIM115 - owned by the process
        try:
            self.proc = subprocess.Popen([binary, "serve", config], stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=out, start_new_session=True)
        finally:
            out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited {self.proc.returncode} at start")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"docker-registry did not listen on {self.host} within {timeout:.0f}s")

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None

    def log_size(self) -> int:
        return os.path.getsize(self.log) if os.path.exists(self.log) else 0

    def blob_bytes_since(self, offset: int) -> int:
        """Blob bytes the registry sent (GET .../blobs/..., 200 or 206) since log ``offset``."""
        time.sleep(0.05)  # the access log line follows the response
        with open(self.log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        return sum(int(m.group(3)) for m in _ACCESS.finditer(text) if m.group(2) in ("200", "206"))


def _second_image(archive: str, data: str, new_bytes: int) -> tuple[str, int]:
    """An OCI layout under ``data`` with ``:1`` (the archive's image) and ``:2`` (the same
    but its last layer replaced by a new one of about ``new_bytes``); (layout, new layer size)."""
    layout = os.path.join(data, "layout")
    with tarfile.open(archive) as tar:
        tar.extractall(layout, filter="data")
    blobs = os.path.join(layout, "blobs", "sha256")
    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)
    first = index["manifests"][0]
    with open(os.path.join(blobs, first["digest"].removeprefix("sha256:"))) as f:
        manifest = json.load(f)
    with open(os.path.join(blobs, manifest["config"]["digest"].removeprefix("sha256:"))) as f:
        config = json.load(f)
    scratch = os.path.join(data, "new-layer")
    write_file(os.path.join(scratch, "opt", "bench", "new.bin"), new_bytes, seed=77)

    def fill(tar: tarfile.TarFile) -> None:
        for name in ("opt", "opt/bench", "opt/bench/new.bin"):
            tar.add(os.path.join(scratch, name), name, recursive=False)

    desc, diff_id = _write_layer(blobs, fill)
    shutil.rmtree(scratch)
    config["rootfs"]["diff_ids"][-1] = diff_id
    config_desc = {**manifest["config"], **_put_bytes(blobs, canonical_json(config, ensure_ascii=True))}
    second = {**manifest, "config": config_desc, "layers": [*manifest["layers"][:-1], desc]}
    second_desc = {"mediaType": first["mediaType"], **_put_json(blobs, second),
                   "annotations": {"org.opencontainers.image.ref.name": "2"}}
    first["annotations"] = {"org.opencontainers.image.ref.name": "1"}
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [first, second_desc]}, f)
    return layout, int(desc["size"])


class Pull(StoreOps):
    """Pull from a loopback registry: layerfs, skopeo + import, containerd."""

    name = "pull"
    title = "registry pull: layerfs pull vs skopeo copy + layerfs import vs ctr images pull"
    subjects = ("layerfs", "skopeo+import", "containerd")
    reference = "containerd"

    def __init__(self, quick: bool) -> None:
        super().__init__(quick)
        self.new_layer_target = (1 << 20) if quick else (16 << 20)
        self.registry: BenchRegistry | None = None
        self.new_layer = 0
        self.config_size = 0
        self.moved: dict[str, list[tuple[int, int]]] = {}

    def describe(self) -> str:
        base = super().describe().split("; the container")[0]
        text = (f"{base}, pushed to a loopback docker-registry as :1, and :2 sharing all but its last layer "
                f"(a new {human_size(self.new_layer, binary=True)} layer)")
        for subject, moved in self.moved.items():
            first = sorted(m[0] for m in moved)[len(moved) // 2]
            second = sorted(m[1] for m in moved)[len(moved) // 2]
            text += (f"; {subject} moved {human_size(first, binary=True)} of blobs for :1, "
                     f"{human_size(second, binary=True)} for :2")
        return text

    def facts(self) -> dict[str, Any]:
        return {"new_layer_bytes": self.new_layer, "config_bytes": self.config_size,
                "blob_bytes_moved": {s: [{"first": a, "second": b} for a, b in m] for s, m in self.moved.items()}}

    def unavailable(self, subject: str) -> str | None:
        if shutil.which("docker-registry") is None:
            return "docker-registry is not installed"
        if subject == "skopeo+import" and shutil.which("skopeo") is None:
            return "skopeo is not installed"
        if subject == "containerd":
            return super().unavailable(subject)
        return None

    def prepare(self, data: str, log: Log) -> None:
        super().prepare(data, log)
        assert self.image is not None
        layout, self.new_layer = _second_image(self.image.archive, data, self.new_layer_target)
        os.unlink(self.image.archive)
        self.registry = BenchRegistry(os.path.join(data, "registry"))
        self.registry.start()
        try:
            for tag in ("1", "2"):
                log(f"pushing the image :{tag} to the bench registry")
                _run_child(["skopeo", "--insecure-policy", "copy", "-q", "--dest-tls-verify=false",
                            f"oci:{layout}:{tag}", f"docker://{self.registry.host}/{REPO}:{tag}"])
        finally:
            self.registry.stop()
        with open(os.path.join(layout, "index.json")) as f:
            second = json.load(f)["manifests"][1]["digest"].removeprefix("sha256:")
        with open(os.path.join(layout, "blobs", "sha256", second)) as f:
            self.config_size = int(json.load(f)["config"]["size"])
        shutil.rmtree(layout)

    def sample(self, subject: str, scratch: str, meter: Meter) -> None:
        reg = self.registry
        assert reg is not None
        reg.start()
        try:
            if subject == "layerfs":
                self._pull_layerfs(reg, scratch, meter)
            elif subject == "skopeo+import":
                self._pull_skopeo(reg, scratch, meter)
            else:
                self._pull_containerd(reg, scratch, meter)
        finally:
            reg.stop()

    def _measured(self, subject: str, reg: BenchRegistry, meter: Meter,
                  pull: Callable[[str, str], tuple[float, float]]) -> None:
        moved = []
        for tag, metric in (("1", FIRST), ("2", SECOND)):
            offset = reg.log_size()
            seconds, cpu = pull(f"{reg.host}/{REPO}:{tag}", tag)
            meter.record(Metric(metric), seconds, cpu)
            moved.append(reg.blob_bytes_since(offset))
        self.moved.setdefault(subject, []).append((moved[0], moved[1]))

    def _pull_layerfs(self, reg: BenchRegistry, scratch: str, meter: Meter) -> None:
        cli = [sys.executable, "-m", "layerfs", "--root", os.path.join(scratch, "store"), "-q"]
        self._measured("layerfs", reg, meter, lambda ref, tag: _run_child([*cli, "pull", ref]))

    def _pull_skopeo(self, reg: BenchRegistry, scratch: str, meter: Meter) -> None:
        cli = [sys.executable, "-m", "layerfs", "--root", os.path.join(scratch, "store"), "-q"]
        env_tmp = os.path.join(scratch, "tmp")
        os.makedirs(env_tmp, exist_ok=True)

        def pull(ref: str, tag: str) -> tuple[float, float]:
            out = os.path.join(scratch, f"oci-{tag}")
            a = _run_child(["env", f"TMPDIR={env_tmp}", "skopeo", "--insecure-policy", "copy", "-q",
                            "--src-tls-verify=false", f"docker://{ref}", f"oci:{out}:{tag}"])
            b = _run_child([*cli, "import", out, "--name", f"{REPO}:{tag}"])
            return a[0] + b[0], a[1] + b[1]

        self._measured("skopeo+import", reg, meter, pull)

    def _pull_containerd(self, reg: BenchRegistry, scratch: str, meter: Meter) -> None:
        daemon = PrivateContainerd(os.path.join(scratch, "containerd"))
        try:
            daemon.start()
            pid = daemon.pid
            assert pid is not None

            def pull(ref: str, tag: str) -> tuple[float, float]:
                cpu0 = process_cpu(pid) or 0.0
                seconds, cpu = _run_child(["ctr", "--address", daemon.socket, "--namespace", "bench", "images",
                                           "pull", "--plain-http", "--snapshotter", "overlayfs", ref])
                return seconds, cpu + (process_cpu(pid) or 0.0) - cpu0

            self._measured("containerd", reg, meter, pull)
        finally:
            daemon.stop()

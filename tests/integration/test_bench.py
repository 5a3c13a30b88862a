"""The benchmark suite works: ``python -m bench --quick`` runs every workload on every
available backend, reports ratios and targets, and leaves nothing mounted or running.

No timing assertions: the numbers of a quick run on a shared machine mean nothing; what is
checked is that they exist, and how ratios and targets are computed from them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.measure import Meter, Metric
from bench.runner import WorkloadResult
from bench.targets import FUSE, MET, NOT_MET, SKIPPED, evaluate
from tests.support.markers import needs_root
from tests.support.paths import REPO

ROOT = REPO
WORKLOADS = ("read", "metadata", "copyup", "depth", "writes", "store")


def _leftover_mounts(path: Path) -> list[str]:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == real or p.startswith(real + "/")]


def _processes_naming(path: Path) -> list[str]:
    found = []
    needle = str(path).encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmdline and state != "Z":
            found.append(pid + ": " + cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


@needs_root
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_run_measures_everything_and_cleans_up(tmp_path: Path) -> None:
    workdir, out = tmp_path / "work", tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--workdir", str(workdir), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=540,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "== targets" in proc.stdout
    assert "bench: [" in proc.stderr  # progress goes to stderr

    # nothing left behind: no mount, no daemon, no data
    assert _leftover_mounts(tmp_path) == []
    assert _processes_naming(tmp_path) == []
    assert list(workdir.iterdir()) == []

    doc = json.loads((out / "results.json").read_text())
    assert doc["quick"] is True and doc["rounds"] == 3 and doc["interrupted"] is False
    machine = doc["machine"]
    for key in ("kernel", "cpu_model", "cores", "memory_bytes", "workdir_filesystem", "debian_packages",
                "python_packages"):
        assert machine[key], key
    assert "fuse-overlayfs" in machine["debian_packages"] and "pyfuse3" in machine["python_packages"]

    backends = doc["backends"]
    assert set(backends) == {"native", "kernel", "kernel-plain", "layerfs-fuse", "layerfs-kernel", "fuse-overlayfs",
                             "unionfs-fuse"}  # --quick leaves the lever variants out
    for name, info in backends.items():
        assert info["available"] or info["reason"], name  # a skipped backend says why
    available = [b for b, info in backends.items() if info["available"]]
    assert "native" in available

    assert set(doc["workloads"]) == set(WORKLOADS)
    for name, w in doc["workloads"].items():
        assert w["error"] is None, (name, w["error"])
        assert w["metrics"] and w["summary"], name
        skipped = {s for by in w["status"].values() for s, st in by.items() if st["state"] == "skipped"}
        subjects = available if w["kind"] == "mount" else [s for s in w["subjects"] if s not in skipped]
        for subject in subjects:
            samples = [s for s in w["samples"] if s["subject"] == subject]
            assert samples, f"{name}: no samples from {subject}: {w['status']}"
            assert all(s["values"] for s in samples)
            assert len({s["round"] for s in samples if s["case"] == samples[0]["case"]}) == 3
        for row in w["summary"]:
            assert row["min_s"] <= row["median_s"] <= row["max_s"]
            reference_measured = any(r["metric"] == row["metric"] and r["subject"] == w["reference"]
                                     for r in w["summary"])
            assert (row["vs_reference"] is not None) == reference_measured, row
            if row["subject"] == "kernel" and "kernel-plain" in available:
                assert row["vs_pair"] is not None and row["pair"] == "kernel-plain"
            if row["subject"] in ("layerfs-fuse", "layerfs-kernel") and "fuse-overlayfs" in available:
                assert row["vs_pair"] is not None and row["pair"] == "fuse-overlayfs"

    fuse_daemons = [b for b in ("fuse-overlayfs", "unionfs-fuse", "layerfs-fuse", "layerfs-kernel") if b in available]
    for backend in fuse_daemons:  # the daemon's CPU seconds are recorded per sample
        assert any(s["cpu"] for s in doc["workloads"]["metadata"]["samples"] if s["subject"] == backend)

    targets = doc["targets"]
    assert len(targets) >= 12
    assert {t["status"] for t in targets} <= {MET, NOT_MET, SKIPPED}
    assert all(t["detail"] for t in targets)
    if FUSE not in available:  # the default transport's backend: the targets are its
        assert all(t["status"] == SKIPPED for t in targets if "fuse-overlayfs" in t["name"])
    if any(p.endswith(".png") for p in doc["plots"]):
        assert (out / "copyup.png").exists() and (out / "depth.png").exists()


def _result(values: dict[str, dict[str, list[float]]], kind: str = "mount") -> WorkloadResult:
    subjects = sorted({s for by in values.values() for s in by})
    w = WorkloadResult("x", "x", kind, subjects, "native",
                       {FUSE: "fuse-overlayfs", "kernel": "kernel-plain"})
    for metric, by in values.items():
        for subject, samples in by.items():
            for r, v in enumerate(samples):
                meter = Meter()
                meter.record(Metric(metric), v)
                w.add("case", subject, r, meter)
    return w


def test_targets_from_medians() -> None:
    metadata = _result({
        "find cold": {FUSE: [1.0, 2.0, 9.0], "fuse-overlayfs": [2.0, 2.1, 2.2]},  # median 2.0 <= 2.1
        "find warm": {FUSE: [3.0], "fuse-overlayfs": [1.0]},
        "ls -lR cold": {FUSE: [1.0], "fuse-overlayfs": [2.0]},  # 0.5x: met, exactly
        "ls -lR warm": {"fuse-overlayfs": [1.0]},
    })
    metadata.name = "metadata"
    metadata.set_status("case", FUSE, "failed", "the daemon crashed")
    kernel = _result({"seq read warm": {"kernel": [1.04], "kernel-plain": [1.0], "native": [0.9]}})
    kernel.name = "read"
    by_name = {t.name: t for t in evaluate({"metadata": metadata, "read": kernel})}
    assert by_name["find cold <= 1.0x fuse-overlayfs"].status == MET
    assert by_name["find warm <= 1.0x fuse-overlayfs"].status == NOT_MET
    assert by_name["find warm <= 1.0x fuse-overlayfs"].value == pytest.approx(3.0)
    assert by_name["ls -lR cold <= 0.5x fuse-overlayfs"].status == MET
    warm = by_name["ls -lR warm <= 0.5x fuse-overlayfs"]
    assert warm.status == SKIPPED and "the daemon crashed" in warm.detail
    assert by_name["kernel within 5% of kernel-plain (every metric)"].status == MET
    assert by_name["import <= 1.0x ctr images import"].status == SKIPPED
    assert by_name["create files + sync <= 1.0x fuse-overlayfs"].detail == "workload writes not run"
    # issue 11: over every metric both have (find cold 2.0/2.1, find warm 3.0, ls -lR cold 0.5)
    geo = by_name["every workload: geomean <= 1.0x fuse-overlayfs"]
    assert geo.status == NOT_MET and geo.value == pytest.approx((2.0 / 2.1 * 3.0 * 0.5) ** (1 / 3))
    each = by_name["every workload: each metric <= 1.0x fuse-overlayfs"]
    assert each.status == NOT_MET and "2/3 metrics" in each.detail and "metadata/find warm 3.00×" in each.detail
    assert by_name["mount of 500 layers <= 1.0x fuse-overlayfs"].status == SKIPPED


def test_depth_targets() -> None:
    depth = WorkloadResult("depth", "depth", "mount", [FUSE, "fuse-overlayfs", "native"], "native",
                           {FUSE: "fuse-overlayfs"})
    samples = {("first stat, 1 layer", "first stat", 1): {FUSE: 1.0, "fuse-overlayfs": 1.0},
               ("first stat, 500 layers", "first stat", 500): {FUSE: 2.5, "fuse-overlayfs": 9.0},
               ("mount, 500 layers", "mount", 500): {FUSE: 0.2, "fuse-overlayfs": 0.4}}
    for (name, group, x), by in samples.items():
        for subject, v in by.items():
            meter = Meter()
            meter.record(Metric(name, group, x, True), v)
            depth.add("case", subject, 0, meter)
    by_name = {t.name: t for t in evaluate({"depth": depth})}
    flat = by_name["first stat at the deepest stack <= 2x the 1-layer figure (flat)"]
    assert flat.status == NOT_MET and flat.value == pytest.approx(2.5)
    mount = by_name["mount of 500 layers <= 1.0x fuse-overlayfs"]
    assert mount.status == MET and mount.value == pytest.approx(0.5)

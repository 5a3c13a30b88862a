"""The bench's pull workload runs in quick mode: every subject pulls both images, the
second pull's blob bytes are measured, and the registry and containerd it started are gone.

Behaviour only, never time. The registry binds a free port; everything else is under tmp_path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_bench import _leftover_mounts, _processes_naming
from tests.support.markers import needs_root
from tests.support.paths import REPO


@needs_root
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(shutil.which("docker-registry") is None, reason="docker-registry not installed")
def test_quick_pull_workload(tmp_path: Path) -> None:
    workdir, out = tmp_path / "work", tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--workload", "pull", "--rounds", "2", "--workdir", str(workdir),
         "--out", str(out), "--no-plots"],
        cwd=REPO, capture_output=True, text=True, timeout=550, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    w = doc["workloads"]["pull"]
    assert w["error"] is None, w["error"]
    skipped = {s for by in w["status"].values() for s, st in by.items() if st["state"] != "ok"}
    expected = {"layerfs", "skopeo+import", "containerd"} - skipped
    assert "layerfs" in expected and not {s for s in skipped if s == "layerfs"}
    for subject in expected:
        samples = [s for s in w["samples"] if s["subject"] == subject]
        assert len(samples) == 2, (subject, w["status"])
        assert all(set(s["values"]) == {"pull", "pull, 1 new layer"} for s in samples), samples
    facts = w["facts"]
    new = facts["new_layer_bytes"] + facts["config_bytes"]
    for moved in facts["blob_bytes_moved"]["layerfs"]:
        assert moved["second"] == new  # only the new layer (and the config) came over the wire
        assert moved["first"] > moved["second"]
    if "skopeo+import" in expected:  # a fresh oci dir: skopeo moves every layer again
        assert all(m["second"] > new for m in facts["blob_bytes_moved"]["skopeo+import"])
    by_name = {t["name"]: t for t in doc["targets"]}
    assert by_name["second pull (1 new layer) moves only that layer"]["status"] == "MET"
    assert by_name["pull <= 1.0x ctr images pull"]["status"] in ("MET", "NOT MET", "SKIPPED")
    assert "pull" in r.stdout and "layerfs moved" in r.stdout
    assert _leftover_mounts(workdir) == [] and _processes_naming(workdir) == []
    assert not workdir.exists() or not any(workdir.iterdir())

"""Inspection through the real CLI: analyze (exact waste, CI rules and exit codes), tree,
on images made by umoci (the way the issue's test image was made) and by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import imagebuild as ib
from tests.support import wasteimage
from tests.support.markers import needs_skopeo, needs_umoci
from tests.support.paths import GOLDEN

DOCS = {f"usr/share/doc/pkg{i}/README": os.urandom(1000 + 37 * i) for i in range(12)}
DOC_BYTES = sum(len(v) for v in DOCS.values())
CACHE = os.urandom(7000)


def layerfs(root: Path, *args: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "layerfs", "--root", str(root), "-q", *args],
                       capture_output=True, text=True, timeout=300, cwd=cwd)
    if check and r.returncode != 0:
        raise AssertionError(f"layerfs {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return r


def _rewrite_docs(rootfs: Path) -> None:
    for path, content in DOCS.items():
        (rootfs / path).write_bytes(content)  # the same bytes again: a full copy per file
        os.utime(rootfs / path, (1_700_000_000, 1_700_000_000))  # as a reinstall leaves them
    os.chmod(rootfs / "bin/busybox", 0o700)  # chmod only: the whole binary once more


@pytest.fixture(scope="module")
def umoci_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("docs")
    layers = [
        ib.Layer(busybox=True, dirs=["etc", "var/cache/apt"], files={**DOCS, "var/cache/apt/pkgcache.bin": CACHE},
                 created_by="COPY rootfs /"),
        ib.Layer(edit=_rewrite_docs, created_by="RUN reinstall docs; chmod 700 /bin/busybox"),
        ib.Layer(delete=["var/cache/apt/pkgcache.bin"], created_by="RUN rm /var/cache/apt/pkgcache.bin"),
    ]
    layout = ib.build_busybox_image(work, work / "layout", "1", layers)
    root = work / "store"
    layerfs(root, "import", str(layout), "--name", "docs:1")
    return root


@needs_umoci
def test_analyze_umoci_image_reports_the_readded_docs(umoci_store: Path) -> None:
    data = json.loads(layerfs(umoci_store, "analyze", "docs:1", "--format", "json").stdout)
    busybox = os.path.getsize(ib.BUSYBOX)
    assert data["schemaVersion"] == 1
    assert data["wasted_bytes"] == DOC_BYTES + busybox + len(CACHE)
    layer1, layer2, layer3 = data["layers"]
    assert layer1["wasted_bytes"] == DOC_BYTES + busybox + len(CACHE)
    assert layer2["metadata_only_bytes"] == DOC_BYTES + busybox
    assert layer2["overwrites_bytes"] == DOC_BYTES + busybox
    assert layer3["deletes_bytes"] == len(CACHE) and layer3["deleted_paths"] == 1
    assert data["duplicate_bytes"] == DOC_BYTES + busybox
    assert data["offenders"][0]["path"] == "/bin/busybox"
    assert {"directory": "/usr/share/doc", "wasted_bytes": DOC_BYTES, "copies": len(DOCS)} in data["wasted_by_directory"]
    assert {o["path"] for o in data["offenders"]} == {"/bin/busybox", "/var/cache/apt/pkgcache.bin", *("/" + p for p in DOCS)}
    text = layerfs(umoci_store, "analyze", "docs:1").stdout
    assert "Wasted space by path:" in text and "/usr/share/doc/pkg0/README" in text


@needs_umoci
def test_analyze_ci_thresholds_exit_status(umoci_store: Path, tmp_path: Path) -> None:
    wasted = json.loads(layerfs(umoci_store, "analyze", "docs:1", "--format", "json").stdout)["wasted_bytes"]
    ok = layerfs(umoci_store, "analyze", "docs:1", "--highest-wasted-bytes", str(wasted), check=False)
    assert ok.returncode == 0, ok.stderr
    assert "PASS: highestWastedBytes" in ok.stdout and "Result: PASS" in ok.stdout
    bad = layerfs(umoci_store, "analyze", "docs:1", "--highest-wasted-bytes", str(wasted - 1), check=False)
    assert bad.returncode == 1 and "FAIL: highestWastedBytes" in bad.stdout and "Result: FAIL" in bad.stdout
    bad = layerfs(umoci_store, "analyze", "docs:1", "--lowest-efficiency", "99%", check=False)
    assert bad.returncode == 1 and "FAIL: lowestEfficiency" in bad.stdout
    # a .dive-ci in the working directory, with --ci; the command line wins over it
    (tmp_path / ".dive-ci").write_text("rules:\n  lowestEfficiency: 0.01\n  highestWastedBytes: 1GB\n"
                                       "  highestUserWastedPercent: disabled\n")
    ok = layerfs(umoci_store, "analyze", "docs:1", "--ci", check=False, cwd=tmp_path)
    assert ok.returncode == 0 and "SKIP: highestUserWastedPercent" in ok.stdout, ok.stdout
    bad = layerfs(umoci_store, "analyze", "docs:1", "--ci", "--highest-wasted-bytes", "1kB", check=False, cwd=tmp_path)
    assert bad.returncode == 1
    data = json.loads(layerfs(umoci_store, "analyze", "docs:1", "--ci-config", str(tmp_path / ".dive-ci"),
                              "--format", "json").stdout)
    assert data["passed"] is True and [r["status"] for r in data["rules"]] == ["pass", "pass", "skip"]


def test_analyze_errors_are_one_line(tmp_path: Path) -> None:
    root = tmp_path / "store"
    layout = wasteimage.build_layout(tmp_path / "layout")
    layerfs(root, "import", str(layout), "--name", wasteimage.NAME)
    for args, code, needle in [
        (("analyze", "nosuch:1"), 1, "nosuch:1"),
        (("analyze", wasteimage.NAME, "--lowest-efficiency", "2"), 2, "--lowest-efficiency: '2' is not a ratio"),
        (("analyze", wasteimage.NAME, "--highest-wasted-bytes", "lots"), 2, "is not a size"),
        (("analyze", wasteimage.NAME, "--ci-config", str(tmp_path / "missing")), 2, "cannot read the rules file"),
        (("tree", wasteimage.NAME, "--layer", "4"), 2, "has layers 1 to 3"),
    ]:
        r = layerfs(root, *args, check=False)
        assert r.returncode == code, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_cli_golden_for_the_hand_made_image(tmp_path: Path) -> None:
    root = tmp_path / "store"
    layerfs(root, "import", str(wasteimage.build_layout(tmp_path / "layout")), "--name", wasteimage.NAME)
    golden = GOLDEN / "analysis"
    assert layerfs(root, "analyze", wasteimage.NAME, "--lowest-efficiency", "0.9", "--highest-user-wasted-percent",
                   "0.1", check=False).stdout == (golden / "analyze_cli.txt").read_text()
    assert layerfs(root, "tree", wasteimage.NAME).stdout == (golden / "tree.txt").read_text()
    assert layerfs(root, "tree", wasteimage.NAME, "--layer", "2", "--changes-only").stdout == (
        golden / "tree_layer2_changes.txt").read_text()


@needs_skopeo
def test_inspect_agrees_with_skopeo(tmp_path: Path) -> None:
    layout = wasteimage.build_layout(tmp_path / "layout")
    root = tmp_path / "store"
    layerfs(root, "import", str(layout), "--name", wasteimage.NAME)
    ours = json.loads(layerfs(root, "inspect", wasteimage.NAME).stdout)
    theirs = ib.skopeo_inspect(f"oci:{layout}:{wasteimage.TAG}")
    for key in ("Digest", "Created", "Labels", "Architecture", "Os", "Layers", "Env"):
        assert ours[key] == theirs[key], key
    assert ours["schemaVersion"] == 1 and ours["Name"] == "waste/demo" and ours["RepoTags"] == ["1.0"]
    assert (ours["Cmd"], ours["WorkingDir"], ours["ExposedPorts"], ours["Author"]) == (
        ["/bin/tool"], "/", ["8080/tcp"], "layerfs tests")
    raw = layerfs(root, "inspect", "--raw", wasteimage.NAME).stdout
    skopeo_raw = ib.run("skopeo", "--insecure-policy", "inspect", "--raw", f"oci:{layout}:{wasteimage.TAG}")
    assert raw == skopeo_raw
    config_digest = json.loads(raw)["config"]["digest"]
    assert layerfs(root, "inspect", "--config", "--raw", wasteimage.NAME).stdout == \
        ib.blob_path(layout, config_digest).read_text()
    assert json.loads(layerfs(root, "inspect", "--config", wasteimage.NAME).stdout) == \
        json.loads(ib.blob_path(layout, config_digest).read_bytes())
    # by image ID too, and a miss is one line
    assert json.loads(layerfs(root, "inspect", ours["Id"][7:19]).stdout)["Digest"] == ours["Digest"]
    miss = layerfs(root, "inspect", "nosuch", check=False)
    assert miss.returncode == 1 and miss.stderr.count("\n") == 1 and "nosuch" in miss.stderr


def test_history_lists_config_only_steps(tmp_path: Path) -> None:
    root = tmp_path / "store"
    layerfs(root, "import", str(wasteimage.build_layout(tmp_path / "layout")), "--name", wasteimage.NAME)
    steps = json.loads(layerfs(root, "history", wasteimage.NAME, "--format", "json").stdout)
    assert [(s["created_by"], s["empty_layer"], s["size"] > 0) for s in steps] == [
        ('CMD ["/bin/tool"]', True, False),
        ("RUN chmod +x /bin/tool && mv /old /new && rm -rf /var/cache/*", False, True),
        ("COPY docs /usr/share/doc", False, True),
        ("ENV LANG=C.UTF-8", True, False),
        ("ADD base.tar /", False, True),
    ]
    assert steps[-1]["created"] == "2024-01-02T03:04:05.123456789Z"  # nanoseconds kept
    assert steps[0]["diff_id"] is None and steps[1]["diff_id"].startswith("sha256:")
    table = layerfs(root, "history", wasteimage.NAME).stdout.splitlines()
    assert len(table) == 6 and table[1].startswith("<none>") and "0B" in table[1]

"""Failures a user can meet end in one line on stderr and a documented exit code, never a
traceback; SIGTERM and SIGHUP clean up like SIGINT (nothing left in the store's ``tmp/``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.support.markers import needs_root


def _layerfs(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "layerfs", "--root", str(root), "-q", *args],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def _one_line_error(r: subprocess.CompletedProcess[str], *, code: int = 1) -> str:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("layerfs: error: "), r.stderr
    return lines[0]


def _layer(tmp_path: Path, name: str = "l.tar", files: int = 3) -> Path:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    for i in range(files):
        (src / f"f{i}").write_text(f"file {i}\n")
    out = tmp_path / name
    with tarfile.open(out, "w") as tar:
        for i in range(files):
            tar.add(src / f"f{i}", arcname=f"f{i}")
    return out


def test_deeply_nested_json_is_one_line(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_text("[" * 100_000 + "]" * 100_000)
    line = _one_line_error(_layerfs(tmp_path / "store", "import", str(layout)))
    assert "import" in line and "nested too deeply" in line


def test_unwritable_export_target_names_the_path(tmp_path: Path) -> None:
    root = tmp_path / "store"
    assert _layerfs(root, "import-layer", str(_layer(tmp_path)), "--name", "x:1").returncode == 0
    line = _one_line_error(_layerfs(root, "export", "x:1", "/proc/layerfs-no-such-dir/o.tar"))
    assert "export" in line and "/proc/layerfs-no-such-dir" in line


def test_debug_lets_the_traceback_through(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_text("[" * 100_000 + "]" * 100_000)
    r = _layerfs(tmp_path / "store", "import", str(layout), env={"LAYERFS_DEBUG": "1"})
    assert r.returncode != 0 and "RecursionError" in r.stderr


@needs_root
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_polite_signals_clean_up_an_import(tmp_path: Path, sig: str) -> None:
    root = tmp_path / "store"
    layer = _layer(tmp_path)
    # the signal arrives at the first crash point of the import: the layer is staged in tmp/
    r = _layerfs(root, "import-layer", str(layer), "--name", "x:1",
                 env={"LAYERFS_FAILPOINT_KILL": "1", "LAYERFS_FAILPOINT_SIGNAL": sig})
    assert r.returncode != 0, r.stderr
    assert r.returncode != -signal.Signals[sig].value, f"killed by {sig} without cleaning up"
    assert "Traceback" not in r.stderr, r.stderr
    assert sorted(os.listdir(root / "tmp")) == [], "staging left behind"
    assert _layerfs(root, "fsck").returncode == 0
    # nothing half-imported, and the import runs again
    assert _layerfs(root, "images", "--format", "json").stdout.strip() in ("[]", "")
    assert _layerfs(root, "import-layer", str(layer), "--name", "x:1").returncode == 0

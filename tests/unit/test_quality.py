"""The code stays typed and linted: ruff and mypy run as part of the suite."""

from __future__ import annotations

import subprocess
import sys

from tests.support.paths import REPO

ROOT = REPO


def test_ruff_clean() -> None:
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "layerfs", "snapshotter", "bench", "tests"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_clean() -> None:
    r = subprocess.run([sys.executable, "-m", "mypy", "layerfs", "snapshotter"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

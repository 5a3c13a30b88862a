"""Golden-file comparison for the view tests: ``check(folder, name, actual)``.

``LAYERFS_UPDATE_GOLDEN=1`` rewrites the file instead (then review the diff)."""

from __future__ import annotations

import os
from pathlib import Path


def check(folder: Path, name: str, actual: str) -> None:
    path = folder / name
    if os.environ.get("LAYERFS_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual, encoding="utf-8", newline="")
        return
    assert path.exists(), f"{path} missing: run with LAYERFS_UPDATE_GOLDEN=1 to create it"
    assert actual == path.read_text(encoding="utf-8"), f"output differs from {path}"

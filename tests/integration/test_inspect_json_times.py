"""Issue 14 (one time format): every JSON view writes times as RFC 3339 in UTC with ``Z`` and
up to nine fraction digits; an image config's nanoseconds survive in ``images --format json``
as they do in ``history`` and ``inspect``. Everything is under tmp_path.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support import imagebuild as ib

CREATED = "2024-01-02T03:04:05.123456789Z"


def lf(root: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "layerfs", "--root", str(root), "-q", *args],
                       capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_nanoseconds_of_a_config_survive_in_every_json_view(tmp_path: Path) -> None:
    root, layout = tmp_path / "store", tmp_path / "layout"
    desc = ib.add_image(layout, [ib.layer_tar({"etc/os": "x\n"})], config_extra={
        "created": CREATED, "history": [{"created": CREATED, "created_by": "ADD x /"}]})
    ib.set_index(layout, [(desc, {ib.REF_NAME: "t"})])
    lf(root, "import", str(layout), "--name", "demo/ns:1")
    images = json.loads(lf(root, "images", "--format", "json"))
    assert [i["created"] for i in images] == [CREATED]
    history = json.loads(lf(root, "history", "demo/ns:1", "--format", "json"))
    assert [h["created"] for h in history] == [CREATED]
    assert json.loads(lf(root, "inspect", "demo/ns:1"))["Created"] == CREATED

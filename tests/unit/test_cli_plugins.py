"""Commands from outside the engine (bench, snapshotter) load only when they are named or listed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROBE = """
import sys
from layerfs.cli import main
sys.argv = ["layerfs", "--root", sys.argv[1], *sys.argv[2:]]
try:
    main()
except SystemExit:
    pass
print("LOADED", sorted(m for m in ("bench.cli", "snapshotter.cli") if m in sys.modules), file=sys.stderr)
"""


def _loaded(tmp_path: Path, *args: str) -> tuple[str, str]:
    r = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "store"), *args],
                       capture_output=True, text=True, timeout=60)
    line = [x for x in r.stderr.splitlines() if x.startswith("LOADED")]
    assert line, r.stderr
    return r.stdout, line[-1]


def test_an_engine_command_loads_no_plugin(tmp_path: Path) -> None:
    out, loaded = _loaded(tmp_path, "images")
    assert loaded == "LOADED []"
    assert "REPOSITORY" in out or out == ""  # the (empty) table


def test_a_named_plugin_loads_only_itself(tmp_path: Path) -> None:
    out, loaded = _loaded(tmp_path, "bench", "--help")
    assert loaded == "LOADED ['bench.cli']"
    assert "--quick" in out


def test_the_command_list_shows_the_plugins(tmp_path: Path) -> None:
    out, loaded = _loaded(tmp_path, "--help")
    assert loaded == "LOADED ['bench.cli', 'snapshotter.cli']"
    assert "bench" in out and "snapshotter" in out

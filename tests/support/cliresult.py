"""Checks of a finished ``layerfs`` command and of what it left mounted, shared by the CLI tests."""

from __future__ import annotations

import subprocess
from pathlib import Path


def ok(r: subprocess.CompletedProcess[str]) -> str:
    """The command's stdout; fails with its stderr unless it exited 0 without a traceback."""
    assert r.returncode == 0, (r.args, r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    return r.stdout


def one_line_error(r: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The one ``layerfs: error: ...`` line a failed command printed (exit ``code``, no traceback)."""
    assert r.returncode == code, (r.args, r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("layerfs: error: "), r.stderr
    return lines[0]


def mounted_under(*paths: Path) -> list[str]:
    """Mount points (this namespace) at or below any of ``paths``, in mount order."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if any(mp == str(p) or mp.startswith(str(p) + "/") for p in paths):
                out.append(mp)
    return out

"""fsck beside concurrent commands reports nothing that is not there (issue 15).

Found by the 8-process soak (about one run in four): ``fsck`` listed ``snapshots/`` while
``rm`` of a container was deleting its directory (the row gone, the files not yet) and
called it an orphan; ``export REF out.tgz`` (and ``export -``, ``import -``) kept its
``tmp/export-*`` staging outside the store lock, so fsck called it leftover staging. A
focused loop: one process creates and removes containers (with files in the upper) and
exports to ``.tgz`` as fast as it can, while this one runs fsck over and over; before the
fix about one fsck in twenty reported damage. Everything lives under ``tmp_path``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from layerfs.store import Store
from layerfs.store.fsck import fsck
from tests.integration.test_store_crash import run_layerfs
from tests.support.tarbuild import write_layer

pytestmark = pytest.mark.slow

REPO = str(Path(__file__).resolve().parents[2])

_CHURN = r"""
import os, sys, time
from click.testing import CliRunner
from layerfs.cli import cli
from layerfs.store import Store
root, seconds, image, out = sys.argv[1:]
deadline, n, runner = time.time() + float(seconds), 0, CliRunner()
with Store(root) as s:
    img = s.get_image(image)
    while time.time() < deadline or n < 10:
        s.create_container("churn", "churn-key", img)
        upper = s.fs_dir(s.get_snapshot("churn-key").id)
        os.mkdir(os.path.join(upper, "many"))
        for i in range(300):
            open(os.path.join(upper, "many", str(i)), "w").close()
        s.remove_container("churn", "churn-key")
        r = runner.invoke(cli, ["--root", root, "-q", "export", image, out])
        assert r.exit_code == 0, r.output
        n += 1
print(n)
"""


def test_fsck_beside_rm_and_export_reports_nothing(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    root = str(tmp_path / "store")
    base = write_layer(str(tmp_path / "base.tar"), {"d": None, **{f"d/f{i}": os.urandom(500) for i in range(50)}})
    r = run_layerfs(root, "import-layer", base, "--name", "b:1")
    assert r.returncode == 0, r.stderr
    churn = subprocess.Popen([sys.executable, "-c", _CHURN, root, "4", "b:1", str(tmp_path / "out.tgz")],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    procs.append(churn)
    runs, wrong = 0, []
    with Store(root) as s:
        time.sleep(0.2)
        while churn.poll() is None:
            report = fsck(s)
            runs += 1
            wrong += [f.problem for f in report.findings]
            time.sleep(0.005)  # (flock is not fair: leave the churner room to take the lock)
        assert churn.wait() == 0
        cycles = int(churn.communicate()[0])
        final = fsck(s)
    print(f"\nfsck beside rm and export: {runs} fsck runs, {cycles} create/rm/export cycles, "
          f"{len(wrong)} false findings")
    assert cycles >= 10 and runs >= 20, (cycles, runs)
    assert not wrong, sorted(set(wrong))[:10]
    assert final.clean, [f.problem for f in final.findings]

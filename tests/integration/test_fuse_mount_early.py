"""``layerfs-fuse`` on the kernel transport reports the mount live right after mount(2).

The parent returns before the daemon imported trio and answered the kernel's INIT (the
kernel holds the first requests until then, as with libfuse's programs). What fails after
that point must still end well: the daemon unmounts again, exits, and says why in its log.
Failures are injected with ``layerfs.failpoint`` (``fuse.serve``, ``fuse.mounted``) in the
daemon's environment. Needs root, /dev/fuse and fusermount3 (the ``fuse`` fixture's
checks); everything stays in tmp_path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from layerfs.mount import fuse as fuse_backend
from tests.integration import test_fuse_program as program
from tests.integration.test_fuse_program import Fuse, is_mounted, needs_fuse, two_lowers, wait_for

# the fixtures of test_fuse_program: the daemon tracker, and the real model whatever the environment says
fuse = program.fuse
_model = program._model


# what the mount path (the program, the mount, the model) must not import: the request loop
# (trio, ~0.2 s) is imported once the mount is live; the rest only where needed (fusermount3:
# socket, subprocess; copy-up and format probes: tempfile, shutil; logging once mounted;
# platform for syscall numbers). Each costs milliseconds of every mount.
HEAVY = ("trio", "layerfs.fuse.session", "layerfs.fuse.ops", "pyfuse3", "socket", "subprocess", "tempfile",
         "shutil", "platform", "logging", "selectors", "asyncio")


def test_the_mount_path_does_not_import_the_request_loop() -> None:
    """What the program needs up to mount(2) leaves trio (the loop) and the heavy helpers unimported."""
    code = ("import sys, layerfs.fuse.main, layerfs.fuse.connection, layerfs.union.fs; "
            f"print(sorted(m for m in sys.modules if m in {HEAVY!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_building_the_model_imports_nothing_heavy(tmp_path: Path) -> None:
    """The daemon's whole way up to mount(2) (parse, resolve and check the layers, the busy-upper
    check, the model with an upper, the mount configuration) imports none of HEAVY either."""
    top, bottom = two_lowers(tmp_path)
    upper, work, mp = tmp_path / "upper", tmp_path / "work", tmp_path / "mp"
    for d in (upper, work, mp):
        d.mkdir()
    code = ("import os, sys; from layerfs.fuse import main; "
            f"opts = main.parse_args(['--transport', 'kernel', '-o', "
            f"'lowerdir={top}:{bottom},upperdir={upper},workdir={work}', '{mp}']); "
            "model = main.build_model(opts); main.kernel_mount_config(opts, os.geteuid()); "
            f"print(sorted(m for m in sys.modules if m in {HEAVY!r})); model.destroy()")
    env = {**_env(), "LAYERFS_FUSE_MODEL": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "[]"
    assert (work / "work").is_dir()  # the model was built: it made its work directory


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERFS_FAILPOINT")}
    env.update(extra)
    return env


@needs_fuse
def test_a_mount_is_usable_the_moment_the_program_returns(tmp_path: Path, fuse: Fuse) -> None:
    top, bottom = two_lowers(tmp_path)
    mp = tmp_path / "mp"
    mp.mkdir()
    pid = fuse.mount(f"lowerdir={top}:{bottom}", mp, "--transport", "kernel")
    # the first requests wait in the kernel for INIT; none fails
    assert (mp / "a").read_text() == "top\n" and (mp / "d/x").read_text() == "x\n"
    assert sorted(os.listdir(mp)) == ["a", "b", "d", "o"]
    subprocess.run(["fusermount3", "-u", str(mp)], check=True, capture_output=True)
    assert fuse_backend.wait_gone(pid, 10)


@needs_fuse
def test_a_failure_after_the_mount_unmounts_and_is_logged(tmp_path: Path, fuse: Fuse) -> None:
    top, bottom = two_lowers(tmp_path)
    mp, log = tmp_path / "mp", tmp_path / "daemon.log"
    mp.mkdir()
    r = fuse.run("--transport", "kernel", "--log", str(log), "-o", f"lowerdir={top}:{bottom}", str(mp),
                 env=_env(LAYERFS_FAILPOINT_ERROR="fuse.serve:EIO"))
    assert r.returncode == 0, r.stderr  # it was mounted when the parent heard "ok"
    assert wait_for(lambda: not is_mounted(mp)), "the daemon left its mount behind"
    assert not os.listdir(mp)  # the bare directory again, no dead mount (ENOTCONN)
    # it unmounts first, then logs why and exits: the log is complete once the daemon is gone
    assert wait_for(lambda: not any(fuse_backend.is_daemon(int(p), str(mp)) for p in os.listdir("/proc")
                                    if p.isdigit())), "the daemon did not exit"
    text = log.read_text()
    assert f"cannot serve {mp} (unmounted it): OSError" in text and "Input/output error" in text, text
    assert "Traceback" not in text, text


@needs_fuse
def test_a_stop_signal_before_the_loop_runs_unmounts(tmp_path: Path, fuse: Fuse) -> None:
    top, bottom = two_lowers(tmp_path)
    mp, log = tmp_path / "mp", tmp_path / "daemon.log"
    mp.mkdir()
    r = fuse.run("--transport", "kernel", "--print-pid", "--log", str(log), "-o", f"lowerdir={top}:{bottom}",
                 str(mp), env=_env(LAYERFS_FAILPOINT_KILL="1", LAYERFS_FAILPOINT_SIGNAL="SIGTERM"))
    assert r.returncode == 0, r.stderr
    pid = int(r.stdout.split()[-1])
    fuse.pids.append(pid)
    assert fuse_backend.wait_gone(pid, 10), "the daemon did not stop on SIGTERM"
    assert wait_for(lambda: not is_mounted(mp)), "the daemon left its mount behind"
    text = log.read_text()
    assert f"stopped by a signal before serving {mp}: unmounted it" in text and "Traceback" not in text, text

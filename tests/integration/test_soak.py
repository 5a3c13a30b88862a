"""Soak tests (issue 15), within the CI budget; ``LAYERFS_SOAK=long`` for the long mode.

- kill -9 at random points (``LAYERFS_FAILPOINT_KILL=N`` at a random crash point, or
  SIGKILL after a random delay) of import (OCI archive), import-layer, commit, export
  (with and without ``--rebuild-layers``), rmi, gc, fsck --repair, and of concurrent pairs
  of them. After each: the store opens, ``fsck --repair`` makes it clean, every image
  committed before is intact (tree checksum of its layers), and the interrupted operation
  re-runs successfully (and its result is right). ``tests/integration/test_store_crash.py``
  covers every crash point of one import; this extends it to every operation.
- 8 processes doing random store operations for a bounded time; then fsck and every
  image's tree.
- Fault injection at the store's syscall boundary (``LAYERFS_FAILPOINT_ERROR``: EIO and
  ENOSPC on write, fsync and rename): one line, exit 1, the store unchanged.

The figures (cases, kills, failures) are printed at the end of each test (``-s``).
Every process a test starts is stopped by pid in a finalizer.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from layerfs.cli import cli
from layerfs.store import Store
from layerfs.store.fsck import fsck
from tests.integration.test_store_crash import copy_store, image_tree, run_layerfs
from tests.support.registry import REGISTRY_BIN, RegistryServer
from tests.support.tarbuild import write_layer

pytestmark = pytest.mark.slow

LONG = os.environ.get("LAYERFS_SOAK") == "long"
KILLS = int(os.environ.get("LAYERFS_SOAK_KILLS", "1000" if LONG else "200"))
STRESS_SECONDS = float(os.environ.get("LAYERFS_SOAK_SECONDS", "300" if LONG else "30"))


_RUNNER = CliRunner()


def lf_argv(root: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "layerfs", "--root", root, "-q", *args]


@dataclass
class World:
    """A pristine store and what its images (and the ones the operations make) must hold."""

    root: str  # base:1 and app:1, container c1 with changes, garbage for gc and fsck --repair
    files: dict[str, str]  # layer tars and the OCI archive
    trees: dict[str, dict[str, tuple]]  # image name -> tree fingerprint
    pull_ref: str | None = None  # oci:1 in a loopback docker-registry (None: not installed)


def _make_garbage(root: str) -> None:
    """What gc and fsck --repair have to remove: an untagged image's layers, leftover
    staging, an orphan snapshot directory and an orphan blob file."""
    with Store(root) as s:
        with s.meta.transaction() as db:
            db.execute("DELETE FROM images WHERE name='old:1'")
        for name in ("new-leftover", "ingest-leftover"):
            os.makedirs(os.path.join(s.tmp_dir, name, "fs", "d"))
            with open(os.path.join(s.tmp_dir, name, "fs", "d", "f"), "wb") as f:
                f.write(os.urandom(10_000))
        os.makedirs(os.path.join(s.root, "snapshots", "9999", "fs"))
        with open(os.path.join(s.content.blob_dir, "ab" * 32), "wb") as f:
            f.write(b"orphan")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer | None]:
    """A loopback docker-registry for the pull operation (stopped by pid at the end), or
    None when docker-registry is not installed (pull is then left out of the soak)."""
    if REGISTRY_BIN is None:
        yield None
        return
    server = RegistryServer(tmp_path_factory.mktemp("soak-registry"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, registry: RegistryServer | None) -> World:
    d = tmp_path_factory.mktemp("soak")
    files = {
        "base": write_layer(str(d / "base.tar"), {"etc": None, "etc/os-release": b"base\n", "bin": None,
                                                   "bin/sh": b"#!sh\n" * 100,
                                                   **{f"bin/f{i}": os.urandom(2000) for i in range(100)}}),
        "l1": write_layer(str(d / "l1.tar.gz"), {"app": None, "app/main": os.urandom(300_000),
                                                  "etc/os-release": b"changed\n"}, "gzip"),
        "l2": write_layer(str(d / "l2.tar.zst"), {"etc": None, "etc/os-release": ("whiteout",), "app": None,
                                                   **{f"app/d{i}": os.urandom(5000) for i in range(60)}}, "zstd"),
        "old": write_layer(str(d / "old.tar"), {"old": os.urandom(50_000)}),
        "n1": write_layer(str(d / "n1.tar.gz"), {"n": None, **{f"n/f{i}": os.urandom(4000) for i in range(150)}},
                          "gzip"),
        "n2": write_layer(str(d / "n2.tar"), {"n2": os.urandom(200_000)}),
    }
    # an OCI archive of an image the pristine store does not have
    ref = str(d / "ref")
    for args in (("import-layer", files["base"], files["n1"], files["n2"], "--name", "oci:1"),
                 ("export", "oci:1", str(d / "oci.tar"))):
        r = run_layerfs(ref, *args)
        assert r.returncode == 0, r.stderr
    files["oci"] = str(d / "oci.tar")
    pull_ref = None
    if registry is not None:
        pull_ref = f"{registry.host}/soak/oci:1"
        r = run_layerfs(ref, "push", "oci:1", pull_ref)
        assert r.returncode == 0, r.stderr
    root = str(d / "pristine")
    for args in (("import-layer", files["base"], "--name", "base:1"),
                 ("import-layer", files["base"], files["l1"], files["l2"], "--name", "app:1"),
                 ("import-layer", files["old"], "--name", "old:1"),
                 ("create", "c1", "--from", "app:1")):
        r = run_layerfs(root, *args)
        assert r.returncode == 0, r.stderr
    from layerfs import containers

    with Store(root) as s:
        upper = containers.upper(s, containers.get(s, "c1"))
    os.makedirs(os.path.join(upper, "app", "new"))
    for i in range(80):
        with open(os.path.join(upper, "app", "new", f"f{i}"), "wb") as f:
            f.write(os.urandom(3000))
    trees = {"base:1": image_tree(root, "base:1"), "app:1": image_tree(root, "app:1"), "oci:1": image_tree(ref, "oci:1")}
    trees["pulled:1"] = trees["oci:1"]  # the same layers, pulled
    # what the operations must produce, from a clean run of each in a copy
    probe = str(d / "probe")
    copy_store(root, probe)
    for args in (("import-layer", files["base"], files["n1"], "--name", "new:1"), ("commit", "c1", "committed:1")):
        r = run_layerfs(probe, *args)
        assert r.returncode == 0, r.stderr
    trees["new:1"] = image_tree(probe, "new:1")
    trees["committed:1"] = image_tree(probe, "committed:1")
    _make_garbage(root)
    return World(root, files, trees, pull_ref)


def _ops(w: World, out: str) -> dict[str, list[str]]:
    f = w.files
    return {
        "import": ["import", f["oci"]],
        "import-layer": ["import-layer", f["base"], f["n1"], "--name", "new:1"],
        "commit": ["commit", "c1", "committed:1"],
        "export": ["export", "app:1", os.path.join(out, "app.tar")],
        "export-rebuild": ["export", "--rebuild-layers", "app:1", os.path.join(out, "rebuilt")],
        "rmi": ["rmi", "base:1"],
        "gc": ["gc"],
        "fsck-repair": ["fsck", "--repair"],
        **({"pull": ["pull", w.pull_ref, "--name", "pulled:1"]} if w.pull_ref else {}),
    }


PAIRS = [("import-layer", "gc"), ("commit", "rmi"), ("import", "fsck-repair"), ("export", "gc"),
         ("import-layer", "import"), ("commit", "export-rebuild"), ("pull", "gc"), ("pull", "import")]
# what each operation makes (its image) or removes
MAKES = {"import": "oci:1", "import-layer": "new:1", "commit": "committed:1", "pull": "pulled:1"}
REMOVES = {"rmi": "base:1"}


def _points(w: World, tmp: Path, op: str) -> int:
    """How many crash points a clean run of ``op`` passes (``LAYERFS_FAILPOINT_TRACE``)."""
    work = str(tmp / f"trace-{op}")
    copy_store(w.root, work)
    trace = tmp / f"trace-{op}.txt"
    out = tmp / f"trace-{op}-out"
    out.mkdir()
    r = subprocess.run(lf_argv(work, *_ops(w, str(out))[op]), capture_output=True, text=True, timeout=300,
                       env={**os.environ, "LAYERFS_FAILPOINT_TRACE": str(trace)})
    assert r.returncode == 0, (op, r.stderr)
    return len(trace.read_text().split()) if trace.exists() else 0


def _check(w: World, work: str, out: str, ran: list[str]) -> None:
    """After a kill: opens, repairs to clean, nothing committed before lost, the operations re-run."""
    with Store(work) as s:
        fsck(s, repair=True)
        report = fsck(s)
        assert report.clean, [f.problem for f in report.findings]
        names = {i.name for i in s.list_images()}
    for name in ("base:1", "app:1"):
        if name in names:
            assert image_tree(work, name) == w.trees[name], name
        else:
            assert any(REMOVES.get(op) == name for op in ran), f"{name} lost"
    for op in ran:
        made = MAKES.get(op)
        if made in names:  # killed after its commit: whole
            assert image_tree(work, made) == w.trees[made], made
    for op in ran:
        if op in REMOVES and REMOVES[op] not in names:
            continue  # done before the kill
        r = _RUNNER.invoke(cli, ["--root", work, "-q", *_ops(w, out)[op]])  # in-process: the same command
        assert r.exit_code == 0, (op, r.output, r.exception)
        if op in MAKES:
            assert image_tree(work, MAKES[op]) == w.trees[MAKES[op]], op
    with Store(work) as s:
        assert fsck(s).clean


# 200 kills take about 5 min on an idle 2-core machine; the limit is a hang guard, not a time target
@pytest.mark.timeout(1800)
def test_kill_9_at_random_points_of_every_operation(world: World, tmp_path: Path, procs: list) -> None:
    rng = random.Random(int(os.environ.get("LAYERFS_SOAK_SEED", "15")))
    singles = list(_ops(world, "/nonexistent"))
    points = {op: _points(world, tmp_path, op) for op in singles}
    assert all(points[op] > 0 for op in ("import", "import-layer", "commit", "export", "export-rebuild", "rmi", "gc",
                                           "fsck-repair", *(["pull"] if "pull" in points else []))), points
    figures = {"cases": 0, "kills": 0, "by failpoint": 0, "by timer": 0, "pairs": 0, "finished first": 0,
               "failures": 0}
    failures: list[str] = []
    case = -1
    while figures["kills"] < KILLS and case < 2 * KILLS:
        case += 1
        work = str(tmp_path / "work")
        out = tmp_path / "out"
        subprocess.run(["rm", "-rf", work, str(out)], check=True)
        copy_store(world.root, work)
        out.mkdir()
        ops = _ops(world, str(out))
        env: dict[str, str] = {}
        if case % 4 == 3:  # a concurrent pair: one is killed at a random time, the other runs on
            ran = list(rng.choice([p for p in PAIRS if all(op in ops for op in p)]))
            figures["pairs"] += 1
            started = [subprocess.Popen(lf_argv(work, *ops[op]), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE) for op in ran]
            procs.extend(started)
            victim = rng.randrange(2)
            time.sleep(rng.uniform(0.05, 0.8))
            started[victim].send_signal(signal.SIGKILL)
            killed = started[victim].wait() == -signal.SIGKILL
            for i, p in enumerate(started):
                _, err = p.communicate(timeout=300)
                if i != victim and p.returncode != 0 and b"not found" not in err and b"in use" not in err \
                        and b"mounted" not in err and b"used by" not in err:
                    failures.append(f"case {case} {ran[i]} beside a killed {ran[victim]}: {err.decode()[-300:]}")
        else:
            op = rng.choice(singles)
            ran = [op]
            env = dict(os.environ)
            if points[op] and rng.random() < 0.75:
                env["LAYERFS_FAILPOINT_KILL"] = str(rng.randint(1, points[op]))
                r = subprocess.run(lf_argv(work, *ops[op]), capture_output=True, text=True, timeout=300, env=env)
                killed = r.returncode == -signal.SIGKILL
                figures["by failpoint"] += killed
                if not killed:
                    failures.append(f"case {case} {op}: not killed at point {env['LAYERFS_FAILPOINT_KILL']}: "
                                    f"{r.returncode} {r.stderr[-300:]}")
            else:
                p = subprocess.Popen(lf_argv(work, *ops[op]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                procs.append(p)
                time.sleep(rng.uniform(0.05, 1.0))
                p.send_signal(signal.SIGKILL)
                killed = p.wait() == -signal.SIGKILL
        if killed and "LAYERFS_FAILPOINT_KILL" not in env:
            figures["by timer"] += 1
        figures["kills"] += killed
        figures["finished first"] += not killed
        figures["cases"] += 1
        try:
            subprocess.run(["rm", "-rf", str(out)], check=True)
            out.mkdir()
            _check(world, work, str(out), ran)
        except AssertionError as e:
            failures.append(f"case {case} {ran}: {e}"[:600])
    figures["failures"] = len(failures)
    print(f"\nsoak kill -9: {figures}; crash points per operation: {points}")
    assert figures["kills"] >= min(KILLS, 200)
    assert not failures, "\n".join(failures[:20])


# One of the 8 workers: random store operations until the deadline; one JSON line per command.
_WORKER = r"""
import json, random, subprocess, sys, time
root, deadline, me, log, reg, base, *tops = sys.argv[1:]
rng, deadline, n = random.Random(int(me)), float(deadline), 0
with open(log, "w") as out:
    while time.time() < deadline:
        k = rng.randrange(len(tops))
        op = rng.choice(["import", "import", "rmi", "gc", "fsck", "images", "df", "tag", "export", "container",
                         *(["pull", "pull"] if reg else [])])
        args = {"import": [["import-layer", base, tops[k], "--name", f"img-{k}:1"]],
                "pull": [["pull", f"{reg}/soak8/img-{k}:1", "--name", f"img-{k}:1"]],
                "rmi": [["rmi", f"img-{k}:1"]], "gc": [["gc"]], "fsck": [["fsck"]],
                "images": [["images"]], "df": [["df"]], "tag": [["tag", f"img-{k}:1", f"alias-{k}:1"]],
                "export": [["export", f"img-{k}:1", f"{log}.{n}.tar"]],
                "container": [["create", f"c{me}", "--from", f"img-{k}:1"], ["commit", f"c{me}", f"saved-{k}:1"],
                              ["rm", f"c{me}"]]}[op]
        for a in args:
            t0 = time.time()
            r = subprocess.run([sys.executable, "-m", "layerfs", "--root", root, "-q", *a],
                               capture_output=True, text=True)
            out.write(json.dumps({"args": a, "rc": r.returncode, "err": r.stderr[-400:],
                                  "out": r.stdout[-400:] if r.returncode else "",
                                  "s": round(time.time() - t0, 2)}) + "\n")
            out.flush()
            n += 1
            if r.returncode and a[0] != "commit":  # (a failed commit still removes its container)
                break
        subprocess.run(["rm", "-f", f"{log}.{n - 1}.tar"])
"""
# failures a racing command may meet and must say in one line
_EXPECTED = ("not found", "used by container", "is mounted", "already exists", "has children")


def test_eight_processes_of_random_operations(tmp_path: Path, procs: list, registry: RegistryServer | None) -> None:
    import json

    root = str(tmp_path / "store")
    base = write_layer(str(tmp_path / "base.tar.gz"),
                       {"d": None, **{f"d/f{i}": os.urandom(1000) for i in range(200)}}, "gzip")
    tops = [write_layer(str(tmp_path / f"top{k}.tar"), {f"top{k}": os.urandom(4000), "d/f0": b"over\n"})
            for k in range(6)]
    ref = str(tmp_path / "ref")
    for k, top in enumerate(tops):
        assert run_layerfs(ref, "import-layer", base, top, "--name", f"img-{k}:1").returncode == 0
        if registry is not None:  # pulled as well as imported (the same image, the same name)
            r = run_layerfs(ref, "push", f"img-{k}:1", f"{registry.host}/soak8/img-{k}:1")
            assert r.returncode == 0, r.stderr
    expected = {k: image_tree(ref, f"img-{k}:1") for k in range(len(tops))}
    deadline = time.time() + STRESS_SECONDS
    logs = [tmp_path / f"worker{i}.jsonl" for i in range(8)]
    for i, log in enumerate(logs):
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, root, str(deadline), str(i), str(log),
                                       registry.host if registry else "", base, *tops], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for p in procs:
        assert p.wait(timeout=STRESS_SECONDS + 600) == 0
    commands = [json.loads(line) for log in logs for line in log.read_text().splitlines()]
    unexpected = [c for c in commands if c["rc"] != 0 and not (
        c["rc"] == 1 and "Traceback" not in c["err"] and len(c["err"].strip().splitlines()) == 1
        and any(e in c["err"] for e in _EXPECTED) and c["args"][0] != "fsck")]
    with Store(root) as s:
        fsck(s, repair=True)
        report = fsck(s, verify_blobs=True)
        images = {i.name: i for i in s.list_images()}
        trees = {n: image_tree(root, n) for n in images}
    wrong = []
    for name, tree in trees.items():
        k = int(name.split("-")[1].split(":")[0])
        if tree != expected[k]:  # img-k, alias-k and saved-k (a commit of an unchanged container) alike
            wrong.append(name)
    print(f"\nsoak 8 processes, {STRESS_SECONDS:.0f}s: {len(commands)} commands "
          f"({sum(c['args'][0] == 'pull' for c in commands)} pulls, {sum(c['args'][0] == 'fsck' for c in commands)}"
          f" fsck), "
          f"{sum(c['rc'] != 0 for c in commands)} refused as expected or not, {len(unexpected)} unexpected "
          f"failures, {len(images)} images at the end, {len(wrong)} wrong trees")
    assert len(commands) >= 16, [(c["args"][0], c["s"]) for c in commands]
    assert not unexpected, unexpected[:10]
    assert report.clean, [f.problem for f in report.findings]
    assert not wrong, wrong


@pytest.mark.parametrize("fault", ["store.write:EIO", "store.write:ENOSPC", "store.fsync:EIO",
                                   "store.fsync:ENOSPC", "store.rename:EIO", "store.rename:ENOSPC:2"])
@pytest.mark.parametrize("op", ["import-layer", "commit"])
def test_faults_at_the_store_syscall_boundary(world: World, tmp_path: Path, fault: str, op: str) -> None:
    work = str(tmp_path / "work")
    copy_store(world.root, work)
    with Store(work) as s:
        fsck(s, repair=True)  # the pristine garbage goes first: "unchanged" is then exact

    def state() -> dict[str, object]:
        with Store(work) as s:
            return {"images": {i.name: (i.manifest_digest, i.top_chain_id) for i in s.list_images()},
                    "snapshots": [x.key for x in s.list_snapshots()], "blobs": s.content.list_files(),
                    "tmp": os.listdir(s.tmp_dir), "dirs": sorted(os.listdir(os.path.join(work, "snapshots")))}

    before = state()
    args = _ops(world, str(tmp_path))[op]
    r = subprocess.run(lf_argv(work, *args), capture_output=True, text=True, timeout=300,
                       env={**os.environ, "LAYERFS_FAILPOINT_ERROR": fault})
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerfs: error: ") and "Traceback" not in r.stderr, r.stderr
    reason = os.strerror(getattr(__import__("errno"), fault.split(":")[1]))
    assert reason.lower() in lines[0].lower(), lines[0]
    assert state() == before
    with Store(work) as s:
        assert fsck(s).clean
    r = subprocess.run(lf_argv(work, *args), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert image_tree(work, MAKES[op]) == world.trees[MAKES[op]]

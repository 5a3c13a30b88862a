"""The benchmark suite works: ``python -m bench --quick`` runs every workload on every
available backend, reports ratios and targets, and leaves nothing mounted or running.

No timing assertions: the numbers of a quick run on a shared machine mean nothing; what is
checked is that they exist, and how ratios, targets, resources, comparisons and plots are
computed from them. Nothing here uses a global resource: every path is under tmp_path and
every process a test starts is stopped by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench import backends as backends_mod
from bench import compare as compare_mod
from bench.cli import bench_cmd
from bench.measure import Meter, Metric, peak_rss
from bench.report import workload_json
from bench.runner import Runner, WorkloadResult
from bench.targets import FUSE, MET, NOT_MET, SKIPPED, evaluate
from bench.workloads import Writes
from tests.support.markers import needs_root
from tests.support.paths import REPO

ROOT = REPO
WORKLOADS = ("read", "metadata", "copyup", "depth", "writes", "store", "pull")


def _leftover_mounts(path: Path) -> list[str]:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == real or p.startswith(real + "/")]


def _processes_naming(path: Path) -> list[str]:
    found = []
    needle = str(path).encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmdline and state != "Z":
            found.append(pid + ": " + cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


@needs_root
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_run_measures_everything_and_cleans_up(tmp_path: Path) -> None:
    workdir, out = tmp_path / "work", tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--workdir", str(workdir), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=540,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "== targets" in proc.stdout
    assert "bench: [" in proc.stderr  # progress goes to stderr

    # nothing left behind: no mount, no daemon, no data
    assert _leftover_mounts(tmp_path) == []
    assert _processes_naming(tmp_path) == []
    assert list(workdir.iterdir()) == []

    doc = json.loads((out / "results.json").read_text())
    # --quick: 2 rounds of every mount case, 1 of the store and pull workloads
    assert doc["quick"] is True and doc["rounds"] == 2 and doc["store_rounds"] == 1 and doc["interrupted"] is False
    machine = doc["machine"]
    for key in ("kernel", "cpu_model", "cores", "memory_bytes", "workdir_filesystem", "debian_packages",
                "python_packages"):
        assert machine[key], key
    assert "fuse-overlayfs" in machine["debian_packages"] and "pyfuse3" in machine["python_packages"]

    backends = doc["backends"]
    # --quick leaves the lever variants, unionfs-fuse and kernel-plain out
    assert set(backends) == {"native", "kernel", "layerfs-fuse", "layerfs-kernel", "fuse-overlayfs"}
    for name, info in backends.items():
        assert info["available"] or info["reason"], name  # a skipped backend says why
    available = [b for b, info in backends.items() if info["available"]]
    assert "native" in available

    assert set(doc["workloads"]) == set(WORKLOADS)
    for name, w in doc["workloads"].items():
        assert w["error"] is None, (name, w["error"])
        assert w["metrics"] and w["summary"], name
        skipped = {s for by in w["status"].values() for s, st in by.items() if st["state"] == "skipped"}
        subjects = available if w["kind"] == "mount" else [s for s in w["subjects"] if s not in skipped]
        for subject in subjects:
            samples = [s for s in w["samples"] if s["subject"] == subject]
            assert samples, f"{name}: no samples from {subject}: {w['status']}"
            assert all(s["values"] for s in samples)
            rounds = {s["round"] for s in samples if s["case"] == samples[0]["case"]}
            assert len(rounds) == (2 if w["kind"] == "mount" else 1), (name, subject, rounds)
        for row in w["summary"]:
            assert row["min_s"] <= row["median_s"] <= row["max_s"]
            reference_measured = any(r["metric"] == row["metric"] and r["subject"] == w["reference"]
                                     for r in w["summary"])
            assert (row["vs_reference"] is not None) == reference_measured, row
            if row["subject"] == "kernel" and "kernel-plain" in available:
                assert row["vs_pair"] is not None and row["pair"] == "kernel-plain"
            if row["subject"] in ("layerfs-fuse", "layerfs-kernel") and "fuse-overlayfs" in available:
                assert row["vs_pair"] is not None and row["pair"] == "fuse-overlayfs"

    fuse_daemons = [b for b in ("fuse-overlayfs", "unionfs-fuse", "layerfs-fuse", "layerfs-kernel") if b in available]
    for backend in fuse_daemons:  # the daemon's CPU seconds are recorded per sample
        assert any(s["cpu"] for s in doc["workloads"]["metadata"]["samples"] if s["subject"] == backend)

    targets = doc["targets"]
    assert len(targets) >= 12
    assert {t["status"] for t in targets} <= {MET, NOT_MET, SKIPPED}
    assert all(t["detail"] for t in targets)
    if FUSE not in available:  # the default transport's backend: the targets are its
        assert all(t["status"] == SKIPPED for t in targets if "fuse-overlayfs" in t["name"])
    if any(p.endswith(".png") for p in doc["plots"]):
        for name in ("copyup", "depth", "headline", "ratios", "resources"):
            assert (out / f"{name}.png").read_bytes().startswith(PNG), name

    # issue 14: the FUSE daemons' peak RSS and what every sample left in its upper
    for backend in fuse_daemons:
        samples = [s for s in doc["workloads"]["metadata"]["samples"] if s["subject"] == backend]
        assert all(s["rss_bytes"] > 1 << 20 for s in samples), backend
    for name in ("copyup", "writes"):
        w = doc["workloads"][name]
        for subject in available:
            rows = [r for r in w["resources"] if r["subject"] == subject]
            # a copy-up leaves the file (and its dir) in the upper; native gains no inode, only blocks
            assert rows and all(r["upper_allocated_bytes"] > 0 and (r["upper_inodes"] > 0 or subject == "native")
                                for r in rows), (name, subject, rows)
            if subject in fuse_daemons:
                assert all(r["rss_peak_bytes"] > 1 << 20 for r in rows)
        assert "daemon peak RSS" in proc.stdout and "upper growth" in proc.stdout

    # a run compared with itself: every row in common, none beyond noise
    same = subprocess.run([sys.executable, "-m", "bench", "compare", "--fail-on-regression", str(out / "results.json"),
                           str(out / "results.json")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert same.returncode == 0, same.stderr
    assert " 0 of " in same.stdout and "SLOWER" not in same.stdout


def _result(values: dict[str, dict[str, list[float]]], kind: str = "mount") -> WorkloadResult:
    subjects = sorted({s for by in values.values() for s in by})
    w = WorkloadResult("x", "x", kind, subjects, "native",
                       {FUSE: "fuse-overlayfs", "kernel": "kernel-plain"})
    for metric, by in values.items():
        for subject, samples in by.items():
            for r, v in enumerate(samples):
                meter = Meter()
                meter.record(Metric(metric), v)
                w.add("case", subject, r, meter)
    return w


def test_targets_from_medians() -> None:
    metadata = _result({
        "find cold": {FUSE: [1.0, 2.0, 9.0], "fuse-overlayfs": [2.0, 2.1, 2.2]},  # median 2.0 <= 2.1
        "find warm": {FUSE: [3.0], "fuse-overlayfs": [1.0]},
        "ls -lR cold": {FUSE: [1.0], "fuse-overlayfs": [2.0]},  # 0.5x: met, exactly
        "ls -lR warm": {"fuse-overlayfs": [1.0]},
    })
    metadata.name = "metadata"
    metadata.set_status("case", FUSE, "failed", "the daemon crashed")
    kernel = _result({"seq read warm": {"kernel": [1.04], "kernel-plain": [1.0], "native": [0.9]}})
    kernel.name = "read"
    by_name = {t.name: t for t in evaluate({"metadata": metadata, "read": kernel})}
    assert by_name["find cold <= 1.0x fuse-overlayfs"].status == MET
    assert by_name["find warm <= 1.0x fuse-overlayfs"].status == NOT_MET
    assert by_name["find warm <= 1.0x fuse-overlayfs"].value == pytest.approx(3.0)
    assert by_name["ls -lR cold <= 0.5x fuse-overlayfs"].status == MET
    warm = by_name["ls -lR warm <= 0.5x fuse-overlayfs"]
    assert warm.status == SKIPPED and "the daemon crashed" in warm.detail
    assert by_name["kernel within 5% of kernel-plain (every metric)"].status == MET
    assert by_name["import <= 1.0x ctr images import"].status == SKIPPED
    assert by_name["create files + sync <= 1.0x fuse-overlayfs"].detail == "workload writes not run"
    # issue 11: over every metric both have (find cold 2.0/2.1, find warm 3.0, ls -lR cold 0.5)
    geo = by_name["every workload: geomean <= 1.0x fuse-overlayfs"]
    assert geo.status == NOT_MET and geo.value == pytest.approx((2.0 / 2.1 * 3.0 * 0.5) ** (1 / 3))
    each = by_name["every workload: each metric <= 1.0x fuse-overlayfs"]
    assert each.status == NOT_MET and "2/3 metrics" in each.detail and "metadata/find warm 3.00×" in each.detail
    assert by_name["mount of 500 layers <= 1.0x fuse-overlayfs"].status == SKIPPED


def test_depth_targets() -> None:
    depth = WorkloadResult("depth", "depth", "mount", [FUSE, "fuse-overlayfs", "native"], "native",
                           {FUSE: "fuse-overlayfs"})
    samples = {("first stat, 1 layer", "first stat", 1): {FUSE: 1.0, "fuse-overlayfs": 1.0},
               ("first stat, 500 layers", "first stat", 500): {FUSE: 2.5, "fuse-overlayfs": 9.0},
               ("mount, 500 layers", "mount", 500): {FUSE: 0.2, "fuse-overlayfs": 0.4}}
    for (name, group, x), by in samples.items():
        for subject, v in by.items():
            meter = Meter()
            meter.record(Metric(name, group, x, True), v)
            depth.add("case", subject, 0, meter)
    by_name = {t.name: t for t in evaluate({"depth": depth})}
    flat = by_name["first stat at the deepest stack <= 2x the 1-layer figure (flat)"]
    assert flat.status == NOT_MET and flat.value == pytest.approx(2.5)
    mount = by_name["mount of 500 layers <= 1.0x fuse-overlayfs"]
    assert mount.status == MET and mount.value == pytest.approx(0.5)


PNG = b"\x89PNG\r\n\x1a\n"


def _synthetic(scale: dict[str, float], spread: float = 0.01) -> dict[str, object]:
    """A results.json document: metrics of 3 samples per backend, times ``scale[metric]``."""
    w = WorkloadResult("metadata", "metadata", "mount", ["native", FUSE, "fuse-overlayfs"], "native",
                       {FUSE: "fuse-overlayfs"})
    base = {"native": 0.1, FUSE: 0.3, "fuse-overlayfs": 0.2}
    for r in range(3):
        for subject, t in base.items():
            meter = Meter()
            for metric in ("find cold", "find warm"):
                meter.record(Metric(metric), t * scale.get(metric, 1.0) * (1 + spread * (r - 1)))
            meter.rss_bytes = (40 << 20) if subject != "native" else None
            meter.upper = {"allocated_bytes": 4096, "inodes": 1}
            w.add("find", subject, r, meter)
    return {"workloads": {"metadata": workload_json(w)}}


def test_compare_flags_a_change_beyond_the_runs_spread(tmp_path: Path) -> None:
    old, new = _synthetic({}), _synthetic({"find warm": 2.0})
    rows = compare_mod.compare(old, new)
    by = {(r["kind"], r["name"], r["subject"]): r for r in rows}
    slowed = by[("time", "find warm", FUSE)]
    assert slowed["flag"] == "slower" and slowed["ratio"] == pytest.approx(2.0)
    assert by[("time", "find cold", FUSE)]["flag"] == "" and by[("time", "find cold", FUSE)]["ratio"] == pytest.approx(1)
    assert by[("rss", "find", FUSE)]["flag"] == ""

    # a 20% change inside a spread of +-30% is noise; the same change with a tight spread is not
    noisy = compare_mod.compare(_synthetic({}, spread=0.3), _synthetic({"find cold": 1.2}, spread=0.3))
    assert not [r for r in noisy if r["flag"]]
    tight = compare_mod.compare(_synthetic({}), _synthetic({"find cold": 0.8}))
    assert {r["flag"] for r in tight if r["name"] == "find cold"} == {"faster"}

    old_path, new_path = tmp_path / "old.json", tmp_path / "new.json"
    old_path.write_text(json.dumps(old))
    new_path.write_text(json.dumps(new))
    runner = CliRunner()
    r = runner.invoke(bench_cmd, ["compare", str(old_path), str(new_path)], prog_name="bench")
    assert r.exit_code == 0, r.output
    flagged = [line for line in r.output.splitlines() if "SLOWER" in line]
    assert len(flagged) == 3 and all("find warm" in line and "2.00×" in line for line in flagged), r.output
    r = runner.invoke(bench_cmd, ["compare", "--fail-on-regression", str(old_path), str(new_path)])
    assert r.exit_code == 1
    r = runner.invoke(bench_cmd, ["compare", "--fail-on-regression", str(old_path), str(old_path)])
    assert r.exit_code == 0 and "0 of" in r.output

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    r = runner.invoke(bench_cmd, ["compare", str(broken), str(new_path)])
    assert r.exit_code == 2 and "not JSON" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def _depth_and_copyup() -> dict[str, WorkloadResult]:
    out = {}
    for name, group, xs in (("copyup", "append", (4096, 1 << 20, 1 << 30)), ("depth", "first stat", (1, 64, 1000))):
        w = WorkloadResult(name, name, "mount", ["native", FUSE, "fuse-overlayfs"], "native",
                           {FUSE: "fuse-overlayfs"})
        for r in range(3):
            for k, subject in enumerate(w.subjects):
                meter = Meter()
                for x in xs:
                    meter.record(Metric(f"{group} {x}", group, x), 1e-4 * x ** 0.5 * (k + 1) * (1 + 0.1 * r))
                meter.rss_bytes = None if subject == "native" else (30 + 10 * k) << 20
                meter.upper = {"allocated_bytes": (k + 1) << 20, "inodes": 3}
                w.add(name, subject, r, meter)
        out[name] = w
    return out


def test_plots_are_valid_png_and_svg(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the plots extra is not installed (scripts/bootstrap installs it)")
    from bench.plots import make_plots

    logged: list[str] = []
    written = make_plots(_depth_and_copyup(), str(tmp_path), logged.append, ("png", "svg"))
    names = sorted(os.path.basename(p) for p in written)
    assert names == sorted(f"{n}.{ext}" for n in ("headline", "ratios", "resources", "copyup", "depth")
                           for ext in ("png", "svg")), (names, logged)
    for path in written:
        data = Path(path).read_bytes()
        if path.endswith(".png"):
            assert data.startswith(PNG) and len(data) > 5000, path
        else:
            root = ET.fromstring(data)
            assert root.tag == "{http://www.w3.org/2000/svg}svg", path
    # the headline chart says what it is and where the legend is: the backends, outside the axes
    headline = (tmp_path / "headline.svg").read_text()
    assert "fuse-overlayfs" in headline and FUSE in headline and "native" in headline

    # without fuse-overlayfs there is no headline, and it says so
    results = _depth_and_copyup()
    for w in results.values():
        w.samples = [s for s in w.samples if s["subject"] != "fuse-overlayfs"]
    logged.clear()
    other = tmp_path / "other"
    other.mkdir()
    written = make_plots(results, str(other), logged.append)
    assert not (other / "headline.png").exists() and any("headline plot skipped" in m for m in logged)
    assert (other / "copyup.png").read_bytes().startswith(PNG)


@pytest.fixture
def eater(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A shell whose child holds 64 MiB resident until killed (stopped by PID at the end)."""
    ready = tmp_path / "ready"
    code = f"b = bytearray(64 << 20); open({str(ready)!r}, 'w').close(); import time; time.sleep(120)"
    proc = subprocess.Popen(["sh", "-c", '"$0" -c "$1" & wait', sys.executable, code])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists()
        yield proc
    finally:
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        for pid in children:
            os.kill(int(pid), 9)
        proc.kill()
        proc.wait()


def test_peak_rss_counts_the_children_of_a_daemon(eater: subprocess.Popen[bytes]) -> None:
    rss = peak_rss([eater.pid])
    assert rss is not None and rss >= 64 << 20
    assert peak_rss([]) is None


def _writes_run(tmp_path: Path, names: tuple[str, ...]) -> WorkloadResult:
    runner = Runner(str(tmp_path / "work"), 2, lambda m: None, sample_timeout=120, settle_timeout=0.5,
                    prepare_settle_timeout=0.5)
    backends = backends_mod.by_name(names)
    unavailable = runner.check_backends(backends)
    assert not unavailable, unavailable
    return runner.run(Writes(True), backends, unavailable)


def test_upper_growth_is_recorded_per_sample(tmp_path: Path) -> None:
    w = _writes_run(tmp_path, ("native",))
    assert w.error is None
    native = [s for s in w.samples if s["subject"] == "native"]
    assert len(native) == 2
    # 200 new files of 100 bytes and 50 more in lower dirs: at least a block each, on any filesystem
    assert all(s["upper"]["inodes"] == 201 + 50 and s["upper"]["allocated_bytes"] >= 250 * 512 for s in native)
    assert "rss_bytes" not in native[0]  # no daemon
    assert json.dumps(workload_json(w))  # the JSON holds it
    rows = workload_json(w)["resources"]
    assert rows[0]["subject"] == "native" and rows[0]["upper_inodes"] == 251


@needs_root
@pytest.mark.skipif(shutil.which("fuse-overlayfs") is None, reason="fuse-overlayfs is not installed")
def test_upper_growth_and_daemon_rss_of_a_fuse_backend(tmp_path: Path) -> None:
    w = _writes_run(tmp_path, ("native", "fuse-overlayfs"))
    rows = {r["subject"]: r for r in workload_json(w)["resources"]}
    fuse = rows["fuse-overlayfs"]
    # the upper holds the 200 files, the new dir and the 50 copied-up lower dirs with a file each
    assert fuse["upper_inodes"] >= 251 + 50 and fuse["upper_allocated_bytes"] >= rows["native"]["upper_allocated_bytes"]
    assert fuse["rss_peak_bytes"] > 1 << 20 and rows["native"]["rss_peak_bytes"] is None
    assert fuse["upper_vs_native"] is not None and fuse["upper_vs_native"] >= 1.0


def test_plot_jobs_run_in_workers_and_report_failures_in_order(tmp_path: Path) -> None:
    """The charts are drawn by forked workers: results come back in the jobs' order, a chart
    that raises or whose process dies is reported as that chart's failure, the others are kept."""
    from bench.plots import _run_jobs

    def run(job: tuple[tuple[str, ...], object], logs: list[str]) -> list[str]:
        name = job[0][0]
        if name == "raises":
            logs.append("plot raises failed: RuntimeError")
            return []
        if name == "dies":
            os._exit(3)
        path = tmp_path / f"{name}-{os.getpid()}"
        path.write_text(name)
        return [str(path)]

    jobs = [((n,), lambda logs: None) for n in ("a", "raises", "b", "dies", "c")]
    for workers in (1, 2):
        if workers == 1:
            jobs_here = [j for j in jobs if j[0][0] != "dies"]  # in-process, dying would end the test
        else:
            jobs_here = jobs
        done = _run_jobs(jobs_here, run, workers)  # type: ignore[arg-type]
        names = [j[0][0] for j in jobs_here]
        assert len(done) == len(names)
        for name, (paths, logs) in zip(names, done, strict=True):
            if name in ("raises", "dies"):
                assert paths == [] and len(logs) == 1 and name in logs[0], (name, logs)
            else:
                assert len(paths) == 1 and Path(paths[0]).read_text() == name and logs == []
                # in workers, every chart is drawn in a child process, never in this one
                assert (Path(paths[0]).name.endswith(f"-{os.getpid()}")) == (workers == 1)
        if workers == 2:
            assert "exited 3" in done[3][1][0]

"""containerd's own snapshotter testsuite against ``layerfs snapshotter serve``.

The Go test in ``tests/go/snapshotter`` runs ``testsuite.SnapshotterSuite`` (containerd 1.6,
``snapshots/testsuite``) with a snapshotter from containerd's gRPC proxy client
(``snapshots/proxy``), one fresh server per case; it also runs the suite's Rename case, which
containerd 1.6 skips for every snapshotter. It is built once per session, offline, from
Debian's packages (``golang-go``, ``golang-github-containerd-containerd-dev``: both in
``scripts/bootstrap``) in GOPATH mode against ``/usr/share/gocode`` (see
``tests/go/snapshotter/README.md``), then run with the kernel and with the FUSE backend.

Each Go subtest's outcome is printed (``go tool test2json``); the test fails while any case
fails, listing the failing cases with their messages. No xfail: a failing case is a bug to fix.

With the FUSE backend the suite mounts what the server describes itself: containerd's mount
package runs ``mount.fuse3 ... -t /abs/path/to/layerfs-fuse`` (the server names the program
absolutely in the type, ``fuse3./abs/path/to/layerfs-fuse``), so the Go test and the servers it
starts get a default PATH only (``DEFAULT_PATH``, no venv directory), like a stock containerd.

Whatever is left behind (a server, a FUSE daemon, a mount under the test's directory) is
stopped or unmounted afterwards, and the test fails if there was any.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GO_TEST_DIR = REPO / "tests" / "go" / "snapshotter"
GOCODE = Path("/usr/share/gocode")  # Debian's GOPATH for its golang-*-dev packages
TESTSUITE = GOCODE / "src/github.com/containerd/containerd/snapshots/testsuite"
GOCACHE = REPO / "build" / "go-cache"  # /build/ is gitignored; reused between runs
BUILD_TIMEOUT = 1200  # a cold build takes about a minute on 2 busy cores
RUN_TIMEOUT = 1200  # the fuse run takes about 75 s
MNT_DETACH = 2
DEFAULT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # what a stock containerd has: no venv bin directory

pytestmark = [
    pytest.mark.slow,
    pytest.mark.root,
    pytest.mark.timeout(BUILD_TIMEOUT + RUN_TIMEOUT + 120),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the suite mounts what the snapshotter returns"),
    pytest.mark.skipif(shutil.which("go") is None, reason="go not installed (scripts/bootstrap installs golang-go)"),
    pytest.mark.skipif(not TESTSUITE.is_dir(), reason=f"{TESTSUITE} missing (scripts/bootstrap installs "
                       "golang-github-containerd-containerd-dev)"),
]

# lines of a failing case's output that are not the failure: the suite's dump of its whole
# directory (testutil.DumpDirOnFailure), its unmount notes, and the logrus hook's debug lines
_NOISE = re.compile(r"^\s+(helpers\.go:6\d|helpers_unix\.go:\d+|log_hook\.go:\d+): ")
# causes worth naming when they show up in a failure
_HINTS = {
    "bufio.Scanner: token too long":
        "a line of /proc/self/mountinfo is longer than 64 KiB (some process's mount with very long "
        "options, e.g. a deep lowerdir+= overlay): containerd's mountinfo parser cannot read it, so "
        "its mount helper path (fuse3.*) fails; not a layerfs bug",
    "SyntaxError":
        "layerfs itself failed to import (the Python source was broken while the suite ran)",
}


# -- the Go test binary ------------------------------------------------------------------


def go_env(**extra: str) -> dict[str, str]:
    """GOPATH mode over Debian's gocode tree, strictly offline."""
    env = dict(os.environ)
    env.update(
        GO111MODULE="off",  # GOPATH mode: Debian's tree has no module cache, many deps no go.mod
        GOPATH=str(GOCODE),
        GOPROXY="off",
        GOFLAGS="",  # e.g. -mod=... is refused in GOPATH mode
        GOCACHE=str(GOCACHE),
    )
    if shutil.which("gcc") is None:
        env["CGO_ENABLED"] = "0"  # pure Go (slower: the standard library is rebuilt once)
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def testsuite_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``go test -c`` once per session, niced: the machine is shared."""
    out = tmp_path_factory.mktemp("containerd-testsuite") / "layerfs-snapshotter.test"
    GOCACHE.mkdir(parents=True, exist_ok=True)
    cmd = ["nice", "-n", "10", "go", "test", "-c", "-o", str(out), "."]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=GO_TEST_DIR, env=go_env(), capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT, stdin=subprocess.DEVNULL)
    took = time.monotonic() - start
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"building the Go test failed ({proc.returncode}) after {took:.0f}s: "
                    f"{' '.join(cmd)} in {GO_TEST_DIR}\n{proc.stdout}\n{proc.stderr}", pytrace=False)
    print(f"built {out} in {took:.1f}s")
    return out


# -- reading go test -v ------------------------------------------------------------------


@dataclass
class Case:
    name: str
    action: str = "run"  # pass, fail, skip; "run" if it never finished (a panic, a timeout)
    elapsed: float = 0.0
    output: list[str] = field(default_factory=list)

    def message(self, max_lines: int = 150) -> str:
        lines = [ln.rstrip("\n") for ln in self.output
                 if not _NOISE.match(ln) and not ln.startswith(("=== ", "--- ", "    --- "))
                 and ln.strip() not in ("", "PASS", "FAIL")]
        if len(lines) > max_lines:
            lines = lines[:max_lines] + [f"    ... ({len(lines) - max_lines} more lines)"]
        return "\n".join(lines)


def parse_test2json(events: str) -> dict[str, Case]:
    cases: dict[str, Case] = {}
    for line in events.splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        name = ev.get("Test")
        if not name:
            continue
        case = cases.setdefault(name, Case(name))
        action = ev.get("Action")
        if action == "output":
            case.output.append(ev.get("Output", ""))
        elif action in ("pass", "fail", "skip"):
            case.action = action
            case.elapsed = float(ev.get("Elapsed") or 0.0)
    return cases


def leaves(cases: dict[str, Case]) -> list[Case]:
    """The cases without subtests (TestX/Y, or a TestX that has none)."""
    return [c for n, c in cases.items() if not any(o.startswith(n + "/") for o in cases)]


# -- leftovers ---------------------------------------------------------------------------


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def pids_mentioning(needle: str) -> list[int]:
    """Live processes (not this one) whose command line names ``needle``, a unique temp dir:
    our servers (``--root DIR/...``) and FUSE daemons (``lowerdir=DIR/...``)."""
    me = os.getpid()
    return [int(e) for e in os.listdir("/proc")
            if e.isdigit() and int(e) != me and needle in _cmdline(int(e)) and not _is_zombie(int(e))]


def mounts_under(base: Path) -> list[str]:
    """Mount points at or below ``base`` in /proc/self/mountinfo, deepest first."""
    prefix = str(base).rstrip("/") + "/"
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = line.split()[4]
        for esc, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
            target = target.replace(esc, ch)
        if target == str(base) or target.startswith(prefix):
            found.append(target)
    return sorted(found, key=lambda t: t.count("/"), reverse=True)


def clean_up(base: Path, grace: float = 10.0) -> list[str]:
    """Unmount what is mounted under ``base`` and stop processes naming it (by PID: SIGTERM,
    then SIGKILL); returns what there was. A FUSE daemon whose mount the suite just detached
    exits by itself: it gets ``grace`` seconds first."""
    left: list[str] = []
    libc = ctypes.CDLL(None, use_errno=True)
    for target in mounts_under(base):
        left.append(f"mount {target}")
        if libc.umount2(target.encode(), MNT_DETACH) != 0:
            left.append(f"umount {target}: {os.strerror(ctypes.get_errno())}")
    deadline = time.monotonic() + grace
    while pids_mentioning(str(base)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids_mentioning(str(base)):
        left.append(f"process {pid}: {_cmdline(pid)}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            for _ in range(50):
                if _is_zombie(pid):
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
    return left


# -- the test ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["kernel", "fuse"])
def test_containerd_snapshotter_testsuite(backend: str, testsuite_binary: Path, tmp_path: Path,
                                          request: pytest.FixtureRequest) -> None:
    if backend == "fuse" and shutil.which("mount.fuse3") is None:
        pytest.skip("mount.fuse3 not installed (scripts/bootstrap installs fuse3)")
    if any(ch.isspace() for ch in sys.executable):
        pytest.skip(f"LAYERFS_CMD is split on blanks: {sys.executable!r} has one")
    # the suite's directories go here: a short path, as each holds a unix socket (108 bytes)
    base = Path(tempfile.mkdtemp(prefix="lfs-cts-", dir="/tmp"))

    def finalize() -> None:  # also after a failure or an interrupt: stop, unmount, remove
        clean_up(base, grace=2.0)
        shutil.rmtree(base, ignore_errors=True)

    request.addfinalizer(finalize)
    logs = tmp_path / "server-logs"
    logs.mkdir()
    env = dict(
        os.environ,
        LAYERFS_CMD=f"{sys.executable} -m layerfs",
        LAYERFS_BACKEND=backend,
        LAYERFS_LOG_DIR=str(logs),
        TMPDIR=str(base),
        # mount.fuse3 is in /sbin; layerfs-fuse is named absolutely by the mount type
        PATH=DEFAULT_PATH,
    )
    output = tmp_path / "go-test.out"
    cmd = [str(testsuite_binary), "-test.v", "-test.timeout", f"{RUN_TIMEOUT - 60}s"]
    start = time.monotonic()
    with open(output, "wb") as out:
        # cwd: the checkout, so ``python -m layerfs`` runs this tree's source
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()  # that PID only; its servers are found by clean_up below
            rc = proc.wait()
    took = time.monotonic() - start
    leftovers = clean_up(base)

    raw = output.read_text(errors="replace")
    events = subprocess.run(["go", "tool", "test2json", "-t", "-p", "layerfs"], input=raw, text=True,
                            capture_output=True, env=go_env()).stdout
    cases = parse_test2json(events)
    results = leaves(cases)
    print(f"containerd snapshotter testsuite, backend {backend}: exit {rc} after {took:.1f}s "
          f"(go test -v output: {output}; server logs: {logs})")
    for c in results:
        print(f"  {c.action.upper():4} {c.name} ({c.elapsed:.2f}s)")
    failing = [c for c in results if c.action not in ("pass", "skip")]
    # a parent that failed on its own (not only through its subtests) counts too
    failing += [c for n, c in cases.items() if c.action == "fail" and c not in results
                and not any(o.action == "fail" for m, o in cases.items() if m.startswith(n + "/"))]

    problems = []
    if failing:
        problems.append(f"{len(failing)} of {len(results)} cases failed: {', '.join(c.name for c in failing)}")
        for c in failing:
            problems.append(f"--- {c.name} ({c.action}):\n{c.message() or '(no output)'}")
        hints = {hint for c in failing for key, hint in _HINTS.items() if key in "".join(c.output)}
        problems += [f"note: {h}" for h in sorted(hints)]
    if rc != 0 and not failing:
        tail = "\n".join(raw.splitlines()[-60:])
        problems.append(f"the Go test exited {rc} without a failing case (a panic, a timeout, a build "
                        f"problem?):\n{tail}")
    if not results:
        problems.append(f"no Go test case ran:\n{raw[-4000:]}")
    if leftovers:
        problems.append("left behind (now cleaned up):\n  " + "\n  ".join(leftovers))
    assert not problems, f"backend {backend}:\n" + "\n".join(problems)

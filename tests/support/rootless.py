"""Running layerfs as an unprivileged user, for the rootless tests.

The main venv cannot be run by another user: its interpreter lives in a 0700 home. So this
module builds a second venv from Debian's ``/usr/bin/python3`` in a world-readable directory
under ``/var/tmp`` (named for this checkout), with layerfs installed into it from a copy of
the checkout's sources (non-editable: the checkout itself may be under a 0700 directory).
It is cached: the venv with layerfs' dependencies by a hash of ``pyproject.toml``, the
layerfs install by a hash of ``pyproject.toml`` and the sources, so a run after a change of
the sources only reinstalls layerfs (``--no-deps``).

``RootlessSession`` (a context manager; the test modules make it a session fixture):

- creates, or reuses, the system user ``USER`` (``useradd --system --create-home``) with
  subordinate uid/gid ranges in ``/etc/subuid`` and ``/etc/subgid`` (``usermod
  --add-subuids``), for rootless podman's ``newuidmap``;
- makes ``/dev/fuse`` mode 0666, as Debian's udev rule does (restored on exit);
- runs commands as that user (``runuser``, a clean environment: ``run``, ``layerfs``);
- gives each test a directory in the user's home, owned by the user (``workdir``);
- holds ``LOCK`` while it runs: one session of the user at a time;
- makes the user and the venv under ``BUILD_LOCK``: one process at a time;
- on exit checks that no process of the user is left and nothing is mounted under its home
  (an error listing them, after lazily unmounting what is left), and removes every file of
  the user's home.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path

from tests.support.paths import REPO

USER = "layerfs-rootless"
HOME = Path("/var/tmp/layerfs-rootless-home")
SYSTEM_PYTHON = "/usr/bin/python3"
LOCK = "/var/tmp/layerfs-rootless.lock"  # held while a session runs (it owns the user's home)
BUILD_LOCK = "/var/tmp/layerfs-rootless-build.lock"  # held while the user or the venv is made
SUBID_COUNT = 65536
SOURCES = ("layerfs", "snapshotter", "bench")
EXTRA_FILES = ("pyproject.toml", "README.md", "LICENSE")
PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"


def cache_dir() -> Path:
    """The world-readable directory of this checkout's rootless venv."""
    return Path("/var/tmp") / f"layerfs-rootless-venv-{hashlib.sha256(str(REPO).encode()).hexdigest()[:12]}"


def _source_files() -> list[Path]:
    files = [REPO / f for f in EXTRA_FILES]
    for top in SOURCES:
        for p in sorted((REPO / top).rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc",):
                files.append(p)
    return files


def _digest(files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(REPO)).encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()


def _pip(venv: Path, *args: str) -> None:
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "-q", "--disable-pip-version-check", *args],
                   check=True, stdin=subprocess.DEVNULL, capture_output=True, text=True)


def build_venv() -> tuple[Path, float]:
    """The rootless venv (built or reused) and how many seconds building it took now."""
    start = time.monotonic()
    base = cache_dir()
    venv = base / "venv"
    base.mkdir(mode=0o755, exist_ok=True)
    os.chmod(base, 0o755)
    pyproject = (REPO / "pyproject.toml").read_bytes()
    deps_hash = hashlib.sha256(pyproject).hexdigest()
    deps_stamp = venv / ".layerfs-deps"
    if not deps_stamp.exists() or deps_stamp.read_text() != deps_hash:
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(venv)], check=True, capture_output=True, text=True)
        deps = tomllib.loads(pyproject.decode())["project"]["dependencies"]
        _pip(venv, "install", "setuptools>=77", "wheel", *deps)
        deps_stamp.write_text(deps_hash)
        (venv / ".layerfs-src").unlink(missing_ok=True)
    files = _source_files()
    src_hash = _digest(files)
    src_stamp = venv / ".layerfs-src"
    if not src_stamp.exists() or src_stamp.read_text() != src_hash:
        src = base / "src"
        shutil.rmtree(src, ignore_errors=True)
        for p in files:
            dest = src / p.relative_to(REPO)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dest)
        _pip(venv, "install", "--no-deps", "--no-build-isolation", "--force-reinstall", str(src))
        shutil.rmtree(src / "build", ignore_errors=True)
        src_stamp.write_text(src_hash)
    subprocess.run(["chmod", "-R", "a+rX,go-w", str(base)], check=True)
    return venv, time.monotonic() - start


def _subid_range(path: str, name: str) -> tuple[int, int] | None:
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        fields = line.split(":")
        if len(fields) == 3 and fields[0] == name:
            return int(fields[1]), int(fields[2])
    return None


def _free_subid_start() -> int:
    end = 100000
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            for line in Path(path).read_text().splitlines():
                fields = line.split(":")
                if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                    end = max(end, int(fields[1]) + int(fields[2]))
        except FileNotFoundError:
            pass
    return end


def ensure_user() -> pwd.struct_passwd:
    """The test user, created if missing, with subordinate id ranges."""
    try:
        pw = pwd.getpwnam(USER)
    except KeyError:
        HOME.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["useradd", "--system", "--create-home", "--home-dir", str(HOME), "--shell", "/bin/sh",
                        "--user-group", USER], check=True, capture_output=True, text=True)
        pw = pwd.getpwnam(USER)
    if not HOME.is_dir():
        HOME.mkdir(mode=0o700)
        os.chown(HOME, pw.pw_uid, pw.pw_gid)
    if _subid_range("/etc/subuid", USER) is None or _subid_range("/etc/subgid", USER) is None:
        start = _free_subid_start()
        end = start + SUBID_COUNT - 1
        subprocess.run(["usermod", "--add-subuids", f"{start}-{end}", "--add-subgids", f"{start}-{end}", USER],
                       check=True, capture_output=True, text=True)
    return pw


class RootlessSession:
    """The test user, its venv and ``/dev/fuse`` made usable; see the module docstring."""

    def __init__(self) -> None:
        # the user and the venv are made by one process at a time (pytest-xdist workers, or two
        # pytest runs): useradd, usermod and pip racing each other would fail or half-build
        build_lock = os.open(BUILD_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(build_lock, fcntl.LOCK_EX)
            self.pw = ensure_user()
            self.venv, self.build_seconds = build_venv()
        finally:
            os.close(build_lock)
        self.uid, self.gid = self.pw.pw_uid, self.pw.pw_gid
        self.home = HOME
        self.bin = self.venv / "bin"
        self._fuse_mode: int | None = None
        self._workdirs = 0

    def __enter__(self) -> RootlessSession:
        # one session of the user at a time: a session's exit removes the user's files
        self._lock = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        mode = os.stat("/dev/fuse").st_mode & 0o7777
        if mode & 0o666 != 0o666:
            self._fuse_mode = mode
            os.chmod("/dev/fuse", 0o666)
        return self

    def __exit__(self, *exc: object) -> None:
        problems: list[str] = []
        left = self.processes()
        if left:
            problems.append(f"processes of {USER} left running: {left}")
        mounted = self.mounts()
        for m in reversed(mounted):
            subprocess.run(["umount", "-l", m], capture_output=True)
        if mounted:
            problems.append(f"mounts left under {self.home}: {mounted}")
        self.clean_home()
        if self._fuse_mode is not None:
            os.chmod("/dev/fuse", self._fuse_mode)
        os.close(self._lock)
        if problems and exc[0] is None:
            raise AssertionError("; ".join(problems))

    # --- what the user has ------------------------------------------------------------------

    def processes(self, wait: float = 5.0) -> list[str]:
        """The user's live processes (zombies are gone), after waiting up to ``wait`` seconds
        for ones that are just exiting."""
        deadline = time.monotonic() + wait
        while True:
            found = self._processes()
            if not found or time.monotonic() > deadline:
                return found
            time.sleep(0.1)

    def _processes(self) -> list[str]:
        out = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                st = os.stat(f"/proc/{entry}")
                if st.st_uid != self.uid:
                    continue
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = Path(f"/proc/{entry}/stat").read_bytes().rpartition(b")")[2].split()[0]
            except (OSError, IndexError):
                continue
            if state in (b"Z", b"X"):
                continue
            out.append(f"{entry} {cmd.strip()}")
        return out

    def mounts(self) -> list[str]:
        home = str(self.home) + "/"
        found = []
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                mp = line.split()[4].encode().decode("unicode_escape")
                if mp.startswith(home):
                    found.append(mp)
        return found

    def clean_home(self) -> None:
        for child in self.home.iterdir():
            rm(child)

    # --- running as the user ------------------------------------------------------------------

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {"HOME": str(self.home), "USER": USER, "LOGNAME": USER, "PATH": f"{self.bin}:{PATH}",
               "LANG": "C.UTF-8", "XDG_DATA_HOME": str(self.home / ".local/share"),
               "XDG_RUNTIME_DIR": str(self.home / ".run"), "TMPDIR": str(self.home / ".tmp")}
        env.update(extra or {})
        return env

    def argv(self, argv: Sequence[str | os.PathLike[str]], env: dict[str, str] | None = None) -> list[str]:
        """``argv`` run as the user with a clean environment (``runuser``, then ``env -i``)."""
        assignments = [f"{k}={v}" for k, v in self.env(env).items()]
        return ["runuser", "-u", USER, "--", "/usr/bin/env", "-i", *assignments, *map(str, argv)]

    def run(self, *argv: str | os.PathLike[str], check: bool = True, env: dict[str, str] | None = None,
            cwd: Path | None = None, timeout: float = 300.0, input: str | None = None,
            ) -> subprocess.CompletedProcess[str]:
        for d in (".run", ".tmp"):
            p = self.home / d
            if not p.is_dir():
                p.mkdir(mode=0o700)
                os.chown(p, self.uid, self.gid)
        r = subprocess.run(self.argv(argv, env), capture_output=True, text=True, timeout=timeout,
                           cwd=cwd or self.home, input=input, stdin=None if input is not None else subprocess.DEVNULL)
        if check and r.returncode != 0:
            shown = " ".join(map(str, argv))
            raise AssertionError(f"as {USER}: {shown[:300]}{'...' if len(shown) > 300 else ''} exited {r.returncode}\n"
                                 f"stdout: {r.stdout}\nstderr: {r.stderr}")
        return r

    def layerfs(self, root: Path, *args: str | os.PathLike[str], check: bool = True,
                userns: bool = False, **kw: object) -> subprocess.CompletedProcess[str]:
        """``layerfs --root ROOT ARGS`` as the user; with ``userns`` inside
        ``unshare --user --map-root-user --mount`` (the mount lives and dies with that command)."""
        argv: list[str | os.PathLike[str]] = [self.bin / "layerfs", "--root", root, *args]
        if userns:
            argv = ["unshare", "--user", "--map-root-user", "--mount", *argv]
        return self.run(*argv, check=check, **kw)  # type: ignore[arg-type]

    def mounted(self, root: Path, name: str, mountpoint: Path, *, backend: str = "auto", userns: bool = False,
                commands: str = "", check: bool = True, env: dict[str, str] | None = None,
                ) -> subprocess.CompletedProcess[str]:
        """As the user (in a user namespace with ``userns``): ``layerfs --debug mount`` NAME,
        run the shell ``commands`` in the mount, print its ``tree`` (last line of stdout) and
        unmount, whatever failed (one shell: a user namespace's mount lives only as long as it)."""
        lf = f"{shlex.quote(str(self.bin / 'layerfs'))} --root {shlex.quote(str(root))}"
        mnt = shlex.quote(str(mountpoint))
        script = (f"set -e; {lf} --debug mount --backend {backend} {shlex.quote(name)} {mnt}; "
                  f"trap '{lf} umount {mnt}' EXIT; "
                  + (f"(cd {mnt} && {commands}); " if commands else "")
                  + f"{shlex.quote(str(self.bin / 'python'))} -c {shlex.quote(TREE_SCRIPT)} {mnt}")
        argv: list[str | os.PathLike[str]] = ["/bin/sh", "-c", script]
        if userns:
            argv = ["unshare", "--user", "--map-root-user", "--mount", *argv]
        return self.run(*argv, check=check, env=env)

    def workdir(self, name: str) -> Path:
        """A fresh directory in the user's home, owned by the user."""
        self._workdirs += 1
        d = self.home / f"{self._workdirs:03d}-{name}"[:80]
        rm(d)
        d.mkdir(mode=0o755)
        os.chown(d, self.uid, self.gid)
        return d

    def give(self, path: Path) -> None:
        """Make ``path`` (a tree root made it) the user's."""
        subprocess.run(["chown", "-R", f"{self.uid}:{self.gid}", str(path)], check=True)


def tree(root: str) -> dict[str, str]:
    """A mounted tree as ``{path: description}``: type, permission bits, and a file's size and
    sha256, a symlink's target, a device's numbers. Owners are left out (an unprivileged
    store keeps none but its user's); so are times. Runs in the test user's venv too
    (``TREE_SCRIPT``), so it uses nothing but the standard library."""
    import hashlib
    import os
    import stat

    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            perm = oct(stat.S_IMODE(st.st_mode))
            if stat.S_ISDIR(st.st_mode):
                out[rel] = f"dir {perm}"
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = f"symlink -> {os.readlink(path)}"
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()[:16]
                out[rel] = f"file {perm} {st.st_size} {digest}"
            else:
                out[rel] = f"special {stat.S_IFMT(st.st_mode):o} {perm} {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return out


TREE_SCRIPT = inspect.getsource(tree) + "\nimport json, sys\nprint(json.dumps(tree(sys.argv[1])))\n"


def parse_tree(stdout: str) -> dict[str, str]:
    """``TREE_SCRIPT``'s output (its last line), parsed."""
    return dict(json.loads(stdout.strip().splitlines()[-1]))


def rm(path: Path) -> None:
    """Remove a tree, whatever its modes (as root)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        subprocess.run(["chmod", "-R", "u+rwX", str(path)], capture_output=True)
        shutil.rmtree(path)


if __name__ == "__main__":  # build (or check) the venv and say how long it took
    v, seconds = build_venv()
    print(f"{v} ready in {seconds:.1f}s", file=sys.stderr)

"""podman and buildah on ``layerfs-fuse`` as containers/storage's ``mount_program``.

Debian's podman (4.3) and buildah (1.28) drive containers/storage's overlay driver, which
with a ``mount_program`` runs ``PROGRAM -o lowerdir=...,upperdir=...,workdir=...,,volatile
MERGED`` for every container and build step; its lower layers are ``overlay/l/<short id>``
symlinks. The same scenario runs twice, each time in a private podman (``storage.conf`` and
``containers.conf`` of its own under a short temp dir in /tmp: graphroot, runroot, tmp dir, file locks, no
network, cgroupfs, file events, ulimits the sandbox grants): first with fuse-overlayfs as
``mount_program`` (the control), then with ``layerfs-fuse`` (a wrapper script running
``sys.executable -m layerfs.fuse.main``). Each check must show what it is about on both
(``test_check_shows_what_it_must``), and its normalized output (ids by order of appearance,
the FUSE type name) must be the same on both (``test_layerfs_matches_fuse_overlayfs``).

The image, built by umoci and loaded with ``podman load`` of an OCI archive (skopeo): busybox;
a whiteout (``etc/doomed.txt``), an opaque directory (``op``, a verbatim ``.wh..wh..opq``
layer: umoci never writes one), two names of one file (``hl/a``, ``hl/b``), a setuid file,
a directory to rename (``mv``), files to append to, chmod and delete.

Checks: ``podman run`` (whiteout and opaque directory honoured, hard links, the setuid bit
and a mount without nosuid, writes, copy-up, renaming a lower directory, replacing one with
``rm -r`` + ``mkdir``), ``podman diff``, ``podman mount`` (the tree, the FUSE type),
``podman export``, ``podman commit`` and a run of the committed image, ``podman image
tree``, ``podman build`` of a multi-step Containerfile (RUN steps changing lower files, a
rename, COPY), a build step renaming one lower directory and replacing another, a failing
build (leaves nothing mounted), ``buildah from/run/commit``.

Two names of a lower hard link are one file (``test -ef``, a hard link in ``podman export``)
and stay one after appending through one of them, on both. A known control bug
(``CONTROL_BUILD_BUG``) is xfail(strict=True), and that check is then only asserted on
layerfs (its comparison is xfail too), so a fix shows.

Teardown, per podman, right after its scenario: ``podman unmount -a``/``rm -a``, ``buildah
rm -a``; then every mount under the temp dir is detached lazily (containers/storage's private
bind mount of ``GRAPHROOT/overlay`` on itself is expected; anything else is a leftover) and
every process whose command line names the temp dir (FUSE daemons, conmon) is stopped by
pid; ``test_nothing_left_mounted_or_running`` asserts there were no leftovers.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import resource
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.containerd_util import kill_pid, mounts_under, pids_mentioning
from tests.support.imagebuild import Layer, build_busybox_image, layer_tar, opaque, run
from tests.support.markers import needs_root, needs_skopeo, needs_umoci

PODMAN = shutil.which("podman")
BUILDAH = shutil.which("buildah")
FUSE_OVERLAYFS = shutil.which("fuse-overlayfs") or "/usr/bin/fuse-overlayfs"
needs_podman = pytest.mark.skipif(
    PODMAN is None or BUILDAH is None,
    reason="podman and buildah not installed (scripts/bootstrap installs Debian's podman, buildah, uidmap)",
)
pytestmark = [needs_root, needs_umoci, needs_skopeo, needs_podman, pytest.mark.slow]

CONTROL, LAYERFS = "fuse-overlayfs", "layerfs-fuse"
PROGRAMS = (CONTROL, LAYERFS)
BASE_IMAGE = "localhost/layerfs-test/base:v1"
COMMITTED = "localhost/layerfs-test/committed:v1"
BUILT = "localhost/layerfs-test/built:v1"
BUILDAH_IMAGE = "localhost/layerfs-test/buildah:v1"
TIMEOUT = 300.0
MNT_DETACH = 2
RUN_NETWORKS = Path("/run/containers/networks")
_libc = ctypes.CDLL(None, use_errno=True)
APPLETS = ("sh", "ls", "cat", "echo", "true", "false", "stat", "mv", "rm", "mkdir", "find", "sort", "chmod",
           "tr", "wc", "test", "[", "awk", "sed", "grep", "touch", "id", "cp")

# --- the image -----------------------------------------------------------------------------


def _base_tree(root: Path) -> None:
    """Layer 1 (besides busybox): what the checks change, hard links and a setuid file."""
    for applet in APPLETS:
        if not os.path.lexists(root / "bin" / applet):
            (root / "bin" / applet).symlink_to("busybox")
    for d in ("etc", "tmp", "proc", "sys", "dev", "run", "root", "var", "op", "mv/sub", "data", "hl"):
        (root / d).mkdir(parents=True, exist_ok=True)
    files = {"etc/doomed.txt": "deleted in layer 2\n", "etc/kept.txt": "kept\n", "op/old.txt": "hidden by layer 3\n",
             "mv/top.txt": "top\n", "mv/sub/deep.txt": "deep\n", "data/lower.txt": "lower\n",
             "data/mode.txt": "mode\n", "data/gone.txt": "to delete\n", "hl/a": "linked\n"}
    for path, text in files.items():
        (root / path).write_text(text)
    os.link(root / "hl/a", root / "hl/b")
    (root / "bin/suid").write_text("#!/bin/sh\necho setuid\n")
    (root / "bin/suid").chmod(0o4755)


IMAGE_LAYERS = (
    Layer(busybox=True, edit=_base_tree, created_by="base"),
    Layer(files={"etc/hello.txt": "hello from layer 2\n"}, delete=["etc/doomed.txt"], created_by="whiteout"),
    Layer(raw_tar=layer_tar({opaque("op"): "", "op/new.txt": "new in layer 3\n"}), created_by="opaque"),
)


def build_image(work: Path) -> Path:
    """The test image as an OCI archive whose ref name ``podman load`` takes as the image's name."""
    layout = build_busybox_image(work, layers=IMAGE_LAYERS, tag="v1")
    out = work / "base.oci.tar"
    run("skopeo", "--insecure-policy", "copy", "-q", f"oci:{layout}:v1", f"oci-archive:{out}:{BASE_IMAGE}",
        tmpdir=work)
    return out


@pytest.fixture(scope="module")
def image_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_image(tmp_path_factory.mktemp("podman-image"))


# --- a private podman ------------------------------------------------------------------------


def _default_ulimits() -> list[str]:
    """podman's defaults (RLIMIT_NOFILE and RLIMIT_NPROC 1048576) are above what a sandbox
    may grant without CAP_SYS_RESOURCE, and runc then fails to set them: ask for what we have.
    podman 4.3 as root lowers its own RLIMIT_NPROC to kernel.pid_max (seen: 32768), so runc
    can set no more than that."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    try:
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        pid_max = nproc
    limits = []
    if nofile != resource.RLIM_INFINITY:
        limits.append(f"nofile={nofile}:{nofile}")
    nproc = pid_max if nproc == resource.RLIM_INFINITY else min(nproc, pid_max)
    limits.append(f"nproc={nproc}:{nproc}")
    return limits


@dataclass
class Podman:
    """podman and buildah with their own configuration, storage and state under ``base``."""

    base: Path
    program: str
    leftovers: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        b = self.base
        # podman 4.3 as root makes /run/containers/networks (netavark's run dir) whatever
        # containers.conf says: removed again at teardown if it was not there before
        self.run_dirs = [d for d in (RUN_NETWORKS, RUN_NETWORKS.parent) if not d.exists()]
        self.graphroot, self.runroot = b / "graphroot", b / "runroot"
        for d in (self.graphroot, self.runroot, b / "tmp", b / "cni", b / "work"):
            d.mkdir(parents=True, exist_ok=True)
        if self.program == LAYERFS:
            wrapper = b / "layerfs-fuse"
            wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m layerfs.fuse.main --log {b}/layerfs-fuse.log "$@"\n')
            wrapper.chmod(0o755)
            mount_program = str(wrapper)
        else:
            mount_program = FUSE_OVERLAYFS
        (b / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{self.graphroot}"\nrunroot = "{self.runroot}"\n'
            f'[storage.options.overlay]\nmount_program = "{mount_program}"\n')
        ulimits = ", ".join(f'"{u}"' for u in _default_ulimits())
        (b / "containers.conf").write_text(
            f'[containers]\nnetns = "none"\ndefault_ulimits = [{ulimits}]\n'
            f'[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
            f'events_logfile_path = "{b}/events.log"\ntmp_dir = "{b}/tmp"\nlock_type = "file"\n'
            f'[network]\nnetwork_config_dir = "{b}/cni"\n')
        (b / "registries.conf").write_text('unqualified-search-registries = []\n')
        self.env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(b / "storage.conf"),
                    "CONTAINERS_CONF": str(b / "containers.conf"),
                    "CONTAINERS_REGISTRIES_CONF": str(b / "registries.conf"), "TMPDIR": str(b / "tmp")}

    def _run(self, tool: str | None, args: tuple[str, ...], check: bool, cwd: Path | None
             ) -> subprocess.CompletedProcess[str]:
        assert tool is not None
        proc = subprocess.run([tool, *args], env=self.env, capture_output=True, text=True, timeout=TIMEOUT,
                              cwd=cwd or self.base)
        if check and proc.returncode != 0:
            raise AssertionError(f"{Path(tool).name} {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stderr[-4000:]}\n{self.fuse_log()}")
        return proc

    def podman(self, *args: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return self._run(PODMAN, args, check, cwd)

    def buildah(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run(BUILDAH, args, check, None)

    def fuse_log(self) -> str:
        log = self.base / "layerfs-fuse.log"
        return f"--- layerfs-fuse log ---\n{log.read_text()[-4000:]}" if log.exists() else ""

    def storage_mounts(self) -> list[str]:
        """Mounts under the temp dir other than the driver's bind mount of its home on itself."""
        home = str(self.graphroot / "overlay")
        return [m for m in mounts_under(self.base) if m != home]

    def teardown(self) -> None:
        self.podman("unmount", "--all", "--force", check=False)
        self.podman("rm", "--all", "--force", check=False)
        self.buildah("rm", "--all", check=False)
        self._wait_for_podman()
        for target in mounts_under(self.base):
            if target != str(self.graphroot / "overlay"):
                self.leftovers.append(f"mount {target}")
            if _libc.umount2(target.encode(), MNT_DETACH) != 0:
                self.leftovers.append(f"umount {target}: {os.strerror(ctypes.get_errno())}")
        deadline = time.monotonic() + 10
        while (pids := pids_mentioning(str(self.base))) and time.monotonic() < deadline:
            time.sleep(0.1)  # FUSE daemons exit once unmounted
        for pid in pids:
            self.leftovers.append(f"process {pid}: {_cmdline(pid)}")
            kill_pid(pid)
        for d in self.run_dirs:
            with contextlib.suppress(OSError):  # not empty: someone else's by now
                d.rmdir()

    def _wait_for_podman(self) -> None:
        """conmon runs ``podman container cleanup`` after a container exits: let it finish."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if not [p for p in pids_mentioning(str(self.base)) if not _is_fuse_daemon(p)]:
                return
            time.sleep(0.1)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _is_fuse_daemon(pid: int) -> bool:
    cmd = _cmdline(pid)
    return "fuse-overlayfs" in cmd or "layerfs.fuse.main" in cmd


# --- normalizing ---------------------------------------------------------------------------


HEX_ID = re.compile(r"\b[0-9a-f]{64}\b|\b[0-9a-f]{12}\b")


def normalize(text: str) -> str:
    """Ids by order of appearance (``<id1>``...), the FUSE type name as ``<fuse>``."""
    ids: dict[str, str] = {}

    def name(m: re.Match[str]) -> str:
        full = m.group(0)
        key = next((k for k in ids if k.startswith(full) or full.startswith(k)), full)
        return ids.setdefault(key, f"<id{len(ids) + 1}>")

    text = HEX_ID.sub(name, text)
    return text.replace(CONTROL, "<fuse>").replace(LAYERFS, "<fuse>")


def tree_listing(root: Path) -> str:
    """Every entry below ``root``: type, mode, owner, size and sha256 of files, link targets
    (directory sizes and link counts are the FUSE server's own business)."""
    lines = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for n in sorted(dirnames + filenames):
            p = Path(dirpath) / n
            st = p.lstat()
            rel = p.relative_to(root)
            desc = f"{rel} {stat.filemode(st.st_mode)} {st.st_uid}:{st.st_gid}"
            if stat.S_ISREG(st.st_mode):
                desc += f" {st.st_size} nlink={st.st_nlink} {hashlib.sha256(p.read_bytes()).hexdigest()[:16]}"
            elif stat.S_ISLNK(st.st_mode):
                desc += f" -> {os.readlink(p)}"
            lines.append(desc)
    return "\n".join(lines)


def tar_listing(path: Path) -> str:
    """A tar's members (sorted): name, type, mode, owner, size, content hash, link target."""
    lines = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            desc = f"{m.name} {m.type.decode()} {m.mode:o} {m.uid}:{m.gid}"
            if m.isreg():
                f = tar.extractfile(m)
                assert f is not None
                desc += f" {m.size} {hashlib.sha256(f.read()).hexdigest()[:16]}"
            elif m.issym() or m.islnk():
                desc += f" -> {m.linkname}"
            lines.append(desc)
    return "\n".join(sorted(lines))


def mount_fstype(target: str) -> str:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == target:
            return fields[fields.index("-") + 1]
    return "not mounted"


# --- the scenario --------------------------------------------------------------------------

# in a container of the base image: read what the layers say, then change it
RUN_SCRIPT = r"""
echo "hello: $(cat /etc/hello.txt)"
[ -e /etc/doomed.txt ] && echo doomed-present || echo doomed-absent
echo "op: $(ls -A /op | tr '\n' ' ')"
stat -c 'hl %n nlink=%h size=%s' /hl/a /hl/b
stat -c 'suid %A %u:%g' /bin/suid
awk '$5 == "/" { print "root mount:", ($6 ~ /nosuid/ ? "nosuid" : "suid") }' /proc/self/mountinfo
echo written > /tmp/new.txt && echo "new: $(cat /tmp/new.txt)"
echo appended >> /data/lower.txt && echo "lower: $(cat /data/lower.txt | tr '\n' ' ')"
chmod 600 /data/mode.txt && stat -c 'mode %a %s' /data/mode.txt
mv /mv /moved && ([ -e /mv ] && echo mv-present || echo mv-gone)
find /moved | sort
cat /moved/sub/deep.txt /moved/top.txt
echo added > /moved/sub/added.txt && echo "moved/sub: $(ls /moved/sub | tr '\n' ' ')"
mkdir /mv && echo "mv again: $(ls -A /mv | wc -l) entries"
rm /data/gone.txt && ([ -e /data/gone.txt ] && echo gone-present || echo gone-removed)
rm -r /op && mkdir /op && echo fresh > /op/fresh.txt && echo "op after: $(ls -A /op | tr '\n' ' ')"
rm /etc/kept.txt && ls /etc | grep -v -e hostname -e hosts -e resolv -e mtab | tr '\n' ' ' && echo
"""
RUN_EXPECT = ["hello: hello from layer 2", "doomed-absent", "op: new.txt ", "hl /hl/a nlink=2 size=7",
              "hl /hl/b nlink=2 size=7", "suid -rwsr-xr-x 0:0", "root mount: suid", "new: written",
              "lower: lower appended ", "mode 600 5", "mv-gone",
              "/moved\n/moved/sub\n/moved/sub/deep.txt\n/moved/top.txt", "deep\ntop", "moved/sub: added.txt deep.txt ",
              "mv again: 0 entries", "gone-removed", "op after: fresh.txt ", "hello.txt "]

# in the committed image: what the container changed
VERIFY_SCRIPT = r"""
for f in /etc/doomed.txt /etc/kept.txt /data/gone.txt /mv/top.txt /op/new.txt /op/old.txt; do
  [ -e $f ] && echo "$f present" || echo "$f absent"
done
cat /etc/hello.txt /data/lower.txt /tmp/new.txt /op/fresh.txt /moved/sub/added.txt
stat -c '%n %a' /data/mode.txt
find /moved /mv /op /hl | sort
stat -c '%n nlink=%h' /hl/a /hl/b
stat -c '%n %A' /bin/suid
"""
VERIFY_EXPECT = ["/etc/doomed.txt absent", "/etc/kept.txt absent", "/data/gone.txt absent", "/mv/top.txt absent",
                 "/op/new.txt absent", "/op/old.txt absent",
                 "hello from layer 2\nlower\nappended\nwritten\nfresh\nadded", "/data/mode.txt 600",
                 "/moved/sub/added.txt\n/moved/sub/deep.txt\n/moved/top.txt\n/mv\n/op\n/op/fresh.txt",
                 "/hl/a nlink=2", "/bin/suid -rwsr-xr-x"]

CONTAINERFILE = f"""\
FROM {BASE_IMAGE}
RUN echo step1 >> /data/lower.txt && rm /etc/kept.txt && chmod 640 /data/mode.txt
RUN mv /mv /moved && echo step2 > /moved/sub/step2.txt && rm /op/new.txt && echo b > /op/b.txt
COPY context.txt /data/context.txt
RUN cat /data/context.txt >> /data/lower.txt && rm /data/gone.txt
"""
BUILT_SCRIPT = r"""
cat /data/lower.txt; stat -c '%n %a' /data/mode.txt
find /moved /op | sort
for f in /etc/kept.txt /data/gone.txt /mv /op/new.txt; do [ -e $f ] && echo "$f present" || echo "$f absent"; done
"""
BUILT_EXPECT = ["lower\nstep1\nfrom the context", "/data/mode.txt 640",
                "/moved\n/moved/sub\n/moved/sub/deep.txt\n/moved/sub/step2.txt\n/moved/top.txt\n/op\n/op/b.txt\n",
                "/etc/kept.txt absent", "/data/gone.txt absent", "/mv absent", "/op/new.txt absent"]
# one RUN step renaming a lower directory and replacing another one (opaque in the image)
RECREATE_STEP = "RUN mv /mv /moved && rm -r /op && mkdir /op && echo b > /op/b.txt"

# check -> lines its output must contain, on both programs
EXPECT: dict[str, list[str]] = {
    "run": RUN_EXPECT,
    "diff": ["C /data\nC /data/lower.txt\nC /data/mode.txt", "D /data/gone.txt", "A /moved/sub/added.txt",
             "C /mv", "D /mv/top.txt", "A /tmp/new.txt", "D /etc/kept.txt", "D /op/new.txt", "A /op/fresh.txt"],
    "mount": ["fstype fuse.<fuse>", "moved/sub/added.txt -rw-r--r-- 0:0 6", "op/fresh.txt -rw-r--r-- 0:0 6",
              "bin/suid -rwsr-xr-x 0:0"],
    "export": ["moved/sub/added.txt 0 100644 0:0 6", "bin/suid 0 104755 0:0", "op/fresh.txt 0 100644 0:0 6"],
    "export: lower hard link": ["hl/a 0 100644 0:0 7", "hl/b 1 100644 0:0 -> hl/a"],
    "commit": VERIFY_EXPECT,
    "image tree": ["Image ID: <id1>", "Tags:     [localhost/layerfs-test/committed:v1]",
                   "Top Layer of: [localhost/layerfs-test/base:v1]"],
    "build": BUILT_EXPECT,
    "build: rename, then recreate a lower directory": ["/op/b.txt\n", "/op/new.txt absent"],
    "failed build": ["exit status 3", "mounts left: []"],
    "buildah": ["lower\nbuildah"],
    "lower hard link identity": ["same inode"],
    "hardlink append": ["linked\nmore", "/hl/a nlink=2", "/hl/b nlink=2"],
}
CONTROL_BUILD_BUG = ("fuse-overlayfs 1.10 with containers/storage 1.43: the layer `podman build` commits for "
                     "a RUN step that renames one lower directory and replaces another holds only op/b.txt, "
                     "neither the opaque marker nor a whiteout, so op/new.txt is back in the built image")
CONTROL_BUGS = {"build: rename, then recreate a lower directory": CONTROL_BUILD_BUG}


def scenario(pm: Podman, image: Path, seconds: dict[str, float]) -> dict[str, str]:
    """Run every check; their normalized outputs (or why they failed), by check name; how
    long each took into ``seconds``."""
    out: dict[str, str] = {}
    loaded = pm.podman("load", "-i", str(image)).stdout
    assert f"Loaded image: {BASE_IMAGE}" in loaded, loaded

    def podman_run(image: str, *command: str) -> str:
        return pm.podman("run", "--rm", "--network", "none", image, *command).stdout

    def build(name: str, containerfile: str, tag: str) -> Path:
        ctx = pm.base / "work" / name
        ctx.mkdir()
        (ctx / "Containerfile").write_text(containerfile)
        (ctx / "context.txt").write_text("from the context\n")
        pm.podman("build", "--network", "none", "--pull=never", "-q", "-t", tag, str(ctx))
        return ctx

    def run() -> str:
        return pm.podman("run", "--name", "c1", "--network", "none", BASE_IMAGE, "sh", "-c", RUN_SCRIPT).stdout

    def diff() -> str:
        return "\n".join(sorted(pm.podman("diff", "c1").stdout.splitlines()))

    def mount() -> str:
        path = pm.podman("mount", "c1").stdout.strip()
        try:
            return f"fstype {mount_fstype(path)}\n{tree_listing(Path(path))}"
        finally:
            pm.podman("unmount", "c1")

    exported: list[str] = []

    def export() -> str:
        tar = pm.base / "work" / "c1.tar"
        pm.podman("export", "-o", str(tar), "c1")
        exported.extend(tar_listing(tar).splitlines())
        return "\n".join(line for line in exported if not line.startswith("hl/"))

    def export_hardlink() -> str:
        return "\n".join(line for line in exported if line.startswith("hl/"))

    def commit() -> str:
        pm.podman("commit", "-q", "c1", COMMITTED)
        return podman_run(COMMITTED, "sh", "-c", VERIFY_SCRIPT)

    def image_tree() -> str:
        return pm.podman("image", "tree", COMMITTED).stdout

    def build_steps() -> str:
        build("steps", CONTAINERFILE, BUILT)
        history = pm.podman("history", "--format", "{{.CreatedBy}} | {{.Size}}", BUILT).stdout
        return f"{podman_run(BUILT, 'sh', '-c', BUILT_SCRIPT)}--- history\n{history}"

    def build_recreate() -> str:
        tag = "localhost/layerfs-test/recreated:v1"
        build("recreate", f"FROM {BASE_IMAGE}\n{RECREATE_STEP}\n", tag)
        return podman_run(tag, "sh", "-c", "find /op | sort; [ -e /op/new.txt ] && echo /op/new.txt present "
                                           "|| echo /op/new.txt absent")

    def failed_build() -> str:
        ctx = pm.base / "work" / "failing"
        ctx.mkdir()
        (ctx / "Containerfile").write_text(f"FROM {BASE_IMAGE}\nRUN echo x > /data/x.txt && exit 3\n")
        r = pm.podman("build", "--network", "none", "--pull=never", "-t", "localhost/layerfs-test/failing:v1",
                      str(ctx), check=False)
        assert r.returncode != 0, r.stdout
        error = [line for line in r.stderr.splitlines() if "exit status" in line]
        return f"{error[-1] if error else r.stderr}\nmounts left: {pm.storage_mounts()}"

    def buildah() -> str:
        ctr = pm.buildah("from", "--pull-never", BASE_IMAGE).stdout.strip()
        pm.buildah("run", "--network", "none", ctr, "--", "sh", "-c", "echo buildah >> /data/lower.txt")
        pm.buildah("commit", "-q", ctr, BUILDAH_IMAGE)
        pm.buildah("rm", ctr)
        return podman_run(BUILDAH_IMAGE, "cat", "/data/lower.txt")

    def hardlink_identity() -> str:
        return podman_run(BASE_IMAGE, "sh", "-c", "[ /hl/a -ef /hl/b ] && echo same inode || echo two inodes")

    def hardlink_append() -> str:
        return podman_run(BASE_IMAGE, "sh", "-c", "echo more >> /hl/a && cat /hl/b && stat -c '%n nlink=%h' /hl/a /hl/b")

    checks: dict[str, Callable[[], str]] = {
        "run": run, "diff": diff, "mount": mount, "export": export, "export: lower hard link": export_hardlink,
        "commit": commit, "image tree": image_tree, "build": build_steps,
        "build: rename, then recreate a lower directory": build_recreate, "failed build": failed_build,
        "buildah": buildah, "lower hard link identity": hardlink_identity, "hardlink append": hardlink_append,
    }
    assert list(checks) == list(EXPECT)
    for name, fn in checks.items():
        start = time.monotonic()
        try:
            out[name] = normalize(fn())
        except Exception as e:  # recorded per check: the other checks still run
            out[name] = f"FAILED: {type(e).__name__}: {e}"
        seconds[name] = round(time.monotonic() - start, 1)
    out["mounts after the checks"] = "\n".join(pm.storage_mounts())
    return out


@dataclass
class Results:
    outputs: dict[str, dict[str, str]]  # program -> check -> normalized output
    leftovers: dict[str, list[str]]
    seconds: dict[str, dict[str, float]]  # program -> check -> duration


def short_temp_dir(program: str) -> Path:
    """A podman's own directory, with a short path: with a temp dir path longer than 42
    characters, podman 4.3 waits 20 s for every container it runs to be cleaned up (conmon's
    exit command, ``podman container cleanup``, does not get it done; podman then does it
    itself), which pytest's ``tmp_path`` names reach."""
    return Path(tempfile.mkdtemp(prefix=f"lfpm-{program[:2]}-", dir="/tmp"))


@pytest.fixture(scope="module")
def results(image_archive: Path) -> Iterator[Results]:
    """The scenario on each program in turn (the control first), each torn down at once."""
    res = Results({}, {}, {})
    dirs = []
    for program in PROGRAMS:
        pm = Podman(short_temp_dir(program), program)
        dirs.append(pm.base)
        res.seconds[program] = {}
        try:
            res.outputs[program] = scenario(pm, image_archive, res.seconds[program])
        finally:
            pm.teardown()
            res.leftovers[program] = pm.leftovers
            # for a look after a failure: the outputs, leftovers and durations
            (pm.base / "results.json").write_text(json.dumps(
                {"outputs": res.outputs.get(program), "leftovers": pm.leftovers, "seconds": res.seconds[program]},
                indent=1))
    yield res
    for d in dirs:
        if not mounts_under(d):  # never delete through a mount that is still there
            shutil.rmtree(d, ignore_errors=True)


def _known(check: str, program: str | None) -> list[pytest.MarkDecorator]:
    """xfail marks for a check known to go wrong on the control (fuse-overlayfs)."""
    marks = []
    if check in CONTROL_BUGS and program in (CONTROL, None):
        marks.append(pytest.mark.xfail(strict=True, reason=CONTROL_BUGS[check]))
    return marks


@pytest.mark.parametrize("program, check", [pytest.param(p, c, marks=_known(c, p), id=f"{p}-{c}")
                                            for c in EXPECT for p in PROGRAMS])
def test_check_shows_what_it_must(results: Results, program: str, check: str) -> None:
    got = results.outputs[program][check]
    missing = [want for want in EXPECT[check] if want not in got]
    assert not missing, f"{program}: {check}: missing {missing} in:\n{got}"


@pytest.mark.parametrize("check", [pytest.param(c, marks=_known(c, None), id=c) for c in EXPECT])
def test_layerfs_matches_fuse_overlayfs(results: Results, check: str) -> None:
    control, got = results.outputs[CONTROL][check], results.outputs[LAYERFS][check]
    assert got == control, f"{check}:\n--- fuse-overlayfs\n{control}\n--- layerfs-fuse\n{got}"


def test_nothing_left_mounted_or_running(results: Results) -> None:
    assert {p: results.outputs[p]["mounts after the checks"] for p in PROGRAMS} == {p: "" for p in PROGRAMS}
    assert results.leftovers == {p: [] for p in PROGRAMS}

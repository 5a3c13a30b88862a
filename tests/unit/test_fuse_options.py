"""``layerfs-fuse``'s options as containers/storage passes them, and the layer path checks.

containers/storage 1.43 (podman 4.3, buildah 1.28) runs its ``mount_program`` as
``PROGRAM -o lowerdir=L1:L2,upperdir=U,workdir=W[,MOUNTOPT...][,volatile][,context="..."] MERGED``
(an empty ``mountopt`` leaves ``,,``), with ``lowerdir`` entries that are ``overlay/l/<id>``
symlinks; ``fuse-overlayfs`` warns about what it does not know, kernel overlayfs refuses it.
No mount here: the program-level case fails before mounting.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from layerfs.errors import LayerfsError, UsageError
from layerfs.fuse import main as fuse_main


def parse(*argv: str) -> fuse_main.Options:
    o = fuse_main.parse_args(list(argv))
    assert isinstance(o, fuse_main.Options)
    return o


def test_containers_storage_command_line() -> None:
    o = parse("-o", "lowerdir=/g/overlay/l/AAA:/g/overlay/l/BBB,upperdir=/g/overlay/x/diff,"
                    "workdir=/g/overlay/x/work,,volatile", "/g/overlay/x/merged")
    assert (o.lowers, o.upper, o.work, o.mountpoint) == (
        ["/g/overlay/l/AAA", "/g/overlay/l/BBB"], "/g/overlay/x/diff", "/g/overlay/x/work", "/g/overlay/x/merged")
    assert o.volatile and not o.readonly and o.flags == []
    assert o.warnings == []


@pytest.mark.parametrize("options", [
    "lowerdir=/a,", ",lowerdir=/a", "lowerdir=/a,,,", ",,lowerdir=/a,,nodev,,", "lowerdir=/a,,",
])
def test_empty_and_trailing_commas_are_skipped(options: str) -> None:
    o = parse("-o", options, "/m")
    assert o.lowers == ["/a"] and not o.warnings
    assert fuse_main.split_options(options) == [x for x in options.split(",") if x]


# every option containers/storage 1.43 may put on a mount_program's command line (besides the
# layer paths), and what layerfs-fuse says about each: None = accepted silently
CONTAINERS_STORAGE_OPTIONS = {
    "volatile": None,  # options.Volatile: honoured (no fsyncs), like the kernel option
    'context="system_u:object_r:container_file_t:s0:c1,c2"': "ignoring context=",  # SELinux MountLabel
    "userxattr": None,  # rootless without a mount program; harmless here
    "nodev": None, "nosuid": None, "noexec": None, "ro": None,  # storage.conf mountopt
    "metacopy=on": "ignoring option 'metacopy=on'",  # mountopt (stripped for mount programs, but allowed)
    "xino=off": None, "index=off": None, "redirect_dir=on": None, "redirect_dir=follow": None,
    "redirect_dir=off": "ignoring option", "redirect_dir=nofollow": "ignoring option",
    "xino=on": "ignoring option", "index=on": "ignoring option",
    "fsync=0": "ignoring option 'fsync=0'",  # fuse-overlayfs tuning
    "xattr_permissions=0": None,  # force_mask adds xattr_permissions=2: refused (see below)
}


@pytest.mark.parametrize("option, warning", CONTAINERS_STORAGE_OPTIONS.items(), ids=list(CONTAINERS_STORAGE_OPTIONS))
def test_options_containers_storage_passes_are_accepted(option: str, warning: str | None) -> None:
    o = parse("-o", f"lowerdir=/l/A:/l/B,upperdir=/u,workdir=/w,,{option}", "/m")
    assert o.lowers == ["/l/A", "/l/B"]
    if warning is None:
        assert o.warnings == []
    else:
        assert len(o.warnings) == 1 and warning in o.warnings[0], o.warnings


def test_unknown_options_warn_instead_of_failing() -> None:
    o = parse("-o", "lowerdir=/a,bogus,frob=1", "/m")
    assert o.warnings == ["ignoring unknown option 'bogus'", "ignoring unknown option 'frob=1'"]


@pytest.mark.parametrize("option", ["uidmapping=0:1000:65536", "gidmapping=0:1000:65536", "squash_to_uid=1000",
                                    "squash_to_gid=1000", "xattr_permissions=2"])
def test_id_mapping_and_force_mask_are_refused(option: str) -> None:
    # containers/storage adds these for containers with --uidmap/--gidmap or force_mask
    with pytest.raises(UsageError):
        parse("-o", f"lowerdir=/a,upperdir=/u,workdir=/w,{option}", "/m")


# --- path checks at mount --------------------------------------------------------------------


def storage_like(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """containers/storage's layout: ``l/<id>`` -> ``../<layer>/diff``; returns (l/A, l/B, diff, work)."""
    overlay = tmp_path / "overlay"
    for layer in ("la", "lb", "c"):
        (overlay / layer / "diff").mkdir(parents=True)
    (overlay / "c" / "work").mkdir()
    (overlay / "l").mkdir()
    (overlay / "l" / "AAA").symlink_to("../la/diff")
    (overlay / "l" / "BBB").symlink_to("../lb/diff")
    return overlay / "l" / "AAA", overlay / "l" / "BBB", overlay / "c" / "diff", overlay / "c" / "work"


def test_symlinked_layer_paths_are_resolved_once(tmp_path: Path) -> None:
    a, b, diff, work = storage_like(tmp_path)
    (tmp_path / "up").symlink_to(diff)
    o = parse("-o", f"lowerdir={a}:{b},upperdir={tmp_path / 'up'},workdir={work},,volatile", str(tmp_path))
    fuse_main.resolve_layers(o)
    overlay = os.path.realpath(tmp_path / "overlay")
    assert o.lowers == [f"{overlay}/la/diff", f"{overlay}/lb/diff"]
    assert (o.upper, o.work) == (f"{overlay}/c/diff", f"{overlay}/c/work")


@pytest.mark.parametrize("case, message", [
    ("missing lower", "lowerdir {p}/missing: No such file or directory"),
    ("file lower", "lowerdir {p}/file: not a directory"),
    ("dangling link", "lowerdir {p}/dangling (-> {p}/nowhere): No such file or directory"),
    ("missing upper", "upperdir {p}/missing: No such file or directory"),
    ("work in upper", "upperdir {p}/u and workdir {p}/u/w must be separate subtrees"),
    ("upper in work", "upperdir {p}/w2/u and workdir {p}/w2 must be separate subtrees"),
    ("same dir", "upperdir {p}/u and workdir {p}/u must be separate subtrees"),
])
def test_bad_layer_paths_are_refused(tmp_path: Path, case: str, message: str) -> None:
    p = os.path.realpath(tmp_path)
    (tmp_path / "low").mkdir()
    (tmp_path / "file").write_text("")
    (tmp_path / "dangling").symlink_to(f"{p}/nowhere")
    (tmp_path / "u" / "w").mkdir(parents=True)
    (tmp_path / "w2" / "u").mkdir(parents=True)
    low = f"{p}/low"
    options = {
        "missing lower": f"lowerdir={low}:{p}/missing",
        "file lower": f"lowerdir={p}/file",
        "dangling link": f"lowerdir={p}/dangling",
        "missing upper": f"lowerdir={low},upperdir={p}/missing,workdir={p}/w2",
        "work in upper": f"lowerdir={low},upperdir={p}/u,workdir={p}/u/w",
        "upper in work": f"lowerdir={low},upperdir={p}/w2/u,workdir={p}/w2",
        "same dir": f"lowerdir={low},upperdir={p}/u,workdir={p}/u",
    }[case]
    o = parse("-o", options, p)
    with pytest.raises(LayerfsError) as e:
        fuse_main.resolve_layers(o)
    assert str(e.value) == message.format(p=p)


def test_program_refuses_a_missing_lowerdir_before_mounting(tmp_path: Path) -> None:
    """``layerfs-fuse -o lowerdir=/nonexistent MP``: one error line naming the path, exit 1."""
    mp = tmp_path / "mp"
    mp.mkdir()
    missing = tmp_path / "nonexistent"
    for argv in (["-o", f"lowerdir={missing}", str(mp)], ["-f", "-o", f"lowerdir={missing}", str(mp)]):
        r = subprocess.run([sys.executable, "-m", "layerfs.fuse.main", *argv], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 1, r
        assert r.stderr.splitlines() == [f"layerfs-fuse: error: lowerdir {missing}: No such file or directory"]
        assert not os.path.ismount(mp)

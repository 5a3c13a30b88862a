"""The kernel overlay backend: MountSpec building, probes, and real mounts.

MountSpec tests are pure. Mount tests need root and overlay in /proc/filesystems; each
records its targets in the ``mounts`` fixture, which detaches anything left behind (even
after a failure) and then asserts that /proc/self/mountinfo holds none of them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from layerfs.errors import FailedPrecondition, InUse, InvalidArgument, NotFound, Unsupported
from layerfs.linux.files import getdents
from layerfs.linux.mountinfo import MountEntry, mount_table
from layerfs.mount import kernel
from layerfs.mount.probe import DT_DIR, DT_REG, backing_fs, kernel_version, probe
from layerfs.mount.spec import MountSpec, escape_path, split_lowerdir, unescape_path
from layerfs.union import whiteout
from tests.support.markers import needs_root


def _overlay_listed() -> bool:
    try:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1] == "overlay" for line in f if line.strip())
    except OSError:
        return False


needs_overlay = pytest.mark.skipif(
    not _overlay_listed(), reason="kernel overlayfs not available: 'overlay' missing from /proc/filesystems"
)
HAS_LOWERDIR_PLUS = os.geteuid() == 0 and _overlay_listed() and probe().lowerdir_plus
needs_lowerdir_plus = pytest.mark.skipif(
    not HAS_LOWERDIR_PLUS, reason="the new mount API's lowerdir+ needs kernel >= 6.8"
)


# --- fixtures ---------------------------------------------------------------------------


def _in_mountinfo(target: str) -> bool:
    """Whether ``target`` is a mount point: a plain mountinfo read, independent of layerfs."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split(" ")[4])
            if point == target:
                return True
    return False


class Mounts:
    """Mounts through the code under test and remembers every target."""

    def __init__(self) -> None:
        self.targets: list[str] = []

    def mount(self, spec: MountSpec, target: Path | str, **kw: Any) -> Path:
        real = os.path.realpath(target)
        self.targets.append(real)  # before mounting: a half-done mount is cleaned up too
        kernel.mount(spec, real, **kw)
        return Path(real)


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    m = Mounts()
    yield m
    libc = ctypes.CDLL(None, use_errno=True)
    for target in reversed(m.targets):
        for _ in range(16):  # stacked mounts need one umount each
            if not _in_mountinfo(target):
                break
            libc.umount2(target.encode(), kernel.MNT_DETACH)
    assert [t for t in m.targets if _in_mountinfo(t)] == []


@pytest.fixture(params=["new", "legacy"])
def api(request: pytest.FixtureRequest) -> dict[str, bool]:
    """Both overlay code paths: the new mount API (where the kernel has it) and mount(2)."""
    if request.param == "new" and not HAS_LOWERDIR_PLUS:
        pytest.skip("the new mount API's lowerdir+ needs kernel >= 6.8")
    return {"force_legacy": request.param == "legacy"}


def mk(root: Path, rel: str, data: str = "") -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(data)
    return p


def dirs(tmp: Path, *names: str) -> list[Path]:
    out = [tmp / n for n in names]
    for d in out:
        d.mkdir(parents=True, exist_ok=True)
    return out


def entry(target: Path | str) -> MountEntry:
    found = [e for e in mount_table() if e.mount_point == str(target)]
    assert found, f"{target} is not mounted"
    return found[-1]


def lowers_of(paths: Sequence[Path]) -> list[str]:
    return [str(p) for p in paths]


# --- MountSpec (pure) -------------------------------------------------------------------


def test_overlay_spec_options_and_properties() -> None:
    spec = MountSpec.overlay(["/s/3/fs", "/s/2/fs", "/s/1/fs"], "/s/4/fs", "/s/4/work", extra=["index=off"])
    assert spec.type == "overlay" and spec.source == "overlay"
    assert spec.options == (
        "lowerdir=/s/3/fs:/s/2/fs:/s/1/fs",
        "upperdir=/s/4/fs",
        "workdir=/s/4/work",
        "index=off",
    )
    assert spec.lowers == ("/s/3/fs", "/s/2/fs", "/s/1/fs")
    assert (spec.upper, spec.work, spec.readonly) == ("/s/4/fs", "/s/4/work", False)


def test_overlay_without_upper_is_readonly() -> None:
    spec = MountSpec.overlay(["/a", "/b"])
    assert spec.readonly and "ro" in spec.options and spec.upper is None and spec.work is None
    rw_upper_ro = MountSpec.overlay(["/a"], "/u", "/w", readonly=True)
    assert rw_upper_ro.type == "overlay" and rw_upper_ro.readonly and rw_upper_ro.lowers == ("/a",)
    assert MountSpec("overlay", "overlay", ("lowerdir=/a:/b",)).readonly  # no upper: ro anyway


def test_single_lower_without_upper_is_a_readonly_bind() -> None:
    spec = MountSpec.overlay(["/s/1/fs"])
    assert spec == MountSpec.bind("/s/1/fs", readonly=True)
    assert (spec.type, spec.source, spec.options) == ("bind", "/s/1/fs", ("ro", "rbind"))
    assert spec.readonly and spec.recursive and spec.lowers == ()
    assert not MountSpec.bind("/x", readonly=False).readonly


def test_layer_paths_are_escaped_and_parsed_back() -> None:
    odd = ["/l/a:b", "/l/c,d", "/l/e\\f", "/l/plain"]
    spec = MountSpec.overlay(odd, "/u:1,2", "/w\\x")
    assert spec.options[0] == "lowerdir=/l/a\\:b:/l/c\\,d:/l/e\\\\f:/l/plain"
    assert spec.options[1] == "upperdir=/u\\:1\\,2"
    assert spec.lowers == tuple(odd) and spec.upper == "/u:1,2" and spec.work == "/w\\x"
    for p in odd:
        assert unescape_path(escape_path(p)) == p
    assert split_lowerdir("/a\\::/b") == ["/a:", "/b"]
    with pytest.raises(InvalidArgument, match="data-only"):
        split_lowerdir("/a::/b")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lowers": []}, "at least one lower"),
        ({"lowers": ["relative/path", "/b"]}, "not an absolute path"),
        ({"lowers": ["/a\0b", "/b"]}, "NUL"),
        ({"lowers": ["/a"], "upper": "/u"}, "give both or neither"),
        ({"lowers": ["/a", "/b"], "extra": ["lowerdir=/c"]}, "as arguments"),
        ({"lowers": ["/a", "/b"], "extra": ["a,b"]}, "without ','"),
        ({"lowers": ["/a", "/b"], "extra": ["rbind"]}, "no sense"),
        ({"lowers": "/a"}, "not one string"),
    ],
)
def test_overlay_spec_rejects(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        MountSpec.overlay(**kwargs)


def test_extra_options_deduplicated_and_ordered() -> None:
    spec = MountSpec.overlay(["/a", "/b"], readonly=True, extra=["ro", "nodev", "nodev", "userxattr"])
    assert spec.options == ("lowerdir=/a:/b", "ro", "nodev", "userxattr")
    assert spec.option_value("lowerdir") == "/a:/b" and spec.has_option("userxattr")


def test_to_containerd_round_trip() -> None:
    spec = MountSpec.overlay(["/a:x", "/b"], "/u", "/w", extra=["index=off"])
    d = spec.to_containerd()
    assert d == {
        "type": "overlay",
        "source": "overlay",
        "options": ["lowerdir=/a\\:x:/b", "upperdir=/u", "workdir=/w", "index=off"],
    }
    assert MountSpec.from_containerd(d) == spec
    assert MountSpec.bind("/x", True).to_containerd() == {
        "type": "bind",
        "source": "/x",
        "options": ["ro", "rbind"],
    }
    with pytest.raises(InvalidArgument, match="lacks 'source'"):
        MountSpec.from_containerd({"type": "bind"})
    fuse = spec.as_fuse()
    assert fuse.type == "fuse3.layerfs-fuse" and fuse.options == spec.options


def test_mountinfo_line_octal_escapes() -> None:
    line = (
        "123 27 0:45 / /tmp/with\\040space\\011tab rw,nosuid,nodev,relatime shared:7 master:2 - overlay overlay "
        "ro,lowerdir=/l/a\\054b:/l/c,redirect_dir=on\n"
    )
    e = MountEntry.parse(line)
    assert (e.mount_id, e.parent_id, e.dev, e.root) == (123, 27, (0, 45), "/")
    assert e.mount_point == "/tmp/with space\ttab"
    assert e.options == ("rw", "nosuid", "nodev", "relatime")
    assert (e.fs_type, e.source) == ("overlay", "overlay")
    assert e.super_options == ("ro", "lowerdir=/l/a,b:/l/c", "redirect_dir=on")


def test_getdents_reports_real_d_types(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        types = dict(getdents(fd))
    finally:
        os.close(fd)
    assert types["d"] == DT_DIR and types["f"] == DT_REG and {".", ".."} <= set(types)


def test_more_than_500_layers_is_unsupported_naming_fuse(tmp_path: Path) -> None:
    spec = MountSpec.overlay([f"/nonexistent/{i}" for i in range(501)])
    with pytest.raises(
        Unsupported, match=r"501 layers exceeds kernel overlayfs' limit of 500; use --backend fuse"
    ):
        kernel.mount(spec, str(tmp_path))


def test_fuse_specs_are_not_for_the_kernel_backend(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="FUSE backend"):
        kernel.mount(MountSpec.overlay(["/a", "/b"]).as_fuse(), str(tmp_path))


# --- probes -----------------------------------------------------------------------------


@needs_root
@needs_overlay
def test_probe_on_this_machine() -> None:
    info = probe()
    assert probe() is info  # one probe per process
    assert info.overlay_available and info.privileged and not info.needs_userxattr
    assert info.kernel_release == os.uname().release
    assert info.max_layers == 500
    assert info.userns_overlay == (kernel_version() >= (5, 11))
    assert info.lowerdir_plus == (kernel_version() >= (6, 8))
    assert info.layers_via_fd == (kernel_version() >= (6, 13))
    assert info.redirect_dir
    for name in (
        "overlay_available",
        "privileged",
        "userns_overlay",
        "needs_userxattr",
        "lowerdir_plus",
        "layers_via_fd",
        "redirect_dir",
        "max_layers",
        "kernel_release",
    ):
        assert info.why[name], name
    assert "lowerdir_plus: " in info.explain()


@needs_root
def test_backing_fs_of_the_test_tmp(tmp_path: Path) -> None:
    fs = backing_fs(str(tmp_path))
    assert fs.d_type and fs.trusted_xattrs, fs.why
    found = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "-T", str(tmp_path)], capture_output=True, text=True
    )
    if found.returncode == 0:
        assert fs.fs_type == found.stdout.strip()
    assert fs.overlay_problem(privileged=True) is None
    assert os.listdir(tmp_path) == []  # the probe directory is gone
    assert set(fs.why) == {"fs_type", "d_type", "trusted_xattrs", "user_xattrs"}


# --- overlay mounts ---------------------------------------------------------------------


@needs_root
@needs_overlay
def test_readonly_overlay_merge_whiteout_opaque(tmp_path: Path, mounts: Mounts, api: dict[str, bool]) -> None:
    bottom, top, target = dirs(tmp_path, "bottom", "top", "merged")
    mk(bottom, "a.txt", "bottom")
    mk(bottom, "gone.txt", "deleted above")
    mk(bottom, "opaque/old", "hidden by the opaque dir")
    mk(bottom, "merged/from-bottom")
    mk(top, "a.txt", "top")
    mk(top, "opaque/new", "only this")
    mk(top, "merged/from-top")
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        whiteout.make_whiteout(fd, "gone.txt", whiteout.PRIVILEGED)
    finally:
        os.close(fd)
    fd = os.open(top / "opaque", os.O_RDONLY | os.O_DIRECTORY)
    try:
        whiteout.set_opaque(fd, whiteout.PRIVILEGED)
    finally:
        os.close(fd)

    m = mounts.mount(MountSpec.overlay(lowers_of([top, bottom])), target, **api)
    assert kernel.is_mountpoint(str(m))
    assert (m / "a.txt").read_text() == "top"
    assert not (m / "gone.txt").exists()
    assert sorted(os.listdir(m / "opaque")) == ["new"]
    assert sorted(os.listdir(m / "merged")) == ["from-bottom", "from-top"]
    assert sorted(os.listdir(m)) == ["a.txt", "merged", "opaque"]
    with pytest.raises(OSError) as e:
        (m / "new.txt").write_text("x")
    assert e.value.errno == errno.EROFS
    info = entry(m)
    assert info.fs_type == "overlay" and info.source == "overlay" and "ro" in info.options


@needs_root
@needs_overlay
def test_writable_overlay_writes_land_in_upper(tmp_path: Path, mounts: Mounts, api: dict[str, bool]) -> None:
    l1, l2, upper, work, target = dirs(tmp_path, "l1", "l2", "upper", "work", "merged")
    mk(l2, "base.txt", "base")
    mk(l1, "edit.txt", "v1")
    m = mounts.mount(MountSpec.overlay(lowers_of([l1, l2]), str(upper), str(work)), target, **api)
    (m / "new.txt").write_text("new")
    (m / "edit.txt").write_text("v2")
    os.unlink(m / "base.txt")
    assert (upper / "new.txt").read_text() == "new"
    assert (upper / "edit.txt").read_text() == "v2" and (l1 / "edit.txt").read_text() == "v1"
    assert whiteout.is_whiteout_stat(os.lstat(upper / "base.txt"))  # the kernel's whiteout format
    assert (l2 / "base.txt").exists()
    assert "rw" in entry(m).options
    kernel.unmount(str(m))
    assert not kernel.is_mountpoint(str(m))


@needs_root
@needs_overlay
def test_mount_flags_and_parameters_reach_the_kernel(
    tmp_path: Path, mounts: Mounts, api: dict[str, bool]
) -> None:
    l1, l2, upper, work, target = dirs(tmp_path, "l1", "l2", "upper", "work", "merged")
    spec = MountSpec.overlay(
        lowers_of([l1, l2]),
        str(upper),
        str(work),
        extra=["nodev", "nosuid", "noexec", "redirect_dir=on", "volatile"],
    )
    m = mounts.mount(spec, target, **api)
    info = entry(m)
    assert {"nodev", "nosuid", "noexec", "rw"} <= set(info.options)
    assert "redirect_dir=on" in info.super_options and "fsync=volatile" in info.super_options
    assert f"upperdir={upper}" in info.super_options


@needs_root
@needs_overlay
def test_userxattr_overlay_reads_user_opaque(tmp_path: Path, mounts: Mounts, api: dict[str, bool]) -> None:
    bottom, top, target = dirs(tmp_path, "bottom", "top", "merged")
    mk(bottom, "d/old")
    mk(top, "d/new")
    fd = os.open(top / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        whiteout.set_opaque(fd, whiteout.USERXATTR)
    finally:
        os.close(fd)
    m = mounts.mount(MountSpec.overlay(lowers_of([top, bottom]), extra=["userxattr"]), target, **api)
    assert os.listdir(m / "d") == ["new"]
    assert "userxattr" in entry(m).super_options


@needs_root
@needs_overlay
def test_layer_paths_with_colon_and_comma(tmp_path: Path, mounts: Mounts, api: dict[str, bool]) -> None:
    top, bottom, upper, work, target = dirs(tmp_path, "top:1,x", "bottom\\y", "up:per,", "work,", "merged")
    mk(top, "t", "top")
    mk(bottom, "b", "bottom")
    m = mounts.mount(MountSpec.overlay(lowers_of([top, bottom]), str(upper), str(work)), target, **api)
    assert sorted(os.listdir(m)) == ["b", "t"]
    (m / "w").write_text("x")
    assert (upper / "w").read_text() == "x"


@needs_root
@needs_overlay
def test_layer_path_longer_than_255_bytes(tmp_path: Path, mounts: Mounts, api: dict[str, bool]) -> None:
    deep = tmp_path / ("x" * 120) / ("y" * 120)
    top, bottom, upper, work = dirs(deep, "top", "bottom", "upper", "work")
    (target,) = dirs(tmp_path, "merged")
    assert len(str(top).encode()) > 255  # fsconfig(FSCONFIG_SET_STRING) takes at most 255
    mk(top, "t")
    mk(bottom, "b")
    spec = MountSpec.overlay(lowers_of([top, bottom]), str(upper), str(work))
    if not api["force_legacy"] and not probe().layers_via_fd:
        with pytest.raises(InvalidArgument, match="6.13"):
            mounts.mount(spec, target, **api)
        return
    m = mounts.mount(spec, target, **api)
    assert sorted(os.listdir(m)) == ["b", "t"]
    (m / "w").write_text("x")
    assert (upper / "w").read_text() == "x"
    shown = entry(m).super_options
    assert any(str(top) in o for o in shown) and any(str(upper) in o for o in shown)  # real paths, not fds


def _deep_stack(root: Path, n: int, name: str = "{i}/fs") -> list[Path]:
    """n layers, bottom first: each has f<i> and its own version of 'shared'."""
    layers = []
    for i in range(n):
        d = root / name.format(i=i)
        d.mkdir(parents=True)
        (d / f"f{i}").write_text(str(i))
        (d / "shared").write_text(f"from layer {i}")
        layers.append(d)
    return layers


def _check_stack(m: Path, n: int) -> None:
    names = os.listdir(m)
    assert len(names) == n + 1
    for i in range(n):
        assert (m / f"f{i}").read_text() == str(i)
    assert (m / "shared").read_text() == f"from layer {n - 1}"


@needs_root
@needs_overlay
@needs_lowerdir_plus
def test_500_layers_with_the_new_mount_api(tmp_path: Path, mounts: Mounts) -> None:
    root = tmp_path / ("deep-" * 10) / ("store-" * 10) / "snapshots"
    layers = _deep_stack(root, 500)
    spec = MountSpec.overlay(lowers_of(layers[::-1]))
    assert len(spec.options[0]) > 10 * 4096  # far beyond one page of mount(2) data
    (target,) = dirs(tmp_path, "merged")
    m = mounts.mount(spec, target)
    _check_stack(m, 500)
    shown = [o for o in entry(m).super_options if o.startswith("lowerdir+=")]
    assert shown[0] == f"lowerdir+={layers[-1]}" and len(shown) == 500  # top first, as given


@needs_root
@needs_overlay
def test_legacy_mount_uses_relative_paths_when_absolute_ones_overflow_a_page(
    tmp_path: Path, mounts: Mounts
) -> None:
    root = tmp_path / ("a-long-store-root-" * 3) / "snapshots"
    layers = _deep_stack(root, 300)
    spec = MountSpec.overlay(lowers_of(layers[::-1]))
    plan = kernel.plan_overlay(spec)
    assert len(kernel.legacy_data(plan)) >= kernel.PAGE_SIZE
    assert len(kernel.legacy_data(plan, lambda p: os.path.relpath(p, root))) < kernel.PAGE_SIZE
    (target,) = dirs(tmp_path, "merged")
    cwd = os.getcwd()
    m = mounts.mount(spec, target, force_legacy=True)
    assert os.getcwd() == cwd  # the chdir happened in a helper thread with its own fs_struct
    _check_stack(m, 300)
    lowerdir = [o for o in entry(m).super_options if o.startswith("lowerdir=")][0]
    assert lowerdir.startswith("lowerdir=299/fs:298/fs:")


@needs_root
@needs_overlay
def test_legacy_mount_refuses_what_no_page_can_hold(tmp_path: Path, mounts: Mounts) -> None:
    layers = _deep_stack(tmp_path / "s", 200, name="a-layer-directory-with-a-rather-long-name-{i:04d}")
    (target,) = dirs(tmp_path, "merged")
    with pytest.raises(Unsupported, match="one page holds"):
        mounts.mount(MountSpec.overlay(lowers_of(layers[::-1])), target, force_legacy=True)
    assert not kernel.is_mountpoint(str(target))


# --- bind mounts ------------------------------------------------------------------------


@needs_root
def test_readonly_bind_mount(tmp_path: Path, mounts: Mounts) -> None:
    src, target = dirs(tmp_path, "src", "target")
    mk(src, "file", "data")
    m = mounts.mount(MountSpec.bind(str(src), readonly=True), target)
    assert (m / "file").read_text() == "data"
    with pytest.raises(OSError) as e:
        (m / "file").write_text("changed")
    assert e.value.errno == errno.EROFS
    assert "ro" in entry(m).options
    (src / "file").write_text("changed at the source")
    assert (m / "file").read_text() == "changed at the source"


@needs_root
def test_single_lower_view_mounts_as_readonly_bind(tmp_path: Path, mounts: Mounts) -> None:
    layer, target = dirs(tmp_path, "layer", "target")
    mk(layer, "f", "x")
    m = mounts.mount(MountSpec.overlay([str(layer)]), target)
    assert (m / "f").read_text() == "x" and "ro" in entry(m).options
    with pytest.raises(OSError):
        (m / "g").write_text("x")


@needs_root
def test_writable_bind_mount_with_flags(tmp_path: Path, mounts: Mounts) -> None:
    src, target = dirs(tmp_path, "src", "target")
    m = mounts.mount(MountSpec("bind", str(src), ("rw", "rbind", "nodev", "nosuid")), target)
    (m / "new").write_text("x")
    assert (src / "new").read_text() == "x"
    assert {"rw", "nodev", "nosuid"} <= set(entry(m).options)


# --- errors and unmounting --------------------------------------------------------------


@needs_root
@needs_overlay
def test_missing_lower_is_named(tmp_path: Path, mounts: Mounts, api: dict[str, bool]) -> None:
    top, target = dirs(tmp_path, "top", "merged")
    missing = tmp_path / "no-such-layer"
    with pytest.raises(NotFound, match=re.escape(f"lower layer 2 of 2 {missing} does not exist")):
        mounts.mount(MountSpec.overlay([str(top), str(missing)]), target, **api)


@needs_root
@needs_overlay
def test_missing_target_is_not_found(tmp_path: Path, api: dict[str, bool]) -> None:
    l1, l2 = dirs(tmp_path, "l1", "l2")
    with pytest.raises(NotFound, match=re.escape(f"{tmp_path}/nowhere")):
        kernel.mount(MountSpec.overlay(lowers_of([l1, l2])), str(tmp_path / "nowhere"), **api)
    with pytest.raises(NotFound, match="nowhere"):
        kernel.mount(MountSpec.bind(str(l1), True), str(tmp_path / "nowhere"))


@needs_root
@needs_overlay
@needs_lowerdir_plus
def test_kernel_error_message_is_included(tmp_path: Path, mounts: Mounts) -> None:
    l1, l2, target = dirs(tmp_path, "l1", "l2", "merged")
    with pytest.raises(
        InvalidArgument,
        match=r"option bogus=1: Invalid argument; kernel: e overlay: Unknown parameter 'bogus'",
    ):
        mounts.mount(MountSpec.overlay(lowers_of([l1, l2]), extra=["bogus=1"]), target)


@needs_root
@needs_overlay
def test_overlay_of_one_lower_without_upper_fails_clearly(
    tmp_path: Path, mounts: Mounts, api: dict[str, bool]
) -> None:
    l1, target = dirs(tmp_path, "l1", "merged")
    with pytest.raises(InvalidArgument, match=re.escape(f"top {l1})") + ".*dmesg"):
        mounts.mount(MountSpec("overlay", "overlay", (f"lowerdir={l1}",)), target, **api)


@needs_root
def test_unmount_errors_and_detach(tmp_path: Path, mounts: Mounts) -> None:
    src, target = dirs(tmp_path, "src", "with space")
    mk(src, "f", "data")
    with pytest.raises(FailedPrecondition, match="not a mount point"):
        kernel.unmount(str(target))
    with pytest.raises(NotFound, match="does not exist"):
        kernel.unmount(str(tmp_path / "missing"))
    m = mounts.mount(MountSpec.bind(str(src), readonly=True), target)
    assert kernel.is_mountpoint(str(m)) and not kernel.is_mountpoint(str(src))
    assert kernel.mounts_under(str(tmp_path)) == [str(m)]
    with open(m / "f") as busy:
        with pytest.raises(InUse, match="detach=True"):
            kernel.unmount(str(m))
        kernel.unmount(str(m), detach=True)
        assert not kernel.is_mountpoint(str(m))
        assert busy.read() == "data"  # a detached mount lives on for its open files
    assert kernel.mounts_under(str(tmp_path)) == []


@needs_root
def test_unmount_all_takes_stacked_and_nested_mounts(tmp_path: Path, mounts: Mounts) -> None:
    src, target = dirs(tmp_path, "src", "target")
    (src / "sub").mkdir()
    m = mounts.mount(MountSpec.bind(str(src), readonly=False), target)
    mounts.mount(MountSpec.bind(str(src), readonly=True), m / "sub")
    mounts.mount(MountSpec.bind(str(src), readonly=True), target)  # stacked on the same point
    assert kernel.mounts_under(str(tmp_path)) == [str(m), str(m / "sub"), str(m)]  # one per mount
    done = kernel.unmount_all(str(tmp_path))
    assert len(done) == 3 and kernel.mounts_under(str(tmp_path)) == []

"""containerd's snapshotter testsuite behaviours, ported to pytest, as one suite bound to every
implementation of the snapshot API (the way dulwich binds its ``ObjectStoreTests`` to each store).

``SnapshotterBehaviours`` holds the tests. A binding subclasses it as a ``Test...`` class and
implements ``snapshotter(root, backend)``: a context manager yielding an object with the API
of ``snapshotter.core.Snapshotter`` (``SnapshotterAPI``) over a fresh store at ``root``, whose
mount descriptions are for ``backend``, and whose failures are the ``layerfs.errors`` classes
(``NotFound``, ``AlreadyExists``, ``FailedPrecondition``, ``InvalidArgument``). The bindings:

- ``tests/integration/test_snapshotter.py``: the Python API, ``snapshotter.core.Snapshotter``;
- ``tests/integration/test_snapshotter_grpc.py``: ``layerfs snapshotter serve`` (a subprocess
  per test) through a gRPC client, ``tests.support.snapshotter_client.GrpcSnapshotter``,
  which maps the status codes back to those classes.

Every test runs with the kernel backend and with the FUSE backend. Mounts returned by the
snapshotter are executed by ``layerfs.mount`` (kernel overlay/bind, or the layerfs-fuse
daemon for ``fuse3.layerfs-fuse``) and always unmounted in finalizers.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import errno
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import pytest

from layerfs.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from layerfs.mount.spec import MountSpec
from snapshotter.core import Info, Usage
from tests.support.markers import needs_root
from tests.support.tarbuild import tree_fingerprint

_libc = ctypes.CDLL(None, use_errno=True)

FUSE_READY = os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


class SnapshotterAPI(Protocol):
    """What the shared tests call: ``snapshotter.core.Snapshotter``'s API."""

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[MountSpec]: ...
    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[MountSpec]: ...
    def mounts(self, key: str) -> list[MountSpec]: ...
    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None: ...
    def remove(self, key: str) -> None: ...
    def stat(self, key: str) -> Info: ...
    def update(self, info: Info, *fieldpaths: str) -> Info: ...
    def usage(self, key: str) -> Usage: ...
    def walk(self, fn: Callable[[Info], None], *filter_strings: str) -> None: ...
    def infos(self, *filter_strings: str) -> list[Info]: ...
    def cleanup(self) -> object: ...


class Mounter:
    """Executes MountSpecs and undoes them all at teardown."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.active: list[tuple[str, int | None]] = []
        self.n = 0

    def mount(self, specs: list[MountSpec]) -> Path:
        self.n += 1
        target = self.base / f"m{self.n}"
        target.mkdir()
        (spec,) = specs
        pid = None
        if spec.type.startswith("fuse"):
            from layerfs.mount import fuse

            pid = fuse.mount(spec, str(target))
        else:
            from layerfs.mount import kernel

            kernel.mount(spec, str(target))
        self.active.append((str(target), pid))
        return target

    def unmount(self, target: Path) -> None:
        for i, (t, pid) in enumerate(self.active):
            if t == str(target):
                self._undo(t, pid)
                del self.active[i]
                return
        raise AssertionError(f"{target} not mounted here")

    def _undo(self, target: str, pid: int | None) -> None:
        if pid is not None:
            from layerfs.mount import fuse

            fuse.unmount(target, pid)
        else:
            from layerfs.mount import kernel

            kernel.unmount(target)

    def close(self) -> None:
        for t, pid in reversed(self.active):
            try:
                self._undo(t, pid)
            except Exception:
                _libc.umount2(t.encode(), 2)
        self.active.clear()


Env = tuple[SnapshotterAPI, Mounter]


def write_tree(root: Path, files: dict[str, Any]) -> None:
    for name, val in files.items():
        p = root / name
        if val is None:
            p.mkdir(parents=True, exist_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(val if isinstance(val, bytes) else str(val).encode())


def commit_layer(sn: SnapshotterAPI, m: Mounter, name: str, parent: str, change: Any) -> None:
    key = f"{name}-active"
    target = m.mount(sn.prepare(key, parent))
    change(target)
    m.unmount(target)
    sn.commit(name, key)


@needs_root
class SnapshotterBehaviours:
    """The behaviours every snapshot API must have; bind with a ``Test...`` subclass."""

    def snapshotter(self, root: Path, backend: str) -> contextlib.AbstractContextManager[SnapshotterAPI]:
        """A context manager: the API over a fresh store at ``root``, mounts for ``backend``."""
        raise NotImplementedError

    @pytest.fixture(params=["kernel", "fuse"])
    def env(self, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
        if request.param == "fuse" and not FUSE_READY:
            pytest.skip("the FUSE backend (layerfs.union.fs, /dev/fuse, fusermount3) is not available")
        mnt_dir = tmp_path / "mnt"
        mnt_dir.mkdir()
        m = Mounter(mnt_dir)
        with self.snapshotter(tmp_path / "store", request.param) as sn:
            try:
                yield sn, m
            finally:
                m.close()

    @pytest.fixture
    def store_root(self, tmp_path: Path) -> Path:
        """The store ``env``'s snapshotter works on."""
        return tmp_path / "store"

    def test_basic_prepare_commit_view_chain(self, env: Env) -> None:
        sn, m = env
        commit_layer(sn, m, "base", "", lambda t: write_tree(t, {"foo": None, "foo/bar": "bar\n", "a": "a\n"}))
        target = m.mount(sn.prepare("next", "base"))
        assert (target / "foo/bar").read_text() == "bar\n"
        (target / "foo/bar").write_text("changed\n")
        (target / "b").write_text("b\n")
        os.unlink(target / "a")
        m.unmount(target)
        sn.commit("next-committed", "next")
        view = m.mount(sn.view("view", "next-committed"))
        assert sorted(os.listdir(view)) == ["b", "foo"]
        assert (view / "foo/bar").read_text() == "changed\n"
        m.unmount(view)
        names = {i.name: i for i in sn.infos()}
        assert set(names) == {"base", "next-committed", "view"}
        assert names["next-committed"].parent == "base" and names["view"].parent == "next-committed"

    def test_stat_active_and_committed(self, env: Env) -> None:
        sn, m = env
        sn.prepare("a", "", labels={"x": "1"})
        info = sn.stat("a")
        assert (info.kind, info.name, info.parent, info.labels) == ("active", "a", "", {"x": "1"})
        assert info.created == info.updated
        sn.commit("c", "a", labels={"y": "2"})
        info = sn.stat("c")
        assert (info.kind, info.name, info.labels) == ("committed", "c", {"y": "2"})  # replaced, not inherited
        with pytest.raises(NotFound):
            sn.stat("a")  # the key disappears

    def test_parent_transitivity(self, env: Env) -> None:
        sn, m = env
        parent = ""
        for i in range(4):
            sn.prepare(f"k{i}", parent)
            sn.commit(f"c{i}", f"k{i}")
            parent = f"c{i}"
        assert [sn.stat(f"c{i}").parent for i in range(4)] == ["", "c0", "c1", "c2"]

    def test_prepare_view_failures(self, env: Env) -> None:
        sn, m = env
        sn.prepare("k", "")
        with pytest.raises(AlreadyExists):
            sn.prepare("k", "")
        with pytest.raises(AlreadyExists):
            sn.view("k", "")
        with pytest.raises(NotFound):
            sn.prepare("k2", "missing")
        with pytest.raises(InvalidArgument):
            sn.prepare("k3", "k")  # parent not committed
        with pytest.raises(InvalidArgument):
            sn.view("k4", "k")
        sn.commit("c", "k")
        with pytest.raises(AlreadyExists):
            sn.prepare("c", "")  # a committed name is taken too
        sn.prepare("k5", "c")
        with pytest.raises(AlreadyExists):
            sn.commit("c", "k5")
        sn.view("v", "c")
        with pytest.raises(FailedPrecondition):
            sn.commit("c2", "v")  # a view cannot be committed
        with pytest.raises(FailedPrecondition):
            sn.commit("c3", "c")
        with pytest.raises(NotFound):
            sn.commit("c4", "nope")
        with pytest.raises(FailedPrecondition):
            sn.mounts("c")

    def test_update_semantics(self, env: Env) -> None:
        sn, m = env
        sn.prepare("k", "", labels={"a": "1", "b": "2"})
        created = sn.stat("k").created
        time.sleep(0.01)
        info = sn.update(Info("active", "k", "", {"c": "3"}))  # no paths: replace all labels
        assert info.labels == {"c": "3"} and info.created == created and info.updated > created
        info = sn.update(Info("active", "k", "", {"d": "4"}), "labels.d")
        assert info.labels == {"c": "3", "d": "4"}
        info = sn.update(Info("active", "k", "", {}), "labels.c")  # absent: deleted
        assert info.labels == {"d": "4"}
        info = sn.update(Info("active", "k", "", {"e": "5"}), "labels")
        assert info.labels == {"e": "5"}
        with pytest.raises(InvalidArgument):
            sn.update(Info("active", "k", "x", {}), "parent")
        with pytest.raises(InvalidArgument):
            sn.update(Info("active", "k", "", {}), "name")
        with pytest.raises(NotFound):
            sn.update(Info("active", "missing", "", {}))

    def test_remove_and_key_reuse(self, env: Env) -> None:
        sn, m = env
        sn.prepare("k", "")
        sn.commit("c", "k")
        sn.prepare("child", "c")
        with pytest.raises(FailedPrecondition):
            sn.remove("c")  # has children
        sn.remove("child")
        sn.remove("c")
        with pytest.raises(NotFound):
            sn.remove("c")
        sn.prepare("k", "")  # a removed key can be used again
        target = m.mount(sn.mounts("k"))
        assert os.listdir(target) == []
        m.unmount(target)

    def test_errors_name_the_clients_keys(self, env: Env) -> None:
        """Every error names the key (or name, or parent) the client sent, never the store's
        namespace-prefixed key; removing a snapshot with children says "remove" (containerd's
        testsuite checks that, its storage says "cannot remove snapshot with child")."""
        sn, m = env
        base, work, view = "ns/1/committed base", "ns/2/extract 2", "ns/3/view"

        def raised(cls: type[Exception], fn: Callable[..., object], *args: Any) -> str:
            with pytest.raises(cls) as e:
                fn(*args)
            return str(e.value)

        def names(message: str, *keys: str) -> None:
            for key in keys:
                assert key in message, (key, message)
                assert f"/{key}" not in message, f"{message!r} names a prefixed {key!r}"

        sn.prepare("ns/0/active", "")
        sn.commit(base, "ns/0/active")
        sn.prepare(work, base)
        sn.view(view, base)
        names(raised(AlreadyExists, sn.prepare, work, base), work)
        names(raised(AlreadyExists, sn.view, base, ""), base)
        names(raised(NotFound, sn.prepare, "ns/4/new", "ns/missing parent"), "ns/missing parent")
        names(raised(InvalidArgument, sn.prepare, "ns/5/new", work), work)  # parent not committed
        names(raised(AlreadyExists, sn.commit, base, work), base)
        names(raised(NotFound, sn.commit, "ns/6/name", "ns/missing key"), "ns/missing key")
        names(raised(FailedPrecondition, sn.commit, "ns/7/name", view), view)
        names(raised(FailedPrecondition, sn.mounts, base), base)
        names(raised(NotFound, sn.stat, "ns/missing key"), "ns/missing key")
        names(raised(NotFound, sn.remove, "ns/missing key"), "ns/missing key")
        names(raised(InvalidArgument, sn.update, Info("view", view, "", {}), "parent"), view)
        message = raised(FailedPrecondition, sn.remove, base)  # has children
        names(message, base)
        assert "remove" in message, message
        assert sn.stat(base).kind == "committed"

    def test_commit_sets_created_and_updated_to_the_commit_time(self, env: Env) -> None:
        """containerd's storage makes the committed snapshot anew: Created = Updated = the
        commit's time, not Prepare's; an Update then moves Updated only."""
        sn, m = env
        sn.prepare("k", "")
        prepared = sn.stat("k").created
        assert prepared is not None
        time.sleep(0.05)
        slack = _dt.timedelta(microseconds=1)  # both sides truncate to microseconds
        t1 = _dt.datetime.now(_dt.UTC)
        sn.commit("c", "k")
        t2 = _dt.datetime.now(_dt.UTC)
        info = sn.stat("c")
        assert info.created is not None and info.updated is not None
        assert info.created == info.updated, info
        assert t1 - slack <= info.created <= t2 + slack, (t1, info.created, t2)
        assert info.created - prepared >= _dt.timedelta(milliseconds=40)
        assert [i.created for i in sn.infos() if i.name == "c"] == [info.created]
        time.sleep(0.01)
        updated = sn.update(Info("committed", "c", "", {"x": "1"}))
        assert updated.created == info.created and updated.updated is not None and updated.updated > info.updated

    def test_remove_intermediate_fails(self, env: Env) -> None:
        sn, m = env
        for i, parent in enumerate(["", "c0", "c1"]):
            sn.prepare(f"k{i}", parent)
            sn.commit(f"c{i}", f"k{i}")
        with pytest.raises(FailedPrecondition):
            sn.remove("c1")
        sn.remove("c2")
        sn.remove("c1")

    def test_walk_filters(self, env: Env) -> None:
        sn, m = env
        sn.prepare("a/b c", "", labels={"containerd.io/gc.root": "x", "team": "red"})
        sn.commit("base", "a/b c", labels={"team": "blue", "a/b": "slash"})
        sn.prepare("work 1", "base", labels={"team": "red"})
        sn.view("view-1", "base")

        def names(*fs: str) -> list[str]:
            return sorted(i.name for i in sn.infos(*fs))

        assert names() == ["base", "view-1", "work 1"]
        assert names("kind==committed") == ["base"]
        assert names("kind!=committed") == ["view-1", "work 1"]
        assert names("parent==base") == ["view-1", "work 1"]
        assert names("labels.team==red") == ["work 1"]
        assert names('labels."a/b"==slash') == ["base"]
        assert names("labels.team") == ["base", "work 1"]
        assert names("name~=^w") == ["work 1"]
        assert names("kind==active,labels.team==red") == ["work 1"]
        assert names("kind==view", "labels.team==blue") == ["base", "view-1"]  # OR
        with pytest.raises(InvalidArgument):
            sn.infos("kind==")

        seen: list[str] = []
        sn.walk(lambda info: seen.append(sn.stat(info.name).kind))  # stat inside the callback
        assert sorted(seen) == ["active", "committed", "view"]

    def test_file_updates_across_layers(self, env: Env) -> None:
        sn, m = env
        commit_layer(sn, m, "l1", "", lambda t: write_tree(t, {"f": "one\n", "d": None, "d/x": "x"}))

        def change(t: Path) -> None:
            (t / "f").write_text("two\n")
            os.chmod(t / "f", 0o600)
            os.chmod(t / "d", 0o700)

        commit_layer(sn, m, "l2", "l1", change)
        view = m.mount(sn.view("v", "l2"))
        assert (view / "f").read_text() == "two\n"
        assert stat.S_IMODE(os.stat(view / "f").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(view / "d").st_mode) == 0o700
        assert (view / "d/x").read_text() == "x"
        m.unmount(view)

    def test_directory_removed_in_lower_and_recreated(self, env: Env) -> None:
        sn, m = env
        commit_layer(sn, m, "l1", "", lambda t: write_tree(t, {"d": None, "d/a": "a", "d/b": "b"}))
        commit_layer(sn, m, "l2", "l1", lambda t: shutil.rmtree(t / "d"))
        commit_layer(sn, m, "l3", "l2", lambda t: write_tree(t, {"d": None, "d/c": "c"}))
        view = m.mount(sn.view("v", "l3"))
        assert os.listdir(view / "d") == ["c"]
        m.unmount(view)

    def test_chown_lower_tree(self, env: Env) -> None:
        sn, m = env
        commit_layer(sn, m, "l1", "", lambda t: write_tree(t, {"d": None, "d/sub": None, "d/sub/f": "f"}))

        def chown_all(t: Path) -> None:
            for p in [t / "d", t / "d/sub", t / "d/sub/f"]:
                os.chown(p, 1000, 1001)

        commit_layer(sn, m, "l2", "l1", chown_all)
        view = m.mount(sn.view("v", "l2"))
        for p in ["d", "d/sub", "d/sub/f"]:
            st = os.stat(view / p)
            assert (st.st_uid, st.st_gid) == (1000, 1001), p
        assert (view / "d/sub/f").read_text() == "f"
        m.unmount(view)

    def test_directory_permissions_across_three_layers(self, env: Env) -> None:
        sn, m = env

        def l1(t: Path) -> None:
            (t / "d").mkdir(mode=0o700)
            os.chmod(t / "d", 0o700)

        commit_layer(sn, m, "l1", "", l1)
        commit_layer(sn, m, "l2", "l1", lambda t: write_tree(t, {"d/f": "f"}))
        commit_layer(sn, m, "l3", "l2", lambda t: os.chmod(t / "d", 0o750))
        view = m.mount(sn.view("v", "l3"))
        assert stat.S_IMODE(os.stat(view / "d").st_mode) == 0o750
        assert (view / "d/f").read_text() == "f"
        m.unmount(view)

    def test_files_deleted_in_child(self, env: Env) -> None:
        sn, m = env
        commit_layer(sn, m, "l1", "", lambda t: write_tree(t, {"a": "a", "b": "b", "d": None, "d/c": "c"}))
        commit_layer(sn, m, "l2", "l1", lambda t: (os.unlink(t / "a"), shutil.rmtree(t / "d")))
        view = m.mount(sn.view("v", "l2"))
        assert os.listdir(view) == ["b"]
        m.unmount(view)

    def test_hardlink_to_lower_then_delete_original(self, env: Env) -> None:
        sn, m = env
        commit_layer(sn, m, "l1", "", lambda t: write_tree(t, {"orig": "content\n"}))

        def link_and_delete(t: Path) -> None:
            os.link(t / "orig", t / "link")
            assert os.stat(t / "link").st_nlink == 2
            os.unlink(t / "orig")

        commit_layer(sn, m, "l2", "l1", link_and_delete)
        view = m.mount(sn.view("v", "l2"))
        assert os.listdir(view) == ["link"]
        assert (view / "link").read_text() == "content\n"
        m.unmount(view)

    def test_writes_to_a_view_fail(self, env: Env) -> None:
        sn, m = env
        commit_layer(sn, m, "l1", "", lambda t: write_tree(t, {"f": "f"}))
        commit_layer(sn, m, "l2", "l1", lambda t: write_tree(t, {"g": "g"}))
        for key, parent in [("v1", "l1"), ("v2", "l2")]:
            view = m.mount(sn.view(key, parent))
            with pytest.raises(OSError) as e:
                (view / "new").write_text("x")
            assert e.value.errno == errno.EROFS
            m.unmount(view)

    def test_root_mode(self, env: Env) -> None:
        sn, m = env
        target = m.mount(sn.prepare("k", ""))
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o755
        m.unmount(target)

    def test_rename_including_lower_directory(self, env: Env) -> None:
        sn, m = env
        commit_layer(sn, m, "l1", "", lambda t: write_tree(t, {"dir": None, "dir/sub": None, "dir/sub/f": "f",
                                                               "file": "file"}))

        def renames(t: Path) -> None:
            os.rename(t / "dir", t / "moved")
            os.rename(t / "file", t / "moved/file2")

        commit_layer(sn, m, "l2", "l1", renames)
        commit_layer(sn, m, "l3", "l2", lambda t: write_tree(t, {"moved/sub/g": "g"}))
        view = m.mount(sn.view("v", "l3"))
        assert sorted(os.listdir(view)) == ["moved"]
        assert sorted(os.listdir(view / "moved")) == ["file2", "sub"]
        assert (view / "moved/sub/f").read_text() == "f" and (view / "moved/sub/g").read_text() == "g"
        m.unmount(view)

    def test_usage(self, env: Env) -> None:
        sn, m = env
        target = m.mount(sn.prepare("k", ""))
        (target / "big").write_bytes(os.urandom(64 * 1024))
        m.unmount(target)
        active = sn.usage("k")
        assert active.size >= 64 * 1024 and active.inodes == 1
        sn.commit("c", "k")
        assert sn.usage("c") == active
        sn.prepare("k2", "c")
        assert sn.usage("k2").inodes == 0  # this snapshot only

    def test_128_layers_equal_a_flat_copy(self, env: Env, tmp_path: Path) -> None:
        sn, m = env
        flat = tmp_path / "flat"
        flat.mkdir()
        parent = ""
        for i in range(128):
            def change(t: Path, i: int = i) -> None:
                for root in (t, flat):
                    (root / f"f{i}").write_text(f"{i}\n")
                    (root / "shared").write_text(f"v{i}\n")
                    if i % 10 == 9:
                        os.unlink(root / f"f{i - 5}")
            key = f"k{i}"
            target = m.mount(sn.prepare(key, parent))
            change(target)
            if i % 32 == 31:  # every so often the mount must equal the flat copy
                assert tree_fingerprint([str(target)]) == tree_fingerprint([str(flat)])
            m.unmount(target)
            sn.commit(f"c{i}", key)
            parent = f"c{i}"
        view = m.mount(sn.view("v", parent))
        assert tree_fingerprint([str(view)]) == tree_fingerprint([str(flat)])
        m.unmount(view)

    def test_cleanup_removes_only_what_the_database_does_not_know(self, env: Env, store_root: Path) -> None:
        sn, m = env
        commit_layer(sn, m, "base", "", lambda t: write_tree(t, {"f": "kept\n"}))
        sn.prepare("work", "base")
        sn.view("v", "base")
        before = sorted(sn.infos(), key=lambda i: i.name)
        orphan = store_root / "snapshots" / "999"
        (orphan / "fs").mkdir(parents=True)
        crashed = store_root / "tmp" / "new-crashed"
        crashed.mkdir()
        sn.cleanup()
        assert not orphan.exists() and not crashed.exists()
        assert sorted(sn.infos(), key=lambda i: i.name) == before  # timestamps and labels included
        for key in ("work", "v"):
            target = m.mount(sn.mounts(key))
            assert (target / "f").read_text() == "kept\n", key
            m.unmount(target)

"""The whole suite's scheduling under pytest-xdist, in one place.

``scripts/test`` runs the suite in 2 worker processes (``-n 2 --dist loadgroup``): tests go to
whichever worker is free, except those of one *group*, which all run on one worker, one after
the other. The scheduler (``pytest_xdist_make_scheduler``) takes each test's group from its node
id (``group_of_nodeid``; no test module marks itself):

- ``GROUPS``: tests that share something outside their own tmp dirs, which two processes
  would fight over (the reason is written beside each);
- ``MODULE_GROUPS``: a module whose tests share a module- or session-scoped fixture defined in
  that module (an image, a podman scenario, a Go build, a store) is one group, so that fixture is
  built once, on one worker, and torn down by it (collection fails if such a module is missing).

Everything else runs wherever it lands; such tests keep to their tmp dirs, bind port 0, scope
"nothing left" checks to their own pids and paths. The order in which workers take groups is
longest first (``WEIGHTS``, seconds measured in a full run), so the long ones do not start last
and leave one worker idle at the end; a serial run keeps the collection order.
"""

from __future__ import annotations

import pytest

# group -> test modules (paths from the repository root)
GROUPS: dict[str, tuple[str, ...]] = {
    # the system user layerfs-rootless, its home in /var/tmp (each session empties it), its venv,
    # /etc/subuid and /etc/subgid, and /dev/fuse made 0666 while a session runs
    # (tests/support/rootless.py: one session at a time, under a file lock)
    "rootless-user": ("tests/integration/test_rootless.py", "tests/integration/test_rootless_podman.py"),
    # containerd 1.6 puts its shims' sockets in /run/containerd/s whatever its config says, and the
    # teardown removes that directory again when it made it (tests/support/containerd_util.py)
    "containerd-run-dir": ("tests/integration/test_containerd_e2e.py",),
}

# seconds per group (or per test, by node id), estimated from earlier serial runs (to refresh from a
# --durations run): the order workers take them in
WEIGHTS: dict[str, float] = {
    "rootless-user": 420,
    "tests/integration/test_podman.py": 330,
    "tests/integration/test_soak.py": 300,
    "tests/integration/test_containerd_testsuite.py": 160,
    "tests/conformance/test_stateful.py::test_random_operations_match_kernel[fuse]": 90,
    "tests/conformance/test_stateful.py::test_random_operations_match_kernel[fuse-kernel]": 90,
    "tests/integration/test_snapshotter_grpc.py::TestOverGrpc::test_128_layers_equal_a_flat_copy[fuse]": 80,
    "tests/integration/test_snapshotter.py::TestPythonAPI::test_128_layers_equal_a_flat_copy[fuse]": 75,
    "tests/integration/test_bench.py::test_quick_run_measures_everything_and_cleans_up": 70,
    "containerd-run-dir": 60,
    "tests/integration/test_store_crash.py": 40,
}

# modules whose tests share a module- or session-scoped fixture defined in the module: one group
# each (checked at collection: a module that has such a fixture and is missing here is an error)
MODULE_GROUPS: tuple[str, ...] = (
    "tests/integration/test_podman.py",
    "tests/integration/test_soak.py",
    "tests/integration/test_store.py",
    "tests/integration/test_store_crash.py",
    "tests/integration/test_inspect.py",
    "tests/integration/test_containerd_testsuite.py",
    "tests/unit/test_analysis.py",
    "tests/unit/test_analysis_tui.py",
    "tests/unit/test_images.py",
)

_MODULE_GROUP_SCOPES = ("module", "package", "session")


def group_of_nodeid(nodeid: str) -> str | None:
    """The xdist group of a test (None: it may run anywhere), from its node id alone: the
    controller, which schedules, has only node ids."""
    module = nodeid.split("::", 1)[0]
    for name, modules in GROUPS.items():
        if module in modules:
            return name
    return module if module in MODULE_GROUPS else None


def _shared_fixture_in_module(item: pytest.Item) -> bool:
    """Whether ``item`` uses a module/session-scoped fixture defined in its own module."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    module = item.nodeid.split("::", 1)[0]
    for defs in info.name2fixturedefs.values():
        for fixturedef in defs:
            if fixturedef.scope in _MODULE_GROUP_SCOPES and fixturedef.baseid == module:
                return True
    return False


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """``--dist loadgroup`` with the groups above. (xdist's own loadgroup reads ``xdist_group``
    marks through a node id suffix that pytest 9.2 no longer lets it set: every test then
    ran wherever, so the groups are given to the scheduler here instead.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Groups(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return group_of_nodeid(nodeid) or nodeid

    return Groups(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = sorted({item.nodeid.split("::", 1)[0] for item in items
                      if _shared_fixture_in_module(item) and group_of_nodeid(item.nodeid) is None})
    if missing:
        raise pytest.UsageError(f"tests/conftest.py: add to MODULE_GROUPS (a module-scoped fixture): {missing}")
    if hasattr(config, "workerinput"):  # an xdist worker: the scheduler takes groups in this order

        def weight(item: pytest.Item) -> float:
            group = group_of_nodeid(item.nodeid)
            return WEIGHTS.get(group if group is not None else item.nodeid, 0.0)

        items.sort(key=lambda item: -weight(item))  # stable: a group's tests stay in their order

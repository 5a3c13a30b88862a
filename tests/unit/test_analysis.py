"""layerfs.analysis: exact waste accounting of an image with known waste, CI rules, the
merged tree; golden outputs of the views (tests/support/golden/analysis/).

After an intended change of output, rewrite the golden files with
``LAYERFS_UPDATE_GOLDEN=1 pytest tests/unit/test_analysis.py`` and review the diff.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerfs import analysis, importer
from layerfs.analysis import Rules, check_rules, read_rules
from layerfs.cli import render
from layerfs.errors import InvalidArgument
from layerfs.store import Image, Store
from tests.support import goldens, wasteimage
from tests.support.paths import GOLDEN as GOLDEN_ROOT

GOLDEN = GOLDEN_ROOT / "analysis"


def check_golden(name: str, actual: str) -> None:
    goldens.check(GOLDEN, name, actual)


@pytest.fixture(scope="module")
def waste_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Store, Image]]:
    tmp = tmp_path_factory.mktemp("waste")
    layout = wasteimage.build_layout(tmp / "layout")
    store = Store(str(tmp / "store"))
    importer.import_path(store, str(layout), name=wasteimage.NAME)
    try:
        yield store, store.get_image(wasteimage.NAME)
    finally:
        store.close()


def test_accounting_is_exact(waste_store: tuple[Store, Image]) -> None:
    store, img = waste_store
    a = analysis.analyze(store, img)
    exp = wasteimage.EXPECTED
    assert [c.bytes for c in a.layers] == exp["layer_bytes"]
    assert (a.total_bytes, a.visible_bytes, a.wasted_bytes) == (exp["total"], exp["visible"], exp["wasted"])
    assert [c.wasted_bytes for c in a.layers] == exp["layer_wasted"]
    assert [c.overwrites_bytes for c in a.layers] == exp["overwrites"]
    assert [c.deletes_bytes for c in a.layers] == exp["deletes"]
    assert [c.metadata_only_bytes for c in a.layers] == exp["metadata_only"]
    assert a.duplicate_bytes == exp["duplicates"]
    assert a.efficiency == pytest.approx(exp["visible"] / exp["total"])
    assert a.user_wasted_ratio == pytest.approx(exp["wasted"] / (exp["total"] - exp["layer_bytes"][0]))
    # the hard link: one copy in the base layer, and still visible through bin/tool2
    assert a.layers[0].files == 8
    assert "/bin/tool" not in {o.path for o in a.offenders}
    by_path = {o.path: o for o in a.offenders}
    assert by_path["/data/big"].occurrences[0].fate == "deleted"
    assert by_path["/data/big"].occurrences[0].by_layer == 2
    assert [(x.layer, x.fate, x.by_layer) for x in by_path["/etc/conf"].occurrences] == [
        (1, "overwritten", 2), (2, "visible", None)]
    # whole trees: the opaque var/cache and the deleted (renamed) old/
    assert {(p, by_path[p].occurrences[0].by_layer) for p in ("/var/cache/x", "/var/cache/y", "/old/f1")} == {
        ("/var/cache/x", 3), ("/var/cache/y", 3), ("/old/f1", 3)}
    assert [o.path for o in a.offenders][:3] == ["/data/big", "/var/cache/y", "/var/cache/x"]
    # the renamed directory's content is a duplicate of what it was
    dups = {d.copies[-1].path: d for d in a.duplicates}
    assert [(c.layer, c.path, c.visible) for c in dups["/new/f1"].copies] == [(1, "/old/f1", False), (3, "/new/f1", True)]
    assert [(c.layer, c.visible) for c in dups["/bin/tool"].copies] == [(1, True), (3, True)]  # the chmod-only copy
    assert len(a.duplicates) == 4
    assert a.wasted_by_directory() == [("/data", 10000, 1), ("/var/cache", 7000, 2), ("/usr/share/doc", 3000, 2),
                                       ("/old", 600, 1), ("/etc", 100, 1)]
    assert a.wasted_by_directory(1)[1] == ("/var", 7000, 2)


def test_empty_store_layers_and_scratch(tmp_path: Path) -> None:
    (tmp_path / "l1").mkdir()
    a = analysis.analyze_dirs([str(tmp_path / "l1")], name="scratch")
    assert (a.total_bytes, a.wasted_bytes, a.efficiency, a.user_wasted_ratio) == (0, 0, 1.0, 0.0)
    assert analysis.analyze_dirs([], name="none").efficiency == 1.0


def test_rules_cross_and_pass(waste_store: tuple[Store, Image]) -> None:
    a = analysis.analyze(*waste_store)
    results = check_rules(a, Rules(lowest_efficiency=0.5, highest_wasted_bytes=20700, highest_user_wasted_ratio=None))
    assert [(r.rule, r.status) for r in results] == [
        ("lowestEfficiency", "fail"), ("highestWastedBytes", "pass"), ("highestUserWastedPercent", "skip")]
    results = check_rules(a, Rules(lowest_efficiency=0.4, highest_wasted_bytes=20699, highest_user_wasted_ratio=3.0))
    assert [r.status for r in results] == ["pass", "fail", "pass"]


def test_read_dive_ci_file() -> None:
    text = """# dive's sample
rules:
  # ratio
  lowestEfficiency: 0.95
  highestWastedBytes: 20MB
  highestUserWastedPercent: disabled
"""
    assert read_rules(text, ".dive-ci") == Rules(0.95, 20_000_000, None, frozenset({"highest_user_wasted_ratio"}))
    assert Rules(0.9, None, 0.1).merged(read_rules(text, "f")) == Rules(0.95, 20_000_000, None, frozenset({"highest_user_wasted_ratio"}))
    assert read_rules("rules:\n  highestUserWastedPercent: '0.2'\n", "f") == Rules(None, None, 0.2)
    with pytest.raises(InvalidArgument, match=r"f:2: unknown rule 'lowest'"):
        read_rules("rules:\n  lowest: 1\n", "f")
    with pytest.raises(InvalidArgument, match=r"f:2: highestWastedBytes: '20 parsecs' is not a size"):
        read_rules("rules:\n  highestWastedBytes: 20 parsecs\n", "f")
    with pytest.raises(InvalidArgument, match=r"f:2: lowestEfficiency: '1.5' is not a ratio"):
        read_rules("rules:\n  lowestEfficiency: 1.5\n", "f")
    with pytest.raises(InvalidArgument, match=r"f:1: expected 'rules:'"):
        read_rules("lowestEfficiency: 0.5\n", "f")


def test_analysis_golden(waste_store: tuple[Store, Image]) -> None:
    a = analysis.analyze(*waste_store)
    rules = check_rules(a, Rules(0.9, None, 0.1))
    check_golden("analyze.txt", render.render_analysis(a, rules))
    check_golden("analyze_top2.txt", render.render_analysis(a, (), top=2))
    text = render.render_analysis(a, rules, fmt="json")
    check_golden("analyze.json", text)
    data = json.loads(text)
    assert data["schemaVersion"] == 1 and data["passed"] is False
    assert data["wasted_bytes"] == wasteimage.EXPECTED["wasted"]


def test_tree_marks_and_sizes(waste_store: tuple[Store, Image]) -> None:
    store, img = waste_store
    dirs = list(reversed(store.layer_dirs(img.top_chain_id)))
    top = {t.path: t for t in analysis.image_tree(dirs)}
    assert {p: top[p].mark for p in top if top[p].mark} == {
        "/bin/tool": "M", "/new": "A", "/new/f1": "A", "/old": "D", "/var/cache": "C",
        "/var/cache/x": "D", "/var/cache/y": "D", "/var/cache/z": "A"}
    assert top["/bin/tool"].layer == 3 and top["/bin/tool2"].layer == 1 and top["/etc/conf"].layer == 2
    # a directory's size: the files below it; bin/tool and bin/tool2 are two inodes now
    assert top["/bin"].size == 10000 and top["/var/cache"].size == 500 and top["/old"].size == 600
    second = analysis.image_tree(dirs, 2, changes_only=True)
    assert [(t.path, t.mark) for t in second] == [
        ("/data", ""), ("/data/big", "D"), ("/etc", ""), ("/etc/conf", "C"), ("/usr", ""), ("/usr/share", ""),
        ("/usr/share/doc", ""), ("/usr/share/doc/a.txt", "M"), ("/usr/share/doc/b.txt", "M")]
    first = analysis.image_tree(dirs, 1)
    assert all(t.mark == "A" and t.layer == 1 for t in first)
    # the hard link counts once in its directory
    assert {t.path: t.size for t in first}["/bin"] == 5000


def test_tree_golden(waste_store: tuple[Store, Image]) -> None:
    store, img = waste_store
    dirs = list(reversed(store.layer_dirs(img.top_chain_id)))
    check_golden("tree.txt", render.render_file_tree(analysis.image_tree(dirs), upto=3))
    check_golden("tree_layer2_changes.txt",
                 render.render_file_tree(analysis.image_tree(dirs, 2, changes_only=True), upto=2))
    check_golden("tree.json", render.render_file_tree(analysis.image_tree(dirs), fmt="json", upto=3))


def test_history_golden_with_config_only_steps(waste_store: tuple[Store, Image]) -> None:
    from datetime import UTC, datetime

    from layerfs import catalog

    info = catalog.image_info(*waste_store)
    assert [s.empty_layer for s in info.history] == [False, True, False, False, True]
    assert info.history[0].created_ns == 1704164645123456789
    now = datetime(2024, 6, 1, tzinfo=UTC)
    check_golden("history.txt", render.render_history(info, now=now))
    check_golden("history.json", render.render_history(info, fmt="json", now=now))


def test_inspect_golden(waste_store: tuple[Store, Image]) -> None:
    from layerfs import catalog

    details = catalog.image_details(*waste_store)
    check_golden("inspect.json", render.render_inspect(details))
    assert render.render_inspect(details, raw=True).encode() == details.manifest_bytes
    assert json.loads(render.render_inspect(details, config=True))["history"][1]["empty_layer"] is True

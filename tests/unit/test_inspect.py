"""Tests for layerfs.cli.render: units against go-units' own cases, views against golden files.

Golden files live in tests/support/golden/inspect/. After an intended change of output, rewrite
them with ``LAYERFS_UPDATE_GOLDEN=1 pytest tests/unit/test_inspect.py`` and review the diff.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta, timezone

import pytest

from layerfs.cli import render as inspect
from layerfs.cli.render import (
    DfRow,
    ImageInfo,
    LayerInfo,
    human_duration,
    human_size,
    render_changes,
    render_df,
    render_history,
    render_images,
    render_layer_diffs,
    render_tree,
    split_reference,
)
from layerfs.digest import Digest, chain_ids
from layerfs.errors import InvalidArgument
from tests.support import goldens
from tests.support.paths import GOLDEN as GOLDEN_ROOT

GOLDEN = GOLDEN_ROOT / "inspect"
NOW = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)


def check_golden(name: str, actual: str) -> None:
    goldens.check(GOLDEN, name, actual)


# --- fixture: base B; app:1.0 = B+L1; app:latest and mirror/app:2.0 = B+L1+L2; tool = B+L3


def _layers(specs: list[tuple[str, int, str, datetime | None]]) -> tuple[LayerInfo, ...]:
    diff_ids = [Digest.of(name.encode()) for name, *_ in specs]
    chains = chain_ids(diff_ids)
    return tuple(
        LayerInfo(
            chain_id=chain,
            diff_id=diff,
            parent=chains[i - 1] if i else None,
            size=size,
            created_by=created_by,
            created=created,
        )
        for i, (chain, diff, (_name, size, created_by, created)) in enumerate(
            zip(chains, diff_ids, specs, strict=True)
        )
    )


BASE = ("base", 74_800_000, "/bin/sh -c #(nop) ADD file:0a1b2c in / ", NOW - timedelta(days=800))
L1 = (
    "l1",
    1234,
    "RUN /bin/sh -c apt-get update \\\n    && apt-get install -y --no-install-recommends ca-certificates curl\t# buildkit",
    NOW - timedelta(weeks=3),
)
L2 = ("l2", 429_900_000, "COPY app /opt/app # buildkit", NOW - timedelta(hours=2))
L3 = ("l3", 0, "", None)

CHAIN_1 = _layers([BASE, L1])
CHAIN_2 = _layers([BASE, L1, L2])
CHAIN_3 = _layers([BASE, L3])


def _config(n: int) -> str:
    return Digest.of(f"config {n}".encode())


IMAGES = [
    ImageInfo("example.com/team/app:1.0", _config(1), NOW - timedelta(weeks=3), CHAIN_1),
    ImageInfo("example.com/team/app:latest", _config(2), NOW - timedelta(hours=2), CHAIN_2, Digest.of(b"m2")),
    ImageInfo("localhost:5000/mirror/app:2.0", _config(2), NOW - timedelta(hours=2), CHAIN_2),
    ImageInfo(f"tools@{Digest.of(b'tools manifest')}", _config(3), None, CHAIN_3),
]


# --- units ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, "0B"),
        (999, "999B"),
        (1000, "1kB"),
        (1024, "1.024kB"),
        (1234, "1.234kB"),
        (999_960, "1000kB"),  # rounds up inside %.4g without moving to the next unit, as in Go
        (429_900_000, "429.9MB"),
        (1_000_000_000, "1GB"),
        (5_368_709_120, "5.369GB"),
        (1_000_000_000_000, "1TB"),
        (3_000_000_000_000_000, "3PB"),
        (2**63 - 1, "9.223EB"),
    ],
)
def test_human_size_matches_go_units(size: int, expected: str) -> None:
    assert human_size(size) == expected


def test_human_size_precision() -> None:
    assert human_size(429_912_345, precision=3) == "430MB"


SEC, MIN, HOUR, DAY = 1, 60, 3600, 86400
WEEK, MONTH, YEAR = 7 * DAY, 30 * DAY, 365 * DAY


# go-units duration_test.go's table, plus the boundaries either side of each rule.
@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (-5, "Less than a second"),
        (0, "Less than a second"),
        (0.45, "Less than a second"),
        (0.999, "Less than a second"),
        (1, "1 second"),
        (1.9, "1 second"),
        (2, "2 seconds"),
        (45, "45 seconds"),
        (59, "59 seconds"),
        (59.99, "59 seconds"),
        (60, "About a minute"),
        (119, "About a minute"),
        (120, "2 minutes"),
        (3 * MIN, "3 minutes"),
        (35 * MIN + 40, "35 minutes"),
        (59 * MIN, "59 minutes"),
        (HOUR - 1, "59 minutes"),
        (HOUR, "About an hour"),
        (HOUR + 29 * MIN, "About an hour"),
        (HOUR + 30 * MIN, "2 hours"),  # Go rounds half away from zero
        (2 * HOUR + 30 * MIN, "3 hours"),  # banker's rounding would give 2
        (HOUR + 31 * MIN, "2 hours"),
        (3 * HOUR + 29 * MIN, "3 hours"),
        (3 * HOUR + 31 * MIN, "4 hours"),
        (24 * HOUR, "24 hours"),
        (DAY + 12 * HOUR, "36 hours"),
        (47 * HOUR + 29 * MIN, "47 hours"),
        (47 * HOUR + 30 * MIN, "2 days"),
        (2 * DAY, "2 days"),
        (7 * DAY, "7 days"),
        (13 * DAY + 5 * HOUR, "13 days"),
        (2 * WEEK - HOUR, "13 days"),
        (2 * WEEK, "2 weeks"),
        (2 * WEEK + 4 * DAY, "2 weeks"),
        (3 * WEEK, "3 weeks"),
        (4 * WEEK + 3 * DAY, "4 weeks"),
        (MONTH, "4 weeks"),
        (MONTH + 2 * WEEK, "6 weeks"),
        (2 * MONTH - HOUR, "8 weeks"),
        (2 * MONTH, "2 months"),
        (3 * MONTH + WEEK, "3 months"),
        (5 * MONTH + 2 * WEEK, "5 months"),
        (13 * MONTH, "13 months"),
        (24 * MONTH, "24 months"),
        (2 * YEAR - HOUR, "24 months"),
        (2 * YEAR, "2 years"),
        (24 * MONTH + 2 * WEEK, "2 years"),
        (3 * YEAR + 2 * MONTH, "3 years"),
        (10 * YEAR, "10 years"),
    ],
)
def test_human_duration_matches_go_units(seconds: float, expected: str) -> None:
    assert human_duration(seconds) == expected


# --- images ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("alpine:3.20", ("alpine", "3.20")),
        ("alpine", ("alpine", "<none>")),
        ("localhost:5000/app", ("localhost:5000/app", "<none>")),
        ("localhost:5000/app:v1", ("localhost:5000/app", "v1")),
        (f"app@{Digest.of(b'x')}", ("app", "<none>")),
        (f"app:v1@{Digest.of(b'x')}", ("app", "v1")),
    ],
)
def test_split_reference(name: str, expected: tuple[str, str]) -> None:
    assert split_reference(name) == expected


def test_images_table_golden() -> None:
    check_golden("images.txt", render_images(IMAGES, now=NOW))
    check_golden("images_no_trunc.txt", render_images(IMAGES, no_trunc=True, now=NOW))


def test_images_json_golden() -> None:
    text = render_images(IMAGES, fmt="json", now=NOW)
    check_golden("images.json", text)
    data = json.loads(text)
    assert [row["name"] for row in data] == [
        "example.com/team/app:latest",
        "localhost:5000/mirror/app:2.0",
        "example.com/team/app:1.0",
        IMAGES[3].name,
    ]
    assert data[0]["size"] == 74_800_000 + 1234 + 429_900_000
    assert data[0]["created"] == "2024-06-01T10:00:00Z"
    assert data[0]["layers"] == [layer.chain_id for layer in CHAIN_2]
    assert data[3]["created"] is None and data[3]["tag"] == "<none>"


def test_images_table_alignment_is_docker_tabwriter() -> None:
    text = render_images(IMAGES[:1], now=NOW)
    header, row = text.splitlines()
    # minwidth 10, padding 3: "TAG" is padded to 10, "IMAGE ID" to 12 + 3.
    assert header == "REPOSITORY" + " " * 13 + "TAG       IMAGE ID       CREATED       SIZE"
    assert row.split()[-1] == "74.8MB" and not row.endswith(" ")
    assert row[row.index("1.0") :].startswith("1.0       ")


def test_images_naive_and_offset_times_are_utc() -> None:
    naive = ImageInfo("a:1", _config(1), datetime(2024, 6, 1, 11, 0), ())
    offset = ImageInfo(
        "b:1", _config(1), datetime(2024, 6, 1, 13, 0, tzinfo=timezone(timedelta(hours=2))), ()
    )
    data = json.loads(render_images([naive, offset], fmt="json"))
    assert [row["created"] for row in data] == ["2024-06-01T11:00:00Z", "2024-06-01T11:00:00Z"]
    assert "About an hour ago" in render_images([naive], now=NOW)


def test_images_empty_prints_header_only() -> None:
    assert render_images([], now=NOW) == "REPOSITORY   TAG       IMAGE ID   CREATED   SIZE\n"
    assert render_images([], fmt="json") == "[]\n"


def test_unknown_format_is_a_usage_error() -> None:
    with pytest.raises(InvalidArgument, match="yaml"):
        render_images(IMAGES, fmt="yaml")
    with pytest.raises(InvalidArgument):
        render_tree(IMAGES, fmt="table")


# --- tree --------------------------------------------------------------------------------------


def test_tree_golden() -> None:
    text = render_tree(IMAGES)
    check_golden("tree.txt", text)
    lines = text.splitlines()
    # The base layer is shared by every image, so it is the only root and appears once.
    assert len(lines) == 4 and lines[0].startswith("└─" + CHAIN_1[0].chain_id[7:19])
    assert lines[0].endswith("Size: 74.8MB Virtual Size: 74.8MB")
    tip = next(line for line in lines if CHAIN_2[2].chain_id[7:19] in line)
    assert tip.endswith("Tags: example.com/team/app:latest, localhost:5000/mirror/app:2.0")
    assert "Virtual Size: 504.7MB" in tip


def test_tree_no_trunc_golden() -> None:
    check_golden("tree_no_trunc.txt", render_tree(IMAGES, no_trunc=True))


def test_tree_json_golden() -> None:
    text = render_tree(IMAGES, fmt="json")
    check_golden("tree.json", text)
    (root,) = json.loads(text)
    assert root["id"] == CHAIN_1[0].chain_id and root["tags"] == []
    assert isinstance(root["size"], int) and root["virtual_size"] == 74_800_000
    l1 = next(kid for kid in root["children"] if kid["id"] == CHAIN_1[1].chain_id)
    assert l1["tags"] == ["example.com/team/app:1.0"]
    assert [kid["id"] for kid in l1["children"]] == [CHAIN_2[2].chain_id]


def test_tree_json_is_laid_out_like_json_dumps() -> None:
    text = render_tree(IMAGES, fmt="json")
    assert text == json.dumps(json.loads(text), indent=2) + "\n"


def _check_dot_structure(text: str) -> None:
    """What `dot` would reject, checked without it: one statement a line, quoted ids."""
    quoted = r'"(?:[^"\\]|\\.)*"'
    node = re.compile(rf"  ({quoted}) \[label={quoted}(?:, style={quoted}, fillcolor={quoted})?\];")
    edge = re.compile(rf"  ({quoted}) -> ({quoted});")
    lines = text.splitlines()
    assert lines[0] == "digraph layers {" and lines[-1] == "}"
    assert lines[1] == '  node [shape=box, fontname="monospace"];'
    declared: set[str] = set()
    used: set[str] = set()
    for line in lines[2:-1]:
        if match := node.fullmatch(line):
            declared.add(match[1])
        elif match := edge.fullmatch(line):
            used.update(match.groups())
        else:
            raise AssertionError(f"not a DOT node or edge statement: {line!r}")
    assert used <= declared


def test_tree_dot_golden_and_valid() -> None:
    text = render_tree(IMAGES, fmt="dot")
    check_golden("tree.dot", text)
    _check_dot_structure(text)
    assert text.count(" -> ") == 3  # B->L1, L1->L2, B->L3
    if shutil.which("dot") is not None:
        subprocess.run(["dot", "-Tcanon"], input=text, text=True, capture_output=True, check=True)


def test_tree_dot_quotes_awkward_tags() -> None:
    image = ImageInfo('we"ird\\name:1', _config(9), None, CHAIN_1)
    text = render_tree([image], fmt="dot")
    _check_dot_structure(text)
    assert 'we\\"ird\\\\name:1' in text
    if shutil.which("dot") is not None:
        out = subprocess.run(["dot", "-Tjson"], input=text, text=True, capture_output=True, check=True)
        labels = [obj.get("label", "") for obj in json.loads(out.stdout)["objects"]]
        assert any('we"ird\\\\name:1' in label for label in labels)


def test_tree_zero_layer_images_share_one_none_node_last() -> None:
    empty = [ImageInfo("scratch:b", _config(5), None, ()), ImageInfo("scratch:a", _config(6), None, ())]
    lines = render_tree([*empty, IMAGES[0]]).splitlines()
    assert (
        lines[0].startswith("├─")
        and lines[-1] == "└─<none> Size: 0B Virtual Size: 0B Tags: scratch:a, scratch:b"
    )
    assert lines[1].startswith("│ └─")
    (none,) = [n for n in json.loads(render_tree(empty, fmt="json"))]
    assert none == {
        "id": None,
        "size": 0,
        "virtual_size": 0,
        "tags": ["scratch:a", "scratch:b"],
        "children": [],
    }
    _check_dot_structure(render_tree(empty, fmt="dot"))


def test_tree_prefixes_for_sibling_roots_and_nested_children() -> None:
    other = _layers([("other base", 10, "", None), ("other top", 5, "", None)])
    text = render_tree([*IMAGES, ImageInfo("other:1", _config(7), None, other)])
    prefixes = [line[: len(line) - len(line.lstrip("│├└─ "))] for line in text.splitlines()]
    roots = [p for p in prefixes if p in ("├─", "└─")]
    assert roots[-1] == "└─" and roots[:-1] == ["├─"] * (len(roots) - 1) and len(roots) == 2
    # Children of a non-last root keep their parent's vertical line; of the last, blanks.
    assert {p[:2] for p in prefixes if len(p) > 2} <= {"│ ", "  "}


def test_tree_empty() -> None:
    assert render_tree([]) == ""
    assert render_tree([], fmt="json") == "[]\n"
    assert render_tree([], fmt="dot") == 'digraph layers {\n  node [shape=box, fontname="monospace"];\n}\n'


def test_tree_survives_chains_deeper_than_the_recursion_limit() -> None:
    deep = _layers([(f"layer {i}", i, "", None) for i in range(1200)])
    image = ImageInfo("deep:1", _config(8), None, deep)
    text = render_tree([image])
    assert len(text.splitlines()) == 1200 and text.splitlines()[-1].endswith("Tags: deep:1")
    as_json = render_tree([image], fmt="json")
    assert as_json.count('"children": [\n') == 1199
    assert render_tree([image], fmt="dot").count(" -> ") == 1199


def test_forest_links_each_chain_id_once() -> None:
    # Inconsistent input (a chain id under two parents) must not loop or duplicate.
    a, b = CHAIN_1
    swapped = (
        LayerInfo(b.chain_id, b.diff_id, None, b.size),
        LayerInfo(a.chain_id, a.diff_id, b.chain_id, a.size),
    )
    text = render_tree([IMAGES[0], ImageInfo("bad:1", _config(9), None, swapped)])
    assert len(text.splitlines()) == 2


# --- history, diffs, changes, df -------------------------------------------------------------


def test_history_golden() -> None:
    image = IMAGES[1]
    text = render_history(image, now=NOW)
    check_golden("history.txt", text)
    check_golden("history_no_trunc.txt", render_history(image, no_trunc=True, now=NOW))
    check_golden("history.json", render_history(image, fmt="json"))
    lines = text.splitlines()
    assert lines[0].split() == ["DIFF", "ID", "CREATED", "CREATED", "BY", "SIZE", "COMMENT"]
    assert lines[1].startswith(CHAIN_2[2].diff_id[7:19])  # top first, diff ids
    assert "RUN /bin/sh -c apt-get update \\ && apt-get i…" in lines[2]
    assert "N/A" not in text and "2 years ago" in lines[3]


def test_history_json_keeps_full_values() -> None:
    (top, middle, base) = json.loads(render_history(IMAGES[1], fmt="json"))
    assert middle["created_by"] == L1[2] and middle["size"] == 1234
    assert top["diff_id"] == CHAIN_2[2].diff_id and base["chain_id"] == CHAIN_2[0].chain_id


def test_history_created_by_width_is_docker_ellipsis() -> None:
    layer = LayerInfo(Digest.of(b"c"), Digest.of(b"c"), None, 1, created_by="x" * 46)
    row = render_history(ImageInfo("h:1", _config(1), None, (layer,)), now=NOW).splitlines()[1]
    assert "x" * 44 + "…" in row and "x" * 45 not in row
    layer45 = LayerInfo(Digest.of(b"c"), Digest.of(b"c"), None, 1, created_by="y" * 45)
    assert "y" * 45 + " " in render_history(ImageInfo("h:1", _config(1), None, (layer45,)), now=NOW)


CHANGES = [
    [("A", "/bin"), ("A", "/bin/sh"), ("A", "/etc"), ("A", "/etc/os-release")],
    [("C", "/etc"), ("A", "/etc/ssl/certs/ca-certificates.crt"), ("D", "/var/cache/apt/pkgcache.bin")],
    [("A", "/opt/app"), ("A", "/opt/app/odd\nname"), ("C", "/etc/os-release")],
]


def test_layer_diffs_golden() -> None:
    per_layer = list(zip(CHAIN_2, CHANGES, strict=True))
    text = render_layer_diffs(per_layer)
    check_golden("layer_diffs.txt", text)
    check_golden("layer_diffs.json", render_layer_diffs(per_layer, fmt="json"))
    headers = [line for line in text.splitlines() if line.startswith("#")]
    assert headers[1].startswith(f"# layer 2/3 diffID {CHAIN_2[1].diff_id[7:19]}  RUN ")
    assert headers[1].endswith("  (+1 ~1 -1)")
    assert "A /opt/app/odd\\x0aname" in text  # a newline in a name cannot forge a line
    data = json.loads(render_layer_diffs(per_layer, fmt="json"))
    assert data[2]["index"] == 3 and data[2]["changes"][1] == {"kind": "A", "path": "/opt/app/odd\nname"}


def test_changes_table_and_json() -> None:
    changes = [("C", "/etc"), ("A", "/etc/new"), ("D", "/tmp/gone"), ("A", "/bad\udcffname")]
    assert render_changes(changes) == "C /etc\nA /etc/new\nD /tmp/gone\nA /bad\\xffname\n"
    assert json.loads(render_changes(changes, fmt="json"))[2] == {"kind": "D", "path": "/tmp/gone"}
    assert render_changes([]) == ""
    with pytest.raises(InvalidArgument, match="/x"):
        render_changes([("M", "/x")])


DF = [
    DfRow("Images", 4, 2, 504_701_234, 429_900_000),
    DfRow("Layers", 5, 4, 504_701_234, 0),
    DfRow("Containers", 2, 1, 2_048, 1_024),
    DfRow("Blobs", 0, 0, 0, 0),
]


def test_df_golden() -> None:
    text = render_df(DF)
    check_golden("df.txt", text)
    assert text.splitlines()[1].endswith("429.9MB (85%)")  # docker truncates the percentage
    assert text.splitlines()[4].endswith("0B")
    data = json.loads(render_df(DF, fmt="json"))
    assert data[0] == {
        "type": "Images",
        "total": 4,
        "active": 2,
        "size": 504_701_234,
        "reclaimable": 429_900_000,
    }


def test_public_api_is_exported() -> None:
    for name in inspect.__all__:
        assert hasattr(inspect, name)

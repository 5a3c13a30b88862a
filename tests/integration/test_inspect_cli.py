"""The command line around the views, through the real CLI on real stores: ``gc --dry-run``,
shell completion of image and container names (click's completion protocol, as bash runs
it), man pages rendered by man(1), progress of ``export --rebuild-layers`` on a terminal.

Nothing here changes global state: every store is under ``tmp_path``; the one test that
mounts (a kernel overlay, as root) detaches what is left under its directory in a finalizer.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import imagebuild as ib
from tests.support.cliresult import mounted_under
from tests.support.markers import needs_root


def lf(root: Path, *args: str, check: bool = True, env: dict[str, str] | None = None
       ) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "layerfs", "--root", str(root), "-q", *args],
                       capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"layerfs {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return r


def _import(tmp_path: Path, root: Path, name: str, layers: list[dict[str, str]]) -> None:
    layout = tmp_path / f"layout-{len(list(tmp_path.iterdir()))}"
    desc = ib.add_image(layout, [ib.layer_tar(files) for files in layers])
    ib.set_index(layout, [(desc, {ib.REF_NAME: "t"})])
    lf(root, "import", str(layout), "--name", name)


def _state(root: Path) -> tuple[list[tuple[str, int]], str, str]:
    files = sorted((str(p.relative_to(root)), p.lstat().st_size) for p in root.rglob("*")
                   if p.is_file() and p.parent != root)  # blobs and snapshots (meta.db's WAL aside)
    return files, lf(root, "images", "--format", "json").stdout, lf(root, "ps", "--format", "json").stdout


def _du(paths: list[Path]) -> int:
    """Bytes allocated below each path, hardlinks once, as du(1) counts them."""
    if not paths:
        return 0
    out = subprocess.run(["du", "-s", "--block-size=1", *map(str, paths)], capture_output=True, text=True,
                         check=True).stdout
    return sum(int(line.split()[0]) for line in out.splitlines())


def test_gc_dry_run_lists_what_gc_removes_and_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "store"
    _import(tmp_path, root, "demo/keep:1", [{"etc/os": "base\n"}])
    _import(tmp_path, root, "demo/gone:1", [{"etc/os": "base\n"}, {"srv/app": "x" * 200_000}])
    # a container keeps its image's layers after rmi -f; once it is removed they are garbage
    lf(root, "create", "demo/gone:1", "c1")
    lf(root, "rmi", "-f", "demo/gone:1")
    lf(root, "rm", "c1")
    before = _state(root)

    dry = lf(root, "gc", "--dry-run").stdout.splitlines()
    assert _state(root) == before  # nothing removed, no image or container changed
    assert lf(root, "gc", "-n").stdout.splitlines() == dry  # and so it says the same again

    layers = [line.split()[3:5] for line in dry if line.startswith("Would delete layer: ")]
    blobs = [line.split()[3] for line in dry if line.startswith("Would delete blob: ")]
    assert len(layers) == 1 and blobs  # the app layer; the base is still demo/keep's
    total = int(dry[-1].split("(")[1].split()[0])
    assert dry[-1].startswith("Would free ") and dry[-1].endswith(f"{len(layers)} layers, {len(blobs)} blobs")
    assert total == _du([root / d for _c, d in layers] + [root / "blobs" / "sha256" / b.partition(":")[2]
                                                          for b in blobs])
    assert all((root / d / "fs" / "srv" / "app").is_file() for _c, d in layers)

    done = lf(root, "gc").stdout.splitlines()
    assert sorted(line.split()[2] for line in done if line.startswith("Deleted layer: ")) == \
        sorted(c for c, _d in layers)
    assert sorted(line.split()[2] for line in done if line.startswith("Deleted blob: ")) == sorted(blobs)
    assert not any((root / d).exists() for _c, d in layers)
    assert lf(root, "gc", "--dry-run").stdout == "Would free 0B (0 bytes): 0 layers, 0 blobs\n"
    assert lf(root, "images", "-q").stdout.strip() and "demo/keep" in lf(root, "images").stdout


# --- shell completion -----------------------------------------------------------------------

LAYERFS_BIN = Path(sys.executable).parent  # the venv's bin, where the layerfs script is


def _completion_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("_LAYERFS", "COMP_"))}
    env["LAYERFS_ROOT"] = str(root)
    env["PATH"] = f"{LAYERFS_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture
def named_store(tmp_path: Path) -> Path:
    """Images demo/app:1, demo/app:2, docker.io/library/busybox:latest; container box1 of demo/app:1."""
    root = tmp_path / "store"
    for name in ("demo/app:1", "demo/app:2", "docker.io/library/busybox:latest"):
        _import(tmp_path, root, name, [{"etc/os": f"{name}\n"}])
    lf(root, "create", "demo/app:1", "box1")
    return root


def _bash_complete(root: Path, *words: str) -> list[str]:
    """What bash's completion of ``layerfs WORDS...`` offers, through the script
    ``layerfs completion bash`` installs (COMPREPLY after the completion function ran)."""
    words_q = " ".join(f"'{w}'" for w in ("layerfs", *words))
    script = (f'eval "$(layerfs completion bash)"; COMP_WORDS=({words_q}); COMP_CWORD={len(words)}; '
              'COMPREPLY=(); _layerfs_completion layerfs; printf "%s\\n" "${COMPREPLY[@]}"')
    r = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], capture_output=True, text=True,
                       env=_completion_env(root), timeout=120, check=True)
    return [line for line in r.stdout.splitlines() if line]


def test_bash_completes_image_and_container_names_from_the_store(named_store: Path) -> None:
    images = ["busybox:latest", "demo/app:1", "demo/app:2", "docker.io/library/busybox:latest"]
    assert _bash_complete(named_store, "history", "") == images
    assert _bash_complete(named_store, "history", "demo/app:") == ["demo/app:1", "demo/app:2"]
    assert _bash_complete(named_store, "rm", "") == ["box1"]  # containers only
    assert _bash_complete(named_store, "commit", "b") == ["box1"]
    assert _bash_complete(named_store, "mount", "b") == ["box1", "busybox:latest"]  # either
    assert _bash_complete(named_store, "analyze", "busy") == ["busybox:latest"]
    assert _bash_complete(named_store, "hist") == ["history"]  # commands, as click completes them
    assert "--no-trunc" in _bash_complete(named_store, "history", "--")


def test_completion_protocol_for_zsh_fish_and_a_missing_store(named_store: Path, tmp_path: Path) -> None:
    def run(shell: str, words: str, cword: str, root: Path) -> str:
        env = _completion_env(root) | {"_LAYERFS_COMPLETE": f"{shell}_complete", "COMP_WORDS": words,
                                        "COMP_CWORD": cword}
        return subprocess.run([str(LAYERFS_BIN / "layerfs")], capture_output=True, text=True, env=env,
                              timeout=120, check=True).stdout

    assert run("zsh", "layerfs rm ", "2", named_store).split("\n")[:3] == ["plain", "box1", "container of demo/app:1"]
    fish = run("fish", "layerfs tree demo/app", "demo/app", named_store).splitlines()
    assert fish == ["plain,demo/app:1\timage", "plain,demo/app:2\timage"]
    missing = tmp_path / "no-store"
    assert run("bash", "layerfs history ", "2", missing).strip() == ""  # nothing offered, nothing made
    assert not missing.exists()
    for shell in ("bash", "zsh", "fish"):  # the scripts a user installs
        script = lf(named_store, "completion", shell).stdout
        assert "_LAYERFS_COMPLETE" in script and f"{shell}_complete" in script


# --- man pages ------------------------------------------------------------------------------


MAN_ENV = os.environ | {"MANWIDTH": "100", "MANPAGER": "cat", "PAGER": "cat", "LC_ALL": "C.UTF-8"}


def _words(text: str) -> str:
    """man's output as one line of words: justification and hyphenation undone."""
    return " ".join(re.sub("\u2010\n\\s*", "", text).replace("\u2212", "-").split())


def test_every_command_has_a_man_page_that_man_renders(tmp_path: Path) -> None:
    out = tmp_path / "man1"
    lf(tmp_path / "store", "man", "--output", str(out))
    pages = sorted(p.name for p in out.iterdir())
    helped = subprocess.run([sys.executable, "-c", "from layerfs.cli import _plugins, cli\n"
                             "from layerfs.cli.docs import walk, page_name\n_plugins()\n"
                             "print('\\n'.join(page_name(p) + '.1' for p, _c in walk(cli)))"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert pages == sorted(helped) and "layerfs.1" in pages and "layerfs-snapshotter-serve.1" in pages
    for page in pages:
        r = subprocess.run(["man", "-l", str(out / page)], capture_output=True, text=True, timeout=60,
                           env=MAN_ENV)
        assert r.returncode == 0, (page, r.stderr)
        assert "error" not in r.stderr.lower(), (page, r.stderr)
        text = r.stdout
        for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "EXIT STATUS"):
            assert f"\n{section}\n" in text, (page, section)
        assert page.removesuffix(".1") in text.split("NAME", 1)[1]
    gc = _words(subprocess.run(["man", "-l", str(out / "layerfs-gc.1")], capture_output=True, text=True,
                               env=MAN_ENV, check=True).stdout)
    assert "-n, --dry-run Only show what would be removed" in gc
    root = _words(subprocess.run(["man", "-l", str(out / "layerfs.1")], capture_output=True, text=True,
                                 env=MAN_ENV, check=True).stdout)
    assert "ENVIRONMENT LAYERFS_ROOT The store directory" in root and "layerfs-images(1)" in root
    one = lf(tmp_path / "store", "man", "images").stdout  # one page on stdout, as written
    assert one == (out / "layerfs-images.1").read_text()
    bad = lf(tmp_path / "store", "man", "nosuch", check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("layerfs: error: man: no command 'nosuch'")


# --- progress of export --rebuild-layers -----------------------------------------------------


def test_export_rebuild_layers_shows_a_bar_per_layer_on_a_terminal(tmp_path: Path) -> None:
    from tests.integration.test_inspect_progress import _screen_of

    root = tmp_path / "store"
    layout = tmp_path / "layout"
    desc = ib.add_image(layout, [ib.layer_tar({"etc/os": "base\n"}), ib.layer_tar({"big": os.urandom(6 << 20)})])
    ib.set_index(layout, [(desc, {ib.REF_NAME: "t"})])
    lf(root, "import", str(layout), "--name", "demo/big:1")
    rc, lines = _screen_of([sys.executable, "-m", "layerfs", "--root", str(root), "export", "--rebuild-layers",
                            "demo/big:1", str(tmp_path / "out")])
    assert rc == 0, lines
    written = [line for line in lines if line.startswith("Writing layer")]
    assert [line.split()[2] for line in written] == ["1/2", "2/2"], lines
    big = written[1].split("  ")[1].split(" / ")
    assert big[0] == big[1] and big[0].endswith("MB") and float(big[0][:-2]) > 6.2, lines  # the tar's size
    assert not any("━" in line for line in lines), lines  # no bar left on the screen
    assert any(line.startswith("Exported demo/big:1") for line in lines), lines
    piped = lf(root, "export", "--rebuild-layers", "demo/big:1", str(tmp_path / "out2"))
    assert "Writing" not in piped.stderr and "\x1b[" not in piped.stderr
    assert lf(root, "export", "demo/big:1", str(tmp_path / "out3")).stderr == ""


# --- JSON views against their documented schemas ----------------------------------------------


def test_every_json_view_matches_its_schema(named_store: Path) -> None:
    import json

    from layerfs.cli.schemas import VIEWS, problems

    root = named_store
    runs = {
        "images": ["images", "--format", "json"],
        "images-tree": ["images", "--tree", "--format", "json"],
        "history": ["history", "demo/app:2", "--format", "json"],
        "layer-diffs": ["diff", "demo/app:2", "--format", "json"],
        "changes": ["diff", "demo/app:1", "demo/app:2", "--format", "json"],  # a container's: the same
        "comparison": ["diff", "demo/app:1", "demo/app:2", "--type", "file", "--type", "size", "--type",
                       "history", "--type", "metadata", "--format", "json"],
        "df": ["df", "--format", "json"],
        "df-images": ["df", "-v", "--format", "json"],
        "ps": ["ps", "-s", "--format", "json"],
        "mounts": ["mounts", "--format", "json"],
        "fsck": ["fsck", "--format", "json"],
        "info": ["info", "--format", "json"],
        "analyze": ["analyze", "demo/app:2", "--format", "json"],
        "tree": ["tree", "demo/app:2", "--format", "json"],
        "inspect": ["inspect", "demo/app:2"],
    }
    unchecked = set(VIEWS) - set(runs)
    assert unchecked == {"pull", "push"}  # those need a registry: tests/integration/test_registry.py
    wrong = []
    for view, args in runs.items():
        r = lf(root, *args, check=False)
        assert r.returncode in (0, 1), (view, r.stderr)  # diff REF OTHER: 1 when they differ
        doc = json.loads(r.stdout)
        if VIEWS[view]["shape"] == "array" and view != "mounts":  # nothing mounted here
            assert doc, f"{view}: an empty array checks nothing"
        wrong += problems(view, doc)
    assert not wrong, "\n".join(wrong)
    both = json.loads(lf(root, "schema").stdout)
    assert both == json.loads(json.dumps(VIEWS)) and json.loads(lf(root, "schema", "ps").stdout)["version"] == 1


# --- analyze of a container with a renamed lower directory ------------------------------------


@pytest.fixture
def unmounting(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path``; whatever is still mounted below it is detached afterwards (umount -l)."""
    yield tmp_path
    for mp in reversed(mounted_under(tmp_path)):
        subprocess.run(["umount", "-l", mp], capture_output=True, check=False)


@needs_root
def test_analyze_follows_a_renamed_directory_in_a_containers_upper(unmounting: Path) -> None:
    import json

    tmp_path = unmounting
    root = tmp_path / "store"
    docs = {f"srv/data/doc{i}.txt": f"{i}" * 10_000 for i in range(3)}
    _import(tmp_path, root, "demo/ren:1", [docs, {"etc/os": "top\n"}])
    lf(root, "create", "demo/ren:1", "ren")
    mnt = tmp_path / "mnt"
    lf(root, "mount", "--backend", "kernel", "ren", str(mnt))
    try:
        os.rename(mnt / "srv" / "data", mnt / "srv" / "moved")  # kernel overlayfs, redirect_dir=on
    finally:
        lf(root, "umount", str(mnt))
    redirect = subprocess.run(["getfattr", "-R", "--absolute-names", "-m", "overlay", "-d", str(root / "snapshots")],
                              capture_output=True, text=True, check=True).stdout
    assert 'trusted.overlay.redirect="' in redirect  # the rename is a redirect, not a copy

    a = json.loads(lf(root, "analyze", "ren", "--format", "json").stdout)
    assert a["name"] == "container ren (of demo/ren:1)" and len(a["layers"]) == 3
    content = sum(len(v) for v in docs.values()) + len("top\n")
    # the renamed files are still shown (at their new path): nothing wasted, nothing re-added
    assert a["total_bytes"] == a["visible_bytes"] == content and a["wasted_bytes"] == 0, a
    assert a["efficiency"] == 1.0 and a["layers"][2]["bytes"] == 0 and a["layers"][2]["diff_id"] == ""
    tree = {e["path"] for e in json.loads(lf(root, "tree", "demo/ren:1", "--format", "json").stdout)["entries"]}
    assert "/srv/data/doc0.txt" in tree or "srv/data/doc0.txt" in tree

    # committed, the rename is the old directory deleted and the new one added whole (OCI has no
    # rename): the old copies are wasted, and are duplicates of the new ones
    lf(root, "commit", "ren", "demo/ren:2")
    b = json.loads(lf(root, "analyze", "demo/ren:2", "--format", "json").stdout)
    assert b["visible_bytes"] == content and b["wasted_bytes"] == content - len("top\n"), b
    assert b["layers"][2]["bytes"] == content - len("top\n") and len(b["duplicates"]) == 3

"""An image built by hand with known waste, for the analysis tests and golden files.

Three layers (deterministic tars: mtime 0, root owned), and config-only history steps:

1. base: ``bin/tool`` (5000 B) with a hard link ``bin/tool2``, ``etc/conf`` (100 B), docs
   ``usr/share/doc/a.txt`` (1000 B) and ``b.txt`` (2000 B), ``var/cache/x`` (3000 B) and
   ``y`` (4000 B), ``data/big`` (10000 B), ``old/f1`` (600 B);
2. the docs again, byte for byte; ``etc/conf`` rewritten (150 B); ``data/big`` deleted;
3. ``var/cache`` made opaque with a new ``z`` (500 B); ``bin/tool`` chmod 0755 only (a full
   copy); ``old`` renamed to ``new`` (old deleted, ``new`` opaque with the same ``f1``).

``EXPECTED`` holds the numbers an exact accounting gives.
"""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

from tests.support import imagebuild as ib

TAG = "1.0"
NAME = "waste/demo:1.0"

_rng = random.Random(14)
TOOL = bytes(_rng.randrange(256) for _ in range(5000))
BIG = bytes(_rng.randrange(256) for _ in range(10000))
X = b"x" * 3000
Y = b"y" * 4000
A = b"a" * 1000
B = b"b" * 2000
F1 = b"f" * 600


def _tar(entries: list[tuple[str, object, int]]) -> bytes:
    """(name, content, mode): bytes = file, None = dir, ("link", target) = hard link."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content, mode in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname, ti.mode = 0, 0, 0, "", "", mode
            data = None
            if content is None:
                ti.type = tarfile.DIRTYPE
            elif isinstance(content, tuple):
                ti.type, ti.linkname = tarfile.LNKTYPE, content[1]
            else:
                assert isinstance(content, bytes)
                ti.size, data = len(content), io.BytesIO(content)
            tar.addfile(ti, data)
    return buf.getvalue()


def layers() -> list[bytes]:
    base = _tar([
        ("bin", None, 0o755), ("bin/tool", TOOL, 0o644), ("bin/tool2", ("link", "bin/tool"), 0o644),
        ("data", None, 0o755), ("data/big", BIG, 0o644),
        ("etc", None, 0o755), ("etc/conf", b"c" * 100, 0o644),
        ("old", None, 0o755), ("old/f1", F1, 0o644),
        ("usr", None, 0o755), ("usr/share", None, 0o755), ("usr/share/doc", None, 0o755),
        ("usr/share/doc/a.txt", A, 0o644), ("usr/share/doc/b.txt", B, 0o644),
        ("var", None, 0o755), ("var/cache", None, 0o755), ("var/cache/x", X, 0o644),
        ("var/cache/y", Y, 0o644),
    ])
    again = _tar([
        ("data", None, 0o755), ("data/.wh.big", b"", 0o644),
        ("etc", None, 0o755), ("etc/conf", b"C" * 150, 0o644),
        ("usr", None, 0o755), ("usr/share", None, 0o755), ("usr/share/doc", None, 0o755),
        ("usr/share/doc/a.txt", A, 0o644), ("usr/share/doc/b.txt", B, 0o644),
    ])
    tidy = _tar([
        ("bin", None, 0o755), ("bin/tool", TOOL, 0o755),
        ("new", None, 0o755), ("new/.wh..wh..opq", b"", 0o644), ("new/f1", F1, 0o644),
        (".wh.old", b"", 0o644),
        ("var", None, 0o755), ("var/cache", None, 0o755), ("var/cache/.wh..wh..opq", b"", 0o644),
        ("var/cache/z", b"z" * 500, 0o644),
    ])
    return [base, again, tidy]


HISTORY = [
    {"created": "2024-01-02T03:04:05.123456789Z", "created_by": "ADD base.tar /"},
    {"created": "2024-01-02T03:04:06Z", "created_by": "ENV LANG=C.UTF-8", "empty_layer": True},
    {"created": "2024-01-02T03:04:07Z", "created_by": "COPY docs /usr/share/doc"},
    {"created": "2024-01-02T03:04:08Z", "created_by": "RUN chmod +x /bin/tool && mv /old /new && rm -rf /var/cache/*"},
    {"created": "2024-01-02T03:04:09Z", "created_by": 'CMD ["/bin/tool"]', "empty_layer": True},
]


def build_layout(layout: Path) -> Path:
    desc = ib.add_image(layout, layers(), config_extra={
        "created": "2024-01-02T03:04:09Z",
        "author": "layerfs tests",
        "config": {"Env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"], "Cmd": ["/bin/tool"], "WorkingDir": "/",
                   "Labels": {"org.example.waste": "yes"}, "ExposedPorts": {"8080/tcp": {}}},
        "history": HISTORY,
    })
    return ib.set_index(layout, [(desc, {ib.REF_NAME: TAG})])


EXPECTED = {
    "layer_bytes": [25700, 3150, 6100],
    "total": 34950,
    "visible": 14250,
    "wasted": 20700,
    "layer_wasted": [20700, 0, 0],
    "overwrites": [0, 3100, 0],
    "deletes": [0, 10000, 7600],
    "metadata_only": [0, 3000, 5000],
    "duplicates": 8600,
}

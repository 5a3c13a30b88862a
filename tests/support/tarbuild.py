"""Small builders for layer tars used by the store tests.

``layer_tar(path, files)`` writes a tar where ``files`` maps names to bytes (a file), None
(a directory), ``("exec", bytes)`` (a 0755 file), ``("symlink", target)``, ``("whiteout",)`` (written as ``.wh.NAME``) or
``("opaque",)`` (the ``.wh..wh..opq`` marker inside the named directory).
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile

import xxhash
import zstandard

from layerfs.union.view import LayerStack


def layer_bytes(files: dict[str, object], mtime: int = 1_700_000_000) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, val in files.items():
            ti = tarfile.TarInfo(name)
            ti.mtime = mtime
            data = None
            if val is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            elif isinstance(val, bytes):
                ti.size, ti.mode, data = len(val), 0o644, io.BytesIO(val)
            elif val[0] == "exec":
                ti.size, ti.mode, data = len(val[1]), 0o755, io.BytesIO(val[1])
            elif val[0] == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, str(val[1])
            elif val[0] == "whiteout":
                d, b = os.path.split(name)
                ti.name = os.path.join(d, ".wh." + b)
            elif val[0] == "opaque":
                ti.name = os.path.join(name, ".wh..wh..opq")
            tf.addfile(ti, data)
    return buf.getvalue()


def write_layer(path: str, files: dict[str, object], compress: str = "plain") -> str:
    data = layer_bytes(files)
    if compress == "gzip":
        data = gzip.compress(data, mtime=0)
    elif compress == "zstd":
        data = zstandard.ZstdCompressor().compress(data)
    with open(path, "wb") as f:
        f.write(data)
    return path


def tree_fingerprint(layers: list[str]) -> dict[str, tuple]:
    """path -> (mode, uid, gid, size, content hash | link target) of a union of layers."""
    out: dict[str, tuple] = {}
    stack = LayerStack(layers)
    for e in stack.walk():
        full = stack.real_path(e)
        extra: object = None
        if os.path.islink(full):
            extra = os.readlink(full)
        elif os.path.isfile(full):
            with open(full, "rb") as f:
                extra = xxhash.xxh3_64_hexdigest(f.read())
        out[e.path] = (e.st.st_mode, e.st.st_uid, e.st.st_gid, e.st.st_size if not e.is_dir else 0, extra)
    return out

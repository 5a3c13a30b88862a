"""Writing benchmark layer data: deterministic contents, fast, no network.

Layers are plain directories (no whiteouts: every workload's layers only add names, so the
merged tree is their union and ``native`` can be written with the same helpers). File
contents are a fixed pseudo-random pattern (incompressible, never sparse), shifted by a
per-file seed so no two files are alike.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable

CHUNK = 1 << 20
_PATTERN = random.Random(0x1A7E5F5).randbytes(CHUNK + 4096)
SMALL = b"layerfs bench small file\n" * 4  # 100 bytes


def write_file(path: str, size: int, seed: int = 0) -> None:
    """``size`` bytes of the pattern at ``path`` (parents created), written in 1 MiB chunks."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shift = (seed * 97) % 4096
    block = memoryview(_PATTERN)[shift:shift + CHUNK]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        left = size
        while left > 0:
            n = os.write(fd, block[:min(left, CHUNK)])
            left -= n
    finally:
        os.close(fd)


def write_small(path: str, data: bytes = SMALL) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def tree(root: str, dirs: Iterable[str], files: Iterable[str], writer: Callable[[str], None] = write_small) -> int:
    """Create ``dirs`` (relative, parents first or not) and small ``files`` under ``root``."""
    os.makedirs(root, exist_ok=True)
    for d in dirs:
        os.makedirs(os.path.join(root, d), exist_ok=True)
    count = 0
    for f in files:
        writer(os.path.join(root, f))
        count += 1
    return count

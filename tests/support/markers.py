"""Shared skip markers: import them from here (``from tests.support.markers import needs_root``).

Fixtures live beside their tests; a conftest is never imported by name."""

from __future__ import annotations

import os
import shutil

import pytest

IS_ROOT = os.geteuid() == 0

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (device nodes, trusted.* xattrs, chown)")


def _tool(name: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(shutil.which(name) is None, reason=f"{name} not installed (scripts/bootstrap installs it)")


needs_umoci = _tool("umoci")
needs_skopeo = _tool("skopeo")

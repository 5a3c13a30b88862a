"""Every conformance case on every backend; kernel overlayfs is the oracle.

``test_case[<case>-kernel]`` runs the case on kernel overlayfs alone (it must always pass).
``test_case[<case>-fuse]`` (pyfuse3), ``[<case>-fuse-kernel]`` (the kernel-protocol
transport) and ``[<case>-model]`` run it on the kernel first, then on the
other backend from identical fresh layers, and fail listing every difference between the
two observation logs (operation results, merged tree, upper directory on disk).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from . import cases
from .backends import BACKEND_NAMES, Backend
from .runner import CASES, KNOWN_DIVERGENCES, Case, diff_logs, format_log, run_case

# a FUSE request that never returns must not hold the whole run for pytest's default 600 s
pytestmark = pytest.mark.timeout(120)

assert cases.__name__  # the import registers the cases


def test_enough_cases() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("backend_name", BACKEND_NAMES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(case: Case, backend_name: str, request: pytest.FixtureRequest, workspace: Path) -> None:
    if backend_name == "model" and case.os_only:
        pytest.skip(case.os_only)
    known = KNOWN_DIVERGENCES.get((case.name, backend_name))
    if known:
        request.applymarker(pytest.mark.xfail(strict=True, reason=known))
    kernel: Backend = request.getfixturevalue("kernel")
    other: Backend | None = None if backend_name == "kernel" else request.getfixturevalue(backend_name.replace("-", "_"))
    expected = run_case(case, kernel, workspace / "kernel")
    if other is None:
        return
    actual = run_case(case, other, workspace / backend_name)
    problems = diff_logs(expected, actual, backend_name)
    if problems:
        pytest.fail(
            f"{backend_name} differs from kernel overlayfs in case {case.name} ({case.doc}):\n"
            + "\n".join(problems)
            + "\n\nkernel log:\n" + format_log(expected),
            pytrace=False,
        )

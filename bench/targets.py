"""Issue 6's targets, evaluated on every run (reported, never asserted).

- layerfs-fuse against fuse-overlayfs, same run: creating many files (then sync) <= 1.0x;
  metadata walk (``find``) cold and warm <= 1.0x; ``ls -lR`` cold and warm <= 0.5x;
  first append to and chmod of the largest lower file < 1.0x (the op alone, and op + sync);
- layerfs-fuse warm sequential read >= 0.9x native throughput (time <= native / 0.9);
- kernel within 5% of kernel-plain on every metric both have;
- ``layerfs import`` <= 1.0x containerd's ``ctr images import``.

Each comes back MET, NOT MET (with the numbers) or SKIPPED (with the reason: a backend not
available, a workload not selected). With ``--quick`` the sizes are small: indicative only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from bench.report import fmt_ratio, fmt_seconds, ratio, why_missing
from bench.runner import WorkloadResult

MET, NOT_MET, SKIPPED = "MET", "NOT MET", "SKIPPED"
FUSE, PEER = "layerfs-fuse", "fuse-overlayfs"


@dataclass
class Target:
    name: str
    status: str
    detail: str
    value: float | None = None  # the ratio measured
    limit: float | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _compare(results: Mapping[str, WorkloadResult], name: str, workload: str, metric: str, subject: str,
             other: str, limit: float, strict: bool = False) -> Target:
    """``median(subject) / median(other) <= limit`` (``<`` if strict) on ``metric``."""
    w = results.get(workload)
    if w is None:
        return Target(name, SKIPPED, f"workload {workload} not run")
    r = ratio(w, metric, subject, other)
    if r is None:
        missing = subject if not w.values(metric, subject) else other
        return Target(name, SKIPPED, why_missing(w, missing), limit=limit)
    value, a, b = r
    ok = value < limit if strict else value <= limit
    detail = f"{subject} {fmt_seconds(a)} vs {other} {fmt_seconds(b)} = {fmt_ratio(value)} ({metric})"
    return Target(name, MET if ok else NOT_MET, detail, value, limit)


def _largest(w: WorkloadResult | None, group: str) -> str | None:
    """The copy-up metric of ``group`` at the largest file size measured."""
    if w is None:
        return None
    candidates = [m for m in w.metrics.values() if m.group == group and m.x is not None]
    return max(candidates, key=lambda m: m.x or 0).name if candidates else None


def _kernel_everywhere(results: Mapping[str, WorkloadResult]) -> Target:
    name = "kernel within 5% of kernel-plain (every metric)"
    checked: list[tuple[float, str, bool]] = []  # ratio, where, min-max ranges overlap
    for w in results.values():
        if w.kind != "mount":
            continue
        for metric in w.metrics:
            r = ratio(w, metric, "kernel", "kernel-plain")
            if r is not None:
                mine, plain = w.values(metric, "kernel"), w.values(metric, "kernel-plain")
                checked.append((r[0], f"{w.name}/{metric}", min(mine) <= max(plain)))
    if not checked:
        for w in results.values():
            if w.kind == "mount":
                missing = "kernel" if not any(w.values(m, "kernel") for m in w.metrics) else "kernel-plain"
                return Target(name, SKIPPED, why_missing(w, missing), limit=1.05)
        return Target(name, SKIPPED, "no mounted workload was run", limit=1.05)
    worst = sorted(checked, reverse=True)
    over = [c for c in worst if c[0] > 1.05]
    noise = sum(1 for c in over if c[2])
    detail = (f"{len(checked) - len(over)}/{len(checked)} metrics within 5%"
              + (f" ({noise} of the {len(over)} over it with overlapping min–max ranges)" if over else "")
              + "; worst: " + ", ".join(f"{m} {fmt_ratio(v)}" for v, m, _ in worst[:3]))
    return Target(name, NOT_MET if over else MET, detail, worst[0][0], 1.05)


def evaluate(results: Mapping[str, WorkloadResult]) -> list[Target]:
    """Every target, in the issue's order."""
    targets = [
        _compare(results, "create files + sync <= 1.0x fuse-overlayfs", "writes", "create files + sync",
                 FUSE, PEER, 1.0),
        _compare(results, "find cold <= 1.0x fuse-overlayfs", "metadata", "find cold", FUSE, PEER, 1.0),
        _compare(results, "find warm <= 1.0x fuse-overlayfs", "metadata", "find warm", FUSE, PEER, 1.0),
        _compare(results, "ls -lR cold <= 0.5x fuse-overlayfs", "metadata", "ls -lR cold", FUSE, PEER, 0.5),
        _compare(results, "ls -lR warm <= 0.5x fuse-overlayfs", "metadata", "ls -lR warm", FUSE, PEER, 0.5),
        _compare(results, "warm large read >= 0.9x native (time <= 1.11x)", "read", "seq read warm", FUSE,
                 "native", 1 / 0.9),
    ]
    copyup = results.get("copyup")
    for group in ("append", "append +sync", "chmod", "chmod +sync"):
        metric = _largest(copyup, group)
        label = f"{group} of the largest lower file < 1.0x fuse-overlayfs"
        if metric is None:
            targets.append(Target(label, SKIPPED, "workload copyup not run" if copyup is None
                                  else why_missing(copyup, FUSE)))
        else:
            targets.append(_compare(results, f"{metric}: faster than fuse-overlayfs", "copyup", metric, FUSE,
                                    PEER, 1.0, strict=True))
    targets.append(_kernel_everywhere(results))
    targets.append(_compare(results, "import <= 1.0x ctr images import", "store", "import", "layerfs",
                            "containerd", 1.0))
    return targets


def render(targets: list[Target], quick: bool) -> str:
    lines = ["== targets (issue 6; evaluated, not asserted) =="]
    if quick:
        lines.append("   --quick sizes: indicative only")
    width = max(len(t.name) for t in targets)
    for t in targets:
        lines.append(f"{t.status:<8} {t.name.ljust(width)}  {t.detail}")
    counts = {s: sum(t.status == s for t in targets) for s in (MET, NOT_MET, SKIPPED)}
    lines.append(f"   {counts[MET]} met, {counts[NOT_MET]} not met, {counts[SKIPPED]} skipped")
    return "\n".join(lines)

"""The targets, evaluated on every run (reported, never asserted).

Issue 11 (the FUSE transports), for layerfs-fuse on its default transport (``layerfs-kernel``
when that is the default, ``layerfs-fuse`` for pyfuse3) against fuse-overlayfs, same run:

- every mounted-workload metric both have <= 1.0x (the geomean, and each one);
- warm readdir, ``find`` and ``ls -lR`` <= 1.0x; cold sequential read <= 1.0x;
  create 10k files + sync <= 1.0x; mount of 500 layers <= 1.0x;
- warm sequential read <= 1.1x native (passthrough);
- first stat at the deepest stack still flat: per op <= 2x the 1-layer figure.

Issue 6's, kept:

- layerfs-fuse against fuse-overlayfs, same run: creating many files (then sync) <= 1.0x;
  metadata walk (``find``) cold and warm <= 1.0x; ``ls -lR`` cold and warm <= 0.5x;
  first append to and chmod of the largest lower file < 1.0x (the op alone, and op + sync);
- layerfs-fuse warm sequential read >= 0.9x native throughput (time <= native / 0.9);
- kernel within 5% of kernel-plain on every metric both have;
- ``layerfs import`` <= 1.0x containerd's ``ctr images import``.

Issue 13's (the pull workload): ``layerfs pull`` <= 1.0x ``ctr images pull`` and <= 0.7x
``skopeo copy`` + ``layerfs import``; a second pull of an image sharing all but one layer
moves only that layer (blob bytes the registry sent <= the new layer + the config).

Each comes back MET, NOT MET (with the numbers) or SKIPPED (with the reason: a backend not
available, a workload not selected). With ``--quick`` the sizes are small: indicative only.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from bench.report import fmt_ratio, fmt_seconds, ratio, why_missing
from bench.runner import WorkloadResult
from layerfs.fuse.main import DEFAULT_TRANSPORT

MET, NOT_MET, SKIPPED = "MET", "NOT MET", "SKIPPED"
PEER = "fuse-overlayfs"
# the bench backend of each layerfs-fuse transport
TRANSPORT_BACKENDS = {"pyfuse3": "layerfs-fuse", "kernel": "layerfs-kernel"}
FUSE = TRANSPORT_BACKENDS[DEFAULT_TRANSPORT]


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


def _everywhere(results: Mapping[str, WorkloadResult], subject: str, other: str) -> list[Target]:
    """``subject`` <= 1.0x ``other`` on every mounted metric both have: the geomean, and each one."""
    geo_name, each_name = f"every workload: geomean <= 1.0x {other}", f"every workload: each metric <= 1.0x {other}"
    checked: list[tuple[float, str]] = []
    for w in results.values():
        if w.kind != "mount":
            continue
        for metric in w.metrics:
            r = ratio(w, metric, subject, other)
            if r is not None:
                checked.append((r[0], f"{w.name}/{metric}"))
    if not checked:
        why = "no mounted workload was run"
        for w in results.values():
            if w.kind == "mount":
                why = why_missing(w, subject if not any(w.values(m, subject) for m in w.metrics) else other)
                break
        return [Target(geo_name, SKIPPED, why, limit=1.0), Target(each_name, SKIPPED, why, limit=1.0)]
    geomean = math.exp(sum(math.log(v) for v, _ in checked) / len(checked))
    worst = sorted(checked, reverse=True)
    over = [c for c in worst if c[0] > 1.0]
    geo = Target(geo_name, MET if geomean <= 1.0 else NOT_MET,
                 f"{subject} ÷ {other} geomean {fmt_ratio(geomean)} over {len(checked)} metrics", geomean, 1.0)
    each = Target(each_name, NOT_MET if over else MET,
                  f"{len(checked) - len(over)}/{len(checked)} metrics <= 1.0x; worst: "
                  + ", ".join(f"{m} {fmt_ratio(v)}" for v, m in worst[:4]), worst[0][0], 1.0)
    return [geo, each]


def _flat_depth(results: Mapping[str, WorkloadResult], subject: str) -> Target:
    name = "first stat at the deepest stack <= 2x the 1-layer figure (flat)"
    w = results.get("depth")
    if w is None:
        return Target(name, SKIPPED, "workload depth not run", limit=2.0)
    stats = sorted((m for m in w.metrics.values() if m.group == "first stat" and m.x is not None),
                   key=lambda m: m.x or 0)
    if len(stats) < 2:
        return Target(name, SKIPPED, "fewer than two depths measured", limit=2.0)
    deep, shallow = w.values(stats[-1].name, subject), w.values(stats[0].name, subject)
    if not deep or not shallow:
        return Target(name, SKIPPED, why_missing(w, subject), limit=2.0)
    value = statistics.median(deep) / statistics.median(shallow)
    detail = (f"{subject} {stats[-1].name} {fmt_seconds(statistics.median(deep))} vs "
              f"{stats[0].name} {fmt_seconds(statistics.median(shallow))} = {fmt_ratio(value)}")
    return Target(name, MET if value <= 2.0 else NOT_MET, detail, value, 2.0)


def _mount_at(results: Mapping[str, WorkloadResult], layers: int) -> str | None:
    w = results.get("depth")
    if w is None:
        return None
    for m in w.metrics.values():
        if m.group == "mount" and m.x == layers:
            return m.name
    return None


def evaluate(results: Mapping[str, WorkloadResult]) -> list[Target]:
    """Every target: issue 11's first, then issue 6's."""
    targets = [*_everywhere(results, FUSE, PEER)]
    for name, workload in (("readdir warm", "metadata"), ("find warm", "metadata"), ("ls -lR warm", "metadata"),
                           ("seq read cold", "read"), ("create files + sync", "writes")):
        targets.append(_compare(results, f"{name} <= 1.0x {PEER}", workload, name, FUSE, PEER, 1.0))
    mount500 = _mount_at(results, 500)
    if mount500 is None:
        targets.append(Target(f"mount of 500 layers <= 1.0x {PEER}", SKIPPED,
                              "workload depth not run at 500 layers (full size only)", limit=1.0))
    else:
        targets.append(_compare(results, f"mount of 500 layers <= 1.0x {PEER}", "depth", mount500, FUSE, PEER, 1.0))
    targets.append(_compare(results, "warm seq read <= 1.1x native (passthrough)", "read", "seq read warm", FUSE,
                            "native", 1.1))
    targets.append(_flat_depth(results, FUSE))
    targets += [  # issue 6's, where issue 11 does not restate them
        _compare(results, "find cold <= 1.0x fuse-overlayfs", "metadata", "find cold", FUSE, PEER, 1.0),
        _compare(results, "ls -lR cold <= 0.5x fuse-overlayfs", "metadata", "ls -lR cold", FUSE, PEER, 0.5),
        _compare(results, "ls -lR warm <= 0.5x fuse-overlayfs", "metadata", "ls -lR warm", FUSE, PEER, 0.5),
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
    targets += [  # issue 13's
        _compare(results, "pull <= 1.0x ctr images pull", "pull", "pull", "layerfs", "containerd", 1.0),
        _compare(results, "pull <= 0.7x skopeo copy + import", "pull", "pull", "layerfs", "skopeo+import", 0.7),
        _second_pull_bytes(results),
    ]
    return targets


def _second_pull_bytes(results: Mapping[str, WorkloadResult]) -> Target:
    name = "second pull (1 new layer) moves only that layer"
    w = results.get("pull")
    if w is None:
        return Target(name, SKIPPED, "workload pull not run")
    moved = [m["second"] for m in w.facts.get("blob_bytes_moved", {}).get("layerfs", [])]
    if not moved:
        return Target(name, SKIPPED, why_missing(w, "layerfs"))
    limit = int(w.facts["new_layer_bytes"]) + int(w.facts["config_bytes"])
    worst = max(moved)
    detail = (f"layerfs moved {worst} bytes of blobs (most of {len(moved)} samples); "
              f"new layer + config = {limit} bytes")
    return Target(name, MET if worst <= limit else NOT_MET, detail, worst / limit if limit else None, 1.0)


def render(targets: list[Target], quick: bool) -> str:
    lines = [f"== targets (issues 11 and 6, for {FUSE}; 13 for pull; evaluated, not asserted) =="]
    if quick:
        lines.append("   --quick sizes: indicative only")
    width = max(len(t.name) for t in targets)
    for t in targets:
        lines.append(f"{t.status:<8} {t.name.ljust(width)}  {t.detail}")
    counts = {s: sum(t.status == s for t in targets) for s in (MET, NOT_MET, SKIPPED)}
    lines.append(f"   {counts[MET]} met, {counts[NOT_MET]} not met, {counts[SKIPPED]} skipped")
    return "\n".join(lines)

"""Reading results: summaries (median, spread, ratios), text tables and the JSON file.

Per metric and subject: the median of its samples, min and max, the ratio of its median to
the reference's (``native`` for mounted workloads, ``containerd`` for store operations) and,
for ``layerfs-fuse`` and ``kernel``, to their pair's (``fuse-overlayfs``, ``kernel-plain``).
Ratios are of times: lower is better, 1.00 is a tie. The daemon CPU column is the median of
the FUSE daemon's (or, for store operations, the importing process') CPU seconds in the same
unit as the time: total for a whole-operation metric, per op for a per-op one.

Resources, per case and subject (``resources``): the FUSE daemon's peak RSS (``VmHWM``, the
daemon and its children; the largest over the samples, and the median) and the upper layer's
growth (allocated bytes, ``st_blocks``, and inodes after the unmount; median), with its ratio
to native's growth on write cases (what the same operations added to a plain directory).

The JSON file holds the machine, the run's configuration, every backend's availability,
every workload's metrics, raw samples, per-case status and summary, and the targets.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from bench.runner import WorkloadResult
from layerfs.text import human_size
from layerfs.text import table as text_table

SCHEMA = 1


def fmt_seconds(s: float | None) -> str:
    """A duration in the unit that keeps 3 significant digits readable."""
    if s is None:
        return "–"
    if s == 0:
        return "0"
    a = abs(s)
    if a >= 100:
        return f"{s:.0f} s"
    if a >= 1:
        return f"{s:.2f} s"
    if a >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    if a >= 1e-6:
        return f"{s * 1e6:.3g} µs"
    return f"{s * 1e9:.3g} ns"


def fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}×"


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(w: WorkloadResult) -> list[dict[str, Any]]:
    """One row per (metric, subject) that has samples."""
    rows: list[dict[str, Any]] = []
    for name, metric in w.metrics.items():
        ref = _median(w.values(name, w.reference))
        for subject in w.subjects:
            values = w.values(name, subject)
            if not values:
                continue
            med = statistics.median(values)
            pair = w.pairs.get(subject)
            pair_med = _median(w.values(name, pair)) if pair else None
            rows.append({
                "metric": name, "group": metric.group, "x": metric.x, "per_op": metric.per_op,
                "subject": subject, "n": len(values), "median_s": med, "min_s": min(values), "max_s": max(values),
                "reference": w.reference, "vs_reference": med / ref if ref else None,
                "pair": pair, "vs_pair": med / pair_med if pair_med else None,
                "cpu_s": _median(w.cpu(name, subject)),
            })
    return rows


def resources(w: WorkloadResult) -> list[dict[str, Any]]:
    """One row per (case, subject) with samples: peak RSS of the daemons, growth of the upper."""
    rows: list[dict[str, Any]] = []
    cases = list(dict.fromkeys(s["case"] for s in w.samples))
    for case in cases:
        native_growth = _median([s["upper"]["allocated_bytes"] for s in w.samples
                                 if s["case"] == case and s["subject"] == "native" and "upper" in s])
        for subject in w.subjects:
            samples = [s for s in w.samples if s["case"] == case and s["subject"] == subject]
            if not samples:
                continue
            rss = [s["rss_bytes"] for s in samples if s.get("rss_bytes") is not None]
            upper = [s["upper"] for s in samples if s.get("upper") is not None]
            allocated = [u["allocated_bytes"] for u in upper]
            med_alloc = _median(allocated)
            rows.append({
                "case": case, "subject": subject, "n": len(samples),
                "rss_peak_bytes": max(rss) if rss else None, "rss_median_bytes": _median(rss),
                "rss_min_bytes": min(rss) if rss else None,
                "upper_allocated_bytes": med_alloc,
                "upper_allocated_min_bytes": min(allocated) if allocated else None,
                "upper_allocated_max_bytes": max(allocated) if allocated else None,
                "upper_inodes": _median([u["inodes"] for u in upper]),
                "upper_vs_native": (med_alloc / native_growth if med_alloc is not None and native_growth
                                    else None),
            })
    return rows


def fmt_bytes(n: float | None) -> str:
    return "–" if n is None else human_size(n, binary=True)


def resources_table(w: WorkloadResult) -> str:
    """Peak daemon RSS and upper growth per case and backend ("" when nothing was recorded)."""
    rows = resources(w)
    if not any(r["rss_peak_bytes"] is not None or r["upper_allocated_bytes"] is not None for r in rows):
        return ""
    header = ("case", "backend", "daemon peak RSS", "upper growth", "inodes", "×native")
    out: list[tuple[str, ...]] = []
    last = None
    for r in rows:
        inodes = r["upper_inodes"]
        out.append((r["case"] if r["case"] != last else "", r["subject"], fmt_bytes(r["rss_peak_bytes"]),
                    fmt_bytes(r["upper_allocated_bytes"]), "–" if inodes is None else f"{inodes:g}",
                    fmt_ratio(r["upper_vs_native"]) if r["upper_vs_native"] is not None else ""))
        last = r["case"]
    return ("   resources (peak RSS of the FUSE daemon and its children; allocated bytes the sample left "
            "in the upper):\n" + text_table(header, out, padding=2, right=(2, 3, 4, 5)).removesuffix("\n"))


def ratio(w: WorkloadResult, metric: str, subject: str, other: str) -> tuple[float, float, float] | None:
    """(median(subject) / median(other), both medians), or None if either has no samples."""
    a, b = _median(w.values(metric, subject)), _median(w.values(metric, other))
    if a is None or b is None or b == 0:
        return None
    return a / b, a, b


def why_missing(w: WorkloadResult, subject: str) -> str:
    """Why ``subject`` has no numbers in ``w``: its skip or failure reason, or the workload's error."""
    if w.error:
        return f"workload {w.name} could not run: {w.error}"
    for _case, s, status in w.not_measured():
        if s == subject:
            return f"{subject} {status.state}: {status.reason}"
    return f"{subject} not measured in {w.name}"


def table(w: WorkloadResult) -> str:
    """The workload's text table, with its description and what was not measured."""
    lines = [f"== {w.name}: {w.title} ==", f"   {w.description}"]
    if w.error:
        lines.append(f"   NOT RUN: {w.error}")
        return "\n".join(lines)
    header = ("metric", "backend", "median", "min – max", f"×{w.reference}", "×pair", "vs", "CPU")
    rows: list[tuple[str, ...]] = []
    last_metric = None
    for row in summarize(w):
        label = row["metric"] + (" (per op)" if row["per_op"] else "")
        rows.append((
            label if row["metric"] != last_metric else "",
            row["subject"], fmt_seconds(row["median_s"]),
            f"{fmt_seconds(row['min_s'])} – {fmt_seconds(row['max_s'])}",
            fmt_ratio(row["vs_reference"]),
            fmt_ratio(row["vs_pair"]) if row["pair"] else "",
            row["pair"] if row["pair"] and row["vs_pair"] is not None else "",
            fmt_seconds(row["cpu_s"]) if row["cpu_s"] is not None else "",
        ))
        last_metric = row["metric"]
    # metric, backend and vs read left to right, the numbers are right-aligned
    lines.append(text_table(header, rows, padding=2, right=(2, 3, 4, 5, 7)).removesuffix("\n"))
    seen: set[tuple[str, str]] = set()
    for case, subject, status in w.not_measured():
        key = (subject, status.reason)
        if key in seen and status.state == "skipped":
            continue
        seen.add(key)
        where = "" if case == w.name else f" [{case}]"
        lines.append(f"   not measured: {subject}{where}: {status.state}: {status.reason}")
    extra = resources_table(w)
    if extra:
        lines.append(extra)
    lines.append(f"   ({len(w.samples)} samples in {w.seconds:.0f}s; data written in {w.prepare_seconds:.1f}s of it)")
    return "\n".join(lines)


def workload_json(w: WorkloadResult) -> dict[str, Any]:
    return {
        "title": w.title, "kind": w.kind, "description": w.description, "subjects": w.subjects,
        "reference": w.reference, "pairs": w.pairs, "error": w.error, "prepare_seconds": w.prepare_seconds,
        "seconds": w.seconds,
        "metrics": [m.as_json() for m in w.metrics.values()],
        "status": {case: {s: asdict(st) for s, st in by.items()} for case, by in w.status.items()},
        "samples": w.samples,
        "summary": summarize(w),
        "resources": resources(w),
        "facts": w.facts,
    }


def write_json(path: str, document: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(document, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)

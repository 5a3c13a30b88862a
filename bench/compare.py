"""Comparing two runs: what changed between an earlier ``results.json`` and a later one.

Per (workload, metric, backend) both runs measured: the ratio of the medians, new ÷ old
(lower is better, as everywhere in the bench). A change is *beyond noise* when the two runs'
own spreads say so: their min–max ranges do not overlap and the medians differ by at least
5%; a row with a single sample on either side has no spread and is never flagged. Flags:
``slower`` / ``faster``. The same rule applies to the resources (peak daemon RSS, upper
growth) per (workload, case, backend): ``bigger`` / ``smaller``.

The text report: one line per (workload, backend) with the geomean of new ÷ old over its
metrics and how many got slower and faster, then every flagged row (every row with
``all_rows``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from bench.report import fmt_bytes, fmt_ratio, fmt_seconds
from layerfs.errors import InvalidArgument
from layerfs.text import table as text_table

THRESHOLD = 0.05  # below this relative change a difference is never flagged


def load(path: str) -> dict[str, Any]:
    """A results.json written by ``bench``; one-line errors for anything else."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as e:
        raise InvalidArgument(f"cannot read bench results {path}: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgument(f"bench results {path} are not JSON: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("workloads"), dict):
        raise InvalidArgument(f"bench results {path}: not a bench results.json (no workloads)")
    return doc


def _flag(old: Sequence[float], new: Sequence[float], worse: str, better: str) -> str:
    """``worse``/``better`` when the ranges are apart and the medians >= 5% apart, else ""."""
    if len(old) < 2 or len(new) < 2:
        return ""
    o_med, n_med = _median(old), _median(new)
    if o_med <= 0:
        return ""
    change = n_med / o_med - 1
    if min(new) > max(old) and change >= THRESHOLD:
        return worse
    if max(new) < min(old) and change <= -THRESHOLD:
        return better
    return ""


def _median(values: Sequence[float]) -> float:
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def _samples(w: dict[str, Any], key: tuple[str, str], field: str) -> list[float]:
    """The values of ``field`` ("time" of a metric; "rss", "upper" of a case) for (name, subject)."""
    name, subject = key
    out: list[float] = []
    for s in w.get("samples", []):
        if s.get("subject") != subject:
            continue
        if field == "time" and name in s.get("values", {}):
            out.append(float(s["values"][name]))
        elif field == "rss" and s.get("case") == name and s.get("rss_bytes") is not None:
            out.append(float(s["rss_bytes"]))
        elif field == "upper" and s.get("case") == name and s.get("upper") is not None:
            out.append(float(s["upper"]["allocated_bytes"]))
    return out


def compare(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    """Every row both runs have: times per metric, then peak RSS and upper growth per case."""
    rows: list[dict[str, Any]] = []
    for wname, nw in new["workloads"].items():
        ow = old["workloads"].get(wname)
        if not isinstance(ow, dict):
            continue
        metrics = [m["name"] for m in nw.get("metrics", [])]
        subjects = list(nw.get("subjects", []))
        cases = list(dict.fromkeys(s["case"] for s in nw.get("samples", [])))
        plan = [("time", m, "slower", "faster") for m in metrics]
        plan += [(kind, c, "bigger", "smaller") for kind in ("rss", "upper") for c in cases]
        for kind, name, worse, better in plan:
            for subject in subjects:
                o, n = _samples(ow, (name, subject), kind), _samples(nw, (name, subject), kind)
                if not o or not n:
                    continue
                o_med, n_med = _median(o), _median(n)
                rows.append({
                    "workload": wname, "kind": kind, "name": name, "subject": subject,
                    "old_median": o_med, "new_median": n_med, "old_n": len(o), "new_n": len(n),
                    "old_range": [min(o), max(o)], "new_range": [min(n), max(n)],
                    "ratio": n_med / o_med if o_med else None,
                    "flag": _flag(o, n, worse, better),
                })
    return rows


def _fmt(kind: str, value: float) -> str:
    return fmt_seconds(value) if kind == "time" else fmt_bytes(value)


def render(rows: list[dict[str, Any]], old_label: str, new_label: str, all_rows: bool = False) -> str:
    lines = [f"== compared: {new_label} against {old_label} (new ÷ old; flagged when the min–max ranges "
             f"are apart and the change is >= {THRESHOLD:.0%}) =="]
    if not rows:
        lines.append("   nothing in common: no workload and backend measured in both runs")
        return "\n".join(lines)
    summary: list[tuple[str, ...]] = []
    groups = list(dict.fromkeys((r["workload"], r["subject"]) for r in rows if r["kind"] == "time"))
    for wname, subject in groups:
        mine = [r for r in rows if r["kind"] == "time" and r["workload"] == wname and r["subject"] == subject
                and r["ratio"]]
        if not mine:
            continue
        geo = math.exp(sum(math.log(r["ratio"]) for r in mine) / len(mine))
        slower = sum(r["flag"] == "slower" for r in mine)
        faster = sum(r["flag"] == "faster" for r in mine)
        summary.append((wname, subject, str(len(mine)), fmt_ratio(geo), str(slower), str(faster)))
    lines.append(text_table(("workload", "backend", "metrics", "geomean", "slower", "faster"), summary,
                            padding=2, right=(2, 3, 4, 5)).removesuffix("\n"))
    shown = rows if all_rows else [r for r in rows if r["flag"]]
    flagged = sum(1 for r in rows if r["flag"])
    if shown:
        detail = [(r["workload"], r["name"] + {"time": "", "rss": " (peak RSS)", "upper": " (upper growth)"}[r["kind"]],
                   r["subject"], _fmt(r["kind"], r["old_median"]), _fmt(r["kind"], r["new_median"]),
                   fmt_ratio(r["ratio"]), r["flag"].upper() if r["flag"] else "~") for r in shown]
        lines.append("")
        lines.append(text_table(("workload", "metric", "backend", "old", "new", "new÷old", "change"), detail,
                                padding=2, right=(3, 4, 5)).removesuffix("\n"))
    lines.append(f"   {flagged} of {len(rows)} rows changed beyond noise "
                 f"({sum(r['flag'] in ('slower', 'bigger') for r in rows)} worse, "
                 f"{sum(r['flag'] in ('faster', 'smaller') for r in rows)} better)")
    return "\n".join(lines)


def regressions(rows: list[dict[str, Any]]) -> int:
    return sum(r["flag"] in ("slower", "bigger") for r in rows)

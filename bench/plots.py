"""PNG plots of the metrics that have an x axis (matplotlib, the optional ``plots`` extra).

- ``copyup.png``: copy-up latency by file size, one panel per operation and sync mode,
  one line per backend (log-log);
- ``depth.png``: first stat, first open, warm stat and mount time by number of layers, one
  line per backend.

Points are medians; the bars span min to max. matplotlib is imported only here, and only
when plots are asked for; without it ``make_plots`` says so and returns nothing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping

from bench.report import summarize
from bench.runner import WorkloadResult

Log = Callable[[str], None]
PLOTTED = {"copyup": ("file size (bytes)", "copy-up latency"), "depth": ("layers", "latency")}


def make_plots(results: Mapping[str, WorkloadResult], outdir: str, log: Log) -> list[str]:
    """Write the plots for the workloads that ran; returns the files written."""
    wanted = [w for name, w in results.items() if name in PLOTTED and w.samples]
    if not wanted:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("plots skipped: matplotlib is not installed (pip install 'layerfs[plots]')")
        return []
    written = []
    for w in wanted:
        rows = [r for r in summarize(w) if r["group"] is not None and r["x"] is not None]
        groups = list(dict.fromkeys(r["group"] for r in rows))
        if not groups:
            continue
        xlabel, ylabel = PLOTTED[w.name]
        cols = 3 if len(groups) > 4 else 2
        nrows = math.ceil(len(groups) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4 * nrows), squeeze=False)
        for ax, group in zip(axes.flat, groups, strict=False):
            for subject in w.subjects:
                pts = sorted((r["x"], r["median_s"], r["min_s"], r["max_s"]) for r in rows
                             if r["group"] == group and r["subject"] == subject)
                if not pts:
                    continue
                xs = [p[0] for p in pts]
                meds = [p[1] for p in pts]
                err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
                # one colour per backend in every panel, whichever backends a panel lacks
                ax.errorbar(xs, meds, yerr=err, marker="o", capsize=3, label=subject,
                            color=f"C{w.subjects.index(subject) % 10}")
            ax.set_title(group)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{ylabel} (s)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize="small")
        for ax in list(axes.flat)[len(groups):]:
            ax.set_visible(False)
        fig.suptitle(f"{w.name}: {w.title}", fontsize="medium")
        fig.tight_layout()
        path = os.path.join(outdir, f"{w.name}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written

"""Plots of a run (matplotlib, the optional ``plots`` extra), as PNG or SVG files.

- ``headline``: the main table as one chart: per workload, each backend's geomean ratio to
  fuse-overlayfs over the workload's metrics (log scale, 1× marked; left of it is faster);
- ``ratios``: the same per metric, one row per metric, one marker per backend;
- ``resources``: peak daemon RSS per workload, and upper growth per write case (MiB);
- ``copyup``: copy-up latency by file size, one panel per operation and sync mode;
- ``depth``: first stat, first open, warm stat and mount time by number of layers.

Points are medians; the bars span min to max. Every chart has one legend, outside the
axes (it never hides a point), and the same colour per backend in every chart. Times are
labelled in s/ms/µs, sizes in KiB/MiB/GiB; an axis is logarithmic when its values span
more than a decade. matplotlib is imported only here, and only when plots are asked for;
without it ``make_plots`` says so and returns nothing. The charts are independent: up to two
forked processes draw them at once (``plot_workers``), and ``preload`` imports matplotlib early
(the CLI does it in a thread while the run's data is removed).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

from bench.report import fmt_bytes, fmt_seconds, resources, summarize
from bench.runner import WorkloadResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Log = Callable[[str], None]
PLOTTED = {"copyup": ("file size", "copy-up latency"), "depth": ("layers", "latency")}
PEER = "fuse-overlayfs"
MIB = 1 << 20


def _spans_decades(values: Sequence[float]) -> bool:
    positive = [v for v in values if v > 0]
    return bool(positive) and max(positive) / min(positive) > 10


def plot_workers() -> int:
    """How many processes draw the plots at once: one per CPU this process may use, at most 2."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(2, cpus))


def preload() -> None:
    """Import matplotlib (the slowest part of a small run's plots), e.g. in a thread while the run
    cleans up; without matplotlib this does nothing and ``make_plots`` says so later."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except ImportError:
        pass


# one chart (or the headline pair): the names it is saved under, and how it is drawn
_Job = tuple[tuple[str, ...], Callable[[list[str]], "Sequence[Figure] | None"]]


def make_plots(results: Mapping[str, WorkloadResult], outdir: str, log: Log,
               formats: Sequence[str] = ("png",), workers: int | None = None) -> list[str]:
    """Write the plots for the workloads that ran; returns the files written.

    The charts are independent, so they are drawn by up to ``workers`` forked processes at once
    (default ``plot_workers()``), the biggest first; a chart that fails is logged and skipped.
    """
    if not any(w.samples for w in results.values()):
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("plots skipped: matplotlib is not installed (pip install 'layerfs[plots]')")
        return []
    subjects = list(dict.fromkeys(s for w in results.values() if w.kind == "mount" for s in w.subjects))
    colours = {s: f"C{i % 10}" for i, s in enumerate(subjects)}

    def by_x(w: WorkloadResult) -> Callable[[list[str]], Sequence[Figure] | None]:
        def draw(logs: list[str]) -> Sequence[Figure] | None:
            fig = _by_x(plt, w, colours)
            return None if fig is None else [fig]
        return draw

    def headline(logs: list[str]) -> Sequence[Figure] | None:
        figs = _headline(plt, results, colours)
        if figs is None and any(w.kind == "mount" and w.samples for w in results.values()):
            logs.append(f"headline plot skipped: {PEER} was not measured")
        return figs

    def resources_chart(logs: list[str]) -> Sequence[Figure] | None:
        fig = _resources(plt, results, colours)
        return None if fig is None else [fig]

    # biggest first (the per-size charts have a panel per metric group), so two workers finish together
    charts = sorted((w for name, w in results.items() if name in PLOTTED and w.samples),
                    key=lambda w: -len(w.metrics))
    jobs: list[_Job] = [((w.name,), by_x(w)) for w in charts]
    jobs += [(("headline", "ratios"), headline), (("resources",), resources_chart)]

    def run(job: _Job, logs: list[str]) -> list[str]:
        names, draw = job
        written: list[str] = []
        try:
            figs = draw(logs)
            for name, fig in zip(names, figs or [], strict=False):
                for fmt in formats:
                    path = os.path.join(outdir, f"{name}.{fmt}")
                    fig.savefig(path, dpi=100)
                    written.append(path)
                plt.close(fig)
        except Exception as e:  # one chart is never worth the others
            logs.append(f"plot {'/'.join(names)} failed: {type(e).__name__}: {e}")
        return written

    done = _run_jobs(jobs, run, workers or plot_workers())
    written: list[str] = []
    for paths, logs in done:
        for line in logs:
            log(line)
        written += paths
    return written


def _run_jobs(jobs: Sequence[_Job], run: Callable[[_Job, list[str]], list[str]],
              workers: int) -> list[tuple[list[str], list[str]]]:
    """(files written, log lines) of every job, in the jobs' order; ``workers`` > 1 runs them in
    that many forked processes at once (a child that dies is reported as that job's failure)."""
    if workers <= 1 or len(jobs) <= 1:
        out = []
        for job in jobs:
            logs: list[str] = []
            out.append((run(job, logs), logs))
        return out
    import multiprocessing
    from multiprocessing.connection import Connection, wait

    ctx = multiprocessing.get_context("fork")  # the jobs are closures over the results: no pickling
    results: dict[int, tuple[list[str], list[str]]] = {}
    running: dict[Connection, tuple[int, Any]] = {}  # the child's pipe -> (job index, process)
    pending = list(enumerate(jobs))

    def child(index: int, writer: Connection) -> None:
        logs: list[str] = []
        paths = run(jobs[index], logs)
        writer.send((paths, logs))
        writer.close()

    try:
        while pending or running:
            while pending and len(running) < workers:
                index, _job = pending.pop(0)
                reader, writer = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=child, args=(index, writer), daemon=True)
                proc.start()
                writer.close()
                running[reader] = (index, proc)
            # a pipe is ready when its child sent its result, or died (end of file)
            for ready in wait(list(running)):
                assert isinstance(ready, Connection)
                index, proc = running.pop(ready)
                try:
                    results[index] = ready.recv()
                except EOFError:
                    results[index] = ([], [])
                ready.close()
                proc.join()
                if proc.exitcode != 0 and not results[index][1]:
                    names = "/".join(jobs[index][0])
                    results[index] = ([], [f"plot {names} failed: its process exited {proc.exitcode}"])
    finally:
        for reader, (_index, proc) in running.items():  # only on an exception (Ctrl-C): stop ours, by PID
            proc.terminate()
            proc.join()
            reader.close()
    return [results[i] for i in range(len(jobs))]


def _time_axis(ax: Axes, axis: str, values: Sequence[float]) -> None:
    """Log scale if ``values`` span decades; tick labels in s/ms/µs."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    set_scale = ax.set_yscale if axis == "y" else ax.set_xscale
    target = ax.yaxis if axis == "y" else ax.xaxis
    if _spans_decades(values):
        set_scale("log")
        target.set_minor_formatter(NullFormatter())
    target.set_major_formatter(FuncFormatter(lambda v, _pos: fmt_seconds(v) if v > 0 else "0"))


def _ratio_axis(ax: Axes, values: Sequence[float]) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}×"))
    lo, hi = min([*values, 1.0]), max([*values, 1.0])
    ax.set_xlim(lo / 1.5, hi * 1.5)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.grid(True, axis="x", which="both", alpha=0.3)


def _headline(plt: ModuleType, results: Mapping[str, WorkloadResult],
              colours: dict[str, str]) -> tuple[Figure, Figure] | None:
    """(geomean per workload chart, per metric chart) of every backend ÷ fuse-overlayfs."""
    per_metric: list[tuple[str, str, dict[str, float]]] = []  # workload, metric, subject -> ratio
    for w in results.values():
        if w.kind != "mount" or PEER not in w.subjects:
            continue
        for row_metric in w.metrics:
            peer = [r for r in summarize(w) if r["metric"] == row_metric and r["subject"] == PEER]
            if not peer or not peer[0]["median_s"]:
                continue
            ratios = {r["subject"]: r["median_s"] / peer[0]["median_s"] for r in summarize(w)
                      if r["metric"] == row_metric and r["subject"] != PEER and r["median_s"] > 0}
            if ratios:
                per_metric.append((w.name, row_metric, ratios))
    if not per_metric:
        return None
    workloads = list(dict.fromkeys(wl for wl, _m, _r in per_metric))
    shown = [s for s in colours if s != PEER and any(s in r for _w, _m, r in per_metric)]

    geo: dict[tuple[str, str], float] = {}
    for wl in workloads:
        for s in shown:
            values = [r[s] for w, _m, r in per_metric if w == wl and s in r]
            if values:
                geo[(wl, s)] = math.exp(sum(math.log(v) for v in values) / len(values))
    fig1, ax = plt.subplots(figsize=(10, 1.0 + 0.32 * len(workloads) * len(shown)), layout="constrained")
    height = 0.8 / max(len(shown), 1)
    for j, s in enumerate(shown):
        ys = [i + (j - (len(shown) - 1) / 2) * height for i, wl in enumerate(workloads) if (wl, s) in geo]
        xs = [geo[(wl, s)] for wl in workloads if (wl, s) in geo]
        # bars grow from 1× (the peer): left is faster, right slower
        ax.barh(ys, [x - 1 for x in xs], left=1, height=height * 0.9, color=colours[s], label=s)
        for x, y in zip(xs, ys, strict=True):
            ax.annotate(f"{x:.2f}×", (x, y), xytext=(3 if x >= 1 else -3, 0), textcoords="offset points",
                        ha="left" if x >= 1 else "right", va="center", fontsize="x-small")
    ax.set_yticks(range(len(workloads)), workloads)
    ax.invert_yaxis()
    _ratio_axis(ax, list(geo.values()))
    ax.set_xlabel(f"time ÷ {PEER} (geomean over the workload's metrics; < 1× is faster)")
    ax.set_title(f"Every backend against {PEER}, per workload")
    fig1.legend(loc="outside right upper", title="backend")

    fig2, ax2 = plt.subplots(figsize=(10, 1.5 + 0.22 * len(per_metric)), layout="constrained")
    labels = [f"{wl}: {m}" for wl, m, _r in per_metric]
    for s in shown:
        pts = [(r[s], i) for i, (_w, _m, r) in enumerate(per_metric) if s in r]
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], "o", color=colours[s], label=s, markersize=4,
                 alpha=0.85)
    ax2.set_yticks(range(len(labels)), labels, fontsize="x-small")
    ax2.set_ylim(len(labels) - 0.5, -0.5)
    _ratio_axis(ax2, [v for _w, _m, r in per_metric for v in r.values()])
    ax2.set_xlabel(f"median time ÷ {PEER} median (< 1× is faster)")
    ax2.set_title(f"Every metric against {PEER}")
    fig2.legend(loc="outside right upper", title="backend")
    return fig1, fig2


def _resources(plt: ModuleType, results: Mapping[str, WorkloadResult],
               colours: dict[str, str]) -> Figure | None:
    """Peak daemon RSS per workload (the largest over its cases) and upper growth per write case."""
    from matplotlib.ticker import FuncFormatter

    rss: dict[tuple[str, str], float] = {}
    upper: dict[tuple[str, str], float] = {}
    for w in results.values():
        if w.kind != "mount":
            continue
        for r in resources(w):
            if r["rss_peak_bytes"] is not None:
                key = (w.name, r["subject"])
                rss[key] = max(rss.get(key, 0.0), r["rss_peak_bytes"] / MIB)
            if r["upper_allocated_bytes"] and r["subject"] in colours:
                upper[(f"{w.name}: {r['case']}", r["subject"])] = r["upper_allocated_bytes"] / MIB
    if not rss and not upper:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), layout="constrained", squeeze=False)
    for ax, data, title, xlabel in ((axes[0][0], rss, "FUSE daemon peak RSS (largest over a workload's cases)",
                                     "MiB"),
                                    (axes[0][1], upper, "upper layer growth (allocated, median)", "MiB")):
        groups = list(dict.fromkeys(g for g, _s in data))
        names = [s for s in colours if any(k[1] == s for k in data)]
        height = 0.8 / max(len(names), 1)
        for j, s in enumerate(names):
            ys = [i + (j - (len(names) - 1) / 2) * height for i, g in enumerate(groups) if (g, s) in data]
            xs = [data[(g, s)] for g in groups if (g, s) in data]
            ax.barh(ys, xs, height=height * 0.9, color=colours[s], label=s)
        ax.set_yticks(range(len(groups)), groups, fontsize="small")
        ax.invert_yaxis()
        if _spans_decades(list(data.values())):
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize="medium")
        ax.grid(True, axis="x", which="both", alpha=0.3)
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    order = [s for s in colours if s in handles]
    fig.legend([handles[s] for s in order], order, loc="outside right upper", title="backend")
    return cast("Figure", fig)


def _by_x(plt: ModuleType, w: WorkloadResult, colours: dict[str, str]) -> Figure | None:
    from matplotlib.ticker import NullLocator

    rows = [r for r in summarize(w) if r["group"] is not None and r["x"] is not None]
    groups = list(dict.fromkeys(r["group"] for r in rows))
    if not groups:
        return None
    xlabel, ylabel = PLOTTED[w.name]
    cols = 3 if len(groups) > 4 else 2
    nrows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols + 2, 4 * nrows), squeeze=False, layout="constrained")
    handles: dict[str, Any] = {}
    for ax, group in zip(axes.flat, groups, strict=False):
        mine = [r for r in rows if r["group"] == group]
        for subject in w.subjects:
            pts = sorted((r["x"], r["median_s"], r["min_s"], r["max_s"]) for r in mine if r["subject"] == subject)
            if not pts:
                continue
            err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
            line = ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=err, marker="o", capsize=3,
                               markersize=4, label=subject, color=colours.get(subject, "grey"))
            handles.setdefault(subject, line)
        ax.set_title(group)
        xs = sorted({r["x"] for r in mine})
        if _spans_decades(xs):
            ax.set_xscale("log")
        # ticks where the measurements are, in their unit (4KiB, 1MiB; 1, 64 layers)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(xs, [fmt_bytes(x) if w.name == "copyup" else f"{x:g}" for x in xs])
        _time_axis(ax, "y", [r[k] for r in mine for k in ("min_s", "max_s")])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    fig.suptitle(f"{w.name}: {w.title}", fontsize="medium")
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", title="backend")
    return cast("Figure", fig)

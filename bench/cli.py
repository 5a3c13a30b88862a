"""``layerfs bench`` / ``python -m bench``: run the suite, print tables, write JSON and plots.

Progress goes to stderr, the tables and targets to stdout, everything else to ``--out``
(``results.json``, ``headline``, ``ratios``, ``resources``, ``copyup``, ``depth`` plots as PNG or
SVG); ``--compare OLD.json`` adds the change against an earlier run, and ``bench compare OLD
NEW`` shows it for two earlier runs without running anything. The work directory (a fresh temp dir
under ``--workdir``, default /var/tmp) holds all layer data and is removed at the end;
whatever the run mounted is unmounted and every daemon it started is stopped, by PID, on
the way out, Ctrl-C and SIGTERM included. ``native`` is always measured: it is what every
ratio is relative to.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import click

from bench import backends as backends_mod
from bench import compare as compare_mod
from bench import machine, report, targets
from bench.pull import Pull
from bench.runner import Runner, Workload, WorkloadResult
from bench.storeops import StoreOps
from bench.workloads import ALL as MOUNT_WORKLOADS

WORKLOAD_NAMES = (*(w.name for w in MOUNT_WORKLOADS), StoreOps.name, Pull.name)
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"


def log(message: str) -> None:
    click.echo(f"bench: {message}", err=True)


def make_workloads(names: tuple[str, ...], quick: bool) -> list[Workload]:
    chosen = set(names or WORKLOAD_NAMES)
    out: list[Workload] = [cls(quick) for cls in MOUNT_WORKLOADS if cls.name in chosen]
    if StoreOps.name in chosen:
        out.append(StoreOps(quick))
    if Pull.name in chosen:
        out.append(Pull(quick))
    return out


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the ``finally`` blocks unmount and stop daemons."""

    def raise_interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _no_interrupts() -> Iterator[None]:
    """Cleanup must finish: a second Ctrl-C or SIGTERM during it is ignored."""
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def _cleanup(workdir: str) -> None:
    with _no_interrupts():
        leftovers = backends_mod.sweep(workdir)
        for line in leftovers:
            log(f"cleanup: {line}")
        from layerfs.mount import kernel

        still = kernel.mounts_under(workdir)
        if still:
            log(f"cleanup: NOT removing {workdir}: still mounted: {', '.join(still)}")
            return
        shutil.rmtree(workdir, ignore_errors=True)


@click.group("bench", invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quick", is_flag=True, help="Every workload small, 2 rounds (1 of store and pull), no lever variants, unionfs-fuse or "
                   "kernel-plain: the whole run in under a minute on an idle 2-core machine (about 40-45 s; "
                   "81-122 s at load average 6).")
@click.option("--workload", "workload_names", multiple=True, type=click.Choice(WORKLOAD_NAMES),
              help="Run only this workload (repeatable; default: all).")
@click.option("--backend", "backend_names", multiple=True, type=click.Choice(backends_mod.NAMES),
              help="Run only this backend (repeatable; default: all, without the lever variants "
                   "layerfs-kernel-nodircache/-nopassthrough/-nosplice/-writeback, unionfs-fuse and kernel-plain under --quick; native is always run).")
@click.option("--rounds", type=click.IntRange(min=1), default=None,
              help="Samples per case and backend (default 5; with --quick 2, and 1 for store and pull).")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where to make the run's temp dir for layer data (default /var/tmp; removed at the end).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Where to write results.json and plots (default bench/results/<timestamp>).")
@click.option("--no-plots", is_flag=True, help="Do not draw plots.")
@click.option("--plot-format", "plot_formats", multiple=True, type=click.Choice(("png", "svg")),
              help="Plot file format (repeatable; default png).")
@click.option("--compare", "compare_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="After the run, show the change against this earlier run's results.json.")
@click.pass_context
def bench_cmd(ctx: click.Context, quick: bool, workload_names: tuple[str, ...], backend_names: tuple[str, ...],
              rounds: int | None, workdir: str | None, out_dir: str | None, no_plots: bool,
              plot_formats: tuple[str, ...], compare_path: str | None) -> None:
    """Benchmark copy-on-write and union costs: every workload on every backend, interleaved.

    `bench compare OLD.json NEW.json` compares two earlier runs without running anything.
    """
    if ctx.invoked_subcommand is not None:
        return
    old = _load_or_exit(compare_path) if compare_path else None
    # --quick: 2 rounds of every mount case, 1 of store and pull (one sample of a whole
    # import/export/pull says what --quick can say); --rounds sets both
    store_rounds = rounds or (1 if quick else 5)
    rounds = rounds or (2 if quick else 5)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(out_dir) if out_dir else DEFAULT_RESULTS / stamp
    parent = workdir or "/var/tmp"
    os.makedirs(parent, exist_ok=True)
    run_dir = tempfile.mkdtemp(prefix="layerfs-bench-", dir=parent)
    names = ("native", *backend_names) if backend_names else (backends_mod.QUICK_NAMES if quick
                                                               else backends_mod.NAMES)
    chosen_backends = backends_mod.by_name(names)
    workloads = make_workloads(workload_names, quick)
    if not machine.is_root():
        log("warning: not root: kernel mounts are skipped and cold runs cannot drop caches")
    started = time.time()
    results: dict[str, WorkloadResult] = {}
    document: dict[str, Any] = {
        "schema": report.SCHEMA, "command": sys.argv, "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "quick": quick, "rounds": rounds, "store_rounds": store_rounds, "workdir": run_dir,
    }
    interrupted = False
    try:
        with _terminate_as_interrupt():
            document["machine"] = machine.machine_info(run_dir)
            runner = Runner(run_dir, rounds, log, store_rounds=store_rounds, sample_timeout=120.0 if quick else 1800.0,
                            settle_timeout=0.25 if quick else 20.0, prepare_settle_timeout=1.0 if quick else 60.0)
            unavailable = runner.check_backends(chosen_backends)
            document["backends"] = {
                b.name: {"available": b.name not in unavailable, "reason": unavailable.get(b.name)}
                for b in chosen_backends
            }
            for w in workloads:
                results[w.name] = runner.run(w, chosen_backends, unavailable)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: cleaning up, then reporting what was measured")
    finally:
        # matplotlib's import (most of a small run's plotting) overlaps the removal of the data
        preloading = None if no_plots else _preload_plots()
        _cleanup(run_dir)
    if preloading is not None:
        preloading.join()  # before any fork: no thread may hold the import lock then
    document["duration_s"] = time.time() - started
    document["interrupted"] = interrupted
    _report(document, results, out, quick, no_plots, plot_formats or ("png",), old, compare_path)
    if interrupted:
        sys.exit(130)


def _preload_plots() -> threading.Thread:
    from bench.plots import preload

    thread = threading.Thread(target=preload, name="bench-plots-preload", daemon=True)
    thread.start()
    return thread


def _load_or_exit(path: str) -> dict[str, Any]:
    from layerfs.errors import LayerfsError

    try:
        return compare_mod.load(path)
    except LayerfsError as e:
        click.echo(f"bench: error: {e}", err=True)
        sys.exit(e.exit_code)


@bench_cmd.command("compare")
@click.argument("old_path", metavar="OLD.json", type=click.Path(exists=True, dir_okay=False))
@click.argument("new_path", metavar="NEW.json", type=click.Path(exists=True, dir_okay=False))
@click.option("--all", "all_rows", is_flag=True, help="List every row, not only the ones beyond noise.")
@click.option("--fail-on-regression", is_flag=True,
              help="Exit 1 when anything got slower or bigger beyond noise.")
def compare_cmd(old_path: str, new_path: str, all_rows: bool, fail_on_regression: bool) -> None:
    """Show what changed from an earlier run's results.json to a later one's (new ÷ old)."""
    old, new = _load_or_exit(old_path), _load_or_exit(new_path)
    rows = compare_mod.compare(old, new)
    click.echo(compare_mod.render(rows, old_path, new_path, all_rows))
    if fail_on_regression and compare_mod.regressions(rows):
        sys.exit(1)


def _report(document: dict[str, Any], results: dict[str, WorkloadResult], out: Path, quick: bool,
            no_plots: bool, plot_formats: tuple[str, ...] = ("png",), old: dict[str, Any] | None = None,
            old_path: str | None = None) -> None:
    evaluated = targets.evaluate(results)
    document["workloads"] = {name: report.workload_json(w) for name, w in results.items()}
    document["targets"] = [t.as_json() for t in evaluated]
    info = document.get("machine")
    if info:
        click.echo("machine: " + machine.describe(info))
    store_rounds = document.get("store_rounds", document["rounds"])
    shown = f"{document['rounds']}" + (f" ({store_rounds} of store and pull)" if store_rounds != document["rounds"] else "")
    click.echo(f"rounds: {shown}{' (quick sizes)' if quick else ''}; "
               f"took {document['duration_s']:.0f}s\n")
    for w in results.values():
        click.echo(report.table(w) + "\n")
    click.echo(targets.render(evaluated, quick))
    out.mkdir(parents=True, exist_ok=True)
    if old is not None and old_path is not None:
        rows = compare_mod.compare(old, document)
        document["comparison"] = {"against": old_path, "rows": rows}
        click.echo("\n" + compare_mod.render(rows, old_path, "this run"))
    plots = [] if no_plots else _plots(results, str(out), plot_formats)
    document["plots"] = [os.path.basename(p) for p in plots]
    path = out / "results.json"
    report.write_json(str(path), document)
    log(f"results: {path}" + (f"; plots: {', '.join(document['plots'])}" if plots else ""))


def _plots(results: dict[str, WorkloadResult], out: str, formats: tuple[str, ...]) -> list[str]:
    from bench.plots import make_plots

    try:
        return make_plots(results, out, log, formats)
    except Exception as e:  # a plot is never worth losing the results over
        log(f"plots failed: {type(e).__name__}: {e}")
        return []

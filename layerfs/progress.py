"""Progress bars on stderr: only on a terminal, silenced by ``-q``; drawn by rich.

A bar is a byte counter for one blob: ``Copying blob 1a2b3c4d5e6f ━━━━━━╺━━━ 12.3/45.6 MB
4.1 MB/s 0:00:08`` (sizes decimal, as ``human_size``; the rate and the time left once known).
Several bars may run at once (parallel downloads); each one finished becomes one line,
``Copying blob 1a2b3c4d5e6f  45.6MB / 45.6MB``, above the bars still running; ``line`` goes
there too. The display stops when the last bar finishes; a command wrapped in
``ending_bars`` (every CLI command, through ``cli.base.handle_errors``) stops what a failure
left running before its error is printed, so the error is a line of its own, never the end
of a bar.

The calls (``Progress(enabled, stream)``, ``bar(label, total)``, ``Bar.update``,
``Bar.wrap``, ``Bar.finish``, ``Progress.line``) are what the importer and the registry
client use; they do not depend on rich.
"""

from __future__ import annotations

import atexit
import functools
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO, TypeVar

from layerfs.text import human_duration, human_size

if TYPE_CHECKING:  # rich is imported when the first bar is drawn: most commands draw none
    from rich.console import Console
    from rich.progress import Progress as _RichProgress
    from rich.progress import TaskID


F = TypeVar("F", bound=Callable[..., Any])


class Progress:
    def __init__(self, enabled: bool | None = None, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._lock = threading.Lock()
        self._console: Console | None = None
        self._live: _RichProgress | None = None  # while bars are shown
        self._running = 0

    def bar(self, label: str, total: int | None) -> Bar:
        return Bar(self, label, total)

    def line(self, text: str) -> None:
        if self.enabled:
            with self._lock:
                if self._live is not None:
                    self._live.console.print(text, highlight=False, markup=False, soft_wrap=True)
                    return
            self.stream.write(text + "\n")
            self.stream.flush()

    # --- the rich display ---------------------------------------------------------------

    def _console_(self) -> Console:
        from rich.console import Console

        if self._console is None:
            # a terminal's width; a test's stream (enabled by hand) gets 100 columns
            tty = self.stream.isatty()
            self._console = Console(file=self.stream, force_terminal=True, highlight=False,
                                    width=None if tty else 100)
        return self._console

    def _start(self, label: str, total: int | None) -> TaskID:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as _RichProgress

        with self._lock:
            if self._live is None:
                self._live = _RichProgress(
                    TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=self._console_(), refresh_per_second=10,
                    redirect_stderr=False, redirect_stdout=False,  # click writes past rich's proxies
                )
                self._live.start()
                _SHOWN.add(self)
            self._running += 1
            return self._live.add_task(label, total=total)

    def _advance(self, task: TaskID, n: int) -> None:
        live = self._live
        if live is not None:
            live.advance(task, n)

    def _end(self, task: TaskID, text: str) -> None:
        with self._lock:
            live = self._live
            if live is None:
                return
            live.remove_task(task)
            live.console.print(text, highlight=False, markup=False, soft_wrap=True)
            self._running -= 1
            if self._running == 0:
                self._live = None
                live.stop()

    def _stop(self) -> None:
        with self._lock:
            live, self._live, self._running = self._live, None, 0
        _SHOWN.discard(self)
        if live is not None:
            live.stop()


_SHOWN: weakref.WeakSet[Progress] = weakref.WeakSet()  # the displays running now


def stop_all() -> None:
    """End every bar still shown (as it stands), so what is written next starts a line of
    its own: an error, the end of the program. The bars of a failed command stay visible."""
    for progress in list(_SHOWN):
        progress._stop()


atexit.register(stop_all)


def ending_bars(fn: F) -> F:
    """``fn`` with every bar it left running ended when it returns or raises (``stop_all``)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> object:
        try:
            return fn(*args, **kwargs)
        finally:
            stop_all()

    return wrapper  # type: ignore[return-value]


class Bar:
    def __init__(self, progress: Progress, label: str, total: int | None) -> None:
        self.p = progress
        self.label = label
        self.total = total
        self.done = 0
        self._task: TaskID | None = None
        self._t0 = time.monotonic()
        self._finished = False

    def update(self, n: int) -> None:
        self.done += n
        if not self.p.enabled:
            return
        if self._task is None:
            self._task = self.p._start(self.label, self.total)
        self.p._advance(self._task, n)

    def finish(self) -> None:
        if not self.p.enabled or self._finished:
            return
        self._finished = True
        if self._task is None:
            self._task = self.p._start(self.label, self.total)
        total = f" / {human_size(self.total)}" if self.total else ""
        took = time.monotonic() - self._t0
        line = f"{self.label}  {human_size(self.done)}{total}"
        if took >= 1:
            line += f" in {human_duration(took).lower()}"
        self.p._end(self._task, line)

    def wrap(self, raw: BinaryIO) -> CountingReader:
        return CountingReader(raw, self)


class CountingReader:
    def __init__(self, raw: BinaryIO, bar: Bar) -> None:
        self.raw = raw
        self.bar = bar

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.bar.update(len(data))
        return data

    def readable(self) -> bool:
        return True

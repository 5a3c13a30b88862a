"""Progress bars on stderr: only on a terminal, silenced by ``-q``.

A bar is a byte counter for one blob: ``Copying blob 1a2b3c4d5e6f  12.3MB / 45.6MB``. It is
redrawn at most ten times a second with a carriage return and finished with a newline.
"""

from __future__ import annotations

import sys
import time
from typing import BinaryIO, TextIO

from layerfs.text import human_size


class Progress:
    def __init__(self, enabled: bool | None = None, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled

    def bar(self, label: str, total: int | None) -> Bar:
        return Bar(self, label, total)

    def line(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text + "\n")
            self.stream.flush()


class Bar:
    def __init__(self, progress: Progress, label: str, total: int | None) -> None:
        self.p = progress
        self.label = label
        self.total = total
        self.done = 0
        self._last = 0.0

    def update(self, n: int) -> None:
        self.done += n
        if not self.p.enabled:
            return
        now = time.monotonic()
        if now - self._last >= 0.1:
            self._last = now
            self._draw()

    def _draw(self, end: str = "") -> None:
        total = f" / {human_size(self.total)}" if self.total else ""
        self.p.stream.write(f"\r{self.label}  {human_size(self.done)}{total}\x1b[K{end}")
        self.p.stream.flush()

    def finish(self) -> None:
        if self.p.enabled:
            self._draw("\n")

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

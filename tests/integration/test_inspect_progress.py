"""Progress bars as a terminal shows them: stderr on a pty, the bytes fed to a terminal
emulator (pyte), the screen read back. Finished bars are one line each; an error in the
middle of a bar gets a line of its own; nothing on a pipe."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pyte
import pytest

from tests.support import imagebuild as ib
from tests.support.tarbuild import write_layer

COLS, ROWS = 120, 30


def _screen_of(args: list[str]) -> tuple[int, list[str]]:
    master, slave = pty.openpty()
    os.set_blocking(master, True)
    import fcntl
    import struct
    import termios

    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=slave, stdin=subprocess.DEVNULL)
    try:
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the other side closed
                break
            if not data:
                break
            chunks.append(data)
        rc = p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
    screen = pyte.Screen(COLS, ROWS)
    pyte.ByteStream(screen).feed(b"".join(chunks))
    return rc, [line.rstrip() for line in screen.display if line.strip()]


@pytest.fixture
def big_layer(tmp_path: Path) -> str:
    return write_layer(str(tmp_path / "big.tar.gz"), {"big": os.urandom(6 << 20)}, "gzip")


def test_bars_finish_as_one_line_each(tmp_path: Path, big_layer: str) -> None:
    small = write_layer(str(tmp_path / "small.tar"), {"f": b"x" * 1000})
    rc, lines = _screen_of([sys.executable, "-m", "layerfs", "--root", str(tmp_path / "s"), "import-layer",
                            big_layer, small, "--name", "a:1"])
    assert rc == 0, lines
    copying = [line for line in lines if line.startswith("Copying")]
    assert len(copying) == 2 and all("MB" in line or "kB" in line for line in copying), lines
    assert not any("━" in line for line in lines), lines  # no bar left on the screen


def test_an_error_after_a_bar_is_a_line_of_its_own(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    desc = ib.add_image(layout, [ib.layer_tar({"big": os.urandom(6 << 20)})])
    ib.set_index(layout, [(desc, {ib.REF_NAME: "1"})])
    manifest = json.loads(ib.blob_path(layout, desc["digest"]).read_bytes())
    blob = ib.blob_path(layout, manifest["layers"][0]["digest"])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)  # damaged in the middle
    blob.write_bytes(bytes(data))
    rc, lines = _screen_of([sys.executable, "-m", "layerfs", "--root", str(tmp_path / "s"), "import",
                            str(layout), "--name", "b:1"])
    assert rc == 1
    errors = [line for line in lines if "layerfs: error" in line]
    assert len(errors) == 1 and errors[0].startswith("layerfs: error"), lines
    assert any(line.startswith("Copying blob") for line in lines), lines  # the bar was there


def test_no_bars_on_a_pipe(tmp_path: Path, big_layer: str) -> None:
    r = subprocess.run([sys.executable, "-m", "layerfs", "--root", str(tmp_path / "s"), "import-layer",
                        big_layer, "--name", "c:1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Copying" not in r.stderr and "\x1b[" not in r.stderr

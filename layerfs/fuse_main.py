"""Entry point of the ``layerfs-fuse`` program (filled by the FUSE backend issue)."""

import sys


def main() -> None:
    sys.stderr.write("layerfs-fuse: the FUSE backend is not implemented yet\n")
    raise SystemExit(1)

"""``python -m bench``: the benchmark suite (the same command as ``layerfs bench``)."""

from bench.cli import bench_cmd

if __name__ == "__main__":
    bench_cmd(prog_name="python -m bench")

"""Runs one small CPU job under `contrail local --workers 2` and `--nodes 1 --local-ranks 2`,
alternating, and compares rank 0's steady-state samples/s (its progress lines after the first
`--skip` of them). Standard library only."""

import argparse
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

JOB = """
[data]
url = "file://{data}"
synth_samples = 4096
synth_shard_size = 64
image_size = 32
[model]
layers = [1, 1]
width = 16
projector_hidden = 64
projector_out = 32
[train]
global_batch = 64
micro_batch = 32
epochs = 100
max_steps = {steps}
log_every = 10
[cluster]
grpc_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
[checkpoint]
url = ""
"""

LINE = re.compile(r"step\s+(\d+)\s.*?([\d.]+) samples/s")


def run(contrail, job, shape, skip):
    started = time.monotonic()
    out = subprocess.run(
        [contrail, "local", *shape, "--config", str(job)],
        capture_output=True, text=True, check=True,
    ).stdout
    wall = time.monotonic() - started
    rates = [float(m.group(2)) for m in LINE.finditer(out)]
    if len(rates) <= skip:
        raise SystemExit(f"too few progress lines ({len(rates)}):\n{out}")
    return statistics.mean(rates[skip:]), wall


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--contrail", required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--skip", type=int, default=2, help="progress lines to skip (warm-up)")
    a = p.parse_args()
    shapes = {
        "--workers 2": ["--workers", "2"],
        "--nodes 1 --local-ranks 2": ["--nodes", "1", "--local-ranks", "2"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.toml"
        job.write_text(JOB.format(data=Path(tmp) / "data", steps=a.steps))
        results = {name: [] for name in shapes}
        for r in range(a.repeats):
            # ABBA order, so neither shape always runs first (warm caches, a written dataset).
            order = list(shapes.items())
            for name, shape in order if r % 2 == 0 else order[::-1]:
                rate, wall = run(a.contrail, job, shape, a.skip)
                results[name].append(rate)
                print(f"run {r + 1} {name:<28} {rate:8.1f} samples/s  ({wall:.1f} s wall)")
    med = {name: statistics.median(v) for name, v in results.items()}
    base, node = med["--workers 2"], med["--nodes 1 --local-ranks 2"]
    print(f"median samples/s: --workers 2 {base:.1f}, --nodes 1 --local-ranks 2 {node:.1f}, "
          f"ratio {node / base:.3f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Prints bench/quality's table from the folder run.sh fills: RESULTS/<name>/knn.json and
linear.json (written by `contrail eval knn|linear --json`) and, for trained runs,
timing.json (train_seconds, wall_seconds, embed_seconds, loss_first, loss_last). Names are
`contrail-s<seed>` and `lightly-s<seed>` for the trained runs, `raw-pixels` and
`random-init-s<seed>` for the baselines. Then the published numbers the Debian package
`dataset-fashion-mnist` ships (README table) and what its benchmark/baselines.json holds.

    python bench/quality/summarize.py RESULTS [--steps 600 --batch 256]
"""

import argparse
import gzip
import json
import os
import re
import statistics

DOC = "/usr/share/doc/dataset-fashion-mnist"
NAMES = {"simclr": "SimCLR", "moco": "MoCo v2", "swav": "SwAV"}
SYSTEMS = [("contrail", "contrail (libtorch, 2 workers)"), ("lightly", "lightly 1.6.0 (PyTorch)")]
# Rows of the package README's table of submitted results that give a sense of scale.
PUBLISHED_ROWS = [
    "Human Performance",
    "MLP 256-128-100",
    "2 Conv+pooling",
    "HOG+SVM",
    "ResNet18",
]


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def run(results, name):
    d = os.path.join(results, name)
    knn, lin, timing = (
        load(os.path.join(d, f)) for f in ("knn.json", "linear.json", "timing.json")
    )
    fit = (lin or {}).get("fit")
    return {
        "knn": 100 * knn["knn"]["top1"] if knn else None,
        "linear": 100 * lin["linear"]["top1"] if lin else None,
        "linear_converged": fit.get("converged") if isinstance(fit, dict) else None,
        **(timing or {}),
    }


def stat(values, digits=2, unit=""):
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    mean = statistics.fmean(vals)
    if len(vals) == 1:
        return f"{mean:.{digits}f}{unit}"
    sd = statistics.stdev(vals)
    lo, hi = min(vals), max(vals)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}{unit} [{lo:.{digits}f}, {hi:.{digits}f}]"


def fmt(v, digits=2):
    return "n/a" if v is None else f"{v:.{digits}f}"


def published():
    print("\n== Published (Debian package dataset-fashion-mnist, supervised, test accuracy) ==")
    readme = os.path.join(DOC, "README.md.gz")
    if os.path.exists(readme):
        with gzip.open(readme, "rt", encoding="utf-8") as f:
            rows = [line for line in f if line.startswith("|")]
        for want in PUBLISHED_ROWS:
            for line in rows:
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                if len(cells) >= 3 and cells[0] == want:
                    prep = cells[1] if len(cells[1]) <= 40 else cells[1][:37] + "..."
                    print(f"  {cells[0]:<20} {100 * float(cells[2]):6.2f} %   ({prep})")
                    break
        print("  (README.md 'Benchmark' table of submitted results: supervised training with"
              " labels, not self-supervised)")
    else:
        print(f"  {readme} not found")
    path = os.path.join(DOC, "benchmark", "baselines.json")
    if os.path.exists(path):
        with open(path) as f:
            grid = json.load(f)["classifiers"]
        print(f"  {path} holds the scikit-learn grid the dataset's authors benchmarked"
              " (its accuracies are not in the package):")
        for name in ["KNeighborsClassifier", "LogisticRegression"]:
            if name in grid:
                merged = {k: v for d in grid[name] for k, v in d.items()}
                print(f"    {name}: {merged}")
    else:
        print(f"  {path} not found (apt-get install dataset-fashion-mnist)")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("results")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--objective", default="simclr")
    a = p.parse_args()
    names = sorted(os.listdir(a.results))

    runs = {}
    for name in names:
        m = re.fullmatch(r"(contrail|lightly)-s(\d+)", name)
        if m:
            runs.setdefault(m.group(1), {})[int(m.group(2))] = run(a.results, name)
    seeds = sorted({s for r in runs.values() for s in r})

    what = f"{a.steps} steps of {a.batch}" if a.steps else "trained runs"
    print(f"\n== {NAMES.get(a.objective, a.objective)} on Fashion-MNIST, {what}, seeds {seeds}: "
          "test top-1 % (mean ± sd [min, max]) ==")
    print(f"{'system':<32} {'kNN top-1':<30} {'linear top-1':<30} {'train s':<30} embed s")
    for key, label in SYSTEMS:
        r = runs.get(key, {})
        col = lambda f, d=2: stat([r[s].get(f) for s in sorted(r)], d)  # noqa: E731
        print(f"{label:<32} {col('knn'):<30} {col('linear'):<30} {col('train_seconds', 1):<30} "
              f"{col('embed_seconds', 1)}")
    print("\nper seed:")
    for key, label in SYSTEMS:
        for s, r in sorted(runs.get(key, {}).items()):
            conv = "" if r.get("linear_converged") in (None, True) else " (probe not converged)"
            train, wall = fmt(r.get("train_seconds"), 1), fmt(r.get("wall_seconds"), 1)
            print(f"  {key:<9} seed {s}: kNN {fmt(r['knn'])}  linear {fmt(r['linear'])}{conv}  "
                  f"train {train} s (wall {wall} s)  "
                  f"loss {fmt(r.get('loss_first'), 4)} -> {fmt(r.get('loss_last'), 4)}")

    c, lt = runs.get("contrail", {}), runs.get("lightly", {})
    both = [s for s in seeds if s in c and s in lt
            and c[s].get("train_seconds") and lt[s].get("train_seconds")]
    if both:
        ratios = [lt[s]["train_seconds"] / c[s]["train_seconds"] for s in both]
        print(f"\ntrain time lightly / contrail: {stat(ratios, 2)}×"
              " (above 1: contrail trains faster)")
        for metric in ("knn", "linear"):
            diffs = [c[s][metric] - lt[s][metric] for s in both
                     if c[s][metric] is not None and lt[s][metric] is not None]
            if diffs:
                print(f"{metric} top-1 contrail − lightly, per seed: {stat(diffs, 2)} points")

    print("\n== Baselines (no self-supervised training; same contrail eval commands) ==")
    for name in names:
        if name == "raw-pixels" or name.startswith("random-init"):
            r = run(a.results, name)
            if name == "raw-pixels":
                label = "raw pixels (784 dims, [0, 1])"
            else:
                label = f"random-init encoder (seed {name.rsplit('-s', 1)[-1]})"
            conv = "" if r.get("linear_converged") in (None, True) else " (probe not converged)"
            print(f"  {label:<36} kNN {fmt(r['knn'])}  linear {fmt(r['linear'])}{conv}")
    published()


if __name__ == "__main__":
    main()

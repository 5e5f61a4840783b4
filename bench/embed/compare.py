#!/usr/bin/env python3
"""Compares two embedding folders (contrail's layout: img_emb/img_emb_{i}.npy,
metadata/metadata_{i}.parquet): the same parts, the same metadata row for row (key, caption,
label, and the same Arrow schema), float32 rows of the same shape, and with --atol the rows
themselves within that absolute tolerance. Exits 1 on any difference.

    .venv/bin/python bench/embed/compare.py A B [--atol 1e-4]

Prints PARTS=..., ROWS=..., and with --atol MAX_ABS_DIFF=...
"""

import argparse
import os
import re
import sys

import numpy as np
import pyarrow.parquet as pq


def parts(root, sub, ext):
    pat = re.compile(rf"^{sub}_(\d+)\.{ext}$")
    d = os.path.join(root, sub)
    return sorted(int(m.group(1)) for f in os.listdir(d) if (m := pat.match(f)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--atol", type=float, help="also compare the rows' values")
    a = p.parse_args()

    problems = []
    idx_a = parts(a.a, "img_emb", "npy")
    idx_b = parts(a.b, "img_emb", "npy")
    if idx_a != idx_b:
        sys.exit(f"different parts: {idx_a} vs {idx_b}")
    if parts(a.a, "metadata", "parquet") != idx_a or parts(a.b, "metadata", "parquet") != idx_b:
        sys.exit("a part lacks its metadata")
    rows, worst = 0, 0.0
    for i in idx_a:
        ea = np.load(os.path.join(a.a, "img_emb", f"img_emb_{i}.npy"))
        eb = np.load(os.path.join(a.b, "img_emb", f"img_emb_{i}.npy"))
        ta = pq.read_table(os.path.join(a.a, "metadata", f"metadata_{i}.parquet"))
        tb = pq.read_table(os.path.join(a.b, "metadata", f"metadata_{i}.parquet"))
        if ea.shape != eb.shape or ea.dtype != np.float32 or eb.dtype != np.float32:
            problems.append(f"part {i}: rows {ea.shape} {ea.dtype} vs {eb.shape} {eb.dtype}")
            continue
        if not ta.schema.equals(tb.schema):
            problems.append(f"part {i}: schema {ta.schema} vs {tb.schema}")
        if ta.to_pylist() != tb.to_pylist():
            problems.append(f"part {i}: metadata differs")
        if len(ea) != ta.num_rows:
            problems.append(f"part {i}: {len(ea)} rows but {ta.num_rows} metadata records")
        if a.atol is not None and len(ea):
            worst = max(worst, float(np.abs(ea - eb).max()))
        rows += len(ea)
    print(f"PARTS={len(idx_a)}")
    print(f"ROWS={rows}")
    if a.atol is not None:
        print(f"MAX_ABS_DIFF={worst:.3g}")
        if not worst <= a.atol:
            problems.append(f"rows differ by up to {worst:.3g} > {a.atol}")
    for line in problems:
        print(line, file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()

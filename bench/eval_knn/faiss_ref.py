#!/usr/bin/env python3
"""The reference side of bench/eval_knn: faiss-cpu's exact inner-product search
(IndexFlatIP on L2-normalised rows) for the k nearest train rows of every test row, then the
same weighted vote as lightly's knn_predict (exp(sim / T) per neighbour, summed per class), in
numpy. Prints top-1/top-5 and the seconds of normalise + index + search + vote (loading the
files is not timed, as on the contrail side the read is timed separately)."""

import argparse
import time

import faiss
import numpy as np
import pyarrow.parquet as pq


def load(root):
    x = np.load(f"{root}/img_emb/img_emb_0.npy")
    y = pq.read_table(f"{root}/metadata/metadata_0.parquet").column("label").to_numpy()
    return np.ascontiguousarray(x, dtype=np.float32), y


def main():
    p = argparse.ArgumentParser()
    p.add_argument("banks")
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        faiss.omp_set_num_threads(a.threads)
    train, ty = load(f"{a.banks}/train")
    test, sy = load(f"{a.banks}/test")
    classes = int(ty.max()) + 1
    t0 = time.perf_counter()
    faiss.normalize_L2(train)
    faiss.normalize_L2(test)
    index = faiss.IndexFlatIP(train.shape[1])
    index.add(train)
    sims, idx = index.search(test, a.k)
    weights = np.exp(sims / a.temperature)
    scores = np.zeros((len(test), classes), np.float32)
    np.add.at(scores, (np.arange(len(test))[:, None], ty[idx]), weights)
    ranked = np.argsort(-scores, axis=1)
    seconds = time.perf_counter() - t0
    top1 = float((ranked[:, 0] == sy).mean())
    top5 = float((ranked[:, :5] == sy[:, None]).any(axis=1).mean())
    print(f"faiss {faiss.__version__}: top-1 {100 * top1:.2f}  top-5 {100 * top5:.2f}  in {seconds:.2f} s")
    print(f"SECONDS={seconds}")


if __name__ == "__main__":
    main()

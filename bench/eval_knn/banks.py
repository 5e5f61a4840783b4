#!/usr/bin/env python3
"""Raw-pixel Fashion-MNIST banks (60,000 train × 784, 10,000 test × 784, float32 in [0, 1]) in
clip-retrieval's layout, for bench/eval_knn: OUT/{train,test}/img_emb/img_emb_0.npy and
metadata/metadata_0.parquet with the labels. Raw pixels are also the "raw-pixel kNN" baseline
of the quality benchmarks."""

import gzip
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SRC = "/usr/share/datasets/fashion-mnist"


def idx(name):
    with gzip.open(os.path.join(SRC, name)) as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def main(out):
    for split, stem in [("train", "train"), ("test", "t10k")]:
        x = idx(f"{stem}-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32) / 255.0
        y = idx(f"{stem}-labels-idx1-ubyte.gz").astype(np.int64)
        root = os.path.join(out, split)
        os.makedirs(os.path.join(root, "img_emb"), exist_ok=True)
        os.makedirs(os.path.join(root, "metadata"), exist_ok=True)
        np.save(os.path.join(root, "img_emb", "img_emb_0.npy"), x)
        keys = [f"{split}-{i:06}" for i in range(len(y))]
        pq.write_table(pa.table({"key": keys, "label": y}), os.path.join(root, "metadata", "metadata_0.parquet"))
        print(f"{split}: {x.shape[0]} × {x.shape[1]} in {root}")


if __name__ == "__main__":
    main(sys.argv[1])

"""Reference for bench/data_pipeline: PIL decode + torchvision SimCLR two-view augmentation.

Pinned: torch==2.11.0, torchvision==0.26.0, pillow==13.0.0, numpy==2.4.6 (run.sh installs them).

    python torchvision_ref.py make-images DIR [--count 64]   # writes the shared 320x256 JPEGs
    python torchvision_ref.py bench DIR [--size 224] [--seconds 4] [--rounds 3]

`bench` prints one line per round and IMAGES_PER_S=<best round>; one thread
(torch.set_num_threads(1)), same files and transforms as data/examples/augment_bench.rs.
"""

import argparse
import io
import os
import time

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T


def make_images(out_dir: str, count: int) -> None:
    """Photo-like content: smooth colour fields plus edges and fine noise, JPEG quality 90."""
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    h, w = 256, 320
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(count):
        img = np.zeros((h, w, 3), np.float32)
        for c in range(3):
            for _ in range(4):
                fx, fy, ph = rng.uniform(0.002, 0.05), rng.uniform(0.002, 0.05), rng.uniform(0, 6.3)
                img[..., c] += rng.uniform(20, 60) * np.sin(fx * xx * 6.3 + fy * yy * 6.3 + ph)
        for _ in range(6):  # a few hard-edged rectangles
            x0, y0 = rng.integers(0, w - 20), rng.integers(0, h - 20)
            img[y0 : y0 + rng.integers(10, 120), x0 : x0 + rng.integers(10, 120)] += rng.uniform(-80, 80, 3)
        img += rng.normal(0, 6, img.shape)
        img = np.clip(img + 128, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(out_dir, f"{i:04d}.jpg"), quality=90)


def bench(in_dir: str, size: int, seconds: float, rounds: int) -> None:
    torch.set_num_threads(1)
    files = sorted(f for f in os.listdir(in_dir) if f.endswith(".jpg"))
    blobs = [open(os.path.join(in_dir, f), "rb").read() for f in files]
    view = T.Compose(
        [
            T.RandomResizedCrop(size),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(23, sigma=(0.1, 2.0))], p=0.5),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )

    def one(i: int) -> float:
        img = Image.open(io.BytesIO(blobs[i % len(blobs)])).convert("RGB")
        a, b = view(img), view(img)
        return float(a[0, 0, 0] + b[0, 0, 0])

    for i in range(len(blobs)):
        one(i)  # warm-up
    best = 0.0
    for r in range(rounds):
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            one(n)
            n += 1
        dt = time.perf_counter() - start
        print(f"round {r}: {n} images in {dt:.2f}s = {n / dt:.1f} images/s (decode + 2 views at {size}x{size})")
        best = max(best, n / dt)
    print(f"IMAGES_PER_S={best:.1f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["make-images", "bench"])
    p.add_argument("dir")
    p.add_argument("--count", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    if a.cmd == "make-images":
        make_images(a.dir, a.count)
    else:
        bench(a.dir, a.size, a.seconds, a.rounds)

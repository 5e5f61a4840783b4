#!/usr/bin/env python3
"""The reference side of bench/embed: `contrail embed` done in plain PyTorch. Reads a folder of
WebDataset shards, decodes every image, takes the evaluation view, runs the encoder of
configs/local-fashion-mnist.toml's model (features before the projector) in batches, and writes
an embedding folder in contrail's layout: img_emb/img_emb_{i}.npy and
metadata/metadata_{i}.parquet for shard i (in listing order), so both sides write the same thing.

    .venv/bin/python bench/embed/torch_ref.py --data DIR/train --out OUT \\
        [--checkpoint CK | --random-init] [--batch 256] [--device cpu|cuda] \\
        [--loader-workers N] [--decoder torchvision|pil] [--limit-shards N]

What it does, step for step as contrail (worker/src/embed/shard.rs):
- Shards: every *.tar under --data, recursively, sorted by path (common/src/storage.rs
  list_shards); part i is shard i. Each shard is read whole (tarfile, stream mode, as
  webdataset's tar_file_iterator), members grouped into samples by WebDataset's key rule
  (data/src/tar_stream.rs split_key), `__x__` members skipped, extensions lower-cased, the
  first of duplicate members kept.
- Image: the first of .jpg/.jpeg/.png/.webp; decoded to RGB (grey replicated to three
  channels). A sample without one counts as missing_image, one that does not decode as
  corrupt_image; both are left out, as contrail does.
- Evaluation view (data/src/augment.rs eval_view): the centred square of the shorter side,
  resized to --image-size (bilinear with antialiasing, as contrail's fast_image_resize
  Convolution(Bilinear); skipped when the square already has that size, which is the
  Fashion-MNIST case: 28x28 at image_size 28), /255, normalised with the ImageNet mean/std
  (data.augment.mean/std defaults).
- Forward: per shard, batches of --batch in sample order (contrail chunks each shard's samples
  the same way), model.eval() under torch.inference_mode(), SimCLRResNet.encode (the 128
  pooled features before the projector), float32 rows.
- Writing: np.save of the rows (float32, rows x 128), then the metadata with pyarrow: key (string,
  not null), caption (.txt as UTF-8, null without one), label (.cls as an integer, null without
  one), uncompressed like contrail's parquet ArrowWriter defaults.

The model class is imported from bench/quality/lightly_ref.py (same module names as
contrail's checkpoints, so a contrail model.safetensors loads into it with strict names).
--checkpoint takes a model.safetensors file, a step folder holding one, or a checkpoint base
with LATEST (what `contrail embed --checkpoint` takes); --random-init (the default) keeps
lightly_ref's init, which differs from contrail's seeded init; speed does not depend on it.

Decoding: torchvision.io.decode_image on the raw bytes by default (measured on the
Fashion-MNIST PNGs at about twice PIL's speed: ~16 us vs ~35 us per image); --decoder pil for
PIL.Image.open(...).convert("RGB"). Both give identical pixels for these PNGs.

Parallelism: torch's default intra-op threads (all cores) for the forward in the main process;
--loader-workers N (default 0) moves reading and decoding into N DataLoader processes, whole
shards per worker, while the main process runs the forward (see README.md for what was fastest).

Prints ROWS=..., SHARDS=..., SKIPPED=..., SECONDS=... (from after the imports to the last part
written: building the model, loading the checkpoint, listing, reading, decoding, the view, the
forward and writing; Python's start-up and `import torch` are not included) and
SECONDS_FORWARD=... (the forward passes alone, main process).
"""

import time

T_IMPORT = time.perf_counter()

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# The model is lightly_ref's; don't leave a __pycache__ in bench/quality.
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(HERE, "..", "quality"))
from lightly_ref import MEAN, STD, SimCLRResNet, init_weights  # noqa: E402

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# webdataset's base_plus_ext and meta_prefix rules (data/src/tar_stream.rs).
KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
META_RE = re.compile(r"^__[^/]*__($|/)")


# ---------------------------------------------------------------------------------------------
# Reading and decoding.


def list_shards(root):
    """Every .tar under root, sorted by path (one file: itself)."""
    if root.endswith(".tar"):
        return [root]
    out = []
    for d, _, files in os.walk(root, followlinks=True):
        out.extend(os.path.join(d, f) for f in files if f.endswith(".tar"))
    return sorted(out)


def read_samples(path):
    """The samples of one shard in order: (key, {ext: bytes})."""
    samples = []
    cur_key, cur = None, None
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
        for m in tf:
            if not m.isfile() or META_RE.match(m.name):
                continue
            km = KEY_RE.match(m.name)
            if km is None:
                continue
            key, ext = km.group(1), km.group(2).lower()
            data = tf.extractfile(m).read()
            if key != cur_key:
                if cur is not None:
                    samples.append((cur_key, cur))
                cur_key, cur = key, {}
            cur.setdefault(ext, data)
    if cur is not None:
        samples.append((cur_key, cur))
    return samples


def make_decoder(kind):
    if kind == "pil":
        from PIL import Image

        def decode(data):
            return torch.from_numpy(
                np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            ).permute(2, 0, 1)

        return decode
    from torchvision.io import ImageReadMode, decode_image

    def decode(data):
        # bytearray: a writable buffer (torch.frombuffer warns on bytes), copied once.
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB)

    return decode


def eval_view_u8(img, size):
    """The centred square of the shorter side resized to size, as uint8 CHW."""
    _, h, w = img.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    img = img[:, top: top + side, left: left + side]
    if side != size:
        from torchvision.transforms.v2.functional import resize

        img = resize(img, [size, size], antialias=True)
    return img


def caption_of(members):
    data = members.get("txt")
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def label_of(members):
    data = members.get("cls")
    if data is None:
        return None
    try:
        return int(data.decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError):
        return None


def load_shard(index, path, decode, size):
    """One shard as the forward needs it: (index, uint8 N x 3 x size x size, keys, captions,
    labels, skipped-by-reason)."""
    views, keys, captions, labels = [], [], [], []
    skipped = {}
    for key, members in read_samples(path):
        data = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        if data is None:
            skipped["missing_image"] = skipped.get("missing_image", 0) + 1
            continue
        try:
            img = eval_view_u8(decode(data), size)
        except Exception:  # noqa: BLE001 - any decoder error is a corrupt image
            skipped["corrupt_image"] = skipped.get("corrupt_image", 0) + 1
            continue
        views.append(img)
        keys.append(key)
        captions.append(caption_of(members))
        labels.append(label_of(members))
    pixels = torch.stack(views) if views else torch.empty(0, 3, size, size, dtype=torch.uint8)
    return index, pixels, keys, captions, labels, skipped


class Shards(torch.utils.data.IterableDataset):
    """Whole shards, split over the DataLoader's workers (shard i to worker i mod N)."""

    def __init__(self, paths, decoder, size):
        self.paths, self.decoder, self.size = paths, decoder, size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, n = (0, 1) if info is None else (info.id, info.num_workers)
        decode = make_decoder(self.decoder)
        for i in range(wid, len(self.paths), n):
            yield load_shard(i, self.paths[i], decode, self.size)


# ---------------------------------------------------------------------------------------------
# Checkpoint.


def read_safetensors(path):
    """name -> tensor, with the safetensors package, else a minimal reader of the format (an
    8-byte little-endian header length, a JSON header, the raw little-endian data)."""
    try:
        from safetensors.torch import load_file

        return load_file(path)
    except ImportError:
        pass
    dtypes = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32}
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8: 8 + n])
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        a, b = spec["data_offsets"]
        t = torch.frombuffer(bytearray(blob[8 + n + a: 8 + n + b]), dtype=dtypes[spec["dtype"]])
        out[name] = t.reshape(spec["shape"])
    return out


def checkpoint_file(path):
    """A model.safetensors file, a step folder holding one, or a base folder with LATEST."""
    if os.path.isfile(path):
        return path
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return os.path.join(path, "model.safetensors")
    with open(os.path.join(path, "LATEST")) as f:
        return os.path.join(path, f.read().strip(), "model.safetensors")


def load_checkpoint(model, path):
    tensors = read_safetensors(checkpoint_file(path))
    state = model.state_dict()
    ours = {k for k in state if not k.endswith("num_batches_tracked")}
    missing, extra = sorted(ours - set(tensors)), sorted(set(tensors) - ours)
    if missing or extra:
        sys.exit(f"checkpoint {path} does not fit the model: missing {missing}, unexpected {extra}")
    model.load_state_dict(tensors, strict=False)


# ---------------------------------------------------------------------------------------------
# Writing.

SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("label", pa.int64()),
    ]
)


def write_part(out, index, rows, keys, captions, labels):
    """img_emb first, metadata last (a part whose metadata exists is complete)."""
    np.save(os.path.join(out, "img_emb", f"img_emb_{index}.npy"), rows)
    table = pa.table(
        [pa.array(keys, pa.string()), pa.array(captions, pa.string()),
         pa.array(labels, pa.int64())],
        schema=SCHEMA,
    )
    pq.write_table(table, os.path.join(out, "metadata", f"metadata_{index}.parquet"),
                   compression="none")


# ---------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder of WebDataset shards (one split)")
    p.add_argument("--out", required=True, help="embedding folder to write")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", help="contrail checkpoint (model.safetensors, step or base)")
    g.add_argument("--random-init", action="store_true", help="random weights (the default)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--image-size", type=int, default=28, help="data.image_size")
    p.add_argument("--loader-workers", type=int, default=0,
                   help="DataLoader processes reading and decoding shards (0: main process)")
    p.add_argument("--decoder", choices=["torchvision", "pil"], default="torchvision")
    p.add_argument("--limit-shards", type=int, default=0, help="only the first N shards")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0: torch's default, all cores)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    t0 = time.perf_counter()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    torch.manual_seed(a.seed)
    model = SimCLRResNet()
    init_weights(model, "uniform")
    if a.checkpoint:
        load_checkpoint(model, a.checkpoint)
    model.eval().to(device)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

    paths = list_shards(a.data)
    if a.limit_shards:
        paths = paths[: a.limit_shards]
    if not paths:
        sys.exit(f"no shards at {a.data}")
    os.makedirs(os.path.join(a.out, "img_emb"), exist_ok=True)
    os.makedirs(os.path.join(a.out, "metadata"), exist_ok=True)

    dataset = Shards(paths, a.decoder, a.image_size)
    if a.loader_workers:
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=a.loader_workers, prefetch_factor=2,
            pin_memory=device.type == "cuda",
        )
    else:
        loader = dataset
    rows_total, skipped_total, t_forward = 0, {}, 0.0
    dim = model.out_dim
    with torch.inference_mode():
        for index, pixels, keys, captions, labels, skipped in loader:
            tf = time.perf_counter()
            outs = []
            for s in range(0, len(keys), a.batch):
                x = pixels[s: s + a.batch].to(device, non_blocking=True).float()
                x = (x.div_(255.0) - mean) / std
                outs.append(model.encode(x).float())
            rows = (torch.cat(outs).cpu() if outs else torch.empty(0, dim)).numpy()
            t_forward += time.perf_counter() - tf
            write_part(a.out, index, rows, keys, captions, labels)
            rows_total += len(keys)
            for k, v in skipped.items():
                skipped_total[k] = skipped_total.get(k, 0) + v
            print(f"torch_ref: part {index}, {len(keys)} rows", file=sys.stderr, flush=True)
    t_end = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
          f"{a.loader_workers} loader workers, decoder {a.decoder}, batch {a.batch}, "
          f"{'checkpoint ' + a.checkpoint if a.checkpoint else 'random init'}")
    print(f"ROWS={rows_total}")
    print(f"SHARDS={len(paths)}")
    print(f"SKIPPED={json.dumps(skipped_total, sort_keys=True)}")
    print(f"SECONDS_IMPORTS={t0 - T_IMPORT:.2f}")
    print(f"SECONDS_FORWARD={t_forward:.2f}")
    print(f"SECONDS={t_end - t0:.2f}")


if __name__ == "__main__":
    main()

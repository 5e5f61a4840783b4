#!/usr/bin/env python3
"""The reference side of bench/quality: SimCLR, MoCo v2 or SwAV on Fashion-MNIST in plain
PyTorch with lightly 1.6.0's parts (NTXentLoss; MemoryBankModule, update_momentum and
cosine_schedule; SwaVLoss), built to be the same training as `contrail local --workers 2
--config configs/local-fashion-mnist.toml` with the same objective settings, then the encoder
features of the evaluation view of both splits written as embedding folders that `contrail
eval knn` / `contrail eval linear` read.

Run from the repository root with lightly on the path (run.sh installs it with --no-deps into a
scratch folder, so pip never touches the torch in .venv):

    PYTHONPATH=/tmp/contrail-quality-ref .venv/bin/python bench/quality/lightly_ref.py \
        --objective simclr --steps 600 --batch 256 --seed 0 --out /tmp/emb/lightly-s0

The objectives' own rules (MoCo's key encoder, shuffle BN and queue; SwAV's prototypes and
Sinkhorn) are in the docstrings of the classes SimCLR, MoCo and SwAV below.

What matches contrail (README.md lists the file:line evidence):
- Model: torchvision-style ResNet with the small-image ("cifar") stem, BasicBlocks
  [1, 1, 1, 1], widths 16-32-64-128, BatchNorm, global average pool (128 features), then the
  projector Linear(128, 128, bias=False) -> BatchNorm1d -> ReLU -> Linear(128, 64). Module
  names are contrail's checkpoint names (conv1.weight, layer2.0.downsample.1.running_var,
  projector.3.bias, ...); --check-names compares them and the shapes with a contrail
  checkpoint. Init: convolutions Kaiming-normal (fan-out, ReLU), linears PyTorch's default,
  BatchNorm bias 0 and weight 1 (PyTorch) or U(0, 1) (tch's default, which contrail uses),
  chosen by --bn-weight-init.
- Loss (SimCLR): lightly.loss.NTXentLoss(temperature) over the whole global batch (contrail
  gathers the embeddings of both workers, so every image of the step is a negative for every
  other).
- BatchNorm statistics per worker: contrail's two workers each normalise their own half
  (2 x 128 images = 256 rows each at batch 256), so the reference forwards the batch in
  --bn-splits chunks (default 2) and concatenates the embeddings before the loss. The running
  averages are updated by chunk 0 only, as rank 0's are the ones contrail's checkpoint keeps.
- Optimizer: torch.optim.SGD(all parameters, momentum, weight_decay) (contrail's SGD decays
  every parameter, 1-D ones included); the learning rate per step is contrail's lr_at:
  linear warm-up peak*(s+1)/warmup, then cosine from peak to 0 at --steps.
- Data: every epoch a fresh permutation, batches of --batch, the last batch of an epoch
  partial (contrail trains every sample of an epoch exactly once), until --steps steps.
- Augmentation (per view, torchvision on PIL images, like lightly's SimCLRTransform with
  cj_strength 0.5): RandomResizedCrop(28, scale=(crop_min, 1)), horizontal flip 0.5,
  ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, RandomGrayscale 0.2, GaussianBlur with
  contrail's kernel size (10 % of the side, made odd: 3 at 28) and sigma in [0.1, 2] with
  p 0.5, ToTensor, Normalize(ImageNet mean/std). lightly's own GaussianBlur (PIL radius, no
  kernel size) is not used, since contrail follows torchvision's kernel.
- Evaluation view: the 28x28 image itself (centre square of a square image, resized to its own
  size), /255, grey replicated to three channels, normalised; the model in eval mode.

Threads: --threads (default 2) intra-op threads for the training process, and --loader-workers
(default 2) DataLoader processes doing the augmentation (each one thread). contrail's run has
two worker processes with one libtorch thread and one decode thread each (data.decode_threads
= 1, threads = cores / workers), so both sides keep two compute and two augmentation threads
busy on a 2-core machine.

Prints PARAMS=..., LOSS_FIRST=..., LOSS_LAST=..., SECONDS_TRAIN=... (from before `import
torch` to the end of the last step: imports, reading the IDX files, building the model,
starting the loader and all steps, the span contrail's "local cluster ran for" covers),
SECONDS_LOOP=... (the steps alone) and SECONDS_EMBED=... (both splits).
"""

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import gzip  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torchvision.transforms as T  # noqa: E402
from PIL import Image  # noqa: E402

SRC = "/usr/share/datasets/fashion-mnist"
# data.augment.mean / std defaults (common/src/config/data.rs).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Every BatchNorm of contrail's model is tch's default: momentum 0.1, eps 1e-5.
BN_MOMENTUM = 0.1


def idx(root, name):
    """An IDX file (gzipped) as a uint8 array of its dimensions."""
    with gzip.open(os.path.join(root, name)) as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(root, split):
    stem = "train" if split == "train" else "t10k"
    x = idx(root, f"{stem}-images-idx3-ubyte.gz")
    y = idx(root, f"{stem}-labels-idx1-ubyte.gz").astype(np.int64)
    return x, y


# ---------------------------------------------------------------------------------------------
# Model: contrail's ResNet (worker/src/model/resnet.rs) + projector (projector.rs), with its
# variable names.


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(h + shortcut)


class SimCLRResNet(nn.Module):
    """ResNet trunk with the small-image stem (3x3 stride-1 conv, no max-pool) and the MLP
    projector. Parameters sit at the top level as in contrail's checkpoints (conv1, bn1,
    layer1..layerN, projector)."""

    def __init__(self, layers=(1, 1, 1, 1), width=16, hidden=128, out=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        c_in = width
        self.stages = []
        for i, blocks in enumerate(layers):
            planes = width << i
            stage = []
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(BasicBlock(c_in, planes, stride))
                c_in = planes
            name = f"layer{i + 1}"
            setattr(self, name, nn.Sequential(*stage))
            self.stages.append(name)
        self.out_dim = c_in
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        # Index 2 is the ReLU, as contrail's names say (projector.0, .1, .3).
        self.projector = nn.Sequential(
            nn.Linear(c_in, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out),
        )

    def encode(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        for name in self.stages:
            h = getattr(self, name)(h)
        return torch.flatten(self.avgpool(h), 1)

    def forward(self, x):
        return self.projector(self.encode(x))


def init_weights(model, bn_weight_init):
    """torchvision's ResNet init for the convolutions (Kaiming-normal, fan-out, ReLU), PyTorch's
    default for the linears (U(+-1/sqrt(fan_in)) for weight and bias, as contrail's
    torch_linear), BatchNorm bias 0 and weight 1 ("ones", PyTorch) or U(0, 1) ("uniform", tch's
    BatchNormConfig default that contrail's Norm::new_2d / new_1d use)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            if bn_weight_init == "uniform":
                nn.init.uniform_(m.weight, 0.0, 1.0)
            else:
                nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            m.momentum = BN_MOMENTUM


def comparable_state(model):
    """Names and shapes of what contrail saves: parameters and running statistics (tch keeps
    no num_batches_tracked)."""
    return {
        k: tuple(v.shape)
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }


def check_names(model, extra, path):
    """The reference's tensors (the model's, plus `extra`: the objective's own, such as MoCo's
    key encoder and queue) against a contrail checkpoint's names and shapes."""
    from safetensors.numpy import load_file

    theirs = {k: tuple(v.shape) for k, v in load_file(path).items()}
    ours = {**comparable_state(model), **extra}
    missing = sorted(set(theirs) - set(ours))
    extra = sorted(set(ours) - set(theirs))
    shape = sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])
    def trained(names):
        # Parameters only: not the BatchNorm statistics, MoCo's key encoder nor its queue.
        return sum(
            int(np.prod(s))
            for k, s in names.items()
            if "running_" not in k and not k.startswith("momentum.")
        )

    n_theirs = trained(theirs)
    print(f"contrail checkpoint {path}: {len(theirs)} tensors, {n_theirs} parameters")
    print(f"reference model: {len(ours)} tensors, {trained(ours)} parameters")
    for what, names in [("only in contrail", missing), ("only in the reference", extra)]:
        for k in names:
            print(f"  {what}: {k} {theirs.get(k) or ours.get(k)}")
    for k in shape:
        print(f"  shape differs: {k} contrail {theirs[k]} reference {ours[k]}")
    ok = not (missing or extra or shape)
    print(f"NAMES_MATCH={int(ok)}")
    print(f"CONTRAIL_PARAMS={n_theirs}")
    return ok


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Data.


def blur_kernel_size(size):
    """contrail's rule (data/src/augment.rs blur_kernel_size): 10 % of the side, made odd."""
    k = int(size * 0.1)
    return k + 1 if k % 2 == 0 else k


def view_transform(size, crop_min):
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(crop_min, 1.0)),
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply(
                [T.GaussianBlur(kernel_size=blur_kernel_size(size), sigma=(0.1, 2.0))], p=0.5
            ),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )


class TwoViews(torch.utils.data.Dataset):
    def __init__(self, images, transform):
        self.images = images
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        # Grey replicated to three channels, as contrail's decoder does (decode_rgb).
        img = Image.fromarray(self.images[i]).convert("RGB")
        return self.transform(img), self.transform(img)


class EpochBatches:
    """`steps` batches of `batch` indices: a fresh permutation every epoch, the epoch's last
    batch partial, as contrail's epochs (every sample once per epoch, no tail dropped)."""

    def __init__(self, n, batch, steps, seed):
        self.n, self.batch, self.steps, self.seed = n, batch, steps, seed

    def __len__(self):
        return self.steps

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        done = 0
        while True:
            perm = torch.randperm(self.n, generator=g).tolist()
            for s in range(0, self.n, self.batch):
                if done == self.steps:
                    return
                yield perm[s: s + self.batch]
                done += 1


def lr_at(step, total, peak, warmup):
    """worker/src/optim/schedule.rs lr_at, line for line."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if total == 0:
        return peak
    if step >= total:
        return 0.0
    progress = (step - warmup) / (total - warmup)
    return 0.5 * peak * (1.0 + math.cos(math.pi * progress))


def eval_views(images, mean, std):
    x = torch.from_numpy(np.array(images, np.float32)).div_(255.0)
    x = x.unsqueeze(1).expand(-1, 3, -1, -1)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


@torch.no_grad()
def embed(model, images, batch):
    model.eval()
    out = []
    for s in range(0, len(images), batch):
        out.append(model.encode(eval_views(images[s: s + batch], MEAN, STD)))
    return torch.cat(out).numpy().astype(np.float32)


def write_folder(root, split, feats, labels):
    """clip-retrieval's layout as contrail embed writes it: img_emb/img_emb_0.npy and
    metadata/metadata_0.parquet (key, caption, label)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.join(root, "img_emb"), exist_ok=True)
    os.makedirs(os.path.join(root, "metadata"), exist_ok=True)
    np.save(os.path.join(root, "img_emb", "img_emb_0.npy"), feats)
    keys = [f"{split}-{i:06}" for i in range(len(labels))]
    # contrail's schema (data/src/embeddings/metadata.rs): key not null, caption and label
    # nullable; an IDX import has no captions.
    schema = pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("caption", pa.string()),
            pa.field("label", pa.int64()),
        ]
    )
    table = pa.table(
        [pa.array(keys, pa.string()), pa.array([None] * len(keys), pa.string()),
         pa.array(labels, pa.int64())],
        schema=schema,
    )
    pq.write_table(table, os.path.join(root, "metadata", "metadata_0.parquet"))


# ---------------------------------------------------------------------------------------------
# Objectives. Each takes the step's two views, split in BatchNorm chunks as contrail's workers
# split the batch, and returns the loss of the global batch; `after_step` runs after the
# optimizer's update (MoCo's EMA and queue).


def forward_chunks(model, x1, x2, chunks, bns):
    """Embeddings of both views, each chunk normalised on its own ([view 1; view 2] of its
    samples, as one contrail worker forwards them); only chunk 0 ("rank 0") moves the BatchNorm
    running averages (momentum 0 keeps them)."""
    z1, z2 = [], []
    for i, c in enumerate(chunks):
        for m in bns:
            m.momentum = BN_MOMENTUM if i == 0 else 0.0
        z = model(torch.cat([x1[c], x2[c]]))
        z1.append(z[: len(c)])
        z2.append(z[len(c):])
    for m in bns:
        m.momentum = BN_MOMENTUM
    return torch.cat(z1), torch.cat(z2)


class SimCLR:
    """lightly.loss.NTXentLoss over the whole global batch (contrail gathers both workers'
    embeddings: every image of the step is a negative for every other)."""

    def __init__(self, a, model):
        from lightly.loss import NTXentLoss

        self.criterion = NTXentLoss(temperature=a.temperature)

    def parameters(self):
        return []

    def loss(self, model, x1, x2, chunks, bns, step):
        return self.criterion(*forward_chunks(model, x1, x2, chunks, bns))

    def after_step(self, model, step):
        pass

    def extra_state(self):
        return {}


class MoCo:
    """MoCo v2 in contrail's symmetric form (worker/src/objective/moco.rs): a key encoder that
    is an EMA copy of encoder + projector (lightly's deactivate_requires_grad, update_momentum
    and cosine_schedule from --moco-momentum to 1), keys computed on a shared random
    reassignment of the step's images to the BatchNorm chunks and put back (MoCo's shuffle
    BN), and a queue of --moco-queue keys (lightly's MemoryBankModule) read before the step and
    extended after it with the keys of view 1 of every sample, then view 2. The loss is the
    cross-entropy of each query (both views) against its own key and the queue, at
    --temperature, averaged over the 2B queries."""

    def __init__(self, a, model):
        import copy

        from lightly.models.modules.memory_bank import MemoryBankModule
        from lightly.models.utils import deactivate_requires_grad

        self.key = copy.deepcopy(model)
        deactivate_requires_grad(self.key)
        self.key.train()
        self.memory = MemoryBankModule(size=(a.moco_queue, 64), feature_dim_first=False)
        self.temperature, self.base, self.steps = a.temperature, a.moco_momentum, a.steps
        self.g = torch.Generator().manual_seed(a.seed + 1)
        self.keys_view_major = None

    def parameters(self):
        return []

    @torch.no_grad()
    def keys(self, x1, x2, chunks):
        rows = [torch.cat([x1[c], x2[c]]) for c in chunks]
        images = torch.cat(rows)
        perm = torch.randperm(len(images), generator=self.g)
        parts = perm.split([len(r) for r in rows])
        shuffled = torch.cat(
            [nn.functional.normalize(self.key(images[p]), dim=1) for p in parts]
        )
        keys = torch.empty_like(shuffled)
        keys[perm] = shuffled
        return keys.split([len(r) for r in rows])

    def loss(self, model, x1, x2, chunks, bns, step):
        keys = self.keys(x1, x2, chunks)
        k1 = torch.cat([k[: len(c)] for k, c in zip(keys, chunks)])
        k2 = torch.cat([k[len(c):] for k, c in zip(keys, chunks)])
        self.keys_view_major = torch.cat([k1, k2])
        _, queue = self.memory(k1, update=False)
        z1, z2 = forward_chunks(model, x1, x2, chunks, bns)
        q = nn.functional.normalize(torch.cat([z1, z2]), dim=1)
        positives = torch.cat([k2, k1])
        logits = torch.cat([(q * positives).sum(1, keepdim=True), q @ queue.T], 1)
        logits = logits / self.temperature
        return nn.functional.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))

    def after_step(self, model, step):
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        # contrail's momentum_at(step, total) is 1 - (1 - base)(cos(pi step / total) + 1) / 2;
        # lightly's cosine_schedule divides by max_steps - 1, hence total + 1.
        update_momentum(model, self.key, cosine_schedule(step, self.steps + 1, self.base, 1.0))
        self.memory(self.keys_view_major, update=True)

    def extra_state(self):
        names = {f"momentum.{k}": s for k, s in comparable_state(self.key).items()}
        names["momentum.queue"] = tuple(self.memory.bank.shape)
        names["momentum.queue_next"] = (1,)
        return names


class SwAV:
    """SwAV with two high-resolution views and lightly's SwaVLoss (temperature, Sinkhorn
    epsilon and iterations as contrail's objective.swav), its codes computed over the whole
    global batch as contrail's all-reduced Sinkhorn: the projector's output is normalised and
    scored against --swav-prototypes unit prototype rows (a bias-free linear named
    "prototypes", its rows normalised before every forward as lightly's SwaVPrototypes and
    contrail's model/prototypes.rs do), which get no update for the first
    --swav-freeze-steps steps."""

    def __init__(self, a, model):
        from lightly.loss import SwaVLoss

        self.prototypes = nn.Linear(64, a.swav_prototypes, bias=False)
        self.normalize_prototypes()
        self.criterion = SwaVLoss(
            temperature=a.temperature,
            sinkhorn_iterations=a.swav_iterations,
            sinkhorn_epsilon=a.swav_epsilon,
        )
        self.freeze = a.swav_freeze_steps

    @torch.no_grad()
    def normalize_prototypes(self):
        self.prototypes.weight.copy_(nn.functional.normalize(self.prototypes.weight, dim=1))

    def parameters(self):
        return list(self.prototypes.parameters())

    def loss(self, model, x1, x2, chunks, bns, step):
        self.normalize_prototypes()
        # Frozen: no gradient, so SGD leaves them alone (momentum and weight decay included).
        self.prototypes.weight.requires_grad_(step >= self.freeze)
        z1, z2 = forward_chunks(model, x1, x2, chunks, bns)
        s1, s2 = (self.prototypes(nn.functional.normalize(z, dim=1)) for z in (z1, z2))
        return self.criterion([s1, s2], [])

    def after_step(self, model, step):
        pass

    def extra_state(self):
        return {"prototypes.weight": tuple(self.prototypes.weight.shape)}


OBJECTIVES = {"simclr": SimCLR, "moco": MoCo, "swav": SwAV}


# ---------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=256, help="global batch (images per step)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--loader-workers", type=int, default=2, help="DataLoader processes")
    p.add_argument("--bn-splits", type=int, default=2,
                   help="chunks the batch is normalised in (contrail's worker count)")
    p.add_argument("--bn-weight-init", choices=["ones", "uniform"], default="ones",
                   help="BatchNorm weight init: PyTorch's ones, or tch's U(0,1) as contrail")
    p.add_argument("--lr", type=float, default=0.3)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-6)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--objective", choices=sorted(OBJECTIVES), default="simclr")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--moco-queue", type=int, default=4096, help="objective.moco.queue_size")
    p.add_argument("--moco-momentum", type=float, default=0.99,
                   help="objective.moco.momentum (the key encoder's EMA at step 0)")
    p.add_argument("--swav-prototypes", type=int, default=100,
                   help="objective.swav.prototypes")
    p.add_argument("--swav-epsilon", type=float, default=0.05, help="objective.swav.epsilon")
    p.add_argument("--swav-iterations", type=int, default=3,
                   help="objective.swav.sinkhorn_iterations")
    p.add_argument("--swav-freeze-steps", type=int, default=100,
                   help="objective.swav.freeze_prototypes_steps")
    p.add_argument("--crop-min", type=float, default=0.2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--data", default=SRC, help="folder of the IDX .gz files")
    p.add_argument("--out", help="writes OUT/train and OUT/test embedding folders")
    p.add_argument("--embed-batch", type=int, default=256)
    p.add_argument("--embed-limit", type=int, default=0,
                   help="embed only the first N images of each split (smoke tests)")
    p.add_argument("--check-names", metavar="MODEL_SAFETENSORS",
                   help="only compare names and shapes with a contrail checkpoint and exit")
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model = SimCLRResNet()
    init_weights(model, a.bn_weight_init)
    print(f"PARAMS={n_params(model)}")
    objective = OBJECTIVES[a.objective](a, model)
    if a.check_names:
        sys.exit(0 if check_names(model, objective.extra_state(), a.check_names) else 1)
    if a.batch < a.bn_splits:
        p.error("--batch must be at least --bn-splits")

    import lightly

    train_x, train_y = load_split(a.data, "train")
    # contrail's SGD decays every trainable parameter, SwAV's prototypes included.
    opt = torch.optim.SGD(
        list(model.parameters()) + list(objective.parameters()),
        lr=a.lr,
        momentum=a.momentum,
        weight_decay=a.weight_decay,
    )
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    loader = torch.utils.data.DataLoader(
        TwoViews(train_x, view_transform(28, a.crop_min)),
        batch_sampler=EpochBatches(len(train_x), a.batch, a.steps, a.seed),
        num_workers=a.loader_workers,
        generator=torch.Generator().manual_seed(a.seed),
    )
    print(
        f"lightly {lightly.__version__}, torch {torch.__version__}, {a.objective}: "
        f"{a.steps} steps of "
        f"{a.batch} ({a.bn_splits} BatchNorm chunks), {a.threads} threads, "
        f"{a.loader_workers} loader workers, seed {a.seed}",
        flush=True,
    )

    model.train()
    t_loop = time.perf_counter()
    t_log, seen = t_loop, 0
    loss_first = loss_last = None
    for step, (x1, x2) in enumerate(loader):
        lr = lr_at(step, a.steps, a.lr, a.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        chunks = [c for c in torch.arange(len(x1)).tensor_split(a.bn_splits) if len(c)]
        loss = objective.loss(model, x1, x2, chunks, bns, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        objective.after_step(model, step)
        value = loss.item()
        if not math.isfinite(value):
            sys.exit(f"loss became {value} at step {step + 1}")
        loss_first = value if loss_first is None else loss_first
        loss_last = value
        seen += len(x1)
        if (step + 1) % a.log_every == 0:
            now = time.perf_counter()
            print(
                f"step {step + 1:>6}  loss {value:.4f}  lr {lr:.4f}  "
                f"{seen / (now - t_log):.1f} samples/s",
                flush=True,
            )
            t_log, seen = now, 0
    t_end = time.perf_counter()
    print(f"LOSS_FIRST={loss_first:.4f}")
    print(f"LOSS_LAST={loss_last:.4f}")
    print(f"SECONDS_LOOP={t_end - t_loop:.2f}")
    print(f"SECONDS_TRAIN={t_end - T_START:.2f}", flush=True)

    if a.out:
        t0 = time.perf_counter()
        for split in ["train", "test"]:
            x, y = (train_x, train_y) if split == "train" else load_split(a.data, "test")
            if a.embed_limit:
                x, y = x[: a.embed_limit], y[: a.embed_limit]
            feats = embed(model, x, a.embed_batch)
            write_folder(os.path.join(a.out, split), split, feats, y)
            print(f"{split}: {feats.shape[0]} x {feats.shape[1]} in {os.path.join(a.out, split)}")
        print(f"SECONDS_EMBED={time.perf_counter() - t0:.2f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""PyTorch reference for bench/gpu_node: SimCLR ResNet-50 trained end to end from the same
WebDataset tar shards that contrail reads, the way a PyTorch user would write it.

- Data: a `torch.utils.data.DataLoader` over an `IterableDataset` that streams the `.tar`
  shards (split over the loader's worker processes, as webdataset's `split_by_worker`), groups
  each sample's members by key, decodes the `.jpg` (PIL) and makes two SimCLR views at
  `--image-size` with ImageNet's SimCLR augmentation, as configs/gpu-simclr-resnet50.toml asks:
  RandomResizedCrop(scale 0.08-1), flip 0.5, ColorJitter(0.8, 0.8, 0.8, 0.2) with p 0.8,
  grayscale 0.2, GaussianBlur(kernel ~10% of the side, sigma 0.1-2) with p 0.5, Normalize.
  With torchvision: its v1 transforms on PIL images (the usual SimCLR pipeline). Without it
  (`import torchvision` fails): the same transforms written with plain torch ops on tensors,
  following torchvision's tensor code (crop + antialiased bilinear resize, the colour ops in
  random order, HSV hue shift, a 2-D Gaussian kernel with reflect padding).
- Model and step: ResNet-50 (bench/train_step/torch_ref.py's, torchvision's architecture)
  + projector Linear(2048, 2048, bias=False) -> BatchNorm1d -> ReLU -> Linear(2048, 128),
  channels_last, bf16 autocast (CUDA), NT-Xent at temperature 0.1, LARS (lightly's rule: trust
  ratio and weight decay on the >= 2-D parameters, plain momentum SGD on the 1-D ones) written
  with torch._foreach ops, wrapped in DistributedDataParallel at world size 1 (NCCL on CUDA,
  gloo on the CPU).

Prints three rates, each as one KEY=value line:
  E2E_SAMPLES_PER_S     loader + host-to-device copy + step (the number run.sh compares)
  LOADER_SAMPLES_PER_S  the DataLoader alone (decode + augment on --workers processes)
  STEP_SAMPLES_PER_S    the step alone on synthetic inputs already on the device
    python3 bench/gpu_node/torch_ref.py --shards DIR [--batch 256] [--image-size 224]
        [--workers N] [--steps 60] [--warmup 20] [--device cuda|cpu] [--max-seconds 60]
Pinned: torch 2.11.0 (torchvision 0.26.0 and pillow when present).
"""

import argparse
import importlib.util
import io
import math
import os
import random
import socket
import tarfile
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
JITTER = (0.8, 0.8, 0.8, 0.2)

try:
    import torchvision  # noqa: F401
    from torchvision import transforms as T

    HAVE_TORCHVISION = True
except ImportError:
    HAVE_TORCHVISION = False
# torchvision's transforms when it is installed (`--augment auto`); `--augment torch` forces the
# plain torch ops. Set in main() before the DataLoader forks its workers.
USE_TORCHVISION = HAVE_TORCHVISION


def load_train_step_ref():
    """bench/train_step/torch_ref.py's ResNet-50 and NT-Xent, under another module name."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "train_step", "torch_ref.py")
    spec = importlib.util.spec_from_file_location("train_step_torch_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def blur_kernel_size(size):
    """contrail's `data::augment::blur_kernel_size`: ~10% of the side, made odd (23 at 224)."""
    k = int(size * 0.1)
    return k + 1 if k % 2 == 0 else k


# ---- JPEG decoding -------------------------------------------------------------------------


def decode_rgb(data):
    """JPEG bytes -> PIL image (torchvision path) or uint8 CHW tensor (plain torch path)."""
    try:
        from PIL import Image
    except ImportError:
        raise SystemExit("torch_ref.py needs pillow to decode JPEGs (torchvision needs it too)")
    img = Image.open(io.BytesIO(data)).convert("RGB")
    if USE_TORCHVISION:
        return img
    hwc = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)
    return hwc.permute(2, 0, 1)


# ---- SimCLR view with plain torch ops (no torchvision) --------------------------------------


def crop_params(height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision RandomResizedCrop.get_params."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return random.randint(0, height - h), random.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def grayscale(img):
    r, g, b = img.unbind(0)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(0)  # torchvision's float weights


def blend(a, b, ratio):
    return (ratio * a + (1.0 - ratio) * b).clamp(0.0, 1.0)


def rgb_to_hsv(img):
    r, g, b = img.unbind(0)
    maxc = img.max(dim=0).values
    minc = img.min(dim=0).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc))


def hsv_to_rgb(img):
    h, s, v = img.unbind(0)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int32) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    mask = (i.unsqueeze(0) == torch.arange(6, dtype=torch.int32).view(-1, 1, 1)).to(img.dtype)
    a = torch.stack((torch.stack((v, q, p, p, t, v)), torch.stack((t, v, v, q, p, p)), torch.stack((p, p, t, v, v, q))))
    return torch.einsum("ijk,xijk->xjk", mask, a)


def gaussian_blur(img, ksize, sigma):
    half = (ksize - 1) * 0.5
    x = torch.linspace(-half, half, ksize)
    k1 = torch.exp(-0.5 * (x / sigma) ** 2)
    k1 = k1 / k1.sum()
    k2 = torch.outer(k1, k1).expand(3, 1, ksize, ksize)
    pad = ksize // 2
    out = F.pad(img.unsqueeze(0), [pad, pad, pad, pad], mode="reflect")
    return F.conv2d(out, k2, groups=3).squeeze(0)


def torch_view(img_u8, size, mean, std):
    """One SimCLR view of a uint8 CHW tensor, torchvision's tensor semantics, plain torch ops."""
    _, height, width = img_u8.shape
    top, left, h, w = crop_params(height, width)
    x = img_u8[:, top : top + h, left : left + w].float().div_(255.0)
    x = F.interpolate(x.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    x = x.squeeze(0).clamp_(0.0, 1.0)
    if random.random() < 0.5:
        x = x.flip(-1)
    if random.random() < 0.8:
        b, c, s, hue = JITTER
        for fn in torch.randperm(4).tolist():
            if fn == 0:
                x = blend(x, torch.zeros_like(x), random.uniform(max(0.0, 1 - b), 1 + b))
            elif fn == 1:
                x = blend(x, grayscale(x).mean(), random.uniform(max(0.0, 1 - c), 1 + c))
            elif fn == 2:
                x = blend(x, grayscale(x), random.uniform(max(0.0, 1 - s), 1 + s))
            else:
                hsv = rgb_to_hsv(x)
                hsv[0] = torch.fmod(hsv[0] + random.uniform(-hue, hue) + 1.0, 1.0)
                x = hsv_to_rgb(hsv)
    if random.random() < 0.2:
        x = grayscale(x).expand(3, -1, -1)
    if random.random() < 0.5:
        x = gaussian_blur(x, blur_kernel_size(size), random.uniform(0.1, 2.0))
    return (x - mean) / std


# ---- the dataset ---------------------------------------------------------------------------


def tar_samples(path):
    """WebDataset samples of one tar: (key, {extension: bytes}) in file order; the key is the
    member name up to the first dot of its file name, as contrail's tar reader splits it."""
    current, members = None, {}
    with tarfile.open(path, mode="r|") as tar:
        for m in tar:
            if not m.isfile():
                continue
            folder, base = os.path.split(m.name)
            dot = base.find(".")
            if dot <= 0:
                continue
            key = m.name[: len(m.name) - len(base) + dot]
            if key != current and members:
                yield current, members
                members = {}
            current = key
            members[base[dot + 1 :]] = tar.extractfile(m).read()
    if members:
        yield current, members


class SimclrShards(IterableDataset):
    """Every `.tar` under `root`, split over the DataLoader's workers, read round and round."""

    def __init__(self, root, size):
        self.shards = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".tar"))
        if not self.shards:
            raise SystemExit(f"no .tar shards in {root}")
        self.size = size

    def __iter__(self):
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info else (0, 1)
        torch.set_num_threads(1)
        mine = self.shards[wid::workers] or self.shards
        if USE_TORCHVISION:
            view = T.Compose(
                [
                    T.RandomResizedCrop(self.size, scale=(0.08, 1.0)),
                    T.RandomHorizontalFlip(),
                    T.RandomApply([T.ColorJitter(*JITTER)], p=0.8),
                    T.RandomGrayscale(p=0.2),
                    T.RandomApply([T.GaussianBlur(blur_kernel_size(self.size), sigma=(0.1, 2.0))], p=0.5),
                    T.ToTensor(),
                    T.Normalize(MEAN, STD),
                ]
            )
        else:
            mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)

            def view(img):
                return torch_view(img, self.size, mean, std)

        while True:
            for shard in mine:
                for _, members in tar_samples(shard):
                    data = members.get("jpg") or members.get("jpeg") or members.get("png")
                    if data is None:
                        continue
                    img = decode_rgb(data)
                    yield view(img), view(img)


# ---- model, loss, optimizer ----------------------------------------------------------------


class ForeachLars:
    """LARS as lightly 1.6 (`optim.kind = "lars"`, exclude_1d_from_decay and
    exclude_1d_from_adaptation on): parameters with >= 2 dims get weight decay and the trust
    ratio eta * |w| / (|g| + wd * |w| + eps); 1-D ones plain momentum SGD. Vectorised with
    torch._foreach ops (as PyTorch's foreach optimizers), not a per-parameter loop."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=1e-6, eta=0.001, eps=1e-8):
        params = [p for p in params if p.requires_grad]
        self.adapt = [p for p in params if p.ndim > 1]
        self.plain = [p for p in params if p.ndim <= 1]
        self.lr, self.momentum, self.wd, self.eta, self.eps = lr, momentum, weight_decay, eta, eps
        self.buf_adapt = [torch.zeros_like(p) for p in self.adapt]
        self.buf_plain = [torch.zeros_like(p) for p in self.plain]

    def zero_grad(self):
        for p in self.adapt + self.plain:
            p.grad = None

    @torch.no_grad()
    def step(self, lr):
        grads = [p.grad for p in self.adapt]
        pn = torch.stack(torch._foreach_norm(self.adapt))
        gn = torch.stack(torch._foreach_norm(grads))
        ratio = torch.where((pn > 0) & (gn > 0), self.eta * pn / (gn + self.wd * pn + self.eps), torch.ones_like(pn))
        d = torch._foreach_add(grads, self.adapt, alpha=self.wd)
        torch._foreach_mul_(d, list(ratio.unbind(0)))
        for bufs, steps, params in (
            (self.buf_adapt, d, self.adapt),
            (self.buf_plain, [p.grad for p in self.plain], self.plain),
        ):
            torch._foreach_mul_(bufs, self.momentum)
            torch._foreach_add_(bufs, steps)
            torch._foreach_add_(params, bufs, alpha=-lr)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shards", required=True, help="folder holding the .tar shards")
    p.add_argument("--batch", type=int, default=256, help="images per step (two views each)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="DataLoader worker processes")
    p.add_argument("--steps", type=int, default=60, help="measured steps")
    p.add_argument("--warmup", type=int, default=20, help="steps before the clock starts")
    p.add_argument("--max-seconds", type=float, default=90.0, help="stop a measurement after this long")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--lr", type=float, default=0.3, help="LARS learning rate (0.3 x batch / 256 at the peak)")
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument(
        "--augment",
        default="auto",
        choices=["auto", "torchvision", "torch"],
        help="auto: torchvision's transforms when installed, else plain torch ops",
    )
    a = p.parse_args()
    global USE_TORCHVISION
    if a.augment == "torchvision" and not HAVE_TORCHVISION:
        raise SystemExit("--augment torchvision but torchvision is not installed")
    USE_TORCHVISION = HAVE_TORCHVISION and a.augment != "torch"
    assert torch.__version__.split("+")[0] == "2.11.0", torch.__version__
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU")
    device = torch.device("cuda:0" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        # What contrail's train.tf32 / train.cudnn_benchmark (both on in the job file) set.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    random.seed(0)
    ref = load_train_step_ref()
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", world_size=1, rank=0)
    print(
        f"pytorch {torch.__version__}, augmentation: "
        f"{'torchvision ' + torchvision.__version__ + ' on PIL images' if USE_TORCHVISION else 'plain torch ops on tensors'}"
        f"{'' if HAVE_TORCHVISION else ' (torchvision absent)'}, "
        f"DDP world 1 over {backend}, {a.workers} loader workers, batch {a.batch} at {a.image_size}px on {device}",
        flush=True,
    )

    model = nn.Sequential(
        ref.ResNet50(),
        nn.Linear(2048, 2048, bias=False),
        nn.BatchNorm1d(2048),
        nn.ReLU(),
        nn.Linear(2048, 128),
    ).to(device)
    model = model.to(memory_format=torch.channels_last)
    ddp = DDP(model, device_ids=[0] if cuda else None)
    lr = a.lr * a.batch / 256
    opt = ForeachLars(model.parameters(), lr=lr)
    warmup_lr = 5

    def train(v1, v2, step):
        x = torch.cat([v1, v2]).contiguous(memory_format=torch.channels_last)
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            z = ddp(x)
        loss = ref.nt_xent(z.float(), v1.shape[0], a.temperature)
        loss.backward()
        opt.step(lr * min(1.0, (step + 1) / warmup_lr))
        return loss.item()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def measure(name, batches, step_fn, warmup):
        """Runs `warmup` + --steps steps (or until --max-seconds); returns samples/s."""
        for i in range(warmup):
            step_fn(next(batches), i)
        sync()
        start, done, loss = time.perf_counter(), 0, None
        while done < a.steps and time.perf_counter() - start < a.max_seconds:
            loss = step_fn(next(batches), warmup + done)
            done += 1
        sync()
        secs = time.perf_counter() - start
        rate = a.batch * done / secs
        tail = "" if loss is None else f" (last loss {loss:.4f})"
        print(f"{name}: {done} batches of {a.batch} in {secs:.2f}s = {rate:.1f} samples/s{tail}", flush=True)
        return rate

    loader = DataLoader(
        SimclrShards(a.shards, a.image_size),
        batch_size=a.batch,
        num_workers=a.workers,
        pin_memory=cuda,
        persistent_workers=a.workers > 0,
        drop_last=True,
    )

    def to_device(batch):
        v1, v2 = batch
        return v1.to(device, non_blocking=True), v2.to(device, non_blocking=True)

    it = iter(loader)
    e2e = measure("end to end (DataLoader + copy + step)", (to_device(b) for b in it), lambda b, i: train(*b, i), a.warmup)
    # The same loader, already warm: only its own pace (decode + augment + collate).
    loader_only = measure("DataLoader alone", it, lambda b, i: None, 2)
    del it, loader
    shape = (a.batch, 3, a.image_size, a.image_size)
    fixed = (torch.randn(shape, device=device), torch.randn(shape, device=device))

    def repeat():
        while True:
            yield fixed

    step_only = measure("step alone (synthetic inputs on the device)", repeat(), lambda b, i: train(*b, i), 5)
    dist.destroy_process_group()
    print(f"E2E_SAMPLES_PER_S={e2e}")
    print(f"LOADER_SAMPLES_PER_S={loader_only}")
    print(f"STEP_SAMPLES_PER_S={step_only}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""PyTorch eager reference for bench/train_step: the same step as contrail's train_step_bench,
on synthetic inputs already on the GPU, with bf16 autocast (`--precision fp16`: fp16 autocast
with a GradScaler; `fp32`: none).

- `--objective simclr` (default): torchvision-style ResNet-50 without fc, projector
  Linear(2048, 2048, bias=False) -> BatchNorm1d -> ReLU -> Linear(2048, 128), NT-Xent over both
  views, SGD with momentum, channels_last.
- `--objective clip --model vit-b-16|vit-b-32`: open_clip's ViT-B and 12-layer text transformer
  written out (pre-norm blocks with nn.MultiheadAttention, batch first, as open_clip 3.3),
  77-token captions, open_clip's ClipLoss, AdamW.

torchvision is not required (the device machines only have torch): the ResNet-50 below is
torchvision's architecture written out (Bottleneck v1.5, same layer shapes).

Also measures the bf16 matmul peak (8192^3) for MFU. Prints SAMPLES_PER_S=, PEAK_TFLOPS=.
Pinned: torch 2.11.0.
"""

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride != 1 or c_in != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
            )

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        s = x if self.downsample is None else self.downsample(x)
        return F.relu(h + s)


class ResNet50(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, c_in = [], 64
        for i, blocks in enumerate([3, 4, 6, 3]):
            planes = 64 << i
            stage = []
            for j in range(blocks):
                stage.append(Bottleneck(c_in, planes, 2 if i > 0 and j == 0 else 1))
                c_in = planes * 4
            layers.append(nn.Sequential(*stage))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return torch.flatten(F.adaptive_avg_pool2d(self.layers(x), 1), 1)


class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x, mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Vit(nn.Module):
    def __init__(self, image_size, patch, width=768, layers=12, heads=12, out=512):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        n = (image_size // patch) ** 2 + 1
        self.class_embedding = nn.Parameter(torch.randn(width) * width**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn(n, width) * width**-0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, out) * width**-0.5)

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype)
        x = self.ln_pre(torch.cat([cls, x], 1) + self.positional_embedding.to(x.dtype))
        for b in self.blocks:
            x = b(x)
        return self.ln_post(x[:, 0]) @ self.proj


class Text(nn.Module):
    def __init__(self, vocab=259, ctx=77, width=512, layers=12, heads=8, out=512):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(ctx, width) * 0.01)
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, out) * width**-0.5)
        self.register_buffer("mask", torch.full((ctx, ctx), float("-inf")).triu(1), persistent=False)

    def forward(self, t):
        x = self.token_embedding(t) + self.positional_embedding
        for b in self.blocks:
            x = b(x, self.mask)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), t.argmax(-1)] @ self.text_projection


def clip_loss(img, txt, logit_scale):
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    s = logit_scale.exp()
    labels = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(s * img @ txt.t(), labels) + F.cross_entropy(s * txt @ img.t(), labels)) / 2


def clip_main(a, device):
    patch = 16 if a.model == "vit-b-16" else 32
    vit, text = Vit(a.image_size, patch).to(device), Text().to(device)
    logit_scale = nn.Parameter(torch.tensor(2.6592, device=device))
    params = list(vit.parameters()) + list(text.parameters()) + [logit_scale]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
    images = torch.randn(a.batch, 3, a.image_size, a.image_size, device=device)
    tokens = torch.randint(1, 257, (a.batch, 77), device=device)
    dtype, scaler = autocast_and_scaler(a.precision)

    def step():
        opt.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            img, txt = vit(images), text(tokens)
        loss = clip_loss(img.float(), txt.float(), logit_scale)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        with torch.no_grad():
            logit_scale.clamp_(0, 4.6052)
        return loss.item()

    return step


def autocast_and_scaler(precision):
    """The autocast dtype (None: fp32) and a GradScaler, enabled for fp16 only (disabled it
    passes the loss and the step through), as contrail's train.precision does."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return dtype, torch.amp.GradScaler("cuda", enabled=precision == "fp16")


def nt_xent(z, b, tau):
    z = F.normalize(z, dim=1)
    logits = z @ z.t() / tau
    logits.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(logits, target)


def matmul_peak(device):
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    n = 20
    t = time.perf_counter()
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * n / (time.perf_counter() - t) / 1e12


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--channels-last", default="1")
    p.add_argument("--objective", default="simclr")
    p.add_argument("--model", default="resnet50")
    a, _ = p.parse_known_args()
    assert torch.__version__.split("+")[0] == "2.11.0", torch.__version__
    device = torch.device("cuda")
    torch.manual_seed(0)
    if a.objective == "clip":
        step = clip_main(a, device)
        return measure(a, step, f"clip {a.model}", device)
    model = nn.Sequential(
        ResNet50(),
        nn.Linear(2048, 2048, bias=False),
        nn.BatchNorm1d(2048),
        nn.ReLU(),
        nn.Linear(2048, 128),
    ).to(device)
    channels_last = a.channels_last in ("1", "true")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-6)
    shape = (a.batch, 3, a.image_size, a.image_size)
    v1, v2 = torch.randn(shape, device=device), torch.randn(shape, device=device)
    dtype, scaler = autocast_and_scaler(a.precision)

    def step():
        x = torch.cat([v1, v2])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            z = model(x)
        loss = nt_xent(z.float(), a.batch, 0.2)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.item()

    return measure(a, step, f"simclr resnet50 channels_last={channels_last}", device)


def measure(a, step, what, device):
    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    torch.cuda.synchronize()
    secs = time.perf_counter() - t
    sps = a.batch * a.steps / secs
    peak = matmul_peak(device)
    mem = torch.cuda.max_memory_allocated() / 2**30
    print(
        f"pytorch eager {what} batch {a.batch} at {a.image_size}px {a.precision}: "
        f"{sps:.1f} samples/s ({1000 * secs / a.steps:.1f} ms/step, "
        f"loss {loss:.4f}, peak memory {mem:.1f} GiB); bf16 matmul peak {peak:.0f} TFLOP/s"
    )
    print(f"SAMPLES_PER_S={sps}")
    print(f"PEAK_TFLOPS={peak}")


if __name__ == "__main__":
    main()

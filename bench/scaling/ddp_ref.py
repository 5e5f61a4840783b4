#!/usr/bin/env python3
"""PyTorch DDP reference for bench/scaling: the step of contrail's scaling_bench, run by
torch.distributed over gloo on loopback, in the same invocation and on the same link.

Per rank: torchvision's resnet18 (or resnet50) without fc, projector Linear(F, 2048,
bias=False) -> BatchNorm1d -> ReLU -> Linear(2048, 128) (contrail's shapes), SimCLR's NT-Xent
with negatives from every rank (embeddings all-gathered with autograd,
torch.distributed.nn.functional.all_gather, as lightly's and OpenCLIP's gather-with-grad),
SGD with momentum, DistributedDataParallel with bucket_cap_mb as given and
broadcast_buffers=False (contrail does not synchronise BatchNorm buffers either). Synthetic
images, a fixed batch per rank.

Prints a human line and STEP_MS= (median), SAMPLES_PER_S_PER_RANK=. Pinned: torch 2.11.0,
torchvision 0.26.0 (requirements-test.txt).
"""

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import torchvision


def nt_xent_global(z_local, rank, world, b, tau=0.2):
    """This rank's anchors (both views) against the whole global batch, scaled so that the
    mean over ranks DDP applies gives the global-batch loss's gradient."""
    z_local = F.normalize(z_local, dim=1)
    z_all = torch.cat(dist_fn.all_gather(z_local), 0)  # world blocks of [2b, d]
    n = z_all.shape[0]
    logits = z_local @ z_all.t() / tau
    own = torch.arange(2 * b) + rank * 2 * b
    logits[torch.arange(2 * b), own] = float("-inf")
    partner = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]) + rank * 2 * b
    # Sum over local anchors / global anchor count, times world (DDP averages gradients).
    return F.cross_entropy(logits, partner, reduction="sum") / n * world


def run(rank, a, port, out):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    threads = a.threads if a.threads > 0 else max(1, (os.cpu_count() or 1) // a.world)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=a.world)
    torch.manual_seed(0)
    trunk = getattr(torchvision.models, a.model)(weights=None)
    feat = trunk.fc.in_features
    trunk.fc = nn.Identity()
    model = nn.Sequential(
        trunk,
        nn.Linear(feat, 2048, bias=False),
        nn.BatchNorm1d(2048),
        nn.ReLU(),
        nn.Linear(2048, 128),
    )
    ddp = nn.parallel.DistributedDataParallel(
        model, bucket_cap_mb=a.bucket_mb, broadcast_buffers=False
    )
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-6)
    torch.manual_seed(1 + rank)
    shape = (a.batch, 3, a.image_size, a.image_size)
    v1, v2 = torch.randn(shape), torch.randn(shape)
    times, loss = [], None
    for step in range(a.warmup + a.steps):
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        z = ddp(torch.cat([v1, v2]))
        loss = nt_xent_global(z, rank, a.world, a.batch)
        loss.backward()
        opt.step()
        loss = loss.item()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        med = statistics.median(times)
        params = sum(p.numel() for p in model.parameters())
        out.put(
            f"pytorch ddp gloo: SimCLR {a.model} ({params / 1e6:.1f} M parameters), world "
            f"{a.world}, batch {a.batch} per rank at {a.image_size} px, {a.bucket_mb} MiB "
            f"buckets, {threads} threads per rank: median step {med * 1e3:.1f} ms (min "
            f"{min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}) over {len(times)} steps, "
            f"{a.batch / med:.1f} samples/s per rank\n"
            f"STEP_MS={med * 1e3:.3f}\nSAMPLES_PER_S_PER_RANK={a.batch / med:.3f}"
        )
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bucket-mb", type=float, default=25.0)
    p.add_argument("--threads", type=int, default=0)
    a, _ = p.parse_known_args()
    assert torch.__version__.split("+")[0] == "2.11.0", torch.__version__
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=run, args=(r, a, port, out)) for r in range(a.world)]
    for pr in procs:
        pr.start()
    result = out.get(timeout=3600)
    for pr in procs:
        pr.join()
        if pr.exitcode != 0:
            raise SystemExit(f"a DDP rank exited with {pr.exitcode}")
    print(result)


if __name__ == "__main__":
    main()

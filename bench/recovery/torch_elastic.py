"""The reference side of bench/recovery: plain PyTorch DDP (gloo, CPU) under torchrun's elastic
agent, the way a PyTorch user recovers from a dead worker: `--max-restarts` restarts every
worker, which reload the last checkpoint. Rank 0 logs `STEP <n> <unix time>` after every
optimizer step and `RESUMED <step>` after loading a checkpoint; every rank writes its pid to
`<out>/pid-<rank>` so the driver can kill one.

    torchrun --nproc-per-node 3 --max-restarts 3 --rdzv-backend c10d \
        --rdzv-endpoint 127.0.0.1:29400 bench/recovery/torch_elastic.py --out DIR

The model is a small conv net on synthetic 16x16 images (the same shape of work as the
contrail side's tiny ResNet); the data order is deterministic per (step, rank).
"""
import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--checkpoint-every", type=int, default=50)
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    with open(os.path.join(a.out, f"pid-{rank}"), "w") as f:
        f.write(str(os.getpid()))
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 16),
    )
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    ck = os.path.join(a.out, "checkpoint.pt")
    step = 0
    if os.path.exists(ck):
        state = torch.load(ck)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        if rank == 0:
            print(f"RESUMED {step} {time.time():.3f}", flush=True)
    log = open(os.path.join(a.out, "steps.log"), "a") if rank == 0 else None
    while step < a.steps:
        g = torch.Generator().manual_seed(step * 1000 + rank)
        x = torch.rand(a.batch, 3, 16, 16, generator=g)
        z = nn.functional.normalize(ddp(x), dim=1)
        loss = -(z @ z.t()).logsumexp(1).mean()  # a contrastive-shaped loss; the work is what counts
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if log:
            log.write(f"STEP {step} {time.time():.3f}\n")
            log.flush()
        if step % a.checkpoint_every == 0 and rank == 0:
            tmp = ck + ".tmp"
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, tmp)
            os.replace(tmp, ck)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Reference: torch.distributed all-reduce with the gloo backend, 2 processes on loopback.

Same workload as worker/examples/allreduce_bench.rs: a Float tensor of --mib MiB, --warmup untimed
and --iters timed all-reduces; prints busbw = 2 (n-1)/n * bytes / time and a BUSBW_GBPS= line.
Pinned: torch==2.11.0 (the version tch 0.24 links against, already in .venv).
"""

import argparse
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PINNED_TORCH = "2.11.0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(rank: int, args, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world
    )
    numel = (args.mib << 20) // 4
    t = torch.full((numel,), float(rank + 1))
    dist.all_reduce(t)
    want = args.world * (args.world + 1) / 2
    assert t.min().item() == want and t.max().item() == want, "gloo all-reduce is wrong"
    t = torch.zeros(numel)
    for _ in range(args.warmup):
        dist.all_reduce(t)
    dist.barrier()
    times = []
    start = time.perf_counter()
    for _ in range(args.iters):
        t0 = time.perf_counter()
        dist.all_reduce(t)
        times.append(time.perf_counter() - t0)
    mean = (time.perf_counter() - start) / args.iters
    times.sort()
    median = times[len(times) // 2]
    if rank == 0:
        n = args.world
        nbytes = numel * 4
        busbw = lambda s: 2 * (n - 1) / n * nbytes / s / 1e9  # noqa: E731
        print(
            f"torch {torch.__version__} gloo all-reduce: world {n}, {args.mib} MiB Float, "
            f"{args.warmup} warmup + {args.iters} iters"
        )
        print(
            f"  mean {mean * 1e3:.2f} ms  median {median * 1e3:.2f} ms  "
            f"algbw {nbytes / mean / 1e9:.3f} GB/s  busbw {busbw(mean):.3f} GB/s "
            f"(median {busbw(median):.3f})"
        )
        print(f"BUSBW_GBPS={busbw(mean):.4f}")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    if not torch.__version__.startswith(PINNED_TORCH):
        raise SystemExit(f"expected torch {PINNED_TORCH}, found {torch.__version__}")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(run, args=(args, free_port()), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()

"""Reference: one MoE layer forward's token exchange with torch.distributed gloo, on loopback.

Replays the exchange that worker/examples/moe_dispatch_bench.rs measured, with the same split
sizes: each rank reads DIR/rank<r>.json (written by the example's --splits-dir) and, per
iteration, does what a PyTorch MoE layer with uneven splits does (fairseq / DeepSpeed style):
  1. all_to_all_single of the per-expert counts (the header: one Int64 per expert a
     destination holds),
  2. the receive splits are the per-source sums of the received counts; all_to_all_single of
     the token rows (dispatch),
  3. all_to_all_single of the expert outputs back (combine: the splits swapped).
Prints the time per layer forward, busbw = (row bytes a rank sends to other ranks, mean over
ranks) / time, and EXCHANGE_MS= / BUSBW_GBPS= lines for run.sh.
Pinned: torch==2.11.0 (the version tch 0.24 links against, already in .venv).
"""

import argparse
import json
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PINNED_TORCH = "2.11.0"
KINDS = {"Float": torch.float32, "Int64": torch.int64, "Double": torch.float64}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(splits_dir: str, rank: int) -> dict:
    with open(os.path.join(splits_dir, f"rank{rank}.json")) as f:
        doc = json.load(f)
    if len(doc["calls"]) != 3:
        raise SystemExit(f"rank {rank}: expected 3 calls (header, dispatch, combine)")
    return doc


def rows(call: dict, value: float) -> torch.Tensor:
    return torch.full([sum(call["send"]), *call["row"]], value, dtype=KINDS[call["kind"]])


def off_rank_bytes(call: dict, rank: int) -> int:
    row = 1
    for d in call["row"]:
        row *= d
    row *= torch.empty((), dtype=KINDS[call["kind"]]).element_size()
    return sum(n for p, n in enumerate(call["send"]) if p != rank) * row


def run(rank: int, args, world: int, port: int) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    doc = load(args.splits_dir, rank)
    header, dispatch, combine = doc["calls"]
    header_in = torch.tensor(header["values"], dtype=torch.int64)
    # Every destination p receives header["send"][p] counts from each source; this rank
    # receives its own number of local experts from everyone.
    n_local = header["send"][rank]
    header_out = torch.empty(world * n_local, dtype=torch.int64)
    dispatch_in = rows(dispatch, float(rank))
    combine_in = rows(combine, float(rank))
    width = dispatch["row"]

    def once():
        dist.all_to_all_single(
            header_out, header_in, output_split_sizes=[n_local] * world,
            input_split_sizes=header["send"],
        )
        recv = header_out.view(world, n_local).sum(1).tolist()
        out = torch.empty([sum(recv), *width], dtype=dispatch_in.dtype)
        dist.all_to_all_single(
            out, dispatch_in, output_split_sizes=recv, input_split_sizes=dispatch["send"]
        )
        back = torch.empty([sum(dispatch["send"]), *width], dtype=combine_in.dtype)
        dist.all_to_all_single(
            back, combine_in, output_split_sizes=dispatch["send"], input_split_sizes=recv
        )
        return recv, out, back

    # Correctness once: the counts give the block's splits and rows from source s hold s.
    recv, out, back = once()
    assert recv == dispatch["recv"], f"rank {rank}: header gave {recv}, block {dispatch['recv']}"
    for t, splits in ((out, recv), (back, dispatch["send"])):
        for s, part in enumerate(torch.split(t, splits)):
            if part.numel():
                assert part.min().item() == s and part.max().item() == s, "gloo a2a is wrong"

    for _ in range(args.warmup):
        once()
    dist.barrier()
    times = []
    start = time.perf_counter()
    for _ in range(args.iters):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    mean = (time.perf_counter() - start) / args.iters
    times.sort()
    median = times[len(times) // 2]

    off = torch.tensor([off_rank_bytes(dispatch, rank) + off_rank_bytes(combine, rank)])
    dist.all_reduce(off)
    if rank == 0:
        per_rank = off.item() / world
        busbw = lambda s: per_rank / s / 1e9  # noqa: E731
        tokens = doc["tokens"]
        print(
            f"torch {torch.__version__} gloo MoE exchange (3x all_to_all_single: header, "
            f"dispatch, combine): world {world}, {tokens} tokens/worker, same splits, "
            f"{args.warmup} warmup + {args.iters} iters, {args.threads} thread(s) per process; "
            f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')} "
            f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', 'unset')}"
        )
        print(
            f"  mean {mean * 1e3:.2f} ms  median {median * 1e3:.2f} ms per layer forward; "
            f"{tokens / mean:.0f} tokens/s per worker, busbw {busbw(mean):.3f} GB/s "
            f"(median {busbw(median):.3f})"
        )
        print(f"EXCHANGE_MS={mean * 1e3:.4f}")
        print(f"BUSBW_GBPS={busbw(mean):.4f}")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--splits-dir", required=True)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    # The example's other flags (sizes, block steps) are fixed by the splits files.
    args, _ = p.parse_known_args()
    if not torch.__version__.startswith(PINNED_TORCH):
        raise SystemExit(f"expected torch {PINNED_TORCH}, found {torch.__version__}")
    world = load(args.splits_dir, 0)["world"]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(run, args=(args, world, free_port()), nprocs=world, join=True)


if __name__ == "__main__":
    main()

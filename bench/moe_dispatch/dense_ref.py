"""Reference for the world-1 mode: eager PyTorch, an MoE block against a dense MLP of the same
active FLOPs, forward + backward, as `moe_dispatch_bench --world 1` measures contrail.

Both are `h + mlp(ln(h))`; the dense MLP has hidden width top_k x expert_hidden. The MoE block
routes as contrail's does (DeepSpeed top-1/top-2 semantics: float32 gate outside autocast,
slots by cumulative count with first choices first, capacity ceil(factor * k * T / E) but at
least 4, kept weights renormalised for k = 2, balance + z losses), then loops over the experts
with index_select / index_add: the eager implementation a PyTorch user would write.
Prints MOE_STEP_MS= / DENSE_STEP_MS= lines for run.sh.
Pinned: torch==2.11.0 (the version tch 0.24 links against, already in .venv).
"""

import argparse
import contextlib
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PINNED_TORCH = "2.11.0"


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Dense(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, hidden)

    def forward(self, h):
        return h + self.mlp(self.ln_2(h))


class Moe(nn.Module):
    def __init__(self, width, hidden, experts, top_k, capacity_factor):
        super().__init__()
        self.ln_2 = nn.LayerNorm(width)
        self.gate = nn.Linear(width, experts, bias=False)
        self.experts = nn.ModuleList(Mlp(width, hidden) for _ in range(experts))
        self.top_k, self.factor = top_k, capacity_factor

    def forward(self, h):
        y = self.ln_2(h)
        tokens, experts = y.shape[0], len(self.experts)
        with torch.autocast(h.device.type, enabled=False):
            logits = F.linear(y.float(), self.gate.weight)
        capacity = max(math.ceil(tokens / experts * self.factor * self.top_k), 4)
        gates = logits.softmax(-1)
        first = gates.argmax(1)
        choices = [first]
        if self.top_k == 2:
            first_mask = F.one_hot(first, experts).bool()
            choices.append(logits.masked_fill(first_mask, -math.inf).argmax(1))
        taken = torch.zeros(1, experts, dtype=torch.long, device=h.device)
        kept, probs = [], []
        for c in choices:
            mask = F.one_hot(c, experts)
            slot = ((mask.cumsum(0) - 1 + taken) * mask).sum(1)
            taken = taken + mask.sum(0, keepdim=True)
            keep = slot < capacity
            kept.append(keep)
            probs.append(gates.gather(1, c[:, None]).squeeze(1) * keep)
        if self.top_k == 2:
            denom = (probs[0] + probs[1]).clamp_min(torch.finfo(torch.float32).eps)
            probs = [p / denom for p in probs]
        fraction = F.one_hot(first, experts).float().mean(0)
        aux = 0.01 * experts * (fraction * gates.mean(0)).sum()
        aux = aux + 0.001 * logits.logsumexp(-1).pow(2).mean()
        out = torch.zeros_like(h)
        # One call per expert on all its kept assignments (first choices, then second).
        for e, expert in enumerate(self.experts):
            picks = [((c == e) & keep).nonzero().squeeze(1) for c, keep in zip(choices, kept)]
            idx = torch.cat(picks)
            if idx.numel():
                w = torch.cat([p[i] for p, i in zip(probs, picks)])
                o = expert(y.index_select(0, idx))
                out = out.index_add(0, idx, o.to(h.dtype) * w[:, None].to(h.dtype))
        return h + out, aux


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--expert-hidden", type=int, default=3072)
    p.add_argument("--block-warmup", type=int, default=1)
    p.add_argument("--block-iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    args, _ = p.parse_known_args()
    if not torch.__version__.startswith(PINNED_TORCH):
        raise SystemExit(f"expected torch {PINNED_TORCH}, found {torch.__version__}")
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(1)
    moe = Moe(args.width, args.expert_hidden, args.experts, args.top_k, args.capacity_factor)
    dense = Dense(args.width, args.top_k * args.expert_hidden)
    moe, dense = moe.to(dev), dense.to(dev)
    h = torch.randn(args.tokens, args.width, device=dev, requires_grad=True)
    dz = torch.randn(args.tokens, args.width, device=dev)
    amp = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if args.bf16
        else contextlib.nullcontext
    )
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def moe_step():
        moe.zero_grad(set_to_none=False)
        h.grad = None
        with amp():
            out, aux = moe(h)
        ((out.float() * dz).sum() + aux).backward()

    def dense_step():
        dense.zero_grad(set_to_none=False)
        h.grad = None
        with amp():
            out = dense(h)
        (out.float() * dz).sum().backward()

    def timed(step):
        for _ in range(args.block_warmup):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.block_iters):
            step()
        sync()
        return (time.perf_counter() - t0) / args.block_iters

    moe_s, dense_s = timed(moe_step), timed(dense_step)
    amp_note = " (bf16 autocast)" if args.bf16 else ""
    print(
        f"torch {torch.__version__} eager MoE vs dense on {dev}{amp_note}: "
        f"{args.tokens} tokens, D {args.width}, E {args.experts}, top-{args.top_k}, "
        f"expert hidden {args.expert_hidden} vs dense hidden {args.top_k * args.expert_hidden}"
    )
    print(
        f"  MoE {moe_s * 1e3:.2f} ms/step, dense {dense_s * 1e3:.2f} ms/step; "
        f"MoE/dense {moe_s / dense_s:.2f}x"
    )
    print(f"MOE_STEP_MS={moe_s * 1e3:.4f}")
    print(f"DENSE_STEP_MS={dense_s * 1e3:.4f}")


if __name__ == "__main__":
    main()

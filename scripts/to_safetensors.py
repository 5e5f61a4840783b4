#!/usr/bin/env python3
"""Converts a PyTorch checkpoint (.pt / .pth / .bin: a pickle) into a safetensors file that
`model.init_weights` reads. contrail never unpickles: a pickle can run code, and Rust has no
reader for it.

    .venv/bin/python scripts/to_safetensors.py IN.pt OUT.safetensors

What it accepts: a state dict, or a dict holding one under "state_dict", "model" or "module"
(open_clip's training checkpoints keep theirs under "state_dict", with "module." in front of
every name when trained under DDP; contrail strips that prefix when loading). Only tensors are
kept; the file is read with torch.load(weights_only=True), which refuses arbitrary objects.
Prints how many tensors it wrote and the first few names.

Pinned as the project: torch 2.11.0 and safetensors 0.8.0 (both in .venv after
scripts/setup.sh and scripts/setup-test.sh).
"""

import sys

import torch
from safetensors.torch import save_file

NESTED = ("state_dict", "model", "module")


def state_dict_of(obj, path):
    if isinstance(obj, dict):
        for key in NESTED:
            if isinstance(obj.get(key), dict):
                return obj[key]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise SystemExit(
        f"{path}: neither a state dict nor a dict with one under {', '.join(NESTED)} "
        f"(found {type(obj).__name__}{' with keys ' + ', '.join(map(str, list(obj)[:8])) if isinstance(obj, dict) else ''})"
    )


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    src, dst = sys.argv[1], sys.argv[2]
    obj = torch.load(src, map_location="cpu", weights_only=True)
    state = state_dict_of(obj, src)
    tensors = {k: v.detach().clone().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    skipped = len(state) - len(tensors)
    if not tensors:
        raise SystemExit(f"{src}: the state dict holds no tensors")
    save_file(tensors, dst)
    names = sorted(tensors)
    more = f", ... ({len(names)} in all)" if len(names) > 4 else ""
    print(f"{dst}: {len(tensors)} tensors ({', '.join(names[:4])}{more})"
          + (f"; {skipped} non-tensor entries skipped" if skipped else ""))


if __name__ == "__main__":
    main()

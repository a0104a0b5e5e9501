#!/usr/bin/env python3
"""Where Llama3Block's training step reaches its memory peak: the block's C calls (the training
forward and the backward, each one call that allocates its outputs, activations and workspace
with torch first) are wrapped to print the memory allocated beyond the step's start, before
each and the peak after it, for the LLaMA-3-8B layer (B2 S2048 bf16).  The library allocates
nothing itself, so torch's counters see the whole step.

  python3 tools/mem_trace_block.py
"""

import torch

import llama3_kernels.block as blk
from llama3_kernels import Llama3Block
from llama3_kernels.ops.rope import llama3_rope_cos_sin

MiB = 2**20
trace = []


def wrap(name, fn):
    def call(*args, **kw):
        before = torch.cuda.memory_allocated()
        out = fn(*args, **kw)
        trace.append((name, before, torch.cuda.max_memory_allocated()))
        return out

    return call


def main():
    for name in ("train_forward", "backward"):
        setattr(blk.BlockCall, name, wrap(name, getattr(blk.BlockCall, name)))
    dim, hidden, heads, kv, b, s = 4096, 14336, 32, 8, 2, 2048
    block = Llama3Block(dim, hidden, heads, kv, device="cuda", dtype=torch.bfloat16)
    cos, sin = llama3_rope_cos_sin(s, dim // heads, device="cuda")
    x = torch.randn(b, s, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    block(x, cos, sin).backward(dy)  # warm-up
    x.grad = None
    for p in block.parameters():
        p.grad = None
    torch.cuda.synchronize()
    trace.clear()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    block(x, cos, sin).backward(dy)
    torch.cuda.synchronize()
    print(f"{'call':<36} {'allocated before':>17} {'peak so far':>12}  (MiB beyond the step's start)")
    for name, before, peak in trace:
        print(f"{name:<36} {(before - base) / MiB:>17.1f} {(peak - base) / MiB:>12.1f}")
    print(f"extra peak of the step: {(torch.cuda.max_memory_allocated() - base) / MiB:.1f} MiB")


if __name__ == "__main__":
    main()

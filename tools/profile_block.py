#!/usr/bin/env python3
"""Where a TritonLlama3Block forward+backward spends its GPU time: every kernel of one training
step under torch.profiler, in launch order and summed by kind, so the time outside the GEMMs can
be attributed; then the wall time a step takes in a long loop (the GPU drained only at the end)
next to the host time of the same loop with the GPU idle between steps, which tells a host-bound
step from a GPU-bound one.  Configs: the block benchmark's GPU configs (llama3_kernels.bench_block),
the LLaMA-3-8B layer by default.

  python3 tools/profile_block.py [--steps 3] [--config "llama3-8b layer"|"tutorial bench"|"tutorial test"]
"""

import argparse
import statistics
import time
from collections import defaultdict

import torch

from llama3_kernels import TritonLlama3Block
from llama3_kernels.bench_block import GPU_CONFIGS
from llama3_kernels.ops.rope import llama3_rope_cos_sin


def kind(name: str) -> str:
    n = name.lower()
    for key, label in (
        ("gemm", "GEMM"),
        ("nvjet", "GEMM"),
        ("cutlass", "GEMM"),
        ("sm90_xmma", "GEMM"),
        ("fa_", "attention"),
        ("attn", "attention"),
        ("rmsnorm", "rmsnorm"),
        ("rope", "rope"),
        ("swiglu", "swiglu"),
        ("memset", "memset"),
        ("memcpy", "memcpy"),
    ):
        if key in n:
            return label
    return "other"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--config", choices=[c.name for c in GPU_CONFIGS], default=GPU_CONFIGS[0].name)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = next(c for c in GPU_CONFIGS if c.name == args.config)  # the benchmark's own shapes
    block = TritonLlama3Block(
        cfg.dim, cfg.hidden, cfg.heads, cfg.kv_heads, causal=cfg.causal, device="cuda", dtype=cfg.dtype
    )
    cos, sin = llama3_rope_cos_sin(cfg.seq, cfg.dim // cfg.heads, device="cuda")
    x = torch.randn(cfg.batch, cfg.seq, cfg.dim, device="cuda", dtype=cfg.dtype, requires_grad=True)
    dy = torch.randn_like(x)

    def step():
        x.grad = None
        for p in block.parameters():
            p.grad = None
        block(x, cos, sin).backward(dy)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_step = len(events) // args.steps
    last = events[-per_step:]
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  kernels per step: {per_step}")
    print(f"{'#':>3} {'us':>8}  kernel")
    by_kind = defaultdict(float)
    for i, e in enumerate(last):
        us = e.device_time if hasattr(e, "device_time") else e.cuda_time
        by_kind[kind(e.name)] += us
        print(f"{i:>3} {us:>8.1f}  {e.name[:110]}")
    total = sum(by_kind.values())
    print(f"\nsum of kernel times per step: {total / 1e3:.3f} ms")
    for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<10} {v / 1e3:8.3f} ms")

    n = 10 if cfg.dim >= 4096 else 200  # the large layers take ms a step, the small one us
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / n
    host = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        host.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    idle = statistics.median(host) * 1e3
    print(f"\nstep in a loop: {wall * 1e3:.3f} ms wall; host time of one step on an idle GPU: {idle:.3f} ms")


if __name__ == "__main__":
    main()

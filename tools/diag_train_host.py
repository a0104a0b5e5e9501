#!/usr/bin/env python3
"""Where the host time of a small (host-bound) training step goes: Llama3Block forward +
backward at the tutorial's test shape (dim 512, hidden 2048, 8 heads, batch 2, seq 128, fp16).
Prints the wall-clock time per step, then torch.profiler's CPU-side events of 20 steps summed by
name (CUDA runtime and driver calls included: a synchronizing call would show up here), per step,
then the Python functions that take the most time (cProfile).  --compiled: the block under
torch.compile.

  python3 tools/diag_train_host.py [--compiled]
"""

import cProfile
import pstats
import sys

import torch
from torch.profiler import ProfilerActivity, profile
from wall_clock import wall_us

from llama3_kernels import Llama3Block, llama3_rope_cos_sin


def main():
    torch.manual_seed(0)
    blk = Llama3Block(512, 2048, 8, 8, causal=False, device="cuda", dtype=torch.float16)
    params = list(blk.parameters())
    if "--compiled" in sys.argv:
        blk = torch.compile(blk)
    cos, sin = llama3_rope_cos_sin(128, 64, device="cuda")
    x = torch.randn(2, 128, 512, device="cuda", dtype=torch.float16, requires_grad=True)
    dy = torch.randn_like(x)

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        blk(x, cos, sin).backward(dy)

    host, drained = wall_us(step, n=200, warmup=20)
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}: training step {host:.0f} us "
        f"of host time per step ({drained:.0f} us with the final drain)"
    )
    steps = 20
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    print(f"{'CPU-side event':<60} {'calls/step':>10} {'self us/step':>13}")
    for e in rows[:25]:
        print(f"{e.key[:60]:<60} {e.count / steps:>10.1f} {e.self_cpu_time_total / steps:>13.1f}")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()

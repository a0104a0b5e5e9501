#!/usr/bin/env python3
"""Where a Hugging Face LlamaForCausalLM training step spends its GPU time, patched with
llama3_kernels.hf and not: bench_hf's GPU model (4 layers of LLaMA-3-8B sizes, vocab 32000, bf16,
batch 2, seq 2048), a few steps under torch.profiler, the kernels of one step summed by kind and
the costliest listed; then the step's wall time in a loop, so that the gap between the kernels'
sum and the wall time (host-bound stretches, synchronizations) shows.

  python3 tools/profile_hf_step.py [--top 25]
"""

import argparse
import time
from collections import defaultdict

import torch
from profile_block import kind

from llama3_kernels import hf
from llama3_kernels.bench_hf import GPU_CONFIG, build_model, training_step


def profile_step(label: str, step, top: int, steps: int = 3) -> None:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name, by_kind = defaultdict(float), defaultdict(float)
    for e in events:
        us = (e.device_time if hasattr(e, "device_time") else e.cuda_time) / steps
        by_name[e.name[:100]] += us
        by_kind[kind(e.name)] += us
    n = 10
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / n * 1e3
    print(
        f"\n== {label}: {len(events) // steps} kernels a step, kernel sum {sum(by_kind.values()) / 1e3:.2f} ms, "
        f"wall {wall:.2f} ms a step in a loop"
    )
    for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<10} {v / 1e3:8.3f} ms")
    for name, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {v / 1e3:8.3f} ms  {name}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = build_model(GPU_CONFIG, dev, torch.bfloat16)
    ids = torch.randint(3, GPU_CONFIG["vocab_size"], (GPU_CONFIG["batch"], GPU_CONFIG["seq"]), device=dev)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    profile_step("HF eager (SDPA)", training_step(model, ids), args.top)
    with hf.patched(model):
        profile_step("patched with llama3_kernels.hf", training_step(model, ids), args.top)


if __name__ == "__main__":
    main()

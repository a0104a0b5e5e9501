"""Decode attention kernel by kernel: each bench_decode case (bf16, GQA 32/8, head_dim 128) through
attention_decode and through SDPA's default choice, 20 calls each under torch.profiler (CUPTI),
the L2 evicted before each call; prints the median GPU duration of every kernel a call launches
(the split kernel and the merge, SDPA's own), which the event timings of bench_decode sum with
the launch gaps between them.

    python tools/profile_decode_kernels.py
"""

import statistics

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import llama3_kernels as l3k

CASES = ((1, 4096), (8, 4096), (1, 32768), (64, 2048))


def kernel_times(fn, flush, reps: int = 20) -> dict[str, float]:
    """Median microseconds of each kernel fn launches (the flush's reduction left out)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            flush.sum()
            torch.cuda.synchronize()
            fn()
            torch.cuda.synchronize()
    times: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA" and "reduce_kernel" not in e.name:
            times.setdefault(e.name[:48], []).append(e.time_range.end - e.time_range.start)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    dev, dt = "cuda", torch.bfloat16
    flush = torch.ones(64 << 20, device=dev)
    for B, L in CASES:
        q = torch.randn(B, 32, 1, 128, device=dev, dtype=dt)
        k = torch.randn(B, 8, L, 128, device=dev, dtype=dt)
        v = torch.randn(B, 8, L, 128, device=dev, dtype=dt)
        rng = torch.tensor([[0, L]] * B, dtype=torch.int32, device=dev)
        calls = {
            "llama3_kernels": lambda: l3k.attention_decode(q, k, v, rng),
            "SDPA default": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        }
        for label, fn in calls.items():
            ks = kernel_times(fn, flush)
            print(f"B{B} cache {L}, {label}: " + "; ".join(f"{n} {t:.1f} us" for n, t in ks.items()))


if __name__ == "__main__":
    main()

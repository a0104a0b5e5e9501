#!/usr/bin/env python3
"""The per-call floor of torch.compile(mode="reduce-overhead") on this host: a module whose
compiled graph is one tiny kernel, timed the way the block benchmark times the block (CUDA events
after an L2-evicting read; median) and by wall clock over 200 calls. Needs only torch.

  python3 tests/gpu/diag_reduce_overhead_floor.py
"""
import statistics
import time

import torch


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(512, device="cuda", dtype=torch.float16))

    def forward(self, x, cos, sin):
        return x * self.w


def events_ms(fn, reps=50):
    flush = torch.ones(64 << 20, dtype=torch.float32, device="cuda")
    for _ in range(10):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize()
    for s, e in zip(starts, ends):
        flush.sum()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def wall_us(fn, n=200):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main():
    x = torch.randn(2, 128, 512, device="cuda", dtype=torch.float16)
    cos = sin = torch.randn(128, 32, device="cuda")
    m = Tiny()
    with torch.no_grad():
        eager = lambda: m(x, cos, sin)
        ro = torch.compile(m, mode="reduce-overhead")
        compiled = lambda: ro(x, cos, sin)
        for name, fn in (("eager (one kernel)", eager), ("reduce-overhead (one kernel)", compiled)):
            print(f"{name:<30} events {events_ms(fn) * 1e3:7.1f} us   wall {wall_us(fn):7.1f} us per call")


if __name__ == "__main__":
    main()

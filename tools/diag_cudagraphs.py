#!/usr/bin/env python3
"""Why is torch.compile(mode="reduce-overhead") of TritonLlama3Block slower than a hand-captured
graph?  Prints Inductor's cudagraph skip counters, a profile of one call (graph launches vs
kernel launches, host time), the timing of both forms at the tutorial's test shape, and the floor:
reduce-overhead of a module whose graph is one tiny kernel, timed the same ways (wall clock, and
CUDA events after an L2-evicting read as the block benchmark does).
Run with TORCH_LOGS=cudagraphs,perf_hints for the compiler's own account."""

import torch
import torch._dynamo.utils as dutils
from wall_clock import wall_us

from llama3_kernels import TritonLlama3Block
from llama3_kernels.bench import Timer
from llama3_kernels.bench_block import capture_forward
from llama3_kernels.reference import TorchLlama3Block


def timeit(fn, n=200):
    """Microseconds per call, the GPU drained at the end of the loop."""
    return wall_us(fn, n, warmup=10)[1]


class OneKernel(torch.nn.Module):
    """The floor: what reduce-overhead costs a call when the graph is a single elementwise kernel."""

    def __init__(self, dim):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(dim, device="cuda", dtype=torch.float16))

    def forward(self, x, cos, sin):
        return x * self.w


def floor(x, cos, sin):
    m, events = OneKernel(x.shape[-1]), Timer(torch.device("cuda"), reps=50, warmup=10)
    with torch.no_grad():
        ro = torch.compile(m, mode="reduce-overhead")
        for name, fn in (("eager", lambda: m(x, cos, sin)), ("reduce-overhead", lambda: ro(x, cos, sin))):
            print(
                f"[floor] one-kernel module, {name}: events {events(fn) * 1e3:.1f} us, "
                f"wall {timeit(fn):.1f} us per call"
            )


def main():
    torch.manual_seed(0)
    dim, hidden, heads, b, s = 512, 2048, 8, 2, 128
    x = torch.randn(b, s, dim, device="cuda", dtype=torch.float16)
    hd = dim // heads
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, device="cuda").float() / hd))
    ang = torch.arange(s, device="cuda").float()[:, None] * inv[None]
    cos, sin = ang.cos(), ang.sin()
    for name, cls in (("ours", TritonLlama3Block), ("torch", TorchLlama3Block)):
        block = cls(dim, hidden, heads, causal=False).cuda().half()
        dutils.counters.clear()
        ro = torch.compile(block, mode="reduce-overhead")
        with torch.no_grad():
            for _ in range(4):
                ro(x, cos, sin)
            torch.cuda.synchronize()
            print(f"[{name}] inductor counters: {dict(dutils.counters['inductor'])}")
            print(f"[{name}] cudagraph skips: {dutils.counters['inductor'].get('cudagraph_skips', 0)}")
            t = timeit(lambda: ro(x, cos, sin))
            print(f"[{name}] reduce-overhead forward: {t:.1f} us per call")
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                t = timeit(lambda: ro(x, cos, sin))
            print(f"[{name}] reduce-overhead forward, guards skipped: {t:.1f} us per call")
            t = timeit(capture_forward(block, x, cos, sin))
            print(f"[{name}] hand-captured graph forward: {t:.1f} us per call")
            with torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            ) as prof:
                for _ in range(3):
                    ro(x, cos, sin)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=60))
    floor(x, cos, sin)


if __name__ == "__main__":
    main()

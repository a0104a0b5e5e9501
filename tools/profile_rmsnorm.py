"""Kernel-level view of RMSNorm on the GPU (bf16, 4096 x 4096): raw forward/backward
timings with preallocated buffers, the L2 flushed before each repetition (CUDA events,
median), next to a device-to-device copy of the same bytes and torch.compile's forward
in the same run; then device time of each kernel (torch.profiler).

Notes (H100 80GB HBM3, see docs/performance.md and docs/kernels.md):
  floors at 3.0 TB/s: forward 67.1 MB -> 22.4 us, backward 100.7 MB -> 33.6 us.
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

import llama3_kernels as l3k

torch.manual_seed(0)
rows, n = 4096, 4096
x = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
w = (1 + 0.3 * torch.randn(n, device="cuda")).to(torch.bfloat16)
dy = torch.randn_like(x)
y = torch.empty_like(x)
dx = torch.empty_like(x)
dw = torch.empty_like(w)
rstd = torch.empty(rows, device="cuda")
ws = torch.empty(l3k.rmsnorm_backward_workspace_size(x), dtype=torch.uint8, device="cuda")
flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
flush_f = flush.view(torch.float32)
MODE = "zero"


def do_flush():
    if MODE == "zero":
        flush.zero_()  # the usual flush (triton.testing.do_bench): leaves dirty lines in L2
    else:
        flush_f.sum()  # read-only flush: evicts without leaving dirty lines


def timed(fn, reps=50):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        do_flush()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        times.append((s, e))
    torch.cuda.synchronize()
    t = sorted(s.elapsed_time(e) for s, e in times)
    return t[len(t) // 2] * 1e3


def eager_rmsnorm(x, w, eps=1e-5):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


fwd = lambda: l3k.rmsnorm_forward_into(x, w, 1e-5, y, rstd)
bwd = lambda: l3k.rmsnorm_backward_into(dy, x, w, rstd, 1e-5, dx, dw, ws)
bwd_dx = lambda: l3k.rmsnorm_backward_into(dy, x, w, rstd, 1e-5, dx, None, None)
copy = lambda: y.copy_(x)
compiled = torch.compile(eager_rmsnorm)
tc = lambda: compiled(x, w)
ref = eager_rmsnorm(x, w)
fwd()
torch.cuda.synchronize()
print(
    "forward max |y - eager| =",
    (y.float() - ref.float()).abs().max().item(),
    " torch.compile max |y - eager| =",
    (tc().float() - ref.float()).abs().max().item(),
)

big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
big2 = torch.empty_like(big)
t_big = timed(lambda big=big, big2=big2: big2.copy_(big), reps=10)
del big, big2
bw_big = 2 * (1 << 30) / t_big * 1e-3
print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}")
print(f"copy 1 GiB d2d: {t_big:.1f} us = {bw_big:.0f} GB/s (read + write)")
FB, BB = 2 * rows * n * 2, 3 * rows * n * 2
rowsout = []
for MODE in ("zero", "read"):
    t_copy = timed(copy)
    res = {
        "copy 32 MiB": (t_copy, FB),
        "forward": (timed(fwd), FB),
        "torch.compile fwd": (timed(tc), FB),
        "backward (dx + dweight)": (timed(bwd), BB),
        "backward dx only": (timed(bwd_dx), BB),
    }
    print(f"--- L2 flush: {MODE} ---")
    for k, (t, b) in res.items():
        print(
            f"{k:26s} {t:7.1f} us  {b / t * 1e-3:6.0f} GB/s  {100 * b / t * 1e-3 / bw_big:5.1f}% of copy bw"
            f"  {100 * (t_copy * b / FB) / t:5.1f}% of same-size copy"
        )
if "--profile" in sys.argv:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fwd()
            bwd()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))

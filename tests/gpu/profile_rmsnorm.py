"""Kernel-level view of RMSNorm on the GPU: device time of each kernel (torch.profiler)
and back-to-back timings of the raw calls with preallocated buffers."""
import torch
from torch.profiler import ProfilerActivity, profile

import llama3_kernels as l3k
from llama3_kernels.ops import rmsnorm as R

torch.manual_seed(0)
rows, n = 4096, 4096
x = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
w = torch.randn(n, device="cuda", dtype=torch.bfloat16)
dy = torch.randn_like(x)
y = torch.empty_like(x)
dx = torch.empty_like(x)
dw = torch.empty_like(w)
rstd = torch.empty(rows, device="cuda")
ws = torch.empty(l3k.rmsnorm_backward_workspace_size(x), dtype=torch.uint8, device="cuda")
flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")


def timed(fn, reps=50):
    times = []
    for _ in range(reps):
        flush.zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record()
        times.append((s, e))
    torch.cuda.synchronize()
    t = sorted(s.elapsed_time(e) for s, e in times)
    return t[len(t) // 2] * 1e3


fwd = lambda: l3k.rmsnorm_forward_into(x, w, 1e-5, y, rstd)
bwd = lambda: l3k.rmsnorm_backward_into(dy, x, w, rstd, 1e-5, dx, dw, ws)
for _ in range(3):
    fwd(); bwd()
print(f"raw forward  {timed(fwd):7.1f} us")
print(f"raw backward {timed(bwd):7.1f} us")
xg = x.clone().requires_grad_(); wg = w.clone().requires_grad_()
def fb():
    xg.grad = wg.grad = None
    l3k.rms_norm(xg, wg).backward(dy)
print(f"autograd fwd+bwd {timed(fb):7.1f} us")
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        fwd(); bwd()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))

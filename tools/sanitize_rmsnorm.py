"""A small RMSNorm workload for compute-sanitizer (memcheck, racecheck, synccheck):
every kernel variant (vector and scalar paths, register-cached and looped rows,
fused residual add, every dtype) runs once on small shapes."""

import torch

import llama3_kernels as l3k

torch.manual_seed(0)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for rows, n in ((3, 8), (5, 123), (4, 4096), (2, 40000), (130, 64)):
        x = torch.randn(rows, n, device="cuda", dtype=dtype, requires_grad=True)
        r = torch.randn(rows, n, device="cuda", dtype=dtype, requires_grad=True)
        w = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
        l3k.rms_norm(x, w).sum().backward()
        h, y = l3k.add_rms_norm(x, r, w)
        (h.float().sum() + y.float().sum()).backward()
        l3k.rms_norm(x.detach()[:, 1:], w.detach()[1:])  # misaligned rows: scalar path
torch.cuda.synchronize()
print("sanitize_rmsnorm: done")

"""A small RoPE + SwiGLU workload for compute-sanitizer (memcheck, racecheck, synccheck):
vector and scalar paths, both RoPE conventions, float32 and activation-dtype tables,
fused-QKV views in place, q only, odd widths, separate and fused SwiGLU layouts,
forward and backward, every dtype."""

import torch

import llama3_kernels as l3k

torch.manual_seed(0)
dev = "cuda"
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for B, Hq, Hk, S, D in ((2, 4, 2, 5, 8), (1, 3, 1, 7, 6), (2, 8, 2, 9, 128), (1, 2, 2, 3, 256), (1, 1, 1, 2, 2)):
        for inter in (False, True):
            for tdt in (torch.float32, dtype):
                cos, sin = l3k.llama3_rope_cos_sin(S + 3, D, device=dev, dtype=tdt)
                qkv = torch.randn(B, S, (Hq + 2 * Hk) * D, device=dev, dtype=dtype)
                v4 = qkv.view(B, S, Hq + 2 * Hk, D)
                q, k = v4[:, :, :Hq].transpose(1, 2), v4[:, :, Hq : Hq + Hk].transpose(1, 2)
                l3k.rope_(q, k, cos, sin, offset=3, interleaved=inter)
                qo, ko = l3k.rope(q.contiguous(), k, cos, sin, interleaved=inter)
                l3k.rope_(qo, None, cos, sin, interleaved=inter)
                l3k.rope_backward_into(qo, ko, cos, sin, qo, ko, interleaved=inter)
    for rows, n in ((3, 8), (5, 123), (4, 4096), (130, 64), (1, 1)):
        g = torch.randn(rows, n, device=dev, dtype=dtype, requires_grad=True)
        u = torch.randn(rows, n, device=dev, dtype=dtype, requires_grad=True)
        l3k.swiglu(g, u).float().sum().backward()
        gu = torch.randn(rows, 2 * n, device=dev, dtype=dtype, requires_grad=True)
        l3k.swiglu_fused(gu).float().sum().backward()
        l3k.swiglu(g.detach()[:, 1:], u.detach()[:, 1:])  # misaligned rows: scalar path
        da = torch.randn(rows, n, device=dev, dtype=dtype)
        l3k.swiglu_fused_backward_into(da, gu.detach(), gu.detach().clone(), a=da)
torch.cuda.synchronize()
print("sanitize_rope_swiglu: done")

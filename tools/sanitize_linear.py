"""A small GEMM + block workload for compute-sanitizer (memcheck): each GEMM configuration's
first call times cuBLASLt's candidates on the caller's operands and keeps the pick and the
descriptors; later calls reuse them.  Forward with and without the residual, both backward
products with and without accumulation (in place: untuned), with and without the workspace,
odd sizes, both 16-bit dtypes; then the block's C calls: inference forward, training steps
with the activations consumed and preserved (retain_graph), the attention output kept, and the
weights as nine separate matrices."""

import torch

import llama3_kernels as l3k
from llama3_kernels.ops.linear import gemm_workspace

torch.manual_seed(0)
dev = "cuda"
ws = gemm_workspace(torch.device(dev))
for dtype in (torch.float16, torch.bfloat16):
    for t, k, n in ((7, 24, 40), (128, 512, 1536), (33, 128, 72)):
        x = torch.randn(t, k, device=dev, dtype=dtype)
        w = torch.randn(n, k, device=dev, dtype=dtype) * 0.1
        r = torch.randn(t, n, device=dev, dtype=dtype)
        for _ in range(2):  # the first call tunes, the second reuses
            for workspace in (ws, None):
                y = torch.empty(t, n, device=dev, dtype=dtype)
                l3k.linear_forward_into(x, w, y, None, workspace)
                l3k.linear_forward_into(x, w, y, r, workspace)
                dx = torch.empty_like(x)
                l3k.linear_backward_input_into(y, w, dx, workspace=workspace)
                l3k.linear_backward_input_into(y, w, dx, accumulate=True, workspace=workspace)
                dw = torch.empty_like(w)
                l3k.linear_backward_weight_into(y, x, dw, workspace=workspace)
                l3k.linear_backward_weight_into(y, x, dw, accumulate=True, workspace=workspace)
    blk = l3k.Llama3Block(256, 512, 4, 2).to(dev, dtype)
    cos, sin = l3k.llama3_rope_cos_sin(64, 64, device=dev)
    x = torch.randn(2, 64, 256, device=dev, dtype=dtype)
    with torch.no_grad():
        blk(x, cos, sin)
        blk(x, cos, sin)
    loss = blk(x.requires_grad_(), cos, sin).float().sum()
    loss.backward(retain_graph=True)
    loss.backward()
    blk.recompute_attention = False
    blk(x, cos, sin).float().sum().backward()
    q, k, v = (t.detach().clone() for t in blk.qkv_weight.split(blk._split_sizes("qkv_weight")))
    g, u = (t.detach().clone() for t in blk.gate_up_weight.split(blk._split_sizes("gate_up_weight")))
    split = [
        t.requires_grad_()
        for t in (
            q,
            k,
            v,
            blk.o_weight.detach().clone(),
            g,
            u,
            blk.down_weight.detach().clone(),
            blk.norm1_weight.detach().clone(),
            blk.norm2_weight.detach().clone(),
        )
    ]
    l3k.block.llama_block(x, cos, sin, split, 4, 2).float().sum().backward()
torch.cuda.synchronize()
print("sanitize_linear: done")

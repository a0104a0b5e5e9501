"""A small attention workload for compute-sanitizer: forward and backward (both dq
modes), causal and not, GQA, odd lengths, head_dim 40/64/128."""
import torch

import llama3_kernels as l3k

torch.manual_seed(0)
for (b, h, hkv, sq, sk, d) in ((1, 2, 1, 17, 17, 64), (2, 4, 2, 33, 70, 128), (1, 2, 2, 70, 33, 40)):
    for causal in (False, True):
        for det in (False, True):
            q = torch.randn(b, h, sq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(b, hkv, sk, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(b, hkv, sk, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            l3k.flash_attn(q, k, v, causal=causal, deterministic=det).float().sum().backward()
torch.cuda.synchronize()
print("sanitize_attention: done")

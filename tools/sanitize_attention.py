"""A small attention workload for compute-sanitizer: forward and backward (both dq
modes), causal and not, GQA, odd lengths, head_dim 40/64/128, with and without key ranges
(padding: a range that starts late, one that ends early, an empty one)."""

import torch

import llama3_kernels as l3k

torch.manual_seed(0)
for b, h, hkv, sq, sk, d in ((1, 2, 1, 17, 17, 64), (2, 4, 2, 33, 70, 128), (1, 2, 2, 70, 33, 40)):
    for causal in (False, True):
        for det, ranged in ((False, False), (True, False), (False, True), (True, True)):
            key_range = None
            if ranged:
                ends = [(sk // 3, sk), (4, 4)] if b > 1 else [(3, sk - 2)]
                key_range = torch.tensor(ends, dtype=torch.int32, device="cuda")
            q = torch.randn(b, h, sq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(b, hkv, sk, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(b, hkv, sk, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            l3k.flash_attn(q, k, v, causal=causal, deterministic=det, key_range=key_range).float().sum().backward()
torch.cuda.synchronize()
print("sanitize_attention: done")

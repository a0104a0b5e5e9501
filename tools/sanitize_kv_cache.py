"""A small KV-cache workload for compute-sanitizer: appends (q in place inside a fused QKV
buffer, per-sequence positions, a range that ends before the new tokens and one past the
capacity) and decode attention in each dtype, GQA and MHA, head_dim 64, 72 and 128, one split
and several (a long cache), and the block's decode step (prefill, then single tokens)."""

import torch

import llama3_kernels as l3k
from llama3_kernels.ops.rope import llama3_rope_cos_sin

torch.manual_seed(0)
dev = "cuda"
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for b, h, hkv, d, seq, cap in ((2, 8, 2, 128, 1, 4096), (3, 6, 2, 72, 3, 40), (1, 4, 4, 64, 5, 300)):
        qkv = torch.randn(b, seq, h + 2 * hkv, d, device=dev, dtype=dtype).transpose(1, 2)
        q, k, v = qkv[:, :h], qkv[:, h : h + hkv], qkv[:, h + hkv :]
        kc = torch.randn(b, hkv, cap, d, device=dev, dtype=dtype)
        vc = torch.randn(b, hkv, cap, d, device=dev, dtype=dtype)
        cos, sin = llama3_rope_cos_sin(cap + 8, d, device=dev)
        ranges = torch.tensor([[0, cap // 2], [3, seq - 1], [1, cap + 5]][:b], dtype=torch.int32, device=dev)
        positions = torch.arange(b, dtype=torch.int32, device=dev) * 2
        l3k.kv_cache_append_into(k, v, cos, sin, ranges, kc, vc, q=q, q_out=q, positions=positions)
        l3k.attention_decode(q, kc, vc, ranges)
        l3k.attention_decode(q.contiguous(), kc, vc, ranges, scale=0.5)

blk = l3k.Llama3Block(256, 512, 8, 2, device=dev, dtype=torch.bfloat16)
cos, sin = llama3_rope_cos_sin(64, 32, device=dev)
cache = l3k.KVCache(1, 2, 2, 32, 64, dtype=torch.bfloat16, device=dev)
cache.reset(torch.tensor([0, 2], device=dev))
with torch.no_grad():
    x = torch.randn(2, 7, 256, device=dev, dtype=torch.bfloat16)
    cache.advance(7)
    blk.decode(x, cos, sin, cache)
    for _ in range(4):  # the second identical step is captured, later ones replayed
        cache.advance(1)
        blk.decode(x[:, :1], cos, sin, cache)
torch.cuda.synchronize()
print("sanitize_kv_cache: done")

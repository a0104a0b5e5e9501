"""A small block workload for compute-sanitizer: training steps and inference calls repeated
on the same buffers, so the library captures them as CUDA graphs and replays them (the
second call of a shape is captured, later ones replayed); GQA and MHA, fp16 and bf16, with
and without key ranges (padding)."""

import torch

import llama3_kernels as l3k

torch.manual_seed(0)
for dim, hidden, h, hkv, dtype, ranged in (
    (128, 256, 4, 2, torch.bfloat16, False),
    (64, 160, 2, 2, torch.float16, True),
):
    blk = l3k.Llama3Block(dim, hidden, h, hkv, device="cuda", dtype=dtype)
    cos, sin = l3k.llama3_rope_cos_sin(33, dim // h, device="cuda")
    x = torch.randn(2, 33, dim, device="cuda", dtype=dtype, requires_grad=True)
    key_range = torch.tensor([(0, 33), (5, 30)], dtype=torch.int32, device="cuda") if ranged else None
    for _ in range(4):
        x.grad = None
        for p in blk.parameters():
            p.grad = None
        with torch.no_grad():
            blk(x, cos, sin, key_range)
        blk(x, cos, sin, key_range).float().square().sum().backward()
torch.cuda.synchronize()
print("sanitize_block: done")

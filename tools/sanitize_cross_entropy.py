"""A small cross-entropy workload for compute-sanitizer: float32, float16 and bfloat16 logits,
vocabularies that take the vector and the scalar paths (multiples of 8 and not), ignored and
out-of-range targets, a row slice of a wider buffer, in place and out of place."""

import torch

import llama3_kernels as l3k

torch.manual_seed(0)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for rows, vocab in ((5, 1), (33, 1000), (7, 32003), (3, 4096)):
        wide = torch.randn(rows, vocab + 8, device="cuda", dtype=dtype)
        for logits in (wide[:, :vocab], wide[:, :vocab].contiguous()):
            target = torch.randint(0, vocab, (rows,), device="cuda")
            target[0] = -100
            target[-1] = vocab  # out of range: NaN row
            loss = torch.empty(rows, device="cuda")
            l3k.cross_entropy_into(logits, target, loss, torch.empty_like(logits))
            if logits.is_contiguous():
                l3k.cross_entropy_into(logits, target, loss, logits)  # in place
        x = torch.randn(rows, vocab, device="cuda", dtype=dtype, requires_grad=True)
        l3k.cross_entropy(x, torch.randint(0, vocab, (rows,), device="cuda")).backward()
torch.cuda.synchronize()
print("sanitize_cross_entropy: done")

#!/usr/bin/env python3
"""Host time of the block's C calls at the tutorial's test shape (dim 512, hidden 2048, 8 heads,
batch 2, seq 128, fp16), split: the whole eager training step, the Python body of each C call,
the bare C calls with their arguments prepared once, and single ops called from C in a loop
(validation + launch).  Wall clock per call in long loops; the GPU keeps up at this shape, so
the numbers are host time.

  python3 tools/host_block_calls.py
"""

import ctypes
import statistics
import time

import torch

import llama3_kernels as l3k
from llama3_kernels._dlpack import Borrowed, current_stream
from llama3_kernels._lib import LIB, PRESERVE_ACTIVATIONS, BlockActivations, BlockGrads
from llama3_kernels.block import PARAM_NAMES, BlockCall, _layout


def per_call_us(fn, n=300, reps=5):
    for _ in range(30):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    return statistics.median(out)


def main():
    torch.manual_seed(0)
    dev, dt = "cuda", torch.float16
    blk = l3k.Llama3Block(512, 2048, 8, 8, causal=False, device=dev, dtype=dt)
    cos, sin = l3k.llama3_rope_cos_sin(128, 64, device=dev)
    x = torch.randn(2, 128, 512, device=dev, dtype=dt, requires_grad=True)
    dy = torch.randn_like(x)
    params = [getattr(blk, n) for n in PARAM_NAMES]
    rows = []

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        blk(x, cos, sin).backward(dy)

    rows.append(("eager training step (module, autograd)", per_call_us(step)))
    call = BlockCall(params, 8, 8, False, 1e-5)
    xd = x.detach()
    acts = call.train_forward(xd, cos, sin, False)[1:]
    rows.append(("BlockCall.train_forward (Python + C)", per_call_us(lambda: call.train_forward(xd, cos, sin, False))))
    rows.append(
        (
            "BlockCall.backward, preserving (Python + C)",
            per_call_us(lambda: call.backward(dy, xd, cos, sin, acts, True)),
        )
    )
    with torch.no_grad():
        rows.append(("inference forward (module)", per_call_us(lambda: blk(xd, cos, sin))))

    # The bare C calls, arguments prepared once.
    lay = _layout(call, xd)
    out = torch.empty_like(xd)
    fws = torch.empty(lay.forward_workspace_bytes, dtype=torch.uint8, device=dev)
    bws = torch.empty(lay.backward_workspace_bytes_preserving, dtype=torch.uint8, device=dev)
    dx = torch.empty_like(xd)
    grads = [torch.empty_like(p) for p in params]
    b = Borrowed(xd, cos, sin, out, fws, *acts[:5], dy, dx, bws, *grads)
    p = b.ptrs
    saved = BlockActivations(*p[5:10])
    g = BlockGrads(*p[13:19])
    s = current_stream(xd)
    w, cfg = ctypes.byref(call.weights), ctypes.byref(call.cfg)
    fwd = LIB.l3k_llama_block_forward_train
    bwd = LIB.l3k_llama_block_backward
    rows.append(
        (
            "C: l3k_llama_block_forward_train",
            per_call_us(lambda: fwd(p[0], p[1], p[2], w, cfg, p[3], ctypes.byref(saved), p[4], s)),
        )
    )
    rows.append(
        (
            "C: l3k_llama_block_backward (preserving)",
            per_call_us(
                lambda: bwd(
                    p[10],
                    p[0],
                    p[1],
                    p[2],
                    w,
                    cfg,
                    ctypes.byref(saved),
                    PRESERVE_ACTIVATIONS,
                    p[11],
                    ctypes.byref(g),
                    p[12],
                    s,
                )
            ),
        )
    )
    # Single ops through the C ABI: validation + launch.
    t = torch.randn(256, 512, device=dev, dtype=dt)
    wt = torch.randn(512, device=dev, dtype=dt)
    y = torch.empty_like(t)
    bo = Borrowed(t, wt, y)
    rows.append(
        (
            "C: l3k_rmsnorm_forward (one kernel)",
            per_call_us(lambda: LIB.l3k_rmsnorm_forward(bo.ptrs[0], bo.ptrs[1], 1e-5, bo.ptrs[2], None, s)),
        )
    )
    wl = torch.randn(512, 512, device=dev, dtype=dt)
    ws = torch.empty(32 << 20, dtype=torch.uint8, device=dev)
    bl = Borrowed(t, wl, y, ws)
    rows.append(
        (
            "C: l3k_linear_forward (cuBLASLt)",
            per_call_us(lambda: LIB.l3k_linear_forward(bl.ptrs[0], bl.ptrs[1], None, bl.ptrs[2], bl.ptrs[3], s)),
        )
    )
    e = torch.empty(0, device=dev)
    rows.append(("torch.empty (one tensor)", per_call_us(lambda: torch.empty(256, 512, device=dev, dtype=dt))))
    rows.append(("Borrowed of one tensor (to_dlpack)", per_call_us(lambda: Borrowed(e))))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: host time per call")
    for name, us in rows:
        print(f"  {name:<48} {us:8.1f} us")


if __name__ == "__main__":
    main()

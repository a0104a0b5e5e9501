#!/usr/bin/env python3
"""Where the host time of a small (host-bound) block forward goes, at the tutorial's test shape
(dim 512, hidden 2048, 8 heads, batch 2, seq 128, fp16): wall-clock microseconds per call over a
long loop with the GPU left to drain only at the end, for
  - the module's inference forward (what the benchmark times),
  - the same with the cached weight DLTensors dropped before every call (each call rebuilds them),
  - the bare C call l3k_llama_block_forward with its arguments prepared once,
  - the PyTorch block in eager mode,
and the GPU time of one forward (CUDA events around 200 back-to-back calls, host far ahead)."""

import ctypes

import torch
from wall_clock import wall_us

from llama3_kernels import TritonLlama3Block, llama3_rope_cos_sin
from llama3_kernels import block as B
from llama3_kernels._dlpack import Borrowed
from llama3_kernels._lib import LIB, check
from llama3_kernels.reference import TorchLlama3Block


def host_us(fn, n=2000):
    """Host microseconds per call in a long loop, the GPU left to drain after the clock stops."""
    return wall_us(fn, n, warmup=50)[0]


def main():
    torch.manual_seed(0)
    dev, dt = "cuda", torch.float16
    ref = TorchLlama3Block(512, 2048, 8, 8, causal=False, device=dev, dtype=dt)
    ours = TritonLlama3Block(512, 2048, 8, 8, causal=False, device=dev, dtype=dt)
    ours.load_state_dict(ref.state_dict())
    cos, sin = llama3_rope_cos_sin(128, 64, device=dev)
    x = torch.randn(2, 128, 512, device=dev, dtype=dt)

    def uncached():
        B._CALLS.pop(ours, None)
        ours(x, cos, sin)

    with torch.no_grad():
        ours(x, cos, sin)
        call = B._CALLS[ours]  # the module's cached C-call state (weights' DLTensors, config, sizes)
        b = Borrowed(x, cos, sin)
        out = torch.empty_like(x)
        ws = torch.empty(call.inference_bytes[(x.shape, x.dtype)], dtype=torch.uint8, device=dev)
        o = Borrowed(out, ws)
        stream = torch.cuda.current_stream().cuda_stream
        args = (
            b.ptrs[0],
            b.ptrs[1],
            b.ptrs[2],
            ctypes.byref(call.weights),
            ctypes.byref(call.cfg),
            o.ptrs[0],
            o.ptrs[1],
            stream,
        )

        def bare():
            LIB.l3k_llama_block_forward(*args)

        check(LIB.l3k_llama_block_forward(*args))
        rows = {
            "module forward (weights cached)": host_us(lambda: ours(x, cos, sin)),
            "module forward (weights rebuilt each call)": host_us(uncached),
            "bare C call l3k_llama_block_forward": host_us(bare),
            "PyTorch eager block": host_us(lambda: ref(x, cos, sin)),
        }
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(20_000_000)  # ~10 ms of GPU wait: the host queues the whole loop ahead
        start.record()
        for _ in range(200):
            bare()
        end.record()
        end.synchronize()
        rows["GPU time of one forward (host ahead)"] = start.elapsed_time(end) / 200 * 1e3
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; tutorial test shape, fp16")
    for k, v in rows.items():
        print(f"  {k:<45} {v:8.1f} us")


if __name__ == "__main__":
    main()

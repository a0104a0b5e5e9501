"""Wall-clock time per call of a host-bound loop, for the host-overhead probes in this folder
(tools/host_overhead.py, tools/diag_cudagraphs.py, tools/diag_train_host.py)."""

import time

import torch


def wall_us(fn, n: int = 200, warmup: int = 10) -> tuple[float, float]:
    """Microseconds per call of `fn` over `n` back-to-back calls, after `warmup` calls and a drain
    of the GPU: (host time, the loop up to its end on the GPU).  The first is what the host
    spends issuing a call when the GPU keeps up; the second includes the final
    torch.cuda.synchronize(), i.e. whatever work the GPU still had queued."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t0) / n * 1e6

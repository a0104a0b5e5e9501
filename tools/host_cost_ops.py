#!/usr/bin/env python3
"""Host cost of each public op on tiny CPU float32 tensors: the Python, dispatch and autograd
time around the C call, which is what a host-bound (small-shape) GPU run pays per op.

For every op, the median wall time of one call over many thousand calls, without grad and with
grad (forward + backward through torch.autograd.backward).  The kernels themselves take well
under a microsecond at these shapes, so the numbers are host cost.

    PYTHONPATH=python python3 tools/host_cost_ops.py --json after.json
    PYTHONPATH=/old/python python3 tools/host_cost_ops.py --json before.json
    python3 tools/host_cost_ops.py --compare before.json after.json   # the table, no timing

Run it with the machine otherwise idle: the medians move by tens of percent under load.
Threads are pinned to one (OpenMP and torch) so that the kernels' thread pools stay out of it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


def _cases():
    import llama3_kernels as l3k

    # the module constructors live next to the ops; names the package exports in every version
    from llama3_kernels import RMSNorm, RotaryEmbedding, SwiGLUMLP

    f32 = torch.float32
    r = lambda *s, g=False: torch.randn(*s, dtype=f32).requires_grad_(g)  # noqa: E731
    cos, sin = l3k.llama3_rope_cos_sin(4, 8)

    def rope_inplace_views(g):
        # q and k as views of one fused QKV projection (a non-leaf, so in place is allowed)
        base = r(1, 4, 4, 8, g=g)

        def call():
            qkv = base * 1.0 if g else base.clone()
            q, k = qkv[:, :, :2].transpose(1, 2), qkv[:, :, 2:3].transpose(1, 2)
            l3k.rope_(q, k, cos, sin)
            return qkv

        return call

    def rope_inplace_plain(g):
        q0, k0 = r(1, 2, 4, 8, g=g), r(1, 1, 4, 8, g=g)

        def call():
            q, k = (q0 * 1.0, k0 * 1.0) if g else (q0.clone(), k0.clone())
            return l3k.rope_(q, k, cos, sin)

        return call

    def simple(fn, *shapes):
        def make(g):
            args = [r(*s, g=g) for s in shapes]
            return lambda: fn(*args)

        return make

    def mlp(g):
        gu = r(32, 8, g=g)
        x, down = r(2, 8, g=g), r(8, 16, g=g)
        return lambda: l3k.swiglu_mlp(x, gu[:16], gu[16:], down)

    def module(make_mod, *shapes):
        def make(g):
            m = make_mod()
            m.requires_grad_(g)
            args = [r(*s, g=g) for s in shapes]
            return lambda: m(*args)

        return make

    return [
        ("rms_norm", simple(l3k.rms_norm, (2, 8), (8,))),
        ("add_rms_norm", simple(l3k.add_rms_norm, (2, 8), (2, 8), (8,))),
        ("rope", simple(lambda q, k: l3k.rope(q, k, cos, sin), (1, 2, 4, 8), (1, 1, 4, 8))),
        ("rope_ (q, k plain; +clone/mul)", rope_inplace_plain),
        ("rope_ (QKV views; +clone/mul)", rope_inplace_views),
        ("swiglu", simple(l3k.swiglu, (2, 8), (2, 8))),
        ("swiglu_fused", simple(l3k.swiglu_fused, (2, 16))),
        ("swiglu_mlp", mlp),
        ("flash_attn", simple(lambda q, k, v: l3k.flash_attn(q, k, v, causal=True), (1, 2, 4, 8), (1, 1, 4, 8),
                              (1, 1, 4, 8))),
        ("linear", simple(l3k.linear, (2, 8), (4, 8))),
        ("linear + residual", simple(l3k.linear, (2, 8), (4, 8), (2, 4))),
        ("RMSNorm module", module(lambda: RMSNorm(8), (2, 8))),
        ("RotaryEmbedding module", module(lambda: RotaryEmbedding(8, max_seq_len=4), (1, 2, 4, 8),
                                          (1, 1, 4, 8))),
        ("SwiGLUMLP module", module(lambda: SwiGLUMLP(8, 16), (2, 8))),
    ]


def _outputs(out):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]


def _median_us(fn, n: int) -> float:
    for _ in range(max(200, n // 10)):
        fn()
    clock = time.perf_counter_ns
    times = []
    for _ in range(n):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times) / 1e3


def measure(n: int) -> dict:
    results = {}
    for name, make in _cases():
        with torch.no_grad():
            call = make(False)
            no_grad = _median_us(call, n)
        call = make(True)
        outs = _outputs(call())
        grads = [torch.randn_like(o) for o in outs]

        def step(call=call, grads=grads):
            torch.autograd.backward(_outputs(call()), grads)

        with_grad = _median_us(step, n)
        results[name] = {"no_grad_us": no_grad, "grad_us": with_grad}
        print(f"{name:32s} {no_grad:8.2f} {with_grad:8.2f}", flush=True)
    return results


def table(before: dict | None, after: dict) -> str:
    head = "| op | no grad (us) | fwd+bwd (us) |"
    if before:
        head = "| op | no grad before | no grad after | fwd+bwd before | fwd+bwd after |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, a in after["results"].items():
        if before:
            b = before["results"].get(name)
            if b is None:
                continue
            lines.append(f"| {name} | {b['no_grad_us']:.1f} | {a['no_grad_us']:.1f} | {b['grad_us']:.1f} | "
                         f"{a['grad_us']:.1f} |")
        else:
            lines.append(f"| {name} | {a['no_grad_us']:.1f} | {a['grad_us']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=20000, help="timed calls per op and mode (median reported)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="print the table of two JSON runs")
    args = p.parse_args(argv)
    if args.compare:
        before, after = (json.load(open(f)) for f in args.compare)
        print(table(before, after))
        return 0
    import llama3_kernels

    print(f"torch {torch.__version__}, llama3_kernels from {os.path.dirname(llama3_kernels.__file__)}")
    print(f"{'op':32s} {'no grad':>8s} {'fwd+bwd':>8s}   (median us per call)")
    run = {"torch": torch.__version__, "package": os.path.dirname(llama3_kernels.__file__), "n": args.n,
           "results": measure(args.n)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(run, f, indent=1)
    print(table(None, run))
    return 0


if __name__ == "__main__":
    sys.exit(main())

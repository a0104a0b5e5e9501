#!/usr/bin/env python3
"""Host cost of each public op on tiny CPU float32 tensors: the Python, dispatch and autograd
time around the C call, which is what a host-bound (small-shape) GPU run pays per op.

For every op, the median wall time of one call over many thousand calls, without grad and with
grad (forward + backward through torch.autograd.backward).  The kernels themselves take well
under a microsecond at these shapes, so the numbers are host cost.

    PYTHONPATH=python python3 tools/host_cost_ops.py                      # this package alone
    PYTHONPATH=python python3 tools/host_cost_ops.py --against /old/python --json cmp.json

--against DIR times this package and the one under DIR (the python/ directory of another
checkout, e.g. ``git archive <rev> python | tar -x -C /old``) in two worker processes, taking
turns op by op over several rounds, so that both see the same machine load; the table gives
the median over the rounds of each side's median.  Use it for before/after numbers: separate
runs on a shared machine differ by tens of percent.  Threads are pinned to one (OpenMP and
torch) so that the kernels' thread pools stay out of it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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
        (
            "flash_attn",
            simple(lambda q, k, v: l3k.flash_attn(q, k, v, causal=True), (1, 2, 4, 8), (1, 1, 4, 8), (1, 1, 4, 8)),
        ),
        ("linear", simple(l3k.linear, (2, 8), (4, 8))),
        ("linear + residual", simple(l3k.linear, (2, 8), (4, 8), (2, 4))),
        ("RMSNorm module", module(lambda: RMSNorm(8), (2, 8))),
        ("RotaryEmbedding module", module(lambda: RotaryEmbedding(8, max_seq_len=4), (1, 2, 4, 8), (1, 1, 4, 8))),
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


class Timer:
    """Each case's call (no grad) and step (forward + backward), made once, timed on demand."""

    def __init__(self):
        self.cases = dict(_cases())
        self.calls = {}

    def _call(self, name: str, grad: bool):
        key = (name, grad)
        if key not in self.calls:
            make = self.cases[name]
            if not grad:
                with torch.no_grad():
                    self.calls[key] = make(False)
            else:
                call = make(True)
                grads = [torch.randn_like(o) for o in _outputs(call())]

                def step(call=call, grads=grads):
                    torch.autograd.backward(_outputs(call()), grads)

                self.calls[key] = step
        return self.calls[key]

    def median_us(self, name: str, grad: bool, n: int) -> float:
        fn = self._call(name, grad)
        if grad:
            return _median_us(fn, n)
        with torch.no_grad():
            return _median_us(fn, n)


def measure(n: int) -> dict:
    timer, results = Timer(), {}
    for name in timer.cases:
        no_grad, with_grad = timer.median_us(name, False, n), timer.median_us(name, True, n)
        results[name] = {"no_grad_us": no_grad, "grad_us": with_grad}
        print(f"{name:32s} {no_grad:8.2f} {with_grad:8.2f}", flush=True)
    return results


def _worker() -> int:
    """Answer 'name<TAB>grad<TAB>n' lines with the median in microseconds (first line: the names)."""
    timer = Timer()
    print(json.dumps(list(timer.cases)), flush=True)
    for line in sys.stdin:
        name, grad, n = line.rstrip("\n").split("\t")
        print(timer.median_us(name, grad == "1", int(n)), flush=True)
    return 0


def _spawn(pythonpath: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=pythonpath)
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker"],
        env=env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


def compare_live(before_path: str, n: int, rounds: int) -> tuple[dict, dict]:
    after_path = os.environ.get("PYTHONPATH", "")
    workers = {"before": _spawn(before_path), "after": _spawn(after_path)}
    names = {side: json.loads(w.stdout.readline()) for side, w in workers.items()}
    common = [x for x in names["after"] if x in names["before"]]
    samples = {side: {(x, g): [] for x in common for g in (False, True)} for side in workers}
    for r in range(rounds):
        order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
        for key in samples["after"]:
            for side in order:
                w = workers[side]
                w.stdin.write(f"{key[0]}\t{int(key[1])}\t{n}\n")
                w.stdin.flush()
                samples[side][key].append(float(w.stdout.readline()))
        print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    for w in workers.values():
        w.stdin.close()
        w.wait()
    out = {}
    for side, path in (("before", before_path), ("after", after_path)):
        res = {
            x: {
                "no_grad_us": statistics.median(samples[side][(x, False)]),
                "grad_us": statistics.median(samples[side][(x, True)]),
            }
            for x in common
        }
        out[side] = {"package": path, "n": n, "rounds": rounds, "results": res}
    return out["before"], out["after"]


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
            lines.append(
                f"| {name} | {b['no_grad_us']:.1f} | {a['no_grad_us']:.1f} | {b['grad_us']:.1f} | {a['grad_us']:.1f} |"
            )
        else:
            lines.append(f"| {name} | {a['no_grad_us']:.1f} | {a['grad_us']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=20000, help="timed calls per op and mode (median reported)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--against", metavar="DIR", help="compare with the package under DIR, taking turns (see above)")
    p.add_argument("--rounds", type=int, default=5, help="rounds of turns with --against")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="print the table of two JSON runs")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker()
    if args.compare:
        before, after = (json.load(open(f)) for f in args.compare)
        print(table(before, after))
        return 0
    if args.against:
        before, after = compare_live(args.against, args.n, args.rounds)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"torch": torch.__version__, "before": before, "after": after}, f, indent=1)
        print(
            f"torch {torch.__version__}; median over {args.rounds} rounds of each side's median of {args.n} calls, us"
        )
        print(table(before, after))
        return 0
    import llama3_kernels

    print(f"torch {torch.__version__}, llama3_kernels from {os.path.dirname(llama3_kernels.__file__)}")
    print(f"{'op':32s} {'no grad':>8s} {'fwd+bwd':>8s}   (median us per call)")
    run = {
        "torch": torch.__version__,
        "package": os.path.dirname(llama3_kernels.__file__),
        "n": args.n,
        "results": measure(args.n),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(run, f, indent=1)
    print(table(None, run))
    return 0


if __name__ == "__main__":
    sys.exit(main())

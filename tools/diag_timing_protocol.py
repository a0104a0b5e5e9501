#!/usr/bin/env python3
"""Why the block bench's ratios depend on how contenders are timed: the LLaMA-3-8B layer's
inference forward (ours, PyTorch eager, the bare GEMMs) timed alone in turn in two orders,
alone with a sync after every repetition, alone in alternating blocks, and in shared rotating
rounds, with the SM clock and board power that nvidia-smi samples every 20 ms during each phase.
(A run with the GPU sleeping ~2 ms before each timed region, so that the host was always ahead,
ran at ~1900 MHz and gave the same ratios as the rounds: host launches are not the difference.)

  python3 tools/diag_timing_protocol.py [--reps 60]
"""

import argparse
import statistics
import subprocess
import time

import torch

from llama3_kernels import TritonLlama3Block
from llama3_kernels.bench import Timer
from llama3_kernels.bench_block import GPU_CONFIGS, _gemms
from llama3_kernels.ops.rope import llama3_rope_cos_sin
from llama3_kernels.reference import TorchLlama3Block


class Sampler:
    """nvidia-smi's SM clock (MHz) and power (W), stamped with the host clock."""

    def __init__(self):
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits", "-lms", "20"],
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.samples = []
        import threading

        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                mhz, watts = (float(v) for v in line.split(","))
                self.samples.append((time.time(), mhz, watts))
            except ValueError:
                pass

    def between(self, t0, t1):
        got = [(m, w) for t, m, w in self.samples if t0 <= t <= t1]
        if not got:
            return "no samples"
        return f"{statistics.mean(m for m, _ in got):6.0f} MHz {statistics.mean(w for _, w in got):5.0f} W"

    def stop(self):
        self.proc.terminate()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=60)
    args = ap.parse_args()
    cfg = GPU_CONFIGS[0]
    dev = torch.device("cuda")
    torch.manual_seed(0)
    ref = TorchLlama3Block(cfg.dim, cfg.hidden, cfg.heads, cfg.kv_heads, causal=True, device=dev, dtype=cfg.dtype)
    ours = TritonLlama3Block(cfg.dim, cfg.hidden, cfg.heads, cfg.kv_heads, causal=True, device=dev, dtype=cfg.dtype)
    ours.load_state_dict(ref.state_dict())
    cos, sin = llama3_rope_cos_sin(cfg.seq, cfg.dim // cfg.heads, device=dev)
    x = torch.randn(cfg.batch, cfg.seq, cfg.dim, device=dev, dtype=cfg.dtype)
    gemms, _ = _gemms(cfg, dev)

    def infer(block):
        def run():
            with torch.no_grad():
                block(x, cos, sin)

        return run

    xg = x.clone().requires_grad_()
    dy = torch.randn_like(x)

    def train(block):
        def run():
            xg.grad = None
            for p in block.parameters():
                p.grad = None
            block(xg, cos, sin).backward(dy)

        return run

    fns = {
        "GEMMs alone": gemms,
        "ours": infer(ours),
        "eager": infer(ref),
        "ours step": train(ours),
        "eager step": train(ref),
    }
    for fn in fns.values():  # first calls tune the GEMMs and build cuDNN plans
        fn()
        fn()
    timer = Timer(dev, reps=args.reps, warmup=5)
    sampler = Sampler()
    time.sleep(0.5)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  reps {args.reps}")

    def phase(name, run):
        torch.cuda.synchronize()
        t0 = time.time()
        res = run()
        torch.cuda.synchronize()
        t1 = time.time()
        for label, ms in res.items():
            print(f"{name:<34} {label:<24} {ms:7.3f} ms")
        print(f"{'':<34} {'(phase)':<12} {sampler.between(t0, t1)}")

    def alone(order):
        return lambda: {label: timer(fns[label]) for label in order}

    def alone_synced(order):
        def run():
            out = {}
            for label in order:
                times = []
                for _ in range(args.reps):
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    timer.flush.sum()
                    s.record()
                    fns[label]()
                    e.record()
                    torch.cuda.synchronize()
                    times.append(s.elapsed_time(e))
                out[label] = statistics.median(times)
            return out

        return run

    def timed(label):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        timer.flush.sum()
        s.record()
        fns[label]()
        e.record()
        return s, e

    def alternating_blocks(order, blocks=6, per_block=25, skip=5):
        """Each contender alone for `per_block` reps, contenders alternating block by block (drift
        cancels); the first `skip` reps of a block (the switch) are reported apart."""

        def run():
            steady, first = {l: [] for l in order}, {l: [] for l in order}
            for _ in range(blocks):
                for label in order:
                    marks = [timed(label) for _ in range(per_block)]
                    torch.cuda.synchronize()
                    t = [s.elapsed_time(e) for s, e in marks]
                    first[label] += t[:skip]
                    steady[label] += t[skip:]
            out = {f"{l} steady": statistics.median(steady[l]) for l in order}
            out.update({f"{l} after switch": statistics.median(first[l]) for l in order})
            return out

        return run

    def paired_rounds(order, rounds=30):
        """Shared rounds in which each contender runs twice in a row: the first run follows another
        contender, the second follows itself."""

        def run():
            after_other, after_self = {l: [] for l in order}, {l: [] for l in order}
            for r in range(rounds):
                rot = order[r % len(order) :] + order[: r % len(order)]
                marks = [(label, i, timed(label)) for label in rot for i in range(2)]
                torch.cuda.synchronize()
                for label, i, (s, e) in marks:
                    (after_self if i else after_other)[label].append(s.elapsed_time(e))
            out = {f"{l} after another": statistics.median(after_other[l]) for l in order}
            out.update({f"{l} after itself": statistics.median(after_self[l]) for l in order})
            return out

        return run

    phase("alone, GEMMs/ours/eager", alone(["GEMMs alone", "ours", "eager"]))
    phase("alternating blocks of 25", alternating_blocks(["ours", "eager", "GEMMs alone"]))
    phase("paired shared rounds", paired_rounds(["ours", "eager", "GEMMs alone"]))
    phase("fwd+bwd, alternating blocks of 25", alternating_blocks(["ours step", "eager step"]))
    phase("fwd+bwd, shared rounds", lambda: timer.rounds({k: fns[k] for k in ("ours step", "eager step")}))
    phase("alone, eager/ours/GEMMs", alone(["eager", "ours", "GEMMs alone"]))
    phase("alone, sync every rep", alone_synced(["eager", "ours", "GEMMs alone"]))
    fwd = {k: fns[k] for k in ("GEMMs alone", "ours", "eager")}
    phase("shared rounds", lambda: timer.rounds(fwd))
    for label in ("ours", "eager", "GEMMs alone"):
        phase(f"alone, {label} per-phase clock", alone([label]))
    sampler.stop()


if __name__ == "__main__":
    main()

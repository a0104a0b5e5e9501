"""The block benchmark (the main job): Llama3Block against the same block in PyTorch
eager and under torch.compile, forward and forward+backward, extra peak memory, and the
time each spends outside its GEMMs (the GEMMs timed alone in the same run).

Configurations on a GPU: the LLaMA-3-8B layer (bf16, GQA 32/8, causal, batch 2, seq 2048),
the tutorial's benchmark config (fp16, MHA, not causal) and the tutorial's test shape.
Without a GPU: one small float32 config on the CPU path.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import torch

from .block import Llama3Block
from .ops.rope import llama3_rope_cos_sin
from .reference import TorchLlama3Block


@dataclass
class BlockConfig:
    name: str
    dim: int
    hidden: int
    heads: int
    kv_heads: int
    causal: bool
    dtype: torch.dtype
    batch: int
    seq: int
    backward: bool = True
    graphs: bool = False  # also time forward replays of CUDA graphs (hand-captured, reduce-overhead)
    results: dict = field(default_factory=dict)  # (variant, "fwd"|"fwd+bwd"|"mem") -> value

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def forward_flops(self) -> float:
        t, d, hd = self.tokens, self.dim, self.dim // self.heads
        qkv = d + 2 * self.kv_heads * hd
        gemm = 2 * t * d * (qkv + d + 3 * self.hidden)
        attn = 4 * self.batch * self.heads * self.seq * self.seq * hd * (0.5 if self.causal else 1.0)
        return gemm + attn


GPU_CONFIGS = [
    BlockConfig("llama3-8b layer", 4096, 14336, 32, 8, True, torch.bfloat16, 2, 2048),
    BlockConfig("tutorial bench", 4096, 14336, 32, 32, False, torch.float16, 2, 2048),
    BlockConfig("tutorial test", 512, 2048, 8, 8, False, torch.float16, 2, 128, graphs=True),
]
CPU_CONFIGS = [BlockConfig("small (CPU)", 256, 512, 4, 2, True, torch.float32, 2, 64)]


def _gemms(cfg: BlockConfig, device):
    """The block's bare GEMMs (q/k/v fused, gate/up fused), forward and forward+backward."""
    t, d, hd = cfg.tokens, cfg.dim, cfg.dim // cfg.heads
    mk = lambda *s: torch.randn(*s, device=device, dtype=cfg.dtype) * 0.02
    shapes = [(d, d + 2 * cfg.kv_heads * hd), (d, d), (d, 2 * cfg.hidden), (cfg.hidden, d)]
    xs = [mk(t, k) for k, _ in shapes]
    ws = [mk(n, k) for k, n in shapes]
    dys = [mk(t, n) for _, n in shapes]

    def fwd():
        for x, w in zip(xs, ws):
            x @ w.T

    def fwd_bwd():
        for x, w, dy in zip(xs, ws, dys):
            x @ w.T
            dy @ w
            dy.T @ x

    return fwd, fwd_bwd


def _print_flushed(msg: str) -> None:
    print(msg, flush=True)


def run_block_suite(timer, device, compile_ok: bool, log=_print_flushed, only=None) -> list[BlockConfig]:
    """`only`: name prefixes of the configs to run (None: all of the device's configs).
    `log` gets a line as each config and pass starts and ends."""
    configs = GPU_CONFIGS if device.type == "cuda" else CPU_CONFIGS
    if only:
        configs = [c for c in configs if any(c.name.startswith(o) for o in only)]
        if not configs:
            raise SystemExit(f"--configs {','.join(only)}: no block config of this device matches")
    for cfg in configs:
        log(
            f"{cfg.name}: building the blocks (batch {cfg.batch}, seq {cfg.seq}, dim {cfg.dim}, "
            f"{str(cfg.dtype).replace('torch.', '')})"
        )
        torch.manual_seed(0)
        ref = TorchLlama3Block(
            cfg.dim, cfg.hidden, cfg.heads, cfg.kv_heads, causal=cfg.causal, device=device, dtype=cfg.dtype
        )
        ours = Llama3Block(
            cfg.dim, cfg.hidden, cfg.heads, cfg.kv_heads, causal=cfg.causal, device=device, dtype=cfg.dtype
        )
        ours.load_state_dict(ref.state_dict())
        cos, sin = llama3_rope_cos_sin(cfg.seq, cfg.dim // cfg.heads, device=device)
        x = torch.randn(cfg.batch, cfg.seq, cfg.dim, device=device, dtype=cfg.dtype)
        dy = torch.randn_like(x)
        variants = {"llama3_kernels": ours, "eager": ref}
        if compile_ok:
            variants["torch.compile"] = torch.compile(ref)
            variants["llama3_kernels compiled"] = torch.compile(ours)
        gemm_fwd, gemm_fb = _gemms(cfg, device)
        xg = x.clone().requires_grad_()

        def inference(block):
            def run():
                with torch.no_grad():
                    block(x, cos, sin)

            return run

        def training_step(block):
            params = list(getattr(block, "_orig_mod", block).parameters())

            def clear_grads():
                xg.grad = None
                for p in params:
                    p.grad = None

            def run():
                clear_grads()
                block(xg, cos, sin).backward(dy)

            run.clear_grads = clear_grads
            return run

        # Each pass twice: clock-equalized (shared rounds) and each contender alone in steady state.
        fwd = {"GEMMs alone": gemm_fwd, **{label: inference(b) for label, b in variants.items()}}
        steps = {"GEMMs alone": gemm_fb, **{label: training_step(b) for label, b in variants.items()}}
        passes = [("fwd", fwd)] + ([("fwd+bwd", steps)] if cfg.backward else [])
        for kind, fns in passes:
            for protocol, how in (("", timer.rounds), (" steady", timer.steady)):
                if protocol and device.type != "cuda":
                    continue
                what = f"{cfg.name} {kind}{protocol}"
                log(
                    f"{what}: start ({len(fns)} contenders"
                    + (", the first calls compile)" if compile_ok and not protocol else ")")
                )
                t0 = time.perf_counter()
                times = how(fns)
                for label, t in times.items():
                    cfg.results[(label, kind + protocol)] = t
                log(
                    f"{what}: done in {time.perf_counter() - t0:.1f} s: "
                    + ", ".join(f"{label} {t:.3f} ms" for label, t in times.items())
                )
        if cfg.backward and device.type == "cuda":
            for label in variants:
                cfg.results[(label, "mem")] = _extra_peak_mib(steps[label])
            log(
                f"{cfg.name}: extra peak MiB of a training step: "
                + ", ".join(f"{label} {cfg.results[(label, 'mem')]:.0f}" for label in variants)
            )
        if cfg.graphs and device.type == "cuda":
            try:
                _time_graphs(cfg, timer, {"llama3_kernels": ours, "eager": ref}, x, cos, sin, compile_ok, log)
            except RuntimeError as e:  # report it and keep the rest of the run
                log(f"{cfg.name}: CUDA-graph timing failed: {str(e).splitlines()[0]}")
        del ref, ours, variants
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return configs


def _extra_peak_mib(step) -> float:
    """Peak memory of one training step above what was allocated before it (grads cleared)."""
    step()
    step.clear_grads()
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def capture_forward(block, x, cos, sin):
    """`block`'s inference forward captured by hand in a CUDA graph (warmed up on a side
    stream first, as capture requires). Returns replay(): copies `x` into the graph's input
    buffer and replays."""
    static_x = x.clone()
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                block(static_x, cos, sin)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            block(static_x, cos, sin)

    def replay():
        static_x.copy_(x)
        g.replay()

    return replay


def _time_graphs(cfg, timer, blocks, x, cos, sin, compile_ok, log) -> None:
    """Forward under CUDA graphs: captured by hand with torch.cuda.graph, and through
    torch.compile(mode="reduce-overhead"); the input is copied into the graph's buffer."""
    for label, block in blocks.items():
        replay = capture_forward(block, x, cos, sin)
        with torch.no_grad():
            cfg.results[(f"{label} cuda graph", "fwd")] = t = timer(replay)
        log(f"{cfg.name}: {label} forward, hand-captured CUDA graph {t * 1e3:.1f} us")
        if compile_ok:
            ro = torch.compile(block, mode="reduce-overhead")
            with torch.no_grad():
                cfg.results[(f"{label} reduce-overhead", "fwd")] = t = timer(lambda: ro(x, cos, sin))
            log(f"{cfg.name}: {label} forward, torch.compile reduce-overhead {t * 1e3:.1f} us")


KINDS = ("fwd", "fwd steady", "fwd+bwd", "fwd+bwd steady")


def print_block_table(configs: list[BlockConfig], caveat: str | None = None) -> None:
    """'fwd', 'fwd+bwd': clock-equalized (shared rounds); '... steady': each contender alone.
    With a caveat (the CPU run): the times only, under the caveat; the ratios would rank the
    library on numbers that say nothing about it, and the time outside the GEMMs, GEMMs timed
    apart on a busy CPU, comes out negative."""
    labels = ["llama3_kernels", "eager", "torch.compile"]
    print(f"block: {caveat}" if caveat else "block: median times; ours/x = our time over x's (< 1: we are faster)")
    print(
        f"{'block':<16} {'pass':<15} "
        + " ".join(f"{l:>15}" for l in labels)
        + f" {'GEMMs alone':>12}"
        + ("" if caveat else f" {'ours/eager':>10} {'ours/compile':>12}")
    )
    for cfg in configs:
        for kind in KINDS:
            row = [cfg.results.get((l, kind)) for l in labels]
            if row[0] is None:
                continue
            cells = " ".join(f"{v:>12.3f} ms" if v is not None else f"{'-':>15}" for v in row)
            ratio = lambda v: f"{row[0] / v:>9.2f}x" if v else f"{'-':>10}"
            print(
                f"{cfg.name:<16} {kind:<15} {cells} {cfg.results[('GEMMs alone', kind)]:>9.3f} ms"
                + ("" if caveat else f" {ratio(row[1])} {ratio(row[2]):>12}")
            )
    extra = sorted({l for c in configs for (l, k) in c.results if l not in labels + ["GEMMs alone"]})
    if extra:
        print()
        print(f"{'block':<16} {'variant':<40} " + " ".join(f"{k:>15}" for k in KINDS))
        for cfg in configs:
            for l in extra:
                vals = [cfg.results.get((l, k)) for k in KINDS]
                if all(v is None for v in vals):
                    continue
                print(
                    f"{cfg.name:<16} {l:<40} "
                    + " ".join(f"{v:>12.3f} ms" if v is not None else f"{'-':>15}" for v in vals)
                )
    if caveat:
        return
    print()
    print(f"{'block':<16} {'time outside the GEMMs (ms)':<34} {'extra peak MiB fwd+bwd':>40}")
    for cfg in configs:

        def out(label, kind):
            v = cfg.results.get((label, kind))
            return f"{v - cfg.results[('GEMMs alone', kind)]:.3f}" if v is not None else "-"

        mem = lambda l: f"{cfg.results[(l, 'mem')]:.0f}" if (l, "mem") in cfg.results else "-"
        cells = "  ".join(
            f"{k}: ours {out('llama3_kernels', k)} compile {out('torch.compile', k)}"
            for k in KINDS
            if (("llama3_kernels", k) in cfg.results)
        )
        print(
            f"{cfg.name:<16} {cells}   mem: ours {mem('llama3_kernels')} eager {mem('eager')} "
            f"compile {mem('torch.compile')}"
        )


GRAPHED = (" cuda graph", " reduce-overhead")


def block_plot_rows(configs: list[BlockConfig]) -> list[tuple[str, str, dict, dict]]:
    """(group, row label, contender -> median ms, reference -> median ms) per config and pass;
    the CUDA-graph forwards get a row of their own, against the same pass's references."""
    rows = []
    for cfg in configs:
        group = f"{cfg.name}\n{cfg.batch}x{cfg.seq}x{cfg.dim} {str(cfg.dtype).replace('torch.', '')}"
        for kind in KINDS:
            times = {l: v for (l, k), v in cfg.results.items() if k == kind and l != "GEMMs alone"}
            graphed = {l: times.pop(l) for l in list(times) if l.endswith(GRAPHED)}
            refs = {l: times[l] for l in ("torch.compile", "eager") if l in times}
            if "llama3_kernels" in times:
                rows.append((group, kind, times, refs))
            if graphed:
                rows.append((group, f"{kind}, CUDA graphs", graphed, refs))
    return rows


def block_records(configs: list[BlockConfig]) -> list[dict]:
    recs = []
    for cfg in configs:
        recs.append(
            {
                "config": cfg.name,
                "dim": cfg.dim,
                "hidden": cfg.hidden,
                "heads": cfg.heads,
                "kv_heads": cfg.kv_heads,
                "causal": cfg.causal,
                "dtype": str(cfg.dtype).replace("torch.", ""),
                "batch": cfg.batch,
                "seq": cfg.seq,
                "forward_tflop": cfg.forward_flops() / 1e12,
                "median_ms": {f"{l} {k}": v for (l, k), v in cfg.results.items() if k != "mem"},
                "extra_peak_mib_fwd_bwd": {l: v for (l, k), v in cfg.results.items() if k == "mem"},
            }
        )
    return recs

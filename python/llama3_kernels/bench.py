"""The main job: benchmark the library's ops against PyTorch eager and torch.compile.

    python -m llama3_kernels.bench [--suite rmsnorm] [--out bench_out]

On a GPU it times the real shapes (bf16) with CUDA events, the L2 cache flushed
before every repetition, and reports medians next to the copy bandwidth
measured in the same run; the plot shows each contender's median as a ratio
to torch.compile's and to eager's.  Without a GPU it runs the CPU reference
kernels on small shapes: those times only show that the path runs, and the
table, JSON and plot say so and rank nothing.  It prints a table and writes
JSON (card, versions, date, shapes, medians) and a PNG plot.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import _lib
from .ops.rmsnorm import add_rms_norm, rms_norm

# ---- timing ----------------------------------------------------------------------------


class Timer:
    """Median wall time of callables: CUDA events with an L2 flush on the GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device, reps: int, warmup: int, hide_host: bool = False):
        self.device, self.reps, self.warmup = device, reps, warmup
        # hide_host: the GPU spins ~0.5 ms (1M cycles) before each timed region, so the host has
        # queued the whole region when it starts and the time is the GPU's alone.  For kernels of
        # tens of microseconds, whose host path (Python, DLPack, dispatch) can take longer than
        # the kernel: without it the region measures the host.
        self.hide_host = hide_host
        # 256 MiB read before every repetition evicts the L2.  A read, not a write:
        # zeroing the buffer leaves ~50 MB of dirty lines whose write-back the
        # timed kernel would pay (a same-size copy measured 28-32 us that way
        # against 21-22 us after a read, on the H100).
        self.flush = torch.ones(64 << 20, dtype=torch.float32, device=device) if device.type == "cuda" else None

    def _events(self, n: int) -> list:
        """n (start, end) event pairs, made before any timing: creating them inside the timed loop
        put ~0.1 ms of host work between repetitions of host-bound calls (the tutorial test shape)."""
        if self.device.type != "cuda":
            return [None] * n
        return [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]

    def _start(self, fn: Callable[[], object], pair):
        """Runs fn once, timed: ms on the CPU, the recorded event pair (read after a sync) on the GPU."""
        if pair is None:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        s, e = pair
        self.flush.sum()  # evict L2 (clean lines) so every repetition reads from memory
        if self.hide_host:
            torch.cuda._sleep(1_000_000)
        s.record()
        fn()
        e.record()
        return pair

    def _read(self, marks: list) -> list[float]:
        if self.device.type != "cuda":
            return marks
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in marks]

    def _timed_reps(self, fn: Callable[[], object], n: int) -> list[float]:
        """n back-to-back repetitions (the host queues ahead of the GPU), ms each."""
        pairs = self._events(n)
        return self._read([self._start(fn, p) for p in pairs])

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return statistics.median(self._timed_reps(fn, self.reps))

    def rounds(self, fns: dict[str, Callable[[], object]]) -> dict[str, float]:
        """Clock-equalized: every round times each callable once, in an order rotated by one from
        the last round's, so all see the same clocks.  The H100 it was measured on runs power-capped (~700 W):
        its SM clock fell from ~1870 to ~1500 MHz over a run, so callables timed one after the
        other each got the clock of their turn."""
        labels = list(fns)
        for label in labels:
            for _ in range(self.warmup):
                fns[label]()
        times: dict[str, list[float]] = {label: [] for label in labels}
        for r in range(self.reps):
            order = labels[r % len(labels) :] + labels[: r % len(labels)]
            pairs = self._events(len(order))
            for label, ms in zip(order, self._read([self._start(fns[l], p) for l, p in zip(order, pairs)])):
                times[label].append(ms)
        return {label: statistics.median(t) for label, t in times.items()}

    def steady(self, fns: dict[str, Callable[[], object]], blocks: int = 4, skip: int = 5) -> dict[str, float]:
        """Steady state, as a user running one of them sees it: each callable alone for a block of
        reps/blocks repetitions, the callables taking turns block by block (drift cancels); the
        first `skip` repetitions of each block, while the clock settles after the switch, are
        dropped.  Power-capped, a card clocks code with more memory-bound time (less power per
        second) higher: on the H100 a PyTorch eager step ran ~4% faster at the end of its block
        than just after our block's, ours ~4% slower (tools/diag_timing_protocol.py)."""
        per_block = max(skip + 5, self.reps // blocks)
        times: dict[str, list[float]] = {label: [] for label in fns}
        for _ in range(blocks):
            for label, fn in fns.items():
                times[label] += self._timed_reps(fn, per_block)[skip:]
        return {label: statistics.median(t) for label, t in times.items()}


def copy_bandwidth(timer: Timer, device) -> float:
    """Device-to-device copy, bytes read + written per second (the memory ceiling)."""
    n = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * n / (ms * 1e-3)


# ---- cases -----------------------------------------------------------------------------


@dataclass
class Case:
    op: str
    shape: tuple
    dtype: torch.dtype
    bytes: int  # fewest bytes the op must move
    variants: dict[str, Callable]  # label -> callable running the op once
    results: dict[str, float] = field(default_factory=dict)


def eager_rmsnorm(x, w, eps=1e-5):
    """The tutorial's PyTorch RMSNorm, as a user would write it."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rmsnorm_cases(device, dtype, compile_ok: bool) -> list[Case]:
    rows, n = (4096, 4096) if device.type == "cuda" else (512, 1024)
    x = torch.randn(rows, n, device=device, dtype=dtype)
    w = torch.randn(n, device=device, dtype=dtype)
    es = x.element_size()
    fwd = {"llama3_kernels": lambda: rms_norm(x, w), "eager": lambda: eager_rmsnorm(x, w)}
    if compile_ok:
        compiled = torch.compile(eager_rmsnorm)
        fwd["torch.compile"] = lambda: compiled(x, w)

    xg = x.clone().requires_grad_()
    wg = w.clone().requires_grad_()
    dy = torch.randn_like(x)

    def fwd_bwd(f):
        def run():
            xg.grad = wg.grad = None
            f(xg, wg).backward(dy)

        return run

    fb = {"llama3_kernels": fwd_bwd(rms_norm), "eager": fwd_bwd(eager_rmsnorm)}
    if compile_ok:
        fb["torch.compile"] = fwd_bwd(compiled)
    r = torch.randn_like(x)

    def eager_add_rmsnorm(x, r, w):
        h = x + r
        return h, eager_rmsnorm(h, w)

    add = {"llama3_kernels": lambda: add_rms_norm(x, r, w), "eager": lambda: eager_add_rmsnorm(x, r, w)}
    if compile_ok:
        compiled_add = torch.compile(eager_add_rmsnorm)
        add["torch.compile"] = lambda: compiled_add(x, r, w)
    return [
        Case("rmsnorm forward", (rows, n), dtype, 2 * rows * n * es + n * es, fwd),
        # reads x and the residual, writes h and y
        Case("add+rmsnorm fwd", (rows, n), dtype, 4 * rows * n * es + n * es, add),
        # forward reads x, writes y; backward reads x, dy, writes dx (+ weight/dweight)
        Case("rmsnorm fwd+bwd", (rows, n), dtype, 5 * rows * n * es + 3 * n * es, fb),
    ]


def eager_rope(x, cos, sin):
    """Rotate-half RoPE as a user would write it: (batch, heads, seq, d), tables (seq, d/2)."""
    x1, x2 = x.chunk(2, -1)
    c, s = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def rope_cases(device, dtype, compile_ok: bool) -> list[Case]:
    from .ops.rope import llama3_rope_cos_sin, rope_

    B, Hq, Hk, S, D = (2, 32, 8, 2048, 128) if device.type == "cuda" else (1, 8, 2, 256, 128)
    q = torch.randn(B, Hq, S, D, device=device, dtype=dtype)
    k = torch.randn(B, Hk, S, D, device=device, dtype=dtype)
    cos, sin = llama3_rope_cos_sin(S, D, device=device)
    qkv = torch.randn(B, S, (Hq + 2 * Hk) * D, device=device, dtype=dtype)
    v4 = qkv.view(B, S, Hq + 2 * Hk, D)
    qv, kv = v4[:, :, :Hq].transpose(1, 2), v4[:, :, Hq : Hq + Hk].transpose(1, 2)
    es = q.element_size()
    nbytes = 2 * (q.numel() + k.numel()) * es + 2 * cos.numel() * cos.element_size()
    eager = lambda qq, kk: (eager_rope(qq, cos, sin), eager_rope(kk, cos, sin))
    contig = {"llama3_kernels": lambda: rope_(q, k, cos, sin), "eager": lambda: eager(q, k)}
    views = {"llama3_kernels": lambda: rope_(qv, kv, cos, sin), "eager": lambda: eager(qv, kv)}
    if compile_ok:
        compiled = torch.compile(eager)
        contig["torch.compile"] = lambda: compiled(q, k)
        views["torch.compile"] = lambda: compiled(qv, kv)
    return [
        Case("rope q+k in place", (B, Hq, Hk, S, D), dtype, nbytes, contig),
        Case("rope fused-QKV view", (B, Hq, Hk, S, D), dtype, nbytes, views),
    ]


def eager_swiglu_backward(da, g, u):
    sig = torch.sigmoid(g)
    return da * u * sig * (1 + g * (1 - sig)), da * g * sig


def swiglu_cases(device, dtype, compile_ok: bool) -> list[Case]:
    import torch.nn.functional as F

    from .ops.swiglu import swiglu_backward_into, swiglu_forward_into, swiglu_fused_forward_into

    rows, n = (4096, 14336) if device.type == "cuda" else (256, 2048)
    g = torch.randn(rows, n, device=device, dtype=dtype)
    u = torch.randn(rows, n, device=device, dtype=dtype)
    gu = torch.randn(rows, 2 * n, device=device, dtype=dtype)
    da = torch.randn(rows, n, device=device, dtype=dtype)
    a, dg, du = torch.empty_like(g), torch.empty_like(g), torch.empty_like(g)
    es = g.element_size()
    eager_f = lambda gg, uu: F.silu(gg) * uu
    eager_fused = lambda t: F.silu(t[:, :n]) * t[:, n:]
    fwd = {"llama3_kernels": lambda: swiglu_forward_into(g, u, a), "eager": lambda: eager_f(g, u)}
    fused = {"llama3_kernels": lambda: swiglu_fused_forward_into(gu, a), "eager": lambda: eager_fused(gu)}
    bwd = {
        "llama3_kernels": lambda: swiglu_backward_into(da, g, u, dg, du),
        "eager": lambda: eager_swiglu_backward(da, g, u),
    }
    if compile_ok:
        cf, cff, cb = torch.compile(eager_f), torch.compile(eager_fused), torch.compile(eager_swiglu_backward)
        fwd["torch.compile"] = lambda: cf(g, u)
        fused["torch.compile"] = lambda: cff(gu)
        bwd["torch.compile"] = lambda: cb(da, g, u)
    return [
        Case("swiglu forward", (rows, n), dtype, 3 * rows * n * es, fwd),
        Case("swiglu fused gu", (rows, n), dtype, 3 * rows * n * es, fused),
        Case("swiglu backward", (rows, n), dtype, 5 * rows * n * es, bwd),
    ]


SUITES = {"rmsnorm": rmsnorm_cases, "rope": rope_cases, "swiglu": swiglu_cases}


# ---- report ----------------------------------------------------------------------------

CPU_CAVEAT = (
    "CPU timings of the reference kernels on small shapes (float32): "
    "a check that the benchmark runs, not performance results"
)
REFS = ("torch.compile", "eager")


class Progress:
    """Log lines with the seconds since the run began, flushed at once: a block config runs
    silently for tens of seconds otherwise, and piped output would hold the lines back."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        print(f"[bench] ({time.perf_counter() - self.t0:6.1f} s) {msg}", flush=True)


def environment(device) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "llama3_kernels": ".".join(str(v) for v in _lib.version()),
        "library": _lib.library_path(),
        "device": str(device),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(card=p.name, sms=p.multi_processor_count, cuda=torch.version.cuda)
    else:
        env.update(card=f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads")
    return env


def record_header(gpu: bool, caveat: str | None, date: str, env: dict) -> dict:
    """The opening keys of a benchmark's JSON record: what its timings are (with the caveat of a
    CPU run), when and where they were taken."""
    return {
        "timings_are": "gpu" if gpu else "cpu reference",
        **({"caveat": caveat} if caveat else {}),
        "date_utc": date,
        "environment": env,
    }


@dataclass
class Run:
    """Where and how a benchmark's main() times (bench, bench_hf and bench_decode share it): the GPU
    unless none is usable or --cpu is given, else the CPU reference kernels in float32, with
    `caveat` saying what those timings are (None on the GPU)."""

    name: str  # the script, as its banner lines are prefixed: [bench], [bench_hf], ...
    gpu: bool
    device: torch.device
    dtype: torch.dtype
    date: str  # UTC, ISO 8601
    env: dict
    timer: Timer
    log: Progress
    caveat: str | None

    def header(self) -> dict:
        """The opening keys of the run's JSON record (record_header)."""
        return record_header(self.gpu, self.caveat, self.date, self.env)

    def copy_bandwidth(self) -> float:
        """Measures the copy bandwidth (bytes/s) with the run's timer and prints it."""
        bw = copy_bandwidth(self.timer, self.device)
        print(f"[{self.name}] copy bandwidth (read + write): {bw / 1e12:.3f} TB/s", flush=True)
        return bw


def bench_arguments(doc: str, writes: str, reps_help: str, compile_help: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: --out (the folder for `writes`), --reps, --no-compile
    and --cpu; each adds its own after."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out", help=f"folder for {writes}")
    ap.add_argument("--reps", type=int, default=None, help=reps_help)
    ap.add_argument("--no-compile", action="store_true", help=compile_help)
    ap.add_argument("--cpu", action="store_true", help="run the CPU path even where a GPU is present")
    return ap


def start_run(
    name: str,
    cpu_caveat: str,
    args: argparse.Namespace,
    default_reps: tuple[int, int] = (100, 10),
    warmup: tuple[int, int] = (5, 2),
    extra_env: dict | None = None,
) -> Run:
    """A benchmark's setup from its bench_arguments: the device (the CPU where --cpu), its dtype,
    a Timer (--reps where given, else default_reps; default_reps and warmup as (GPU, CPU)), the
    date and the environment (`extra_env`, e.g. the transformers version, after it); prints the
    banner: on the CPU why and `cpu_caveat` first, then the card, the versions and the date."""
    cpu, reps = args.cpu, args.reps
    log = Progress()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    gpu = torch.cuda.is_available() and not cpu and _lib.has_cuda()
    device = torch.device("cuda" if gpu else "cpu")
    timer = Timer(device, reps=reps or default_reps[not gpu], warmup=warmup[not gpu])
    extra_env = extra_env or {}
    env = {**environment(device), **extra_env}
    if not gpu:
        why = (
            "no CUDA GPU visible"
            if not torch.cuda.is_available()
            else ("--cpu given" if cpu else "library built without CUDA")
        )
        print(f"[{name}] {why}: {cpu_caveat}.", flush=True)
    versions = "".join(f", {k} {v}" for k, v in extra_env.items())
    print(
        f"[{name}] {env['card']}, torch {env['torch']}{versions}, llama3_kernels {env['llama3_kernels']} "
        f"(CUDA kernels {'built' if _lib.has_cuda() else 'NOT built: no nvcc when it was installed'}), {date}",
        flush=True,
    )
    dtype = torch.bfloat16 if gpu else torch.float32
    return Run(name, gpu, device, dtype, date, env, timer, log, None if gpu else cpu_caveat)


def transformers_version(needed_by: str | None = None) -> str | None:
    """transformers' version; where it is not installed None, or, where `needed_by` (what needs
    it) is given, an ImportError saying so."""
    try:
        import transformers
    except ImportError as e:
        if needed_by:
            raise ImportError(f"{needed_by} needs transformers (pip install transformers)") from e
        return None
    return transformers.__version__


def print_head(title: str, columns: str, caveat: str | None = None) -> None:
    """A table's title, the caveat (the CPU path's: its times are not results) as a banner, the
    column header and a rule under it."""
    print(title)
    if caveat:
        print(f"*** {caveat} ***")
    print(columns)
    print("-" * len(columns))


def print_table(cases: list[Case], bw: float, caveat: str | None = None) -> None:
    """With a caveat (the CPU run) only the times: the share of the copy-bandwidth floor would
    read as a ranking."""
    labels = sorted({k for c in cases for k in c.variants}, key=lambda k: (k != "llama3_kernels", k))
    head = f"{'op':<20} {'shape':<14} " + " ".join(f"{l:>16}" for l in labels)
    if not caveat:
        head += f" {'floor':>9} {'of floor':>9}"
    print_head(f"single ops: {caveat}" if caveat else "single ops: median times", head)
    for c in cases:
        floor_ms = c.bytes / bw * 1e3
        cells = " ".join(f"{c.results[l] * 1e3:>13.1f} us" if l in c.results else f"{'-':>16}" for l in labels)
        ours = c.results.get("llama3_kernels")
        frac = f"{floor_ms / ours:>8.0%}" if ours else "-"
        tail = "" if caveat else f" {floor_ms * 1e3:>6.1f} us {frac:>9}"
        print(f"{c.op:<20} {'x'.join(map(str, c.shape)):<14} {cells}{tail}")


def case_plot_rows(cases: list[Case]) -> list[tuple[str, str, dict, dict]]:
    """(group, row label, contender -> median ms, reference -> median ms), as
    bench_block.block_plot_rows."""
    return [
        (
            "single ops",
            f"{c.op} {'x'.join(map(str, c.shape))}",
            c.results,
            {r: c.results[r] for r in REFS if r in c.results},
        )
        for c in cases
    ]


def _ratio_ticks(lo: float, hi: float) -> list[float]:
    """Round ratios, 1 first, then outward, each far enough from the others to be read."""
    gap = math.log(hi / lo) / 9
    ticks = [1.0]
    for t in sorted(
        (t for t in (0.05, 0.1, 0.2, 0.5, 0.8, 0.9, 0.95, 1.05, 1.1, 1.25, 1.5, 2, 3, 5, 10, 20) if lo <= t <= hi),
        key=lambda t: abs(math.log(t)),
    ):
        if all(abs(math.log(t / u)) >= gap for u in ticks):
            ticks.append(t)
    return sorted(ticks)


def plot(
    rows: list[tuple[str, str, dict, dict]], path: Path, title: str, caveat: str | None = None, note: str | None = None
) -> bool:
    """On the GPU one column per reference (torch.compile, then eager) and one row of panels per
    group (block config, single ops), each with its own scale: a bar is a contender's median over
    the reference's, drawn from 1.0, so the few-percent gaps that matter show, where absolute times
    spanning decades, or one axis shared with the host-bound shape's 0.1x, would flatten them.
    With a caveat (the CPU run) plain times under it, nothing ranked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, NullLocator
    except ImportError:
        return False
    panels = [None] if caveat else [r for r in REFS if any(r in refs for *_, refs in rows)]

    def bars(times, refs, ref):
        if ref is None:
            return list(times.items())
        if ref not in refs:
            return []
        # the other reference last, so a contender sits in the same slot in both columns
        order = [l for l in times if l not in REFS] + [l for l in REFS if l in times and l != ref]
        return [(l, times[l] / refs[ref]) for l in order]

    groups: dict[str, list] = {}
    for group, label, times, refs in rows:
        per = [bars(times, refs, ref) for ref in panels]
        if any(per):
            groups.setdefault(group, []).append((label, max(map(len, per)), per))
    if not groups:
        return False
    slots = [sum(n + 1 for _, n, _ in entries) - 1 for entries in groups.values()]
    fig, axes = plt.subplots(
        len(groups),
        len(panels),
        squeeze=False,
        sharey="row",
        constrained_layout=True,
        gridspec_kw={"height_ratios": slots},
        figsize=(3 + 5.5 * len(panels), 1.6 + 0.17 * sum(slots) + 0.5 * len(groups)),
    )
    palette, colors = plt.get_cmap("tab10").colors, {}
    for (group, entries), row_axes in zip(groups.items(), axes):
        ys, y = [], 0
        for _, n, _ in entries:
            ys.append(y)
            y += n + 1
        for col, (ax, ref) in enumerate(zip(row_axes, panels)):
            values = [v for *_, per in entries for _, v in per[col]]
            if not values:
                ax.set_axis_off()
                continue
            span = values if ref is None else values + [1.0]
            pad = max(math.log(max(span) / min(span)), 0.1) * 0.15  # room for the value labels
            lo, hi = min(span) * math.exp(-pad), max(span) * math.exp(pad)
            base = 1.0 if ref else lo
            for y0, (_, _, per) in zip(ys, entries):
                for j, (l, v) in enumerate(per[col]):
                    c = colors.setdefault(l, palette[len(colors) % len(palette)])
                    ax.barh(y0 + j, v - base, 0.85, left=base, color=c, label=l)
                    text = f" {v:.3g} ms " if ref is None else f" {v:.2f} "
                    ax.text(v, y0 + j, text, va="center", ha="left" if v >= base else "right", fontsize=7)
            ax.set_xscale("log")
            ax.set_xlim(lo, hi)
            if ref is not None:
                ax.axvline(1.0, color="black", lw=1)
                ax.xaxis.set_major_locator(FixedLocator(_ratio_ticks(lo, hi)))
                ax.xaxis.set_major_formatter(lambda t, _: f"{t:g}")
                ax.xaxis.set_minor_locator(NullLocator())
            ax.grid(axis="x", alpha=0.3)
            ax.tick_params(axis="x", labelsize=8)
        ax0 = row_axes[0]
        ax0.set_yticks([y0 + (n - 1) / 2 for y0, (_, n, _) in zip(ys, entries)])
        ax0.set_yticklabels([label for label, *_ in entries], fontsize=8)
        ax0.set_ylim(y - 1.5, -0.5)
        ax0.set_ylabel(group, fontsize=9, fontweight="bold")
    for ax, ref in zip(axes[-1], panels):
        ax.set_xlabel(
            "median time (ms, log scale), CPU reference kernels" if ref is None else f"median time / {ref} median time"
        )
    for ax, ref in zip(axes[0], panels):
        if ref is not None:
            ax.set_title(f"ratio to {ref} (< 1: faster than {ref})", fontsize=9)
    handles = {}
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(l, h)
    axes[0][-1].legend(handles.values(), handles.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    if caveat:
        fig.suptitle(f"NOT PERFORMANCE RESULTS\n{textwrap.fill(caveat, 70)}\n{title}", fontsize=10, color="firebrick")
    else:
        fig.suptitle(title, fontsize=10)
    if note:
        fig.supxlabel(note, fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = bench_arguments(
        __doc__, "bench.json and bench.png", "timed repetitions per case", "skip the torch.compile peers"
    )
    ap.add_argument(
        "--suite",
        default="block",
        choices=["all", "block", *SUITES],
        help="block (default): the whole LLaMA-3 block; all: block and every op",
    )
    ap.add_argument(
        "--configs",
        default=None,
        help="block configs to run, comma-separated name prefixes (e.g. 'llama3-8b'); default all",
    )
    args = ap.parse_args(argv)

    run = start_run("bench", CPU_CAVEAT, args)
    gpu, device, timer, caveat, env = run.gpu, run.device, run.timer, run.caveat, run.env
    bw = run.copy_bandwidth()
    suites = SUITES if args.suite == "all" else {} if args.suite == "block" else {args.suite: SUITES[args.suite]}
    cases = [c for make in suites.values() for c in make(device, run.dtype, not args.no_compile)]
    blocks = []
    if args.suite in ("all", "block"):
        from .bench_block import run_block_suite

        only = [n.strip() for n in args.configs.split(",")] if args.configs else None
        blocks = run_block_suite(timer, device, not args.no_compile, log=run.log, only=only)
    for i, c in enumerate(cases, 1):
        for label, fn in c.variants.items():
            c.results[label] = timer(fn)
            run.log(f"({i}/{len(cases)}) {c.op} {label}: {c.results[label] * 1e3:.1f} us")

    print()
    if blocks:
        from .bench_block import print_block_table

        print_block_table(blocks, caveat)
    if cases:
        if blocks:
            print()
        print_table(cases, bw, caveat)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        **run.header(),
        "copy_bandwidth_Bps": bw,
        "timing": (
            f"median of {timer.reps} reps, CUDA events, L2 evicted by a 256 MiB read before each rep"
            if gpu
            else f"median of {timer.reps} reps, perf_counter"
        )
        + "; block contenders timed in shared rounds, order rotated each round (clock-equalized)"
        + (
            "; and in steady state (each alone for a block of repetitions, blocks alternating, "
            "the first 5 of each block dropped)"
            if gpu
            else ""
        ),
        "cases": [
            {
                "op": c.op,
                "shape": list(c.shape),
                "dtype": str(c.dtype).replace("torch.", ""),
                "min_bytes": c.bytes,
                "floor_ms": c.bytes / bw * 1e3,
                "median_ms": c.results,
            }
            for c in cases
        ],
    }
    if blocks:
        from .bench_block import block_records

        record["blocks"] = block_records(blocks)
    (out / "bench.json").write_text(json.dumps(record, indent=2))
    rows = case_plot_rows(cases)
    if blocks:
        from .bench_block import block_plot_rows

        rows = block_plot_rows(blocks) + rows
    note = None
    if gpu and blocks:
        note = (
            "block passes: fwd, fwd+bwd timed in shared rounds, order rotated each round (clock-equalized); "
            "'steady': each contender alone for a block of repetitions, blocks alternating"
        )
    drew = plot(rows, out / "bench.png", f"{env['card']} | torch {env['torch']} | {run.date}", caveat, note)
    print(
        f"\n[bench] wrote {out / 'bench.json'}"
        + (f" and {out / 'bench.png'}" if drew else " (matplotlib missing: no plot)")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

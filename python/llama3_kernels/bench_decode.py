"""Decoding with a KV cache: the library's decode attention against PyTorch's SDPA, one layer's
decode step against the time its weights take to read, and generate() of a Hugging Face
LlamaForCausalLM patched with ``llama3_kernels.hf`` against the same model unpatched.

    python -m llama3_kernels.bench_decode [--out bench_out] [--reps 100] [--no-compile]
                                          [--sections attention,layer,generate] [--cpu]

On a GPU, bf16, GQA 32/8 heads, head_dim 128, all in one process:

1. Decode attention of one query token per sequence over a full cache (batch 1 cache 4096,
   batch 8 cache 4096, batch 1 cache 32768, batch 64 cache 2048): ``attention_decode`` against
   ``F.scaled_dot_product_attention(q, k[:, :, :L], v[:, :, :L], enable_gqa=True)`` with the
   backend SDPA picks and with the flash, memory-efficient and cuDNN backends forced (a backend
   that refuses the call is reported and skipped).  Medians of CUDA-event timings with the L2
   evicted before each repetition and the GPU held ~0.5 ms before the timed region, so that the
   host has queued it (these kernels take less time than their host paths: GPU time, not host
   time), the contenders timed in shared rounds (order rotated each round); the KV bandwidth
   reached (bytes of K and V read / time) against the card's device-to-device copy bandwidth
   measured in the same run.  Bars: >= 80% of the copy bandwidth at batch 1 cache 32768 and
   batch 8 cache 4096, >= 1.5x the best SDPA backend at batch 1 cache 4096.
2. One decoder layer's decode step at LLaMA-3-8B sizes (dim 4096, hidden 14336), batch 1, one new
   token over a cache of 4096 (cache_range [0, 4096), the token rewritten at slot 4095 each
   call): ``Llama3Block.decode`` called again and again on the same buffers, so that the library
   replays it as one CUDA graph launch (and once with graph replay off), against the floor of
   reading the layer's weights (qkv, o, gate_up, down) at the copy bandwidth.  Bar: <= 1.3x.
3. generate() of a 4-layer LlamaForCausalLM with 8B layer sizes and a 32000-token vocabulary (to
   keep it small; LLaMA-3's is 128256), random init, greedy, prompt 512, 64 new tokens
   (min_new_tokens = max_new_tokens, so every run makes as many), batch 1 and 8: transformers
   with its dynamic cache; with ``cache_implementation="static"`` as generate runs it (compiled
   by generate itself where this transformers does so, with mode "reduce-overhead"; else
   model.forward is compiled explicitly, in a row of its own); patched with the dynamic cache, and
   with the static cache (generate's compile off: the library's own graph replay; and, where
   generate compiles, as generate compiles it); and ``llama3_kernels.hf.GreedyDecoder``, the
   library's own greedy loop over the same model (on CUDA one graph replay a token; one decoder
   a batch, whose graph the warmup captures).  Time per token = (median of generate with 64 new
   tokens - median with 1) / 63: the prefill cancels out; warmup calls (the compile) come first.
   Bar: ms/token <= 0.5x compiled static transformers'.  --no-compile runs the static
   cache of transformers uncompiled and skips the compiled rows.

Without a GPU, tiny float32 shapes time the C reference kernels and the CPU path of generate with
perf_counter: a check that the benchmark runs, not results.  Prints a table per section, the
project's bars beside the numbers, and writes JSON.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .bench import Timer, bench_arguments, print_head, start_run, transformers_version
from .bench_hf import build_model, model_shape

CPU_NOTE = "CPU reference timings, not results: tiny float32 shapes on the C reference kernels"

# The bars of the attention cases, in their order (on the CPU they are shown, not judged).
ATTENTION_BARS = ({"bar_speedup": 1.5}, {"bar_bandwidth": 0.8}, {"bar_bandwidth": 0.8}, {})


def decode_config(
    *,
    dim: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    attention_cases: list[tuple[int, int]],
    layer_cache: int,
    layers: int,
    vocab: int,
    batches: list[int],
    prompt: int,
    new_tokens: int,
) -> dict:
    """One run's sizes, section by section: the attention cases (batch, cache length), each with
    its bar from ATTENTION_BARS; the layer (batch 1, a cache of `layer_cache`); the generate() model
    (`layers` of the layer's sizes, a `vocab` vocabulary) with its batches, prompt and new tokens."""
    assert len(attention_cases) == len(ATTENTION_BARS)
    return {
        "attention": {
            "heads": heads,
            "kv_heads": kv_heads,
            "head_dim": dim // heads,
            "cases": [{"batch": b, "cache": c, **bar} for (b, c), bar in zip(attention_cases, ATTENTION_BARS)],
        },
        "layer": {
            "dim": dim,
            "hidden": hidden,
            "heads": heads,
            "kv_heads": kv_heads,
            "batch": 1,
            "cache": layer_cache,
            "bar_floor": 1.3,
        },
        "generate": {
            "model": model_shape(dim, hidden, heads, kv_heads, layers, vocab),
            "batches": batches,
            "prompt": prompt,
            "new_tokens": new_tokens,
            "bar_vs_static": 0.5,
        },
    }


# decode_config's sizes, each as (GPU, CPU).
SIZES = dict(
    dim=(4096, 64),
    hidden=(14336, 128),
    heads=(32, 4),
    kv_heads=(8, 2),
    attention_cases=([(1, 4096), (8, 4096), (1, 32768), (64, 2048)], [(1, 128), (2, 128), (1, 256), (4, 64)]),
    layer_cache=(4096, 256),
    layers=(4, 2),
    vocab=(32000, 1000),
    batches=([1, 8], [1, 2]),
    prompt=(512, 8),
    new_tokens=(64, 8),
)
GPU_CONFIG, CPU_CONFIG = (decode_config(**{k: v[i] for k, v in SIZES.items()}) for i in (0, 1))

OURS = "llama3_kernels"
SECTIONS = ("attention", "layer", "generate")


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _verdict(ok: bool, gpu: bool) -> str:
    return ("PASS" if ok else "FAIL") if gpu else "n/a (CPU)"


# ---- 1. decode attention -------------------------------------------------------------------


def sdpa_backends() -> dict:
    """label -> the SDPA backend to force (None: the one SDPA picks)."""
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:  # torch < 2.3: the default only
        return {"SDPA default": None}
    return {
        "SDPA default": None,
        "SDPA flash": SDPBackend.FLASH_ATTENTION,
        "SDPA efficient": SDPBackend.EFFICIENT_ATTENTION,
        "SDPA cuDNN": SDPBackend.CUDNN_ATTENTION if hasattr(SDPBackend, "CUDNN_ATTENTION") else "absent",
    }


def sdpa_call(q, k, v, length: int, backend):
    """One SDPA call over the first `length` slots, under `backend` (None: SDPA's own pick)."""
    ks, vs = k[:, :, :length], v[:, :, :length]
    if backend is None:
        return lambda: F.scaled_dot_product_attention(q, ks, vs, enable_gqa=True)
    from torch.nn.attention import sdpa_kernel

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, ks, vs, enable_gqa=True)

    return run


def attention_case(case: dict, cfg: dict, timer: Timer, bw: float, device, dtype, log) -> dict:
    import llama3_kernels as l3k

    B, L, H, Hkv, D = case["batch"], case["cache"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    q = torch.randn(B, H, 1, D, device=device, dtype=dtype)
    k = torch.randn(B, Hkv, L, D, device=device, dtype=dtype)
    v = torch.randn(B, Hkv, L, D, device=device, dtype=dtype)
    cache_range = torch.tensor([[0, L]] * B, dtype=torch.int32, device=device)
    fns = {OURS: lambda: l3k.attention_decode(q, k, v, cache_range)}
    refused: dict[str, str] = {}
    outs = {}
    for label, backend in sdpa_backends().items():
        if isinstance(backend, str):  # "absent"
            refused[label] = "this torch has no such backend"
            continue
        fn = sdpa_call(q, k, v, L, backend)
        with warnings.catch_warnings(record=True) as said:  # a refusing backend (CUDA) warns why, then raises
            warnings.simplefilter("always")
            try:
                outs[label] = fn()
                fns[label] = fn
            except Exception as e:
                why = [f"{type(e).__name__}: {str(e).strip()}"] + [str(w.message).strip() for w in said]
                refused[label] = " | ".join(line.splitlines()[0] for line in why if line)[:400]
    ours_out = fns[OURS]()
    ref = outs.get("SDPA default")
    diff = (ours_out.float() - ref.float()).abs().max().item() if ref is not None else None
    ms = timer.rounds(fns)
    kv_bytes = 2 * B * Hkv * L * D * q.element_size()
    sdpa = {l: t for l, t in ms.items() if l != OURS}
    best = min(sdpa, key=sdpa.get) if sdpa else None
    result = {
        "batch": B,
        "cache": L,
        "heads": H,
        "kv_heads": Hkv,
        "head_dim": D,
        "kv_bytes": kv_bytes,
        "median_us": {l: t * 1e3 for l, t in ms.items()},
        "kv_TBps": {l: kv_bytes / (t * 1e-3) / 1e12 for l, t in ms.items()},
        "of_copy_bandwidth": {l: kv_bytes / (t * 1e-3) / bw for l, t in ms.items()},
        "vs_best_sdpa": {l: sdpa[best] / t for l, t in ms.items()} if best else {},
        "best_sdpa": best,
        "refused": refused,
        "max_abs_diff_vs_sdpa_default": diff,
    }
    for key in ("bar_speedup", "bar_bandwidth"):
        if key in case:
            result[key] = case[key]
    log(
        f"attention B{B} cache {L}: "
        + ", ".join(f"{l} {t * 1e3:.1f} us" for l, t in ms.items())
        + (f"; refused: {', '.join(refused)}" if refused else "")
    )
    return result


def print_attention(rows: list[dict], bw: float, dtype, gpu: bool) -> list[dict]:
    r0 = rows[0]
    print_head(
        f"Decode attention, one query token per sequence over a full cache: {_dtype_name(dtype)}, "
        f"{r0['heads']}/{r0['kv_heads']} heads, head_dim {r0['head_dim']}; copy bandwidth {bw / 1e12:.3f} TB/s",
        f"{'case':<18} {'contender':<16} {'median':>11} {'KV TB/s':>9} {'of copy':>8} {'vs best SDPA':>13}",
        None if gpu else CPU_NOTE,
    )
    for r in rows:
        case = f"B{r['batch']} cache {r['cache']}"
        for label, us in r["median_us"].items():
            speed = r["vs_best_sdpa"].get(label)
            speed = f"{speed:>12.2f}x" if speed is not None else f"{'-':>13}"
            print(
                f"{case:<18} {label:<16} {us:>8.1f} us {r['kv_TBps'][label]:>9.3f} "
                f"{r['of_copy_bandwidth'][label]:>8.0%} {speed}"
            )
            case = ""
        for label, why in r["refused"].items():
            print(f"{case:<18} {label:<16} refused: {why if len(why) <= 90 else why[:87] + '...'}")
            case = ""
    bars = []
    for r in rows:
        case = f"B{r['batch']} cache {r['cache']}"
        if "bar_bandwidth" in r:
            got = r["of_copy_bandwidth"][OURS]
            ok = got >= r["bar_bandwidth"]
            bars.append(dict(bar=f"attention {case}: >= {r['bar_bandwidth']:.0%} of copy bandwidth", value=got, ok=ok))
            print(
                f"bar: attention {case} >= {r['bar_bandwidth']:.0%} of copy bandwidth: {got:.0%}  {_verdict(ok, gpu)}"
            )
        if "bar_speedup" in r and r["best_sdpa"]:
            got = r["vs_best_sdpa"][OURS]
            ok = got >= r["bar_speedup"]
            bars.append(dict(bar=f"attention {case}: >= {r['bar_speedup']}x the best SDPA backend", value=got, ok=ok))
            print(
                f"bar: attention {case} >= {r['bar_speedup']}x the best SDPA backend ({r['best_sdpa']}): "
                f"{got:.2f}x  {_verdict(ok, gpu)}"
            )
    return bars


# ---- 2. one layer's decode step ------------------------------------------------------------


def layer_step(cfg: dict, timer: Timer, bw: float, device, dtype, log) -> dict:
    import llama3_kernels as l3k
    from llama3_kernels.ops.rope import llama3_rope_cos_sin

    dim, hidden, H, Hkv, B, L = (cfg[k] for k in ("dim", "hidden", "heads", "kv_heads", "batch", "cache"))
    D = dim // H
    blk = l3k.Llama3Block(dim, hidden, H, Hkv, device=device, dtype=dtype).eval()
    cache = l3k.KVCache(1, B, Hkv, D, L, dtype=dtype, device=device)
    for t in cache.k + cache.v:
        t.normal_()  # not zeros: a power-capped card clocks zeros higher
    cache.advance(L)  # every step: the token at slot L - 1 (rewritten each time), attending [0, L)
    cos, sin = llama3_rope_cos_sin(L, D, device=device)
    x = torch.randn(B, 1, dim, device=device, dtype=dtype)
    # One set of buffers for every call: the second identical call is captured, later ones replayed.
    step = lambda: blk.decode(x, cos, sin, cache, 0)
    weight_bytes = sum(
        w.numel() * w.element_size() for w in (blk.qkv_weight, blk.o_weight, blk.gate_up_weight, blk.down_weight)
    )
    kv_bytes = 2 * B * Hkv * L * D * x.element_size()
    floor_ms = weight_bytes / bw * 1e3
    ms = {f"{OURS} (graph replay)": timer(step)}
    prev = l3k.set_graph_replay(False)
    try:
        ms[f"{OURS} (replay off)"] = timer(step)
    finally:
        l3k.set_graph_replay(prev)
    log("decode layer: " + ", ".join(f"{l} {t * 1e3:.1f} us" for l, t in ms.items()))
    return {
        **{k: cfg[k] for k in ("dim", "hidden", "heads", "kv_heads", "batch", "cache")},
        "head_dim": D,
        "cache_range": [0, L],
        "graph_replay_on": bool(prev),
        "weight_bytes": weight_bytes,
        "kv_bytes": kv_bytes,
        "weight_floor_us": floor_ms * 1e3,
        "median_us": {l: t * 1e3 for l, t in ms.items()},
        "over_weight_floor": {l: t / floor_ms for l, t in ms.items()},
        "bar_floor": cfg["bar_floor"],
    }


def print_layer(r: dict, dtype, gpu: bool) -> list[dict]:
    notes = [
        f"weight-read floor: {r['weight_bytes'] / 2**20:.1f} MiB of qkv, o, gate_up, down weights at the copy "
        f"bandwidth = {r['weight_floor_us']:.1f} us (the KV cache adds {r['kv_bytes'] / 2**20:.1f} MiB)"
    ]
    if not r["graph_replay_on"]:
        notes.append(
            "graph replay was off (it is CUDA-only; L3K_GRAPH_REPLAY=0 turns it off): both rows ran the same calls"
        )
    print_head(
        f"One layer's decode step (Llama3Block.decode, one C call): dim {r['dim']}, hidden {r['hidden']}, "
        f"{r['heads']}/{r['kv_heads']} heads, {_dtype_name(dtype)}, batch {r['batch']}, one new token, "
        f"cache_range [0, {r['cache']})\n" + "\n".join(notes),
        f"{'contender':<30} {'median':>11} {'/ weight floor':>15}",
        None if gpu else CPU_NOTE,
    )
    for label, us in r["median_us"].items():
        print(f"{label:<30} {us:>8.1f} us {r['over_weight_floor'][label]:>14.2f}x")
    label = f"{OURS} (graph replay)"
    got = r["over_weight_floor"][label]
    ok = got <= r["bar_floor"]
    print(f"bar: decode layer <= {r['bar_floor']}x the weight-read floor: {got:.2f}x  {_verdict(ok, gpu)}")
    return [dict(bar=f"decode layer: <= {r['bar_floor']}x the weight-read floor", value=got, ok=ok)]


# ---- 3. generate() --------------------------------------------------------------------------


def generate_call(model, ids, mask, new_tokens: int, **kw):
    def run():
        fixed_length = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)  # every run makes as many
        return model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, use_cache=True, pad_token_id=0, **fixed_length, **kw
        )

    return run


@contextlib.contextmanager
def noting_generate_compile(model, seen: list):
    """Appends to `seen` each time generate asks for its compiled forward (it does so where it
    compiles the decode step itself: a static cache on an accelerator)."""
    real = model.get_compiled_call
    model.get_compiled_call = lambda *a, **k: seen.append(True) or real(*a, **k)
    try:
        yield model
    finally:
        del model.get_compiled_call  # the class's method again


@contextlib.contextmanager
def compiled_forward(model):
    """model.forward compiled as transformers would (mode reduce-overhead), for this block only."""
    model.forward = torch.compile(model.forward, mode="reduce-overhead")
    try:
        yield model
    finally:
        del model.forward  # the class's forward again


def time_per_token(label: str, gen_n, gen_1, ids, n: int, timer: Timer) -> dict:
    """A contender's result at one batch: gen_n and gen_1 make n and 1 new tokens after the prompt
    ids; the first call of gen_n (a warmup: the compile or the capture) is checked, then both are
    timed in shared rounds and the per-token time is their difference over n - 1."""
    prompt, batch = ids.shape[1], ids.shape[0]
    out = gen_n()
    if out.shape[1] != prompt + n:
        raise RuntimeError(f"{label} made {out.shape[1] - prompt} tokens, not {n}")
    ms = timer.rounds({"n": gen_n, "1": gen_1})
    per_token = (ms["n"] - ms["1"]) / (n - 1)
    return {
        "contender": label,
        "batch": batch,
        f"median_ms_{n}_tokens": ms["n"],
        "median_ms_1_token": ms["1"],
        "ms_per_token": per_token,
        "tokens_per_s": batch / (per_token * 1e-3) if per_token > 0 else None,
    }


def run_generate_peer(label, model, ids, mask, cfg: dict, timer: Timer, patched: bool, explicit_compile: bool, **kw):
    """(result, whether generate compiled the decode step itself) of one contender at one batch."""
    from . import hf

    n = cfg["new_tokens"]
    seen: list = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(noting_generate_compile(model, seen))
        if patched:
            stack.enter_context(hf.patched(model))
        if explicit_compile:
            stack.enter_context(compiled_forward(model))
        gen_n, gen_1 = generate_call(model, ids, mask, n, **kw), generate_call(model, ids, mask, 1, **kw)
        r = time_per_token(label, gen_n, gen_1, ids, n, timer)
    by_generate = bool(seen)
    r["compiled"] = "by generate" if by_generate else ("explicit" if explicit_compile else "no")
    return r, by_generate


def run_greedy_decoder(label, model, ids, mask, cfg: dict, timer: Timer) -> dict:
    """One batch of ``llama3_kernels.hf.GreedyDecoder`` (the library's own loop), timed as the
    generate() peers are; one decoder serves every call, as a compiled model does (the warmup
    captures its graph)."""
    from . import hf

    n = cfg["new_tokens"]
    decoder = hf.GreedyDecoder(model, ids.shape[0], ids.shape[1] + n, eos_token_id=None)
    r = time_per_token(
        label, lambda: decoder.generate(ids, mask, n), lambda: decoder.generate(ids, mask, 1), ids, n, timer
    )
    r["compiled"] = "no"
    return r


def generate_section(cfg: dict, timer: Timer, device, dtype, gpu: bool, compile_ok: bool, log) -> dict:
    if compile_ok:  # every compiled peer and batch is a recompile of one frame: stay under dynamo's limit
        dyn = torch._dynamo.config
        name = next((n for n in ("recompile_limit", "cache_size_limit") if hasattr(dyn, n)), None)
        if name:
            setattr(dyn, name, max(getattr(dyn, name), 64))
    torch.manual_seed(0)
    model = build_model(cfg["model"], device, dtype).eval()
    static = {"cache_implementation": "static"}
    n = cfg["new_tokens"]
    results: list[dict] = []
    failed: list[str] = []
    auto_compiled = None

    def peer(label, patched=False, explicit_compile=False, native=False, **kw):
        nonlocal auto_compiled
        by_generate = False
        for batch in cfg["batches"]:
            ids = torch.randint(3, cfg["model"]["vocab_size"], (batch, cfg["prompt"]), device=device)
            mask = torch.ones_like(ids)
            try:
                if native:
                    r = run_greedy_decoder(label, model, ids, mask, cfg, timer)
                else:
                    r, by_generate = run_generate_peer(
                        label, model, ids, mask, cfg, timer, patched, explicit_compile, **kw
                    )
            except Exception as e:  # a peer that breaks is reported, the others still run
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                results.append({"contender": label, "batch": batch, "error": why})
                failed.append(label)
                log(f"generate {label} batch {batch}: FAILED {why}")
                continue
            if not patched and "static" in label and not explicit_compile and "disable_compile" not in kw:
                auto_compiled = by_generate
            results.append(r)
            log(
                f"generate {label} batch {batch}: {r[f'median_ms_{n}_tokens']:.1f} ms ({n} tokens), "
                f"{r['median_ms_1_token']:.1f} ms (1), {r['ms_per_token']:.3f} ms/token, compiled: {r['compiled']}"
            )

    peer("HF dynamic")
    if compile_ok:
        peer("HF static", **static)  # as generate runs it: compiled by generate where it does so
        if not auto_compiled and gpu:
            peer("HF static + compile(forward)", explicit_compile=True, disable_compile=True, **static)
    else:
        peer("HF static, not compiled", disable_compile=True, **static)
    peer(f"{OURS} dynamic", patched=True)
    peer(f"{OURS} static", patched=True, disable_compile=True, **static)
    if compile_ok and auto_compiled:
        peer(f"{OURS} static, generate compiles", patched=True, **static)
    peer(f"{OURS} GreedyDecoder" + (" (CUDA graph a token)" if gpu else ""), native=True)
    return {
        "model": {**cfg["model"], "dtype": _dtype_name(dtype), "init": "random", "rope_scaling": "llama3"},
        "vocab_note": "vocab 32000 keeps the model small; LLaMA-3's is 128256" if gpu else None,
        "prompt": cfg["prompt"],
        "new_tokens": n,
        "batches": cfg["batches"],
        "decoding": "greedy, min_new_tokens = max_new_tokens, attention_mask of ones",
        "per_token": f"(median of generate with {n} new tokens - median with 1) / {n - 1}",
        "transformers_compiles_static_generate": auto_compiled,
        "compile_note": (
            "compiled peers skipped (--no-compile)"
            if not compile_ok
            else (
                "transformers compiled the static-cache decode step in generate (its compile_config)"
                if auto_compiled
                else "transformers did not compile generate"
                + (
                    " (it compiles only on accelerators); no explicit compile on the CPU"
                    if not gpu
                    else "; 'HF static + compile(forward)' compiles model.forward with mode='reduce-overhead'"
                )
            )
        ),
        "bar_vs_static": cfg["bar_vs_static"],
        "results": results,
        "failed": sorted(set(failed)),
    }


def print_generate(g: dict, gpu: bool) -> list[dict]:
    m, n = g["model"], g["new_tokens"]
    title = (
        f"generate(): LlamaForCausalLM, {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, intermediate "
        f"{m['intermediate_size']}, {m['num_attention_heads']}/{m['num_key_value_heads']} heads, vocab "
        f"{m['vocab_size']}{' (kept small; LLaMA-3 has 128256)' if gpu else ''}, {m['dtype']}, random init, "
        f"prompt {g['prompt']}, {n} new tokens, greedy\ncompile: {g['compile_note']}\nper token: {g['per_token']}"
    )
    # The reference: transformers' static cache, compiled (by generate or explicitly) where it was.
    statics = [r for r in g["results"] if r["contender"].startswith("HF static") and "error" not in r]
    ref = next((r for r in statics if r["compiled"] != "no"), statics[0] if statics else None)
    ref_label, compiled_ref = (ref["contender"], ref["compiled"] != "no") if ref else (None, False)
    print_head(
        title,
        f"{'contender':<42} {'batch':>5} {'compiled':>11} {f'gen {n}':>11} {'gen 1':>11} {'ms/token':>9} "
        f"{'tokens/s':>10} {'/ HF static':>11}",
        None if gpu else CPU_NOTE,
    )
    refs = {
        r["batch"]: r["ms_per_token"]
        for r in g["results"]
        if r["contender"] == ref_label and "error" not in r and r["ms_per_token"] > 0
    }
    for r in g["results"]:
        if "error" in r:
            print(f"{r['contender']:<42} {r['batch']:>5} failed: {r['error']}")
            continue
        ratio = r["ms_per_token"] / refs[r["batch"]] if r["batch"] in refs else None
        tps = f"{r['tokens_per_s']:>10,.0f}" if r["tokens_per_s"] else f"{'-':>10}"
        print(
            f"{r['contender']:<42} {r['batch']:>5} {r['compiled']:>11} {r[f'median_ms_{n}_tokens']:>8.1f} ms "
            f"{r['median_ms_1_token']:>8.1f} ms {r['ms_per_token']:>9.3f} {tps} "
            + (f"{ratio:>10.2f}x" if ratio is not None else f"{'-':>11}")
        )
    bars = []
    for r in g["results"]:
        if "error" in r or not r["contender"].startswith(OURS) or r["batch"] not in refs:
            continue
        got = r["ms_per_token"] / refs[r["batch"]]
        ok = got <= g["bar_vs_static"] and bool(compiled_ref)
        what = f"generate {r['contender']} batch {r['batch']}: <= {g['bar_vs_static']}x {ref_label} ms/token"
        bars.append(dict(bar=what, value=got, ok=ok if compiled_ref else None))
        verdict = _verdict(ok, gpu) if compiled_ref else "n/a (the reference was not compiled)"
        print(f"bar: {what}: {got:.2f}x  {verdict}")
    return bars


# ---- main -----------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = bench_arguments(
        __doc__,
        "bench_decode.json",
        "timed repetitions per contender (default: 100 GPU / 5 CPU for the kernels and the layer, "
        "10 GPU / 3 CPU generate calls)",
        "skip the compiled peers of generate()",
    )
    ap.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {', '.join(SECTIONS)} (default all)",
    )
    args = ap.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")

    needs_transformers = "bench_decode: the generate section" if "generate" in sections else None
    versions = {"transformers": transformers_version(needs_transformers)}
    run = start_run("bench_decode", CPU_NOTE, args, (100, 5), (5, 2), versions)
    gpu, device, dtype, timer, log = run.gpu, run.device, run.dtype, run.timer, run.log
    config = GPU_CONFIG if gpu else CPU_CONFIG
    gen_timer = copy.copy(timer)  # shares the L2-flush buffer
    gen_timer.reps, gen_timer.warmup = args.reps or (10 if gpu else 3), 3 if gpu else 1
    timer.hide_host = gpu  # kernels and the layer step: the GPU's time, not the host's (Timer)
    bw = run.copy_bandwidth()

    record = {
        **run.header(),
        "copy_bandwidth_Bps": bw,
        "dtype": _dtype_name(dtype),
        "timing": (
            f"kernels and layer: median of {timer.reps} reps, CUDA events, L2 evicted by a 256 MiB read before "
            f"each, then the GPU held ~0.5 ms so that the host has queued the timed region (GPU time); "
            "attention contenders in shared rounds, order rotated each round; "
            f"generate: median of {gen_timer.reps} calls, CUDA events"
            if gpu
            else f"median of {timer.reps} reps ({gen_timer.reps} generate calls), perf_counter"
        ),
        "config": config,
    }
    attention, layer, generate = [], None, None
    with torch.no_grad():
        if "attention" in sections:
            cfg = config["attention"]
            attention = [attention_case(c, cfg, timer, bw, device, dtype, log) for c in cfg["cases"]]
        if "layer" in sections:
            layer = layer_step(config["layer"], timer, bw, device, dtype, log)
            if gpu:
                torch.cuda.empty_cache()
        if "generate" in sections:
            generate = generate_section(config["generate"], gen_timer, device, dtype, gpu, not args.no_compile, log)

    bars: list[dict] = []
    if attention:
        print()
        bars += print_attention(attention, bw, dtype, gpu)
        record["attention_decode"] = attention
    if layer:
        print()
        bars += print_layer(layer, dtype, gpu)
        record["decode_layer"] = layer
    if generate:
        print()
        bars += print_generate(generate, gpu)
        record["generate"] = generate
    if not gpu:
        for b in bars:
            b["ok"] = None  # the bars are the GPU's
    record["bars"] = bars

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench_decode.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"\n[bench_decode] wrote {path}")
    ours_failed = [l for l in (generate or {}).get("failed", []) if l.startswith(OURS)]
    return 1 if ours_failed else 0


if __name__ == "__main__":
    sys.exit(main())

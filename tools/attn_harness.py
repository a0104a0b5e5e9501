#!/usr/bin/env python3
"""GPU harness for the attention kernels (kernels/cuda/flash_*.cu): parity vs a float32 PyTorch reference
(with and without per-sequence key ranges, and NaN propagation), timing vs SDPA.

Self-contained: builds kernels/cuda/flash_*.cu + kernels/cpu/flash_attn.c into a shared library
with nvcc/gcc and calls it through ctypes with a hand-written mirror of kernels/attention.h.

  python3 tools/attn_harness.py [--mode all|parity|bench|sanitize] [--lib PATH] [--arch 90a] [--root DIR]

--root builds from another tree's kernels/ (an A/B against a saved version of a kernel).

--mode sanitize runs a few tiny cases only (for compute-sanitizer memcheck/racecheck).
"""

import argparse
import ctypes
import math
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = os.environ.get("ATTN_VARIANTS", "0") == "1"
# forward kernel for parity/sanitize: 0 default (wgmma on H100), 2 mma.sync
FWD_VARIANT = int(os.environ.get("ATTN_FWD_VARIANT", "0"))
# backward for parity/sanitize: 0 default (wgmma main kernel on H100), 1 mma.sync main kernel
BWD_VARIANT = int(os.environ.get("ATTN_BWD_VARIANT", "0"))
DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


_STRIDE = ctypes.c_int64 * 3  # strides of dims 0..2 of a (B, H, S, D) view


def _decl(ctype, names):
    """The fields of one C declaration of several names, e.g. `void *dq, *dk, *dv;`."""
    return [(name, ctype) for name in names.split()]


class FwdArgs(ctypes.Structure):  # l3k_attn_fwd_args
    _fields_ = (
        _decl(ctypes.c_void_p, "q k v o lse")
        + _decl(ctypes.c_int64, "batch n_heads n_kv_heads seq_q seq_k head_dim")
        + _decl(_STRIDE, "q_stride k_stride v_stride o_stride")
        + [("scale", ctypes.c_float), ("causal", ctypes.c_int), ("dtype", ctypes.c_int)]
        + [("key_range", ctypes.c_void_p)]  # int32 (B, 2) on the GPU, or None
    )


class BwdArgs(ctypes.Structure):  # l3k_attn_bwd_args
    _fields_ = (
        [("f", FwdArgs), ("dout", ctypes.c_void_p), ("do_stride", _STRIDE)]
        + _decl(ctypes.c_void_p, "dq dk dv")
        + _decl(_STRIDE, "dq_stride dk_stride dv_stride")
        + [("workspace", ctypes.c_void_p), ("workspace_bytes", ctypes.c_size_t), ("deterministic", ctypes.c_int)]
    )


def build(arch, out, root=ROOT):
    src_cu = [
        os.path.join(root, "kernels/cuda", f)
        for f in ("flash_attn.cu", "flash_fwd_sm80.cu", "flash_bwd_sm80.cu", "flash_fwd_sm90.cu", "flash_bwd_sm90.cu")
    ]
    src_c = os.path.join(root, "kernels/cpu/flash_attn.c")
    inc = os.path.join(root, "kernels")
    obj_c = out + ".c.o"
    t0 = time.time()
    subprocess.check_call(["gcc", "-std=c11", "-O2", "-fPIC", "-fopenmp", "-I" + inc, "-c", src_c, "-o", obj_c])
    gencode = []
    for a in arch.split(","):
        gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    cmd = [
        "nvcc",
        "-std=c++17",
        "-O3",
        "-lineinfo",
        "-shared",
        "-Xcompiler",
        "-fPIC",
        "-Xcompiler",
        "-fopenmp",
        *gencode,
        "-Xptxas",
        "-v",
        "-I" + inc,
        *src_cu,
        obj_c,
        "-o",
        out,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout, r.stderr)
        raise SystemExit("build failed")
    spills = [l for l in r.stderr.splitlines() if "spill" in l and not l.strip().startswith("0 bytes stack")]
    print(
        f"built {out} in {time.time() - t0:.1f}s; kernels with spills: "
        f"{sum(1 for l in spills if ' 0 bytes spill stores' not in l)}"
    )
    return out


class Lib:
    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        for n in ("l3k_cuda_attn_fwd", "l3k_cuda_attn_bwd", "l3k_cpu_attn_fwd", "l3k_cpu_attn_bwd"):
            getattr(self.lib, n).restype = ctypes.c_int
        self.lib.l3k_cuda_attn_fwd_variant.restype = ctypes.c_int
        self.has_bwd_variant = hasattr(self.lib, "l3k_cuda_attn_bwd_variant")
        self.lib.l3k_attn_bwd_workspace_bytes.restype = ctypes.c_size_t
        self.lib.l3k_attn_bwd_workspace_bytes.argtypes = [ctypes.c_int64] * 6 + [ctypes.c_int, ctypes.c_int]

    def ws_bytes(self, B, H, HKV, SQ, SK, D, det):
        return self.lib.l3k_attn_bwd_workspace_bytes(B, H, HKV, SQ, SK, D, det, 1)


def st3(t):  # (B, H, S, D) view -> strides of dims 0..2, last dim must be contiguous
    assert t.stride(3) == 1
    return (ctypes.c_int64 * 3)(t.stride(0), t.stride(1), t.stride(2))


def make_fwd(q, k, v, o, lse, scale, causal, key_range=None):
    a = FwdArgs()
    a.q, a.k, a.v, a.o, a.lse = q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr()
    a.batch, a.n_heads, a.seq_q, a.head_dim = q.shape
    a.n_kv_heads, a.seq_k = k.shape[1], k.shape[2]
    a.q_stride, a.k_stride, a.v_stride, a.o_stride = st3(q), st3(k), st3(v), st3(o)
    a.scale, a.causal, a.dtype = scale, int(causal), DT[q.dtype]
    if key_range is not None:
        assert key_range.dtype == torch.int32 and key_range.is_contiguous() and key_range.shape == (q.shape[0], 2)
        a.key_range = key_range.data_ptr()
    return a


def make_bwd(fa, do, dq, dk, dv, ws, det):
    b = BwdArgs()
    b.f = fa
    b.dout, b.do_stride = do.data_ptr(), st3(do)
    b.dq, b.dk, b.dv = dq.data_ptr(), dk.data_ptr(), dv.data_ptr()
    b.dq_stride, b.dk_stride, b.dv_stride = st3(dq), st3(dk), st3(dv)
    b.workspace, b.workspace_bytes, b.deterministic = (ws.data_ptr() if ws.numel() else None), ws.numel(), int(det)
    return b


def alloc_bhsd(B, H, S, D, dtype, bshd, fill=None):
    """(B,H,S,D) tensor; if bshd, a transposed view of a (B,S,H,D) buffer."""
    if bshd:
        t = torch.empty(B, S, H, D, device="cuda", dtype=dtype).transpose(1, 2)
    else:
        t = torch.empty(B, H, S, D, device="cuda", dtype=dtype)
    if fill is not None:
        t.fill_(fill)
    return t


def reference(q, k, v, do, scale, causal, dtype_math, key_range=None):
    """Attention with bottom-right causal mask, GQA via repeat_interleave, key j of sequence b
    masked outside key_range[b] (clamped into [0, SK)); fully masked rows -> 0.
    Returns o, lse (+inf for fully masked rows), dq, dk, dv computed in dtype_math."""
    B, H, SQ, D = q.shape
    HKV, SK = k.shape[1], k.shape[2]
    qf, kf, vf = [x.detach().to(dtype_math).requires_grad_(True) for x in (q, k, v)]
    kr = kf.repeat_interleave(H // HKV, dim=1)
    vr = vf.repeat_interleave(H // HKV, dim=1)
    s = (qf @ kr.transpose(-1, -2)) * scale
    i = torch.arange(SQ, device=q.device)[:, None]
    j = torch.arange(SK, device=q.device)[None, :]
    if causal:
        s = s.masked_fill(j > i + SK - SQ, float("-inf"))
    if key_range is not None:
        end = key_range[:, 1].long().clamp(0, SK)
        start = torch.minimum(key_range[:, 0].long().clamp(min=0), end)
        outside = (j < start[:, None, None]) | (j >= end[:, None, None])  # (B, 1, SK)
        s = s.masked_fill(outside[:, None], float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m).detach()
    e = torch.exp(s - m)
    l = e.sum(-1, keepdim=True)
    p = e / torch.where(l == 0, torch.ones_like(l), l)
    o = p @ vr
    lse = torch.where(l == 0, torch.full_like(l, float("inf")), m + torch.log(l)).squeeze(-1)
    o.backward(do.to(dtype_math))
    return o.detach(), lse.detach().float(), qf.grad, kf.grad, vf.grad


def maxerr(a, b):
    return (a.float() - b.float()).abs().max().item()


def run_ours(lib, q, k, v, do, scale, causal, det, bshd, repeat=1, key_range=None):
    B, H, SQ, D = q.shape
    HKV, SK = k.shape[1], k.shape[2]
    nan = float("nan")
    o = alloc_bhsd(B, H, SQ, D, q.dtype, bshd, nan)
    lse = torch.full((B, H, SQ), nan, device="cuda", dtype=torch.float32)
    fa = make_fwd(q, k, v, o, lse, scale, causal, key_range)
    rc = lib.lib.l3k_cuda_attn_fwd_variant(ctypes.byref(fa), None, FWD_VARIANT)
    assert rc == 0, f"fwd rc={rc}"
    outs = []
    for _ in range(repeat):
        dq = alloc_bhsd(B, H, SQ, D, q.dtype, bshd, nan)
        dk = torch.full((B, HKV, SK, D), nan, device="cuda", dtype=q.dtype)
        dv = torch.full((B, HKV, SK, D), nan, device="cuda", dtype=q.dtype)
        ws = torch.full((lib.ws_bytes(B, H, HKV, SQ, SK, D, det),), 255, device="cuda", dtype=torch.uint8)
        ba = make_bwd(fa, do, dq, dk, dv, ws, det)
        if BWD_VARIANT:
            rc = lib.lib.l3k_cuda_attn_bwd_variant(ctypes.byref(ba), None, BWD_VARIANT)
        else:
            rc = lib.lib.l3k_cuda_attn_bwd(ctypes.byref(ba), None)
        assert rc == 0, f"bwd rc={rc}"
        outs.append((dq, dk, dv))
    torch.cuda.synchronize()
    return o, lse, outs


PARITY_CASES = [
    # B, H, HKV, SQ, SK, D, causal
    (1, 4, 4, 1, 1, 64, False),
    (2, 4, 4, 17, 17, 64, True),
    (1, 8, 2, 128, 128, 128, True),
    (1, 8, 1, 1000, 1000, 128, True),  # MQA
    (1, 8, 2, 2048, 2048, 128, False),
    (1, 16, 2, 1000, 1000, 64, False),  # GQA 8
    (1, 4, 1, 113, 203, 64, True),
    (1, 4, 4, 203, 113, 128, True),  # Sq > Sk: fully masked rows
    (1, 2, 2, 1, 239, 128, True),
    (1, 2, 2, 239, 1, 128, True),
    (2, 4, 2, 1023, 1024, 128, True),
    (1, 4, 2, 17, 100, 40, True),  # odd head dims -> padded kernels
    (1, 4, 1, 100, 17, 96, False),
    (1, 2, 2, 128, 257, 160, True),
    (1, 2, 1, 300, 300, 256, True),
    (1, 4, 4, 2048, 2048, 64, True),
    # more tiles than SMs: persistent CTAs walk several tiles (and skip fully masked ones)
    (2, 32, 8, 1100, 1100, 128, True),
    (2, 16, 4, 1500, 700, 128, True),
    (3, 24, 8, 777, 333, 128, False),
]


# Per-sequence key ranges for the key-range cases: sequence b takes pattern (b + case) % 8.  They
# start and end inside KV tiles and on their edges (64, 128), cover one tile or a single key, are
# empty or full, and run past both ends (the kernels clamp them).
RANGE_PATTERNS = [
    lambda S: (0, S),
    lambda S: (S - S // 3, S),  # left padding
    lambda S: (0, S // 2 + 1),  # right padding
    lambda S: (64, min(S, 192)),  # tile edges (mma.sync 64-key tiles, wgmma 128)
    lambda S: (min(S, 128), min(S, 128)),  # empty
    lambda S: (-3, S + 10),  # past both ends: every key
    lambda S: (1, max(1, S - 1)),
    lambda S: (S // 2, S // 2 + 1),  # one key
]

KEY_RANGE_CASES = [
    # B, H, HKV, SQ, SK, D, causal
    (8, 4, 2, 300, 300, 128, True),
    (8, 4, 1, 300, 300, 128, False),
    (8, 2, 2, 1000, 1000, 64, True),
    (8, 2, 2, 257, 257, 256, True),
    (8, 2, 1, 130, 500, 128, False),
    (8, 4, 2, 500, 130, 96, True),  # Sq > Sk: rows masked by the diagonal and by the range
    (8, 8, 2, 2048, 2048, 128, True),
]


def key_ranges(B, SK, offset):
    return torch.tensor(
        [RANGE_PATTERNS[(b + offset) % len(RANGE_PATTERNS)](SK) for b in range(B)], dtype=torch.int32, device="cuda"
    )


def parity(lib):
    torch.manual_seed(0)
    fails = 0
    rows = []
    cases = [(c, False) for c in PARITY_CASES] + [(c, True) for c in KEY_RANGE_CASES]
    for ci, ((B, H, HKV, SQ, SK, D, causal), ranged) in enumerate(cases):
        key_range = key_ranges(B, SK, ci) if ranged else None
        for dtype in (torch.bfloat16, torch.float16):
            if dtype == torch.float16 and ci % 2 == 1:
                continue
            bshd = ci % 3 == 1
            mag = 3.0 if ci % 4 == 2 else 1.0
            scale = 1.0 / math.sqrt(D)
            q = (
                (torch.randn(B, SQ, H, D, device="cuda") * mag).to(dtype).transpose(1, 2)
                if bshd
                else (torch.randn(B, H, SQ, D, device="cuda") * mag).to(dtype)
            )
            k = (torch.randn(B, HKV, SK, D, device="cuda") * mag).to(dtype)
            v = torch.randn(B, HKV, SK, D, device="cuda").to(dtype)
            do = torch.randn(B, H, SQ, D, device="cuda").to(dtype)
            ro, rl, rdq, rdk, rdv = reference(q, k, v, do, scale, causal, torch.float32, key_range)
            po, pl, pdq, pdk, pdv = reference(q, k, v, do, scale, causal, dtype, key_range)
            for det in (False, True):
                o, lse, outs = run_ours(
                    lib, q, k, v, do, scale, causal, det, bshd, repeat=2 if det else 1, key_range=key_range
                )
                dq, dk, dv = outs[0]
                fin = torch.isfinite(rl)
                lse_err = maxerr(lse[fin], rl[fin]) if fin.any() else 0.0
                inf_ok = bool((lse[~fin] == float("inf")).all()) if (~fin).any() else True
                inf_ok = inf_ok and bool((o[~fin] == 0).all())  # masked rows: o = 0
                e = dict(o=maxerr(o, ro), dq=maxerr(dq, rdq), dk=maxerr(dk, rdk), dv=maxerr(dv, rdv))
                ept = dict(o=maxerr(po, ro), dq=maxerr(pdq, rdq), dk=maxerr(pdk, rdk), dv=maxerr(pdv, rdv))
                ok = inf_ok and lse_err < 1e-3 * max(1.0, mag * mag)
                for name in e:
                    mult = 2.0 if name == "o" else 3.0
                    ok = ok and e[name] == e[name] and e[name] <= mult * ept[name] + 1e-3
                if det:
                    dq2, dk2, dv2 = outs[1]
                    ok = ok and torch.equal(dq, dq2) and torch.equal(dk, dk2) and torch.equal(dv, dv2)
                fails += not ok
                rows.append(
                    f"{'PASS' if ok else 'FAIL'} B={B} H={H} Hkv={HKV} Sq={SQ} Sk={SK} D={D} causal={int(causal)} "
                    f"{'ranges ' if ranged else ''}"
                    f"{str(dtype)[6:]} bshd={int(bshd)} det={int(det)} | lse {lse_err:.1e} inf_ok={int(inf_ok)} | "
                    + " ".join(f"{n} {e[n]:.2e}/{ept[n]:.2e}" for n in e)
                )
                print(rows[-1], flush=True)
    print(f"parity: {len(rows) - fails}/{len(rows)} passed")
    return fails + nan_checks(lib)


def nan_checks(lib):
    """A NaN in q or k makes the rows it reaches NaN (o and lse), not fully masked (o = 0,
    lse = +inf); other rows stay finite; a row that sees no key stays masked; the backward carries
    the NaN into that sequence's gradients only."""
    torch.manual_seed(1)
    fails = 0
    for D in (64, 128, 256):
        B, H, HKV, SQ, SK = 2, 4, 2, 300, 200  # causal, Sq > Sk: rows 0..99 see no key
        for where in ("q", "k"):
            q = torch.randn(B, H, SQ, D, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(B, HKV, SK, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(B, HKV, SK, D, device="cuda", dtype=torch.bfloat16)
            do = torch.randn(B, H, SQ, D, device="cuda", dtype=torch.bfloat16)
            nan_rows = torch.zeros(B, H, SQ, dtype=torch.bool, device="cuda")
            if where == "q":
                q[0, 1, 250, 3] = float("nan")
                q[0, 2, 20, 3] = float("nan")  # a row that sees no key
                nan_rows[0, 1, 250] = True
            else:
                k[0, 0, 150, 5] = float("nan")  # seen by rows 250.. of heads 0, 1
                nan_rows[0, :2, 250:] = True
            masked = torch.zeros_like(nan_rows)
            masked[:, :, :100] = True
            for det in (False, True):
                o, lse, outs = run_ours(lib, q, k, v, do, 1.0 / math.sqrt(D), True, det, False)
                dq, dk, dv = outs[0]
                rest = ~nan_rows & ~masked
                ok = bool(torch.isnan(lse[nan_rows]).all()) and bool(torch.isnan(o[nan_rows]).all())
                ok = ok and bool((o[masked] == 0).all()) and bool((lse[masked] == float("inf")).all())
                ok = ok and bool(torch.isfinite(o[rest]).all()) and bool(torch.isfinite(lse[rest]).all())
                ok = ok and bool(torch.isnan(dq[0]).any()) and bool(torch.isfinite(dq[1]).all())
                ok = ok and bool(torch.isfinite(dk[1]).all()) and bool(torch.isfinite(dv[1]).all())
                fails += not ok
                print(f"{'PASS' if ok else 'FAIL'} NaN in {where}: D={D} det={int(det)}", flush=True)
    return fails


def bench(lib):
    import torch.nn.functional as F
    import triton.testing as tt
    from torch.nn.attention import SDPBackend, sdpa_kernel

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    shapes = [
        (2, 32, 8, 2048, 128, True),
        (2, 32, 32, 2048, 128, True),
        (2, 32, 8, 2048, 128, False),
        (1, 32, 8, 8192, 128, True),
        (1, 32, 8, 8192, 128, False),
        (2, 32, 8, 2048, 64, True),
    ]
    table = []
    for B, H, HKV, S, D, causal in shapes:
        dtype = torch.bfloat16
        scale = 1.0 / math.sqrt(D)
        q = torch.randn(B, H, S, D, device="cuda", dtype=dtype)
        k = torch.randn(B, HKV, S, D, device="cuda", dtype=dtype)
        v = torch.randn(B, HKV, S, D, device="cuda", dtype=dtype)
        do = torch.randn(B, H, S, D, device="cuda", dtype=dtype)
        o = torch.empty_like(q)
        lse = torch.empty(B, H, S, device="cuda", dtype=torch.float32)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        ws = torch.empty(lib.ws_bytes(B, H, HKV, S, S, D, 0), device="cuda", dtype=torch.uint8)
        fa = make_fwd(q, k, v, o, lse, scale, causal)
        ba = make_bwd(fa, do, dq, dk, dv, ws, 0)
        wsd = torch.empty(lib.ws_bytes(B, H, HKV, S, S, D, 1), device="cuda", dtype=torch.uint8)
        bad = make_bwd(fa, do, dq, dk, dv, wsd, 1)
        flops = 4.0 * B * H * S * S * D / (2 if causal else 1)
        L = lib.lib

        def f_fwd(variant=0):
            L.l3k_cuda_attn_fwd_variant(ctypes.byref(fa), None, variant)

        def f_fb():
            L.l3k_cuda_attn_fwd(ctypes.byref(fa), None)
            L.l3k_cuda_attn_bwd(ctypes.byref(ba), None)

        def f_fb_det():
            L.l3k_cuda_attn_fwd(ctypes.byref(fa), None)
            L.l3k_cuda_attn_bwd(ctypes.byref(bad), None)

        def bench_ms(fn, **kw):
            return tt.do_bench(fn, warmup=25, rep=100, return_mode="median", **kw)

        res = {}
        res["ours fwd"] = bench_ms(f_fwd)
        res["ours fwd mma.sync"] = bench_ms(lambda: f_fwd(2))
        res["ours fwd+bwd"] = bench_ms(f_fb)
        res["ours fwd+bwd det"] = bench_ms(f_fb_det)
        if VARIANTS and D == 128:
            for vi in (1,):  # fwd variant 1: 8 warps x 16 rows (tuning hook; slower on H100)
                res[f"ours fwd v{vi}"] = bench_ms(lambda: f_fwd(vi))

                if lib.has_bwd_variant:

                    def f_fbv():
                        L.l3k_cuda_attn_fwd(ctypes.byref(fa), None)
                        L.l3k_cuda_attn_bwd_variant(ctypes.byref(ba), None, vi)

                    res[f"ours fwd+bwd v{vi}"] = bench_ms(f_fbv)
        kr = k.repeat_interleave(H // HKV, 1).contiguous()
        vr = v.repeat_interleave(H // HKV, 1).contiguous()
        for name, be in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                qq, kk, vv = [x.detach().clone().requires_grad_(True) for x in (q, kr, vr)]
                with sdpa_kernel(be):
                    res[name + " fwd"] = bench_ms(
                        lambda: F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal, scale=scale)
                    )

                    def fb(do=do):
                        out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal, scale=scale)
                        out.backward(do)

                    res[name + " fwd+bwd"] = bench_ms(fb, grad_to_none=[qq, kk, vv])
            except Exception as ex:  # backend unavailable
                print(f"  {name}: {type(ex).__name__}: {str(ex)[:120]}")
        line = f"B={B} H={H} Hkv={HKV} S={S} D={D} causal={int(causal)}: " + ", ".join(
            f"{n} {ms:.3f}ms {flops * (3.5 if 'bwd' in n else 1.0) / ms / 1e9:.0f}TF" for n, ms in res.items()
        )
        table.append(line)
        print(line, flush=True)
        del q, k, v, do, o, dq, dk, dv, ws, wsd, kr, vr
        torch.cuda.empty_cache()
    print("\n".join(table))


def sanitize(lib):
    torch.manual_seed(0)
    for B, H, HKV, SQ, SK, D, causal, ranged in [
        (1, 2, 1, 70, 45, 64, True, False),
        (1, 2, 2, 33, 130, 128, True, False),
        (1, 2, 1, 40, 40, 40, False, False),
        (1, 1, 1, 20, 70, 256, True, False),
        (8, 2, 1, 150, 150, 128, True, True),
        (8, 2, 2, 90, 200, 64, False, True),
    ]:
        key_range = key_ranges(B, SK, 0) if ranged else None
        for det in (False, True):
            q = torch.randn(B, H, SQ, D, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(B, HKV, SK, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(B, HKV, SK, D, device="cuda", dtype=torch.bfloat16)
            do = torch.randn(B, H, SQ, D, device="cuda", dtype=torch.bfloat16)
            o, lse, outs = run_ours(lib, q, k, v, do, 1.0 / math.sqrt(D), causal, det, False, key_range=key_range)
            ro, rl, rdq, rdk, rdv = reference(q, k, v, do, 1.0 / math.sqrt(D), causal, torch.float32, key_range)
            print(
                f"sanitize case Sq={SQ} Sk={SK} D={D} det={det}: o err {maxerr(o, ro):.2e} "
                f"dq {maxerr(outs[0][0], rdq):.2e}"
            )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="all")
    ap.add_argument("--lib", default="/tmp/libattn.so")
    ap.add_argument("--arch", default="90a")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--root", default=ROOT)
    args = ap.parse_args()
    if not args.no_build:
        build(args.arch, args.lib, args.root)
    lib = Lib(args.lib)
    fails = 0
    if args.mode in ("all", "parity"):
        fails += parity(lib)
    if args.mode in ("all", "bench"):
        bench(lib)
    if args.mode == "sanitize":
        sanitize(lib)
    if args.mode == "profile":  # one shape, a few forward launches, for ncu
        B, H, HKV, S, D = 2, 32, 8, 2048, 128
        q = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, HKV, S, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, HKV, S, D, device="cuda", dtype=torch.bfloat16)
        o, lse = torch.empty_like(q), torch.empty(B, H, S, device="cuda")
        fa = make_fwd(q, k, v, o, lse, 1.0 / math.sqrt(D), True)
        for _ in range(3):
            lib.lib.l3k_cuda_attn_fwd_variant(ctypes.byref(fa), None, FWD_VARIANT)
        torch.cuda.synchronize()
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()

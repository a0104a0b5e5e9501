"""RoPE against a float32 PyTorch reference, forward and backward, CPU and (when present)
CUDA: GQA/MQA, fused-QKV strided views, both conventions, position offsets, per-batch and
full-width tables, odd shapes, in place and out of place; LLaMA-3(.1) tables; the module;
the bad-input matrix from Python."""

import math
import re

import numpy as np
import pytest
import torch

import llama3_kernels as l3k
from conftest import assert_close, poison


def reference(x, cos, sin, offset=0, interleaved=False, inverse=False):
    """Rotate x (B, H, S, D) in float32 with tables (T, D/2) or (B|1, T, D/2)."""
    xf = x.float()
    S = x.shape[2]
    c = cos.float()[..., offset : offset + S, :]
    s = sin.float()[..., offset : offset + S, :]
    c, s = (c[None, None], s[None, None]) if c.dim() == 2 else (c[:, None], s[:, None])
    if inverse:
        s = -s
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        return torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], -1).flatten(-2)
    x1, x2 = xf.chunk(2, -1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def tables(rows, d, batch=None, dtype=torch.float32, device="cpu"):
    shape = (rows, d // 2) if batch is None else (batch, rows, d // 2)
    ang = torch.rand(shape, device=device, dtype=torch.float64) * 2 * math.pi
    return ang.cos().to(dtype), ang.sin().to(dtype)


def make_qk(B, Hq, Hk, S, D, dtype, device, layout):
    """q, k (and the whole buffer) as contiguous tensors or views of one fused QKV projection."""
    if layout == "qkv":
        H = Hq + 2 * Hk
        qkv = torch.randn(B, S, H * D, device=device).to(dtype)
        q = qkv.view(B, S, H, D)[:, :, :Hq].transpose(1, 2)
        k = qkv.view(B, S, H, D)[:, :, Hq : Hq + Hk].transpose(1, 2) if Hk else None
        return q, k, qkv
    q = torch.randn(B, Hq, S, D, device=device).to(dtype)
    k = torch.randn(B, Hk, S, D, device=device).to(dtype) if Hk else None
    return q, k, None


CASES = [  # B, Hq, Hk, S, D, offset, extra rows, interleaved, table, batched, layout
    (2, 4, 2, 5, 8, 0, 0, False, "f32", False, "contig"),
    (1, 3, 1, 7, 6, 3, 2, True, "act", False, "contig"),
    (2, 8, 8, 17, 128, 5, 0, False, "f32", False, "qkv"),
    (2, 2, 0, 3, 256, 0, 1, True, "act", True, "contig"),
    (3, 6, 2, 9, 64, 2, 0, False, "act", True, "qkv"),
    (1, 1, 1, 4, 2, 0, 0, False, "f32", False, "qkv"),
    (2, 32, 8, 33, 128, 0, 0, True, "f32", False, "qkv"),
    (1, 5, 5, 13, 96, 1, 0, False, "f32", False, "contig"),
    (2, 4, 1, 6, 10, 4, 3, False, "act", False, "qkv"),
    (5, 12, 4, 123, 64, 0, 0, False, "f32", False, "qkv"),
]


def case_id(c):
    B, Hq, Hk, S, D, off, extra, inter, tab, batched, layout = c
    return (
        f"B{B}-Hq{Hq}-Hk{Hk}-S{S}-D{D}-off{off}-{'inter' if inter else 'half'}-{tab}"
        f"{'-batched' if batched else ''}-{layout}"
    )


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "bwd"])
def test_parity_out_of_place(case, inverse, dtype, device):
    B, Hq, Hk, S, D, off, extra, inter, tab, batched, layout = case
    q, k, _ = make_qk(B, Hq, Hk, S, D, dtype, device, layout)
    cos, sin = tables(S + off + extra, D, B if batched else None, torch.float32 if tab == "f32" else dtype, device)
    q_out = poison(torch.empty(q.shape, dtype=dtype, device=device))
    k_out = poison(torch.empty(k.shape, dtype=dtype, device=device)) if k is not None else None
    q0 = q.clone()
    fn = l3k.rope_backward_into if inverse else l3k.rope_forward_into
    fn(q, k, cos, sin, q_out, k_out, offset=off, interleaved=inter)
    assert_close(q_out, reference(q, cos, sin, off, inter, inverse), dtype, what="q")
    if k is not None:
        assert_close(k_out, reference(k, cos, sin, off, inter, inverse), dtype, what="k")
    assert torch.equal(q, q0), "input was written"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_parity_in_place(case, dtype, device):
    B, Hq, Hk, S, D, off, extra, inter, tab, batched, layout = case
    q, k, qkv = make_qk(B, Hq, Hk, S, D, dtype, device, layout)
    cos, sin = tables(S + off + extra, D, B if batched else None, torch.float32 if tab == "f32" else dtype, device)
    q_ref = reference(q, cos, sin, off, inter)
    k_ref = reference(k, cos, sin, off, inter) if k is not None else None
    before = qkv.clone() if qkv is not None else None
    ptr = q.data_ptr()
    q2, k2 = l3k.rope_(q, k, cos, sin, offset=off, interleaved=inter)
    assert q2 is q and k2 is k and q.data_ptr() == ptr
    assert_close(q, q_ref, dtype, what="q")
    if k is not None:
        assert_close(k, k_ref, dtype, what="k")
    if qkv is not None:  # v (the last Hk heads) untouched, bit for bit
        H = Hq + 2 * Hk
        v_now = qkv.view(B, S, H, D)[:, :, Hq + Hk :]
        v_before = before.view(B, S, H, D)[:, :, Hq + Hk :]
        assert torch.equal(v_now, v_before), "v was written"


def test_round_trip(dtype, device):
    q = torch.randn(2, 4, 16, 64, device=device).to(dtype)
    cos, sin = l3k.llama3_rope_cos_sin(16, 64, device=device)
    for inter in (False, True):
        y, _ = l3k.rope(q, None, cos, sin, interleaved=inter)
        back = torch.empty_like(y)
        l3k.rope_backward_into(y, None, cos, sin, back, interleaved=inter)
        assert_close(back, q, dtype, scale=2, what="inverse of forward")


# ---- autograd -------------------------------------------------------------------------


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "inter"])
def test_autograd_out_of_place(interleaved, dtype, device):
    q = torch.randn(2, 8, 11, 64, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, 11, 64, device=device, dtype=dtype, requires_grad=True)
    cos, sin = tables(14, 64, device=device)
    qo, ko = l3k.rope(q, k, cos, sin, offset=3, interleaved=interleaved)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    (qo.float() * gq.float()).sum().add((ko.float() * gk.float()).sum()).backward()
    qr, kr = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    rq, rk = reference(qr, cos, sin, 3, interleaved), reference(kr, cos, sin, 3, interleaved)
    ((rq * gq.float()).sum() + (rk * gk.float()).sum()).backward()
    assert_close(qo, rq, dtype, what="q")
    assert_close(ko, rk, dtype, what="k")
    assert_close(q.grad, qr.grad, dtype, what="dq")
    assert_close(k.grad, kr.grad, dtype, what="dk")


def test_autograd_in_place_fused_qkv(dtype, device):
    """The tutorial's pattern: q/k as views of one QKV projection, rotated in place."""
    B, S, Hq, Hk, D, dim = 2, 9, 4, 2, 32, 64
    x = torch.randn(B, S, dim, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn((Hq + 2 * Hk) * D, dim, device=device) / 8).to(dtype).requires_grad_()
    cos, sin = l3k.llama3_rope_cos_sin(S, D, device=device)

    def run(rotate):
        qkv = x @ w.t()
        H = Hq + 2 * Hk
        v4 = qkv.view(B, S, H, D)
        q, k, v = (
            v4[:, :, :Hq].transpose(1, 2),
            v4[:, :, Hq : Hq + Hk].transpose(1, 2),
            v4[:, :, Hq + Hk :].transpose(1, 2),
        )
        q, k, after = rotate(q, k, v, qkv)
        c = torch.linspace(-1, 1, after.numel(), device=device).view(after.shape)
        return q.float().pow(2).sum() + (k.float() * 3).sum() + v.float().sum() + (after.float() * c).sum()

    def ours(q, k, v, qkv):  # in place: qkv itself now holds the rotated q and k
        q, k = l3k.triton_rope(q, k, cos, sin)
        return q, k, qkv

    def theirs(q, k, v, qkv):
        q, k = reference(q, cos, sin).to(dtype), reference(k, cos, sin).to(dtype)
        after = torch.cat([q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)], 2).reshape(qkv.shape)
        return q, k, after

    g = torch.autograd.grad(run(ours), (x, w))
    gr = torch.autograd.grad(run(theirs), (x, w))
    assert_close(g[0], gr[0], dtype, scale=4, what="dx")
    assert_close(g[1], gr[1], dtype, scale=4, what="dw")


@pytest.mark.parametrize("kind", ["plain", "views-of-two-bases", "q-only-view"])
def test_autograd_in_place_other_layouts(kind, device):
    """rope_ under autograd on non-view tensors, views of different bases, q alone."""
    ql = torch.randn(2, 5, 4, 16, device=device, requires_grad=True)
    kl = torch.randn(2, 5, 2, 16, device=device, requires_grad=True)
    cos, sin = tables(7, 16, device=device)
    if kind == "plain":
        q, k = (ql * 1).transpose(1, 2).contiguous(), (kl * 1).transpose(1, 2).contiguous()
    else:
        q, k = (ql * 1).transpose(1, 2), (kl * 1).transpose(1, 2)
    if kind == "q-only-view":
        k = None
    q_ref = reference(ql.detach().transpose(1, 2), cos, sin, 2)
    q2, k2 = l3k.rope_(q, k, cos, sin, offset=2)
    assert q2 is q and k2 is k
    assert_close(q, q_ref, what="q")
    loss = (q * torch.arange(16, device=device)).sum() + (k.pow(2).sum() if k is not None else 0)
    loss.backward()
    qr, kr = ql.detach().clone().requires_grad_(), kl.detach().clone().requires_grad_()
    rq, rk = reference(qr.transpose(1, 2), cos, sin, 2), reference(kr.transpose(1, 2), cos, sin, 2)
    ref_loss = (rq * torch.arange(16, device=device)).sum() + (rk.pow(2).sum() if k is not None else 0)
    ref_loss.backward()
    assert_close(ql.grad, qr.grad, what="dq")
    if k is not None:
        assert_close(kl.grad, kr.grad, what="dk")


def test_autograd_q_only_and_unused_k(device):
    q = torch.randn(1, 2, 5, 16, device=device, requires_grad=True)
    k = torch.randn(1, 1, 5, 16, device=device, requires_grad=True)
    cos, sin = tables(5, 16, device=device)
    qo, _ = l3k.rope(q, None, cos, sin)
    qo.sum().backward()
    qr = q.detach().clone().requires_grad_()
    reference(qr, cos, sin).sum().backward()
    assert_close(q.grad, qr.grad, what="dq, k None")
    q.grad = None
    qo, ko = l3k.rope(q, k, cos, sin)
    ko.sum().backward()  # q's output unused
    kr = k.detach().clone().requires_grad_()
    reference(kr, cos, sin).sum().backward()
    assert_close(k.grad, kr.grad, what="dk, q unused")
    assert q.grad is None or torch.all(q.grad == 0)
    q.grad = k.grad = None
    qo, ko = l3k.rope(q, k, cos, sin)
    qo.sum().backward()  # k's output unused
    assert_close(q.grad, qr.grad, what="dq, k unused")
    assert k.grad is None or torch.all(k.grad == 0)


def test_full_width_tables(device):
    """Hugging Face's (seq, head_dim) = cat(f, f) tables and Meta's repeat_interleave."""
    q = torch.randn(2, 3, 7, 16, device=device)
    cos, sin = tables(7, 16, device=device)
    ref = reference(q, cos, sin)
    out, _ = l3k.rope(q, None, torch.cat([cos, cos], -1), torch.cat([sin, sin], -1))
    assert_close(out, ref, what="HF full width")
    out, _ = l3k.rope(q, None, cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1), interleaved=True)
    assert_close(out, reference(q, cos, sin, interleaved=True), what="Meta full width")


def test_numpy_and_zero_size():
    q = np.random.randn(1, 2, 3, 8).astype(np.float32)
    c = np.cos(np.random.rand(3, 4)).astype(np.float32)
    s = np.sin(np.random.rand(3, 4)).astype(np.float32)
    out = np.full_like(q, np.nan)
    l3k.rope_forward_into(q, None, c, s, out)
    ref = reference(torch.from_numpy(q), torch.from_numpy(c), torch.from_numpy(s)).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    e = torch.empty(2, 4, 0, 8)
    qo, ko = l3k.rope(e, torch.empty(2, 2, 0, 8), torch.empty(0, 4), torch.empty(0, 4))
    assert qo.shape == e.shape and ko.shape == (2, 2, 0, 8)


# ---- tables and module ---------------------------------------------------------------------


def naive_inv_freq(d, theta, scaling):
    out = []
    for i in range(0, d, 2):
        f = theta ** (-i / d)
        if scaling:
            factor, lo, hi, ctx = 8.0, 1.0, 4.0, 8192.0
            wave = 2 * math.pi / f
            if wave > ctx / lo:
                f = f / factor
            elif wave >= ctx / hi:
                t = (ctx / wave - lo) / (hi - lo)
                f = (1 - t) * f / factor + t * f
        out.append(f)
    return out


@pytest.mark.parametrize("scaling", [None, True], ids=["llama3", "llama3.1"])
def test_llama3_tables(scaling, device):
    d, n, off = 128, 300, 8000
    inv = l3k.rope_inv_freq(d, 500000.0, scaling, device=device)
    np.testing.assert_allclose(inv.cpu().numpy(), naive_inv_freq(d, 500000.0, scaling), rtol=1e-12)
    cos, sin = l3k.llama3_rope_cos_sin(n, d, scaling=scaling, offset=off, device=device)
    assert cos.shape == (n, d // 2) and cos.dtype == torch.float32 and cos.device.type == device
    f = naive_inv_freq(d, 500000.0, scaling)
    for p in (0, 17, n - 1):
        for i in (0, 5, d // 2 - 1):
            ang = (p + off) * f[i]
            assert abs(cos[p, i].item() - math.cos(ang)) < 1e-6
            assert abs(sin[p, i].item() - math.sin(ang)) < 1e-6
    if scaling:  # the lowest frequencies are divided by 8, the highest are kept
        plain = l3k.rope_inv_freq(d, 500000.0, None, device=device)
        assert torch.allclose(inv[-1], plain[-1] / 8) and torch.equal(inv[0], plain[0])


def test_rotary_module_continuation(dtype, device):
    rot = l3k.RotaryEmbedding(64, max_seq_len=8, scaling=True, device=device)
    q = torch.randn(2, 4, 12, 64, device=device).to(dtype)
    k = torch.randn(2, 2, 12, 64, device=device).to(dtype)
    qa, ka = rot(q, k)  # grows its tables to 12 rows
    qb1, kb1 = rot(q[:, :, :5], k[:, :, :5])
    qb2, kb2 = rot(q[:, :, 5:], k[:, :, 5:], offset=5)
    assert torch.equal(torch.cat([qb1, qb2], 2), qa) and torch.equal(torch.cat([kb1, kb2], 2), ka)
    cos, sin = l3k.llama3_rope_cos_sin(12, 64, scaling=True, device=device)
    assert_close(qa, reference(q, cos, sin), dtype, what="module q")
    inplace = l3k.RotaryEmbedding(64, max_seq_len=12, scaling=True, inplace=True, device=device)
    q2 = q.clone()
    out, _ = inplace(q2)
    assert out is q2 and torch.equal(q2, qa)


# ---- bad inputs ---------------------------------------------------------------------------


def _good(device):
    q = torch.randn(1, 2, 3, 4, device=device)
    k = torch.randn(1, 1, 3, 4, device=device)
    cos, sin = tables(3, 4, device=device)
    return dict(
        q=q,
        k=k,
        cos=cos,
        sin=sin,
        q_out=torch.full_like(q, 7.0),
        k_out=torch.full_like(k, 7.0),
        offset=0,
        interleaved=False,
    )


BAD = [  # name, override, exception, message
    (
        "odd head_dim",
        lambda a, d: dict(
            q=torch.randn(1, 2, 3, 5, device=d), k=None, k_out=None, q_out=torch.full((1, 2, 3, 5), 7.0, device=d)
        ),
        ValueError,
        "q head_dim is 5, expected an even number",
    ),
    (
        "head_dim > 256",
        lambda a, d: dict(
            q=torch.randn(1, 1, 1, 258, device=d), k=None, k_out=None, q_out=torch.full((1, 1, 1, 258), 7.0, device=d)
        ),
        ValueError,
        "q head_dim is 258, expected at most 256",
    ),
    (
        "k seq",
        lambda a, d: dict(k=torch.randn(1, 1, 4, 4, device=d), k_out=torch.full((1, 1, 4, 4), 7.0, device=d)),
        ValueError,
        "k.shape[2] (seq) is 4, expected 3 like q",
    ),
    (
        "k batch",
        lambda a, d: dict(k=torch.randn(2, 1, 3, 4, device=d), k_out=torch.full((2, 1, 3, 4), 7.0, device=d)),
        ValueError,
        "k.shape[0] (batch) is 2, expected 1 like q",
    ),
    (
        "head ratio",
        lambda a, d: dict(k=torch.randn(1, 3, 3, 4, device=d), k_out=torch.full((1, 3, 3, 4), 7.0, device=d)),
        ValueError,
        "q has 2 heads, expected a multiple of the 3 heads of k",
    ),
    (
        "cos width",
        lambda a, d: dict(cos=torch.randn(3, 3, device=d)),
        ValueError,
        "cos.shape[1] is 3, expected head_dim/2 = 2",
    ),
    (
        "sin shape",
        lambda a, d: dict(sin=torch.randn(4, 2, device=d)),
        ValueError,
        "sin shape (4, 2), expected (3, 2) like cos",
    ),
    (
        "table batch",
        lambda a, d: dict(cos=torch.randn(2, 3, 2, device=d), sin=torch.randn(2, 3, 2, device=d)),
        ValueError,
        "cos.shape[0] is 2, expected the batch size 1",
    ),
    (
        "table too short",
        lambda a, d: dict(offset=1),
        ValueError,
        "cos has 3 rows, expected at least seq + offset = 3 + 1 = 4",
    ),
    ("negative offset", lambda a, d: dict(offset=-2), ValueError, "offset is -2, expected >= 0"),
    (
        "q dtype",
        lambda a, d: dict(q=a["q"].double()),
        TypeError,
        "q dtype float64, expected float32, float16 or bfloat16",
    ),
    (
        "k dtype",
        lambda a, d: dict(k=a["k"].half(), k_out=a["k_out"].half()),
        TypeError,
        "k dtype float16, expected float32 like q",
    ),
    ("cos dtype", lambda a, d: dict(cos=a["cos"].bfloat16()), TypeError, "cos dtype bfloat16, expected float32 like q"),
    (
        "q_out dtype",
        lambda a, d: dict(q_out=a["q_out"].bfloat16()),
        TypeError,
        "q_out dtype bfloat16, expected float32 like q",
    ),
    (
        "q_out shape",
        lambda a, d: dict(q_out=torch.full((1, 3, 2, 4), 7.0, device=d)),
        ValueError,
        "q_out shape (1, 3, 2, 4), expected (1, 2, 3, 4) like q",
    ),
    (
        "last dim strided",
        lambda a, d: dict(q=torch.randn(1, 2, 4, 3, device=d).transpose(2, 3)),
        ValueError,
        "q stride[3] is 3, expected 1 (last dim contiguous)",
    ),
    (
        "partial overlap",
        lambda a, d: (lambda base: dict(q=base[:24].view(1, 2, 3, 4), q_out=base[1:25].view(1, 2, 3, 4)))(
            torch.randn(25, device=d)
        ),
        ValueError,
        "q_out overlaps q without being the same view",
    ),
    ("k_out missing", lambda a, d: dict(k_out=None), ValueError, "k_out is NULL but k is given"),
    (
        "device mismatch",
        lambda a, d: dict(cos=a["cos"].cpu(), sin=a["sin"].cpu()) if d == "cuda" else None,
        ValueError,
        "cos is on cpu, expected cuda:0",
    ),
]


@pytest.mark.parametrize("case", BAD, ids=lambda c: c[0])
def test_bad_inputs(device, case):
    name, make, exc, message = case
    a = _good(device)
    over = make(a, device)
    if over is None:
        pytest.skip("needs a GPU")
    a.update(over)
    outs = [t for t in (a["q_out"], a["k_out"]) if t is not None and t.data_ptr() != a["q"].data_ptr()]
    before = [t.clone() for t in outs]
    q_before = a["q"].clone()
    with pytest.raises(exc) as info:
        l3k.rope_forward_into(a["q"], a["k"], a["cos"], a["sin"], a["q_out"], a["k_out"], a["offset"], a["interleaved"])
    assert str(info.value).startswith("rope_forward: "), str(info.value)
    assert message in str(info.value), f"{name}: {info.value}"
    for t, b in zip(outs, before):
        assert torch.equal(
            t.view(torch.int32) if t.dtype == torch.float32 else t,
            b.view(torch.int32) if b.dtype == torch.float32 else b,
        ), "output was written"
    assert torch.equal(a["q"], q_before), "q was written"


def test_bad_inputs_backward_names(device):
    a = _good(device)
    with pytest.raises(ValueError, match=r"rope_backward: dq has 2 heads, expected a multiple of the 3 heads of dk"):
        l3k.rope_backward_into(
            a["q"],
            torch.randn(1, 3, 3, 4, device=device),
            a["cos"],
            a["sin"],
            a["q_out"],
            torch.empty(1, 3, 3, 4, device=device),
        )
    with pytest.raises(ValueError, match="rope_forward: mode is 2"):
        from llama3_kernels._dlpack import Borrowed
        from llama3_kernels._lib import LIB, check

        b = Borrowed(a["q"], a["cos"], a["sin"], a["q_out"])
        check(LIB.l3k_rope_forward(b.ptrs[0], None, b.ptrs[1], b.ptrs[2], 0, 2, b.ptrs[3], None, None))


@pytest.mark.parametrize(
    "offset, expected", [(2**63, "at most 2^63 - 1"), (2**64 + 1, "at most 2^63 - 1"), (-(2**64), ">= 0")]
)
def test_offset_outside_int64_is_refused_not_wrapped(offset, expected):
    """An offset the C ABI's int64_t cannot hold is refused by name; ctypes would wrap it (2^64 + 1
    became 1, -2^64 became 0) and rotate at the wrong positions.  q is left as it was."""
    q = torch.randn(1, 2, 4, 8)
    cos, sin = l3k.llama3_rope_cos_sin(8, 8)
    q0 = q.clone()
    for fn in (l3k.rope_forward_into, l3k.rope_backward_into):
        name = fn.__name__.removesuffix("_into")
        with pytest.raises(ValueError, match=rf"{name}: offset is {offset}, expected {re.escape(expected)}"):
            fn(q, None, cos, sin, q, offset=offset)
    assert torch.equal(q, q0)

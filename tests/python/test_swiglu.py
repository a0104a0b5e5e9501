"""SwiGLU against float32 PyTorch references, forward and backward, CPU and (when present)
CUDA: separate and fused gate_up layouts, strided rows, in place, odd widths; the whole MLP
(triton_swiglu, SwiGLUMLP); the bad-input matrix from Python."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import llama3_kernels as l3k
from conftest import assert_close, poison
from llama3_kernels.ops.swiglu import gate_up_weight

SHAPES = [(4, 64), (5, 123, 123), (1, 1), (3, 7, 1000), (2, 8, 14336), (33, 17)]


def ref_grads(g, u, da):
    gr, ur = g.float().requires_grad_(), u.float().requires_grad_()
    a = F.silu(gr) * ur
    a.backward(da.float())
    return a.detach(), gr.grad, ur.grad


def small_enough(shape, device):
    return device == "cuda" or int(np.prod(shape)) <= 1 << 20


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_separate(shape, dtype, device):
    if not small_enough(shape, device):
        pytest.skip("large shape on the CPU path")
    g = (3 * torch.randn(shape, device=device)).to(dtype)
    u = torch.randn(shape, device=device).to(dtype)
    da = torch.randn(shape, device=device).to(dtype)
    a_ref, dg_ref, du_ref = ref_grads(g, u, da)
    a = poison(torch.empty_like(g))
    l3k.swiglu_forward_into(g, u, a)
    assert_close(a, a_ref, dtype, what="a")
    dg, du, a2 = (poison(torch.empty_like(g)) for _ in range(3))
    l3k.swiglu_backward_into(da, g, u, dg, du, a2)
    assert_close(dg, dg_ref, dtype, what="dg")
    assert_close(du, du_ref, dtype, what="du")
    assert_close(a2, a_ref, dtype, what="a from the backward")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fused(shape, dtype, device):
    if not small_enough(shape, device):
        pytest.skip("large shape on the CPU path")
    *lead, h = shape
    gu = torch.randn(*lead, 2 * h, device=device).to(dtype) * 2
    da = torch.randn(shape, device=device).to(dtype)
    g, u = gu[..., :h], gu[..., h:]
    a_ref, dg_ref, du_ref = ref_grads(g, u, da)
    a = poison(torch.empty(shape, device=device, dtype=dtype))
    l3k.swiglu_fused_forward_into(gu, a)
    assert_close(a, a_ref, dtype, what="a")
    dgu = poison(torch.empty_like(gu))
    a2 = poison(torch.empty_like(a))
    l3k.swiglu_fused_backward_into(da, gu, dgu, a2)
    assert_close(dgu[..., :h], dg_ref, dtype, what="dg")
    assert_close(dgu[..., h:], du_ref, dtype, what="du")
    assert_close(a2, a_ref, dtype, what="a from the backward")
    # the fused layout through the separate entry point (halves as strided views)
    a3 = poison(torch.empty_like(a))
    l3k.swiglu_forward_into(g, u, a3)
    assert torch.equal(a3, a)


def test_in_place(dtype, device):
    gu = torch.randn(6, 2 * 40, device=device).to(dtype)
    g, u = gu[:, :40], gu[:, 40:]
    da = torch.randn(6, 40, device=device).to(dtype)
    a_ref, dg_ref, du_ref = ref_grads(g, u, da)
    work = gu.clone()
    l3k.swiglu_fused_backward_into(da, work, work)  # dgu over gu
    assert_close(work[:, :40], dg_ref, dtype, what="dg in place")
    assert_close(work[:, 40:], du_ref, dtype, what="du in place")
    work = gu.clone()
    wg, wu = work[:, :40], work[:, 40:]
    l3k.swiglu_backward_into(da, wg, wu, wg, wu)  # dg over g, du over u: interleaved rows, exact
    assert_close(wg, dg_ref, dtype, what="dg over g")
    assert_close(wu, du_ref, dtype, what="du over u")
    work = gu.clone()
    l3k.swiglu_fused_forward_into(work, work[:, :40])  # a over the g half
    assert_close(work[:, :40], a_ref, dtype, what="a over g")
    d2 = da.clone()
    dg = torch.empty_like(da)
    du = torch.empty_like(da)
    l3k.swiglu_backward_into(d2, g, u, dg, du, a=d2)  # the activation written over da
    assert_close(d2, a_ref, dtype, what="a over da")
    assert_close(dg, dg_ref, dtype, what="dg with a over da")


def test_strided_rows(device):
    base = torch.randn(10, 3, 300, device=device)
    g, u = base[:, 0, 5:260], base[:, 2, 1:256]  # row stride 900, misaligned starts: scalar path
    a = l3k.swiglu(g, u)
    assert_close(a, F.silu(g) * u, what="strided rows")
    gt = torch.randn(64, 8, device=device).t()  # last dim not contiguous: copied by the op
    assert_close(l3k.swiglu(gt, gt), F.silu(gt) * gt, what="transposed")


def test_autograd(dtype, device):
    g = (2 * torch.randn(3, 17, 96, device=device)).to(dtype).requires_grad_()
    u = torch.randn(3, 17, 96, device=device).to(dtype).requires_grad_()
    a = l3k.swiglu(g, u)
    da = torch.randn_like(a)
    a.backward(da)
    a_ref, dg_ref, du_ref = ref_grads(g.detach(), u.detach(), da)
    assert_close(a, a_ref, dtype, what="a")
    assert_close(g.grad, dg_ref, dtype, what="dg")
    assert_close(u.grad, du_ref, dtype, what="du")
    gu = (2 * torch.randn(5, 2 * 48, device=device)).to(dtype).requires_grad_()
    a = l3k.swiglu_fused(gu)
    da = torch.randn_like(a)
    a.backward(da)
    a_ref, dg_ref, du_ref = ref_grads(gu.detach()[:, :48], gu.detach()[:, 48:], da)
    assert_close(a, a_ref, dtype, what="fused a")
    assert_close(gu.grad, torch.cat([dg_ref, du_ref], -1), dtype, what="dgu")


def mlp_reference(x, wg, wu, wd):
    x, wg, wu, wd = (t.float() for t in (x, wg, wu, wd))
    return (F.silu(x @ wg.t()) * (x @ wu.t())) @ wd.t()


@pytest.mark.parametrize("adjacent", [True, False], ids=["one-gate-up-param", "separate-weights"])
def test_triton_swiglu_mlp(adjacent, dtype, device):
    dim, hidden = 64, 176
    x = torch.randn(2, 9, dim, device=device).to(dtype).requires_grad_()
    if adjacent:
        w_gu = (torch.randn(2 * hidden, dim, device=device) / 8).to(dtype).requires_grad_()
        wg, wu = w_gu[:hidden], w_gu[hidden:]
        assert gate_up_weight(wg, wu).data_ptr() == w_gu.data_ptr()  # zero-copy concatenation
    else:
        wg = (torch.randn(hidden, dim, device=device) / 8).to(dtype).requires_grad_()
        wu = (torch.randn(hidden, dim, device=device) / 8).to(dtype).requires_grad_()
    wd = (torch.randn(dim, hidden, device=device) / 13).to(dtype).requires_grad_()
    out = l3k.triton_swiglu(x, wg, wu, wd)
    dout = torch.randn_like(out)
    out.backward(dout)
    leaves = [x, w_gu if adjacent else wg] + ([] if adjacent else [wu]) + [wd]
    refs = [t.detach().float().requires_grad_() for t in leaves]
    if adjacent:
        rx, rgu, rwd = refs
        ref = mlp_reference(rx, rgu[:hidden], rgu[hidden:], rwd)
    else:
        rx, rwg, rwu, rwd = refs
        ref = mlp_reference(rx, rwg, rwu, rwd)
    ref.backward(dout.float())
    scale = 4 if dtype != torch.float32 else 1  # the GEMMs round in the storage dtype
    assert_close(out, ref, dtype, scale=scale, what="out")
    for t, r, name in zip(leaves, refs, ["dx", "dgate_up" if adjacent else "dgate", "dup", "ddown"]):
        # The weight gradients sum, over every token, products whose factors were each rounded
        # to the storage dtype (the gate/up outputs, their SiLU product): twice the room.
        assert_close(t.grad, r.grad, dtype, scale=scale if name == "dx" else 2 * scale, what=name)
    with torch.no_grad():
        assert_close(l3k.triton_swiglu(x, wg, wu, wd), ref, dtype, scale=scale, what="no-grad path")


def test_swiglu_mlp_module(device):
    m = l3k.SwiGLUMLP(32, 80).to(device)
    x = torch.randn(4, 32, device=device, requires_grad=True)
    y = m(x)
    ref = mlp_reference(x, m.gate_weight, m.up_weight, m.down_weight)
    assert_close(y, ref, what="module")
    y.sum().backward()
    assert m.gate_up_weight.grad.shape == (160, 32) and m.down_weight.grad.shape == (32, 80)
    assert x.grad is not None


def test_zero_size(device):
    a = l3k.swiglu(torch.empty(0, 16, device=device), torch.empty(0, 16, device=device))
    assert a.shape == (0, 16)
    assert l3k.swiglu_fused(torch.empty(3, 0, device=device)).shape == (3, 0)


def test_numpy():
    g = np.random.randn(5, 9).astype(np.float32)
    u = np.random.randn(5, 9).astype(np.float32)
    a = np.full_like(g, np.nan)
    l3k.swiglu_forward_into(g, u, a)
    np.testing.assert_allclose(a, g / (1 + np.exp(-g.astype(np.float64))) * u, rtol=1e-5, atol=1e-6)


# ---- bad inputs ---------------------------------------------------------------------------

BAD = [  # name, (callable on good tensors), exception, message prefix, message
    (
        "u shape",
        lambda t: l3k.swiglu_forward_into(t["g"], torch.randn(4, 5, device=t["d"]), t["a"]),
        ValueError,
        "swiglu_forward: ",
        "u shape (4, 5), expected (4, 6) like g",
    ),
    (
        "u dtype",
        lambda t: l3k.swiglu_forward_into(t["g"], t["u"].half(), t["a"]),
        TypeError,
        "swiglu_forward: ",
        "u dtype float16, expected float32 like g",
    ),
    (
        "g float64",
        lambda t: l3k.swiglu_forward_into(t["g"].double(), t["u"], t["a"]),
        TypeError,
        "swiglu_forward: ",
        "g dtype float64, expected float32, float16 or bfloat16",
    ),
    (
        "a dtype",
        lambda t: l3k.swiglu_forward_into(t["g"], t["u"], t["a"].bfloat16()),
        TypeError,
        "swiglu_forward: ",
        "a dtype bfloat16, expected float32 like g",
    ),
    (
        "last dim strided",
        lambda t: l3k.swiglu_forward_into(torch.randn(6, 4, device=t["d"]).t(), t["u"], t["a"]),
        ValueError,
        "swiglu_forward: ",
        "g stride[1] is 4, expected 1",
    ),
    (
        "a rows",
        lambda t: l3k.swiglu_forward_into(t["g"], t["u"], torch.full((3, 6), 7.0, device=t["d"])),
        ValueError,
        "swiglu_forward: ",
        "a shape (3, 6), expected (4, 6) like g",
    ),
    (
        "a over g shifted",
        lambda t: (lambda base: l3k.swiglu_forward_into(base[:24].view(4, 6), t["u"], base[1:25].view(4, 6)))(
            torch.randn(25, device=t["d"])
        ),
        ValueError,
        "swiglu_forward: ",
        "a overlaps g without being the same view",
    ),
    (
        "dg is du",
        lambda t: l3k.swiglu_backward_into(t["u"], t["g"], t["u"], t["a"], t["a"]),
        ValueError,
        "swiglu_backward: ",
        "du overlaps dg, expected separate memory",
    ),
    (
        "fused odd",
        lambda t: l3k.swiglu_fused_forward_into(torch.randn(4, 7, device=t["d"]), t["a"]),
        ValueError,
        "swiglu_fused_forward: ",
        "gu.shape[-1] is 7, expected an even size",
    ),
    (
        "fused a shape",
        lambda t: l3k.swiglu_fused_forward_into(torch.randn(4, 10, device=t["d"]), t["a"]),
        ValueError,
        "swiglu_fused_forward: ",
        "a shape does not match gu",
    ),
    (
        "fused dgu shape",
        lambda t: l3k.swiglu_fused_backward_into(
            t["a"], torch.randn(4, 12, device=t["d"]), torch.empty(4, 10, device=t["d"])
        ),
        ValueError,
        "swiglu_fused_backward: ",
        "dgu shape (4, 10), expected (4, 12) like gu",
    ),
    (
        "device mismatch",
        lambda t: l3k.swiglu_forward_into(t["g"], t["u"].cpu(), t["a"]) if t["d"] == "cuda" else None,
        ValueError,
        "swiglu_forward: ",
        "u is on cpu, expected cuda:0",
    ),
]


@pytest.mark.parametrize("case", BAD, ids=lambda c: c[0])
def test_bad_inputs(device, case):
    name, call, exc, prefix, message = case
    if name == "device mismatch" and device != "cuda":
        pytest.skip("needs a GPU")
    t = dict(
        g=torch.randn(4, 6, device=device),
        u=torch.randn(4, 6, device=device),
        a=torch.full((4, 6), 7.0, device=device),
        d=device,
    )
    keep = {k: v.clone() for k, v in t.items() if k != "d"}
    with pytest.raises(exc) as info:
        call(t)
    assert str(info.value).startswith(prefix), str(info.value)
    assert message in str(info.value), f"{name}: {info.value}"
    for k, v in keep.items():
        assert torch.equal(t[k], v), f"{k} was written"


def test_fused_python_error():
    with pytest.raises(ValueError, match="swiglu_fused: gu.shape\\[-1\\] is 5"):
        l3k.swiglu_fused(torch.randn(2, 5))

"""RMSNorm and fused add + RMSNorm against float32 PyTorch references, forward and
backward, CPU and (when present) CUDA; zero copy; the bad-input matrix."""

import ctypes

import numpy as np
import pytest
import torch

import llama3_kernels as l3k
from conftest import assert_close, poison
from llama3_kernels._dlpack import DLTensor  # for tensors built by hand to reach the ABI with odd metadata

SHAPES = [(2, 128, 512), (5, 123, 123), (1, 1, 4096), (4096, 4096), (3, 7, 8192), (2, 3, 1), (4, 65536), (2, 70001)]
EPS = 1e-5


def reference(x, w, eps=EPS):
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()


def scale_for(n):
    """Sums over n elements carry more rounding: widen the tolerance with sqrt(n)."""
    return max(1.0, (n / 4096) ** 0.5)


def small_enough(shape, device):
    numel = int(np.prod(shape))
    return device == "cuda" or numel <= 1 << 22


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward(shape, dtype, device):
    if not small_enough(shape, device):
        pytest.skip("large shape on the CPU path")
    n = shape[-1]
    x = torch.randn(shape, device=device).to(dtype)
    w = (1 + 0.3 * torch.randn(n, device=device)).to(dtype)
    dy = torch.randn(shape, device=device).to(dtype)

    y = poison(torch.empty_like(x))
    rstd = poison(torch.empty(shape[:-1], device=device))
    l3k.rmsnorm_forward_into(x, w, EPS, y, rstd)
    assert_close(y, reference(x, w), dtype, what="y")
    assert_close(rstd, torch.rsqrt(x.float().pow(2).mean(-1) + EPS), torch.float32, what="rstd")

    xr = x.float().requires_grad_()
    wr = w.float().requires_grad_()
    reference(xr, wr).backward(dy.float())
    for saved in (rstd, None):  # with the forward's rstd, and recomputing it
        dx = poison(torch.empty_like(x))
        dw = poison(torch.empty_like(w))
        ws = torch.empty(l3k.rmsnorm_backward_workspace_size(x), dtype=torch.uint8, device=device)
        l3k.rmsnorm_backward_into(dy, x, w, saved, EPS, dx, dw, ws)
        assert_close(dx, xr.grad, dtype, scale=scale_for(n), what="dx")
        # dw sums over all rows: compare relative to its magnitude
        rows = x.numel() // n
        assert_close(dw, wr.grad, dtype, scale=scale_for(n) * max(1.0, rows**0.5 / 4), what="dw")


def test_autograd_and_module(dtype, device):
    x = torch.randn(3, 17, 256, device=device, dtype=dtype, requires_grad=True)
    m = l3k.RMSNorm(256, eps=1e-6).to(device=device, dtype=dtype)
    with torch.no_grad():
        m.weight.normal_(1.0, 0.2)
    y = m(x)
    g = torch.randn_like(y)
    y.backward(g)
    xr = x.detach().float().requires_grad_()
    wr = m.weight.detach().float().requires_grad_()
    ref = reference(xr, wr, 1e-6)
    ref.backward(g.float())
    assert_close(y, ref, dtype, what="y")
    assert_close(x.grad, xr.grad, dtype, what="dx")
    assert_close(m.weight.grad, wr.grad, dtype, scale=4, what="dw")


def test_tutorial_name(device):
    x = torch.randn(2, 128, 512, device=device, dtype=torch.float32)
    w = torch.randn(512, device=device)
    assert_close(l3k.triton_rmsnorm(x, w), reference(x, w, 1e-5), what="triton_rmsnorm")
    assert_close(l3k.triton_rmsnorm(x, w, eps=1e-3), reference(x, w, 1e-3), what="eps")


def test_gradcheck_float64_reference_shape():
    """Backward against finite differences of our own forward (float32, small)."""
    x = torch.randn(4, 33, dtype=torch.float32)
    w = torch.randn(33)
    dy = torch.randn(4, 33)
    xr = x.double().requires_grad_()
    wr = w.double().requires_grad_()
    ref = xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + EPS) * wr
    ref.backward(dy.double())
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    l3k.rms_norm(xa, wa, EPS).backward(dy)
    torch.testing.assert_close(xa.grad.double(), xr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wa.grad.double(), wr.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 64, 512), (5, 123, 123)], ids=str)
def test_add_rmsnorm(shape, dtype, device):
    n = shape[-1]
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    r = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    w = (1 + 0.3 * torch.randn(n, device=device)).to(dtype).requires_grad_()
    h, y = l3k.add_rms_norm(x, r, w, EPS)
    dh, dy = torch.randn_like(h), torch.randn_like(y)
    (h * dh + y * dy).float().sum().backward()

    xr, rr, wr = (t.detach().clone().requires_grad_() for t in (x, r, w))
    h_ref = xr + rr  # rounded to the storage dtype, as the kernel stores h
    y_ref = reference(h_ref, wr)
    (h_ref.float() * dh.float() + y_ref * dy.float()).sum().backward()
    assert torch.equal(h, h_ref.detach()), "h must be exactly x + residual in the storage dtype"
    assert_close(y, y_ref, dtype, what="y")
    assert_close(x.grad, xr.grad, dtype, what="dx")
    assert_close(r.grad, rr.grad, dtype, what="dresidual")
    assert_close(w.grad, wr.grad, dtype, scale=4, what="dw")


@pytest.mark.parametrize("used", ["h", "y"])
def test_add_rmsnorm_one_output_used(used, device):
    """Gradients when only one of (h, y) reaches the loss: the other's gradient is never made up."""
    x, r = (torch.randn(3, 40, device=device, requires_grad=True) for _ in range(2))
    w = torch.randn(40, device=device, requires_grad=True)
    h, y = l3k.add_rms_norm(x, r, w, EPS)
    (h if used == "h" else y).pow(2).sum().backward()
    xr, rr, wr = (t.detach().clone().requires_grad_() for t in (x, r, w))
    h_ref = xr + rr
    (h_ref if used == "h" else reference(h_ref, wr)).pow(2).sum().backward()
    assert_close(x.grad, xr.grad, what="dx")
    assert_close(r.grad, rr.grad, what="dresidual")
    if used == "y":
        assert_close(w.grad, wr.grad, scale=4, what="dw")
    else:
        assert w.grad is None or torch.all(w.grad == 0)


def test_weight_of_another_dtype(device):
    """A float32 weight with bfloat16 x: the weight is cast for the kernel, its gradient comes
    back in float32."""
    x = torch.randn(4, 64, device=device).bfloat16().requires_grad_()
    w = torch.randn(64, device=device, requires_grad=True)
    y = l3k.rms_norm(x, w, EPS)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    xr, wr = x.detach().clone().requires_grad_(), w.detach().bfloat16().requires_grad_()
    reference(xr, wr).sum().backward()
    assert_close(w.grad, wr.grad, torch.bfloat16, scale=4, what="dw")


def test_add_rmsnorm_in_place(device):
    x = torch.randn(4, 256, device=device)
    r = torch.randn(4, 256, device=device)
    w = torch.randn(256, device=device)
    expect_h = x + r
    y = torch.empty_like(x)
    l3k.add_rmsnorm_forward_into(x, r, w, EPS, x, y)  # h written over x
    torch.testing.assert_close(x, expect_h)
    assert_close(y, reference(expect_h, w), what="y")


def test_zero_copy_writes_callers_buffer(device):
    x = torch.randn(8, 256, device=device)
    w = torch.randn(256, device=device)
    y = torch.empty_like(x)
    ptr = y.data_ptr()
    l3k.rmsnorm_forward_into(x, w, EPS, y)
    assert y.data_ptr() == ptr
    assert_close(y, reference(x, w), what="y")
    l3k.rmsnorm_forward_into(x, w, EPS, x)  # in place
    assert_close(x, y, what="in place")


def test_numpy_round_trip():
    x = np.random.randn(6, 100).astype(np.float32)
    w = np.random.randn(100).astype(np.float32)
    y = np.full_like(x, np.nan)
    rstd = np.full(6, np.nan, dtype=np.float32)
    l3k.rmsnorm_forward_into(x, w, EPS, y, rstd)
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + EPS) * w
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_strided_views_and_slices(device):
    base = torch.randn(6, 2, 300, device=device)
    x = base[:, 1, 10:266]  # rows of stride 600, misaligned start: the scalar path
    w = torch.randn(256, device=device)
    y = l3k.rms_norm(x, w)
    assert_close(y, reference(x, w), what="sliced rows")
    xt = torch.randn(64, 32, device=device).t()  # last dim not contiguous: copied by the op
    assert_close(
        l3k.rms_norm(xt, torch.ones(64, device=device)), reference(xt, torch.ones(64, device=device)), what="transposed"
    )


def test_zero_size(device):
    x = torch.empty(0, 64, device=device)
    y = l3k.rms_norm(x, torch.ones(64, device=device))
    assert y.shape == (0, 64)
    x = torch.empty(0, 64, device=device, requires_grad=True)
    w = torch.ones(64, device=device, requires_grad=True)
    l3k.rms_norm(x, w).sum().backward()
    assert torch.equal(w.grad, torch.zeros(64, device=device))


# ---- bad inputs: each gets its exception and message, and touches nothing --------------

BAD_CASES = [  # name, override of the good arguments, exception, message fragment
    (
        "weight length",
        lambda x, w: dict(w=torch.randn(65, device=x.device)),
        ValueError,
        "weight has ndim 1 and 65 elements, expected shape (64,)",
    ),
    ("weight dtype", lambda x, w: dict(w=w.half()), TypeError, "weight dtype float16, expected float32 like x"),
    (
        "integer x",
        lambda x, w: dict(x=torch.ones(4, 64, dtype=torch.int32, device=x.device)),
        TypeError,
        "x dtype int32, expected float32, float16 or bfloat16",
    ),
    ("float64 x", lambda x, w: dict(x=x.double()), TypeError, "x dtype float64, expected float32, float16 or bfloat16"),
    (
        "wrong y shape",
        lambda x, w: dict(y=torch.empty(4, 32, device=x.device)),
        ValueError,
        "y shape (4, 32), expected (4, 64) like x",
    ),
    (
        "mixed y dtype",
        lambda x, w: dict(y=torch.empty(4, 64, device=x.device, dtype=torch.bfloat16)),
        TypeError,
        "y dtype bfloat16, expected float32 like x",
    ),
    (
        "last dim strided",
        lambda x, w: dict(x=torch.randn(64, 4, device=x.device).t()),
        ValueError,
        "x stride[1] is 4, expected 1",
    ),
    ("negative eps", lambda x, w: dict(eps=-1.0), ValueError, "eps is -1, expected a finite value >= 0"),
    ("nan eps", lambda x, w: dict(eps=float("nan")), ValueError, "eps is nan"),
    ("inf eps", lambda x, w: dict(eps=float("inf")), ValueError, "eps is inf"),
    (
        "rstd dtype",
        lambda x, w: dict(rstd=torch.empty(4, device=x.device, dtype=torch.float16)),
        TypeError,
        "rstd dtype float16, expected float32",
    ),
    (
        "rstd length",
        lambda x, w: dict(rstd=torch.empty(5, device=x.device)),
        ValueError,
        "rstd has 5 elements, expected 4",
    ),
    (
        "device mismatch",
        lambda x, w: dict(w=w.cpu()) if x.is_cuda else None,
        ValueError,
        "weight is on cpu, expected cuda:0",
    ),
]


@pytest.mark.parametrize("case", BAD_CASES, ids=lambda c: c[0])
def test_bad_inputs(device, case):
    name, make, exc, message = case
    x = torch.randn(4, 64, device=device)
    w = torch.randn(64, device=device)
    override = make(x, w)
    if override is None:
        pytest.skip("needs a GPU")
    args = dict(x=x, w=w, eps=EPS, y=torch.full_like(x, 7.0), rstd=None)
    args.update(override)
    untouched = args["y"].clone().view(torch.uint8)  # bitwise: an unwritten NaN still equals itself
    with pytest.raises(exc) as info:
        l3k.rmsnorm_forward_into(args["x"], args["w"], args["eps"], args["y"], args["rstd"])
    assert str(info.value).startswith("rmsnorm_forward: "), str(info.value)
    assert message in str(info.value), f"{name}: {info.value}"
    assert torch.equal(args["y"].view(torch.uint8), untouched), "output was written"


def test_backward_bad_workspace(device):
    x = torch.randn(4, 64, device=device)
    w = torch.randn(64, device=device)
    dx = torch.full_like(x, 7.0)
    with pytest.raises(ValueError, match="rmsnorm_backward: workspace is NULL, expected"):
        l3k.rmsnorm_backward_into(x, x, w, None, EPS, dx, torch.empty_like(w), None)
    small = torch.empty(3, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match="workspace has 3 bytes, expected at least"):
        l3k.rmsnorm_backward_into(x, x, w, None, EPS, dx, torch.empty_like(w), small)
    assert torch.all(dx == 7.0)


def test_tensors_on_two_gpus_are_rejected_before_any_launch():
    """x on cuda:0, weight on cuda:1: refused by validation (no GPU needed to check it)."""
    from llama3_kernels._lib import DEVICE, LIB, NO_CUDA

    buf = (ctypes.c_float * 64)()
    shape = (ctypes.c_int64 * 1)(64)
    # float32 (code 2, 32 bits) on kDLCUDA (2) device `dev`
    on = lambda dev: DLTensor(ctypes.addressof(buf), (2, dev), 1, (2, 32, 1), shape, None, 0)
    x, w, y = on(0), on(1), on(0)
    st = LIB.l3k_rmsnorm_forward(ctypes.byref(x), ctypes.byref(w), 1e-5, ctypes.byref(y), None, None)
    if l3k.has_cuda():
        assert st == DEVICE
        assert LIB.l3k_last_error() == b"rmsnorm_forward: weight is on cuda:1, expected cuda:0 like the other tensors"
    else:
        assert st == NO_CUDA and b"built without CUDA" in LIB.l3k_last_error()


def test_misaligned_pointer_is_rejected():
    """A float16 DLTensor whose data pointer is odd: built by hand through the ABI."""
    from llama3_kernels._lib import ALIGNMENT, LIB

    buf = (ctypes.c_uint16 * 130)()
    shape = (ctypes.c_int64 * 1)(64)
    # float16 (code 2, 16 bits) on kDLCPU (1), data pointer moved by `off` bytes
    mk = lambda off: DLTensor(ctypes.addressof(buf), (1, 0), 1, (2, 16, 1), shape, None, off)
    x, w, y = mk(1), mk(0), mk(0)
    st = LIB.l3k_rmsnorm_forward(ctypes.byref(x), ctypes.byref(w), 1e-5, ctypes.byref(y), None, None)
    assert st == ALIGNMENT
    assert b"x data pointer" in LIB.l3k_last_error() and b"not aligned to its 2-byte elements" in LIB.l3k_last_error()


def test_cuda_tensor_in_cpu_only_build_or_mixed_devices():
    x = torch.randn(4, 64)
    if not torch.cuda.is_available():
        pytest.skip("no GPU; the CPU-only build's answer to a CUDA tensor is covered by tests/c")
    with pytest.raises(ValueError, match="rmsnorm_forward: weight is on cuda:0, expected cpu"):
        l3k.rmsnorm_forward_into(x, torch.ones(64, device="cuda"), EPS, torch.empty_like(x))


def test_version_matches_header():
    import re
    from pathlib import Path

    header = Path(__file__).resolve().parents[2] / "capi" / "l3k.h"
    text = header.read_text()
    major, minor, patch = (
        int(re.search(rf"#define L3K_VERSION_{k} (\d+)", text).group(1)) for k in ("MAJOR", "MINOR", "PATCH")
    )
    assert l3k.version() == (major, minor, patch)
    assert l3k.__version__ == f"{major}.{minor}.{patch}"

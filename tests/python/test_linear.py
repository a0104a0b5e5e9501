"""The linear layer's GEMMs against torch.matmul in float32: forward with and without
the fused residual, both backward products, accumulation, views and bad inputs."""

import pytest
import torch

import llama3_kernels as l3k
from conftest import assert_close, poison

SHAPES = [((2, 5, 64), 48), ((7, 33), 17), ((1, 128), 96)]


@pytest.mark.parametrize("xshape,n", SHAPES, ids=str)
def test_forward_backward(xshape, n, dtype, device):
    k = xshape[-1]
    x = torch.randn(xshape, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    r = torch.randn(*xshape[:-1], n, device=device).to(dtype)
    scale = 2.0  # sums over k products
    y = poison(torch.empty(*xshape[:-1], n, device=device, dtype=dtype))
    l3k.linear_forward_into(x, w, y)
    assert_close(y, x.float() @ w.float().T, dtype, scale, "y")
    l3k.linear_forward_into(x, w, y, residual=r)
    assert_close(y, x.float() @ w.float().T + r.float(), dtype, scale, "y + residual")

    dy = torch.randn_like(y)
    dx = poison(torch.empty_like(x))
    l3k.linear_backward_input_into(dy, w, dx)
    assert_close(dx, dy.float() @ w.float(), dtype, scale, "dx")
    dw = poison(torch.empty_like(w))
    l3k.linear_backward_weight_into(dy, x, dw)
    ref_dw = dy.float().reshape(-1, n).T @ x.float().reshape(-1, k)
    assert_close(dw, ref_dw, dtype, scale * 2, "dw")
    dw32 = torch.ones(n, k, device=device)
    l3k.linear_backward_weight_into(dy, x, dw32, accumulate=True)
    assert_close(dw32, ref_dw + 1, torch.float32 if dtype == torch.float32 else dtype, scale * 2, "dw fp32 +=")


def test_first_call_tunes_and_later_calls_agree(device):
    """On CUDA the first call of a GEMM configuration times cuBLASLt's candidates on the
    caller's buffers: its output (with an out-of-place residual, run once per candidate)
    must still be x W^T + r, a later call must reuse the pick (same bits), and a first
    call that accumulates into y itself (not tuned) must add exactly once."""
    x = torch.randn(3, 77, 320, device=device).bfloat16()  # a shape no other test uses
    w = (torch.randn(200, 320, device=device) / 18).bfloat16()
    r = torch.randn(3, 77, 200, device=device).bfloat16()
    ref = x.float() @ w.float().T + r.float()
    y1 = poison(torch.empty_like(r))
    l3k.linear_forward_into(x, w, y1, residual=r)
    assert_close(y1, ref, torch.bfloat16, 2, "first call")
    y2 = poison(torch.empty_like(r))
    l3k.linear_forward_into(x, w, y2, residual=r)
    assert torch.equal(y1, y2)
    y3 = r.clone()
    l3k.linear_forward_into(x, w, y3, residual=y3)
    assert_close(y3, ref, torch.bfloat16, 2, "in place")


def test_autograd(dtype, device):
    x = torch.randn(3, 9, 40, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(24, 40, device=device) / 6).to(dtype).requires_grad_()
    r = torch.randn(3, 9, 24, device=device, dtype=dtype, requires_grad=True)
    y = l3k.linear(x, w, r)
    g = torch.randn_like(y)
    y.backward(g)
    xr, wr, rr = (t.detach().float().requires_grad_() for t in (x, w, r))
    (xr @ wr.T + rr).backward(g.float())
    assert_close(y, (xr @ wr.T + rr).detach(), dtype, 2, "y")
    assert_close(x.grad, xr.grad, dtype, 2, "dx")
    assert_close(w.grad, wr.grad, dtype, 4, "dw")
    assert_close(r.grad, rr.grad, dtype, 1, "dresidual")


def test_weight_row_slice_of_fused_projection(device):
    """q, k, v weights as row slices of one fused weight: no copy needed."""
    wqkv = torch.randn(96, 32, device=device)
    x = torch.randn(5, 32, device=device)
    y = l3k.linear(x, wqkv[32:64])
    assert_close(y, x @ wqkv[32:64].T, what="slice")


def test_bad_inputs(device):
    x = torch.randn(4, 32, device=device)
    w = torch.randn(16, 32, device=device)
    y = torch.full((4, 16), 3.0, device=device)
    with pytest.raises(ValueError, match="linear_forward: weight has in_features 31, expected 32 like x's last dim"):
        l3k.linear_forward_into(x, torch.randn(16, 31, device=device), y)
    with pytest.raises(
        ValueError, match="linear_forward: y has ndim 2 and last dim 16, expected x's leading dims and last dim 8"
    ):
        l3k.linear_forward_into(x, torch.randn(8, 32, device=device), y)
    with pytest.raises(TypeError, match="linear_forward: weight dtype bfloat16, expected float32 like x"):
        l3k.linear_forward_into(x, w.bfloat16(), y)
    with pytest.raises(ValueError, match="linear_forward: weight has ndim 1, expected 2"):
        l3k.linear_forward_into(x, w[0], y)
    with pytest.raises(ValueError, match="linear_forward: residual shape"):
        l3k.linear_forward_into(x, w, y, residual=torch.randn(4, 17, device=device))
    with pytest.raises(
        TypeError, match="linear_backward_weight: dweight dtype float16, expected float32 or the dtype of x"
    ):
        l3k.linear_backward_weight_into(y, x, torch.empty(16, 32, device=device, dtype=torch.float16))
    with pytest.raises(ValueError, match="linear_forward: y overlaps x, expected separate memory"):
        buf = torch.randn(4, 48, device=device)
        l3k.linear_forward_into(buf[:, :32], w, buf[:, 32:])
    assert torch.all(y == 3.0)

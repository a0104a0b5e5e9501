"""RMSNorm and fused residual-add + RMSNorm."""

from __future__ import annotations

import torch

from ..raw import (  # re-exported: the raw calls live in the torch-free raw module
    add_rmsnorm_forward_into,
    rmsnorm_backward_into,
    rmsnorm_backward_workspace_size,
    rmsnorm_forward_into,
)
from ._common import needs_grad, rows_view
from ._registry import define, differentiable, none_slot, ops, traced

# ---- bodies: the registered ops' kernels, called directly by the eager route ----------------


def _weight_like(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return weight if weight.dtype == x.dtype else weight.to(x.dtype)


def _rows_empty(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _rstd_buffer(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[:-1], dtype=torch.float32)


def _rms_norm(x, weight, eps, want_rstd=True):
    """(y, rstd); rstd (float32 per row, for the backward) is None when not wanted."""
    weight = _weight_like(weight, x)
    x = rows_view(x)
    y = _rows_empty(x)
    rstd = _rstd_buffer(x) if want_rstd else None
    rmsnorm_forward_into(x, weight, eps, y, rstd)
    return y, rstd


def _add_rms_norm(x, residual, weight, eps, want_rstd=True):
    """(h, y, rstd) with h = x + residual; rstd is None when not wanted."""
    weight = _weight_like(weight, x)
    x, residual = rows_view(x), rows_view(residual)
    h, y = _rows_empty(x), _rows_empty(x)
    rstd = _rstd_buffer(x) if want_rstd else None
    add_rmsnorm_forward_into(x, residual, weight, eps, h, y, rstd)
    return h, y, rstd


def _rms_norm_backward(dy, dh, x, weight, rstd, eps, need_dweight=True):
    """(dx, dweight) of RMSNorm over x; `dh` (may be None) is the gradient reaching x directly
    (the fused op's h).  dweight is a size-0 placeholder when not wanted."""
    w = _weight_like(weight, x)
    x, dy = rows_view(x), rows_view(dy)
    dh = rows_view(dh) if dh is not None else None
    dx = _rows_empty(x)
    if need_dweight:
        dw = torch.empty_like(w)
        ws = x.new_empty(rmsnorm_backward_workspace_size(x), dtype=torch.uint8)
    else:
        dw = ws = None
    rmsnorm_backward_into(dy, x, w, rstd, eps, dx, dw, ws, dh=dh)
    if dw is None:
        dw = none_slot(weight)
    elif dw.dtype != weight.dtype:
        dw = dw.to(weight.dtype)
    return dx, dw


def _rms_norm_backward_kernel(dy, x, weight, rstd, eps, need_dweight=True):
    return _rms_norm_backward(dy, None, x, weight, rstd, eps, need_dweight)


def _add_rms_norm_backward_kernel(dy, dh, h, weight, rstd, eps, need_dweight=True):
    return _rms_norm_backward(dy, dh, h, weight, rstd, eps, need_dweight)


# ---- fakes and registrations -------------------------------------------------------------


def _backward_fake(x, weight, need_dweight):
    return _rows_empty(x), (torch.empty_like(weight) if need_dweight else none_slot(weight))


define(
    "rms_norm(Tensor x, Tensor weight, float eps) -> (Tensor y, Tensor rstd)",
    _rms_norm,
    lambda x, weight, eps: (_rows_empty(x), _rstd_buffer(x)),
)
define(
    "add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor h, Tensor y, Tensor rstd)",
    _add_rms_norm,
    lambda x, residual, weight, eps: (_rows_empty(x), _rows_empty(x), _rstd_buffer(x)),
)
define(
    "rms_norm_backward(Tensor dy, Tensor x, Tensor weight, Tensor rstd, float eps, bool need_dweight=True) "
    "-> (Tensor dx, Tensor dweight)",
    _rms_norm_backward_kernel,
    lambda dy, x, weight, rstd, eps, need_dweight=True: _backward_fake(x, weight, need_dweight),
)
# dx of the fused op (= d residual): RMSNorm's backward of dy through h, plus dh.
define(
    "add_rms_norm_backward(Tensor dy, Tensor dh, Tensor h, Tensor weight, Tensor rstd, float eps, "
    "bool need_dweight=True) -> (Tensor dx, Tensor dweight)",
    _add_rms_norm_backward_kernel,
    lambda dy, dh, h, weight, rstd, eps, need_dweight=True: _backward_fake(h, weight, need_dweight),
)


# rstd is an output only for the backward: it never gets a gradient, and none is made up for it
# (set_materialize_grads(False)), so a gradient the backward receives may be None.
def _rms_norm_setup(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.eps = eps
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _rms_norm_grads(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    need_dw = ctx.needs_input_grad[1]
    bwd = ops.rms_norm_backward if traced(dy) else _rms_norm_backward_kernel
    dx, dw = bwd(dy, x, weight, rstd, ctx.eps, need_dw)
    return dx, (dw if need_dw else None), None


def _add_rms_norm_setup(ctx, inputs, output):
    x, residual, weight, eps = inputs
    h, _, rstd = output
    ctx.save_for_backward(h, weight, rstd)
    ctx.eps = eps
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)


def _add_rms_norm_grads(ctx, dh, dy, _drstd):
    h, weight, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    if dy is None:  # only h was used
        dy = torch.zeros_like(dh)
    bwd = ops.add_rms_norm_backward if traced(dy) else _add_rms_norm_backward_kernel
    dx, dw = bwd(dy, dh, h, weight, rstd, ctx.eps, need[2])
    return (dx if need[0] else None), (dx if need[1] else None), (dw if need[2] else None), None


RMSNormFunction = differentiable("rms_norm", _rms_norm, _rms_norm_setup, _rms_norm_grads, "RMSNormFunction")
AddRMSNormFunction = differentiable(
    "add_rms_norm", _add_rms_norm, _add_rms_norm_setup, _add_rms_norm_grads, "AddRMSNormFunction"
)


# ---- public ops ------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dim: x * rsqrt(mean(x^2) + eps) * weight, in float32 inside.

    Differentiable in x and weight.  weight is cast to x's dtype if it differs.
    """
    if traced(x):
        return ops.rms_norm(x, weight, eps)[0]
    if needs_grad(x, weight):
        return RMSNormFunction.apply(x, weight, eps)[0]
    return _rms_norm(x, weight, eps, False)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm: returns (h, y) with h = x + residual, y = rmsnorm(h) * weight."""
    if traced(x):
        h, y, _ = ops.add_rms_norm(x, residual, weight, eps)
    elif needs_grad(x, residual, weight):
        h, y, _ = AddRMSNormFunction.apply(x, residual, weight, eps)
    else:
        h, y, _ = _add_rms_norm(x, residual, weight, eps, False)
    return h, y


def triton_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The tutorial's name and signature for the fused RMSNorm (a CUDA C kernel here)."""
    return rms_norm(x, weight, eps)

"""RMSNorm and fused residual-add + RMSNorm."""
from __future__ import annotations

import ctypes

import torch

from .._dlpack import Borrowed, current_stream
from .._lib import LIB, check
from ._common import needs_grad, rows_view


# ---- raw calls: caller-owned buffers, any DLPack producer ------------------------------

def rmsnorm_forward_into(x, weight, eps: float, y, rstd=None, stream: int | None = None) -> None:
    """y = rmsnorm(x) * weight, written into `y` (and per-row float32 `rstd` if given)."""
    b = Borrowed(x, weight, y, rstd)
    if stream is None:
        stream = current_stream(x)
    check(LIB.l3k_rmsnorm_forward(b.ptrs[0], b.ptrs[1], eps, b.ptrs[2], b.ptrs[3], stream))


def add_rmsnorm_forward_into(x, residual, weight, eps: float, h, y, rstd=None,
                             stream: int | None = None) -> None:
    """h = x + residual; y = rmsnorm(h) * weight, written into `h`, `y` (and `rstd`)."""
    b = Borrowed(x, residual, weight, h, y, rstd)
    if stream is None:
        stream = current_stream(x)
    check(LIB.l3k_add_rmsnorm_forward(*b.ptrs[:3], eps, *b.ptrs[3:], stream))


def rmsnorm_backward_workspace_size(x) -> int:
    b = Borrowed(x)
    size = ctypes.c_size_t(0)
    check(LIB.l3k_rmsnorm_backward_workspace_size(b.ptrs[0], ctypes.byref(size)))
    return size.value


def rmsnorm_backward_into(dy, x, weight, rstd, eps: float, dx, dweight=None, workspace=None,
                          dh=None, stream: int | None = None) -> None:
    """dx (and dweight) of RMSNorm; `dh` adds the gradient reaching h directly (fused op)."""
    b = Borrowed(dy, dh, x, weight, rstd, dx, dweight, workspace)
    if stream is None:
        stream = current_stream(x)
    p = b.ptrs
    check(LIB.l3k_rmsnorm_backward(p[0], p[1], p[2], p[3], p[4], eps, p[5], p[6], p[7], stream))


# ---- torch-facing ops ------------------------------------------------------------------

def _workspace(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(rmsnorm_backward_workspace_size(x), dtype=torch.uint8, device=x.device)


def _rstd_buffer(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)


def _weight_like(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return weight if weight.dtype == x.dtype else weight.to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x = rows_view(x)
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        rstd = _rstd_buffer(x)
        rmsnorm_forward_into(x, weight, eps, y, rstd)
        ctx.save_for_backward(x, weight, rstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dy = rows_view(dy)
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        dweight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        ws = _workspace(x) if dweight is not None else None
        rmsnorm_backward_into(dy, x, weight, rstd, ctx.eps, dx, dweight, ws)
        return dx, dweight, None


class AddRMSNormFunction(torch.autograd.Function):
    """(h, y) = (x + residual, rmsnorm(x + residual) * weight)."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        x, residual = rows_view(x), rows_view(residual)
        h = torch.empty_like(x, memory_format=torch.contiguous_format)
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        rstd = _rstd_buffer(x)
        add_rmsnorm_forward_into(x, residual, weight, eps, h, y, rstd)
        ctx.save_for_backward(h, weight, rstd)
        ctx.eps = eps
        return h, y

    @staticmethod
    def backward(ctx, dh, dy):
        h, weight, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(h)
        dy = rows_view(dy)
        dh = rows_view(dh) if dh is not None else None
        dx = torch.empty_like(h, memory_format=torch.contiguous_format)
        dweight = torch.empty_like(weight) if ctx.needs_input_grad[2] else None
        ws = _workspace(h) if dweight is not None else None
        rmsnorm_backward_into(dy, h, weight, rstd, ctx.eps, dx, dweight, ws, dh=dh)
        return dx, dx, dweight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dim: x * rsqrt(mean(x^2) + eps) * weight, in float32 inside.

    Differentiable in x and weight.  weight is cast to x's dtype if it differs.
    """
    if torch.compiler.is_compiling():  # torch.compile: the opaque torch.ops.llama3_kernels op
        from .. import library  # (imported here: library.py imports this module)
        return library.rms_norm(x, weight, eps)
    weight = _weight_like(weight, x)
    if needs_grad(x, weight):
        return RMSNormFunction.apply(x, weight, eps)
    x = rows_view(x)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    rmsnorm_forward_into(x, weight, eps, y)
    return y


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm: returns (h, y) with h = x + residual, y = rmsnorm(h) * weight."""
    if torch.compiler.is_compiling():  # torch.compile: the opaque torch.ops.llama3_kernels op
        from .. import library  # (imported here: library.py imports this module)
        return library.add_rms_norm(x, residual, weight, eps)
    weight = _weight_like(weight, x)
    if needs_grad(x, residual, weight):
        return AddRMSNormFunction.apply(x, residual, weight, eps)
    x, residual = rows_view(x), rows_view(residual)
    h = torch.empty_like(x, memory_format=torch.contiguous_format)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    add_rmsnorm_forward_into(x, residual, weight, eps, h, y)
    return h, y


def triton_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The tutorial's name and signature for the fused RMSNorm (a CUDA C kernel here)."""
    return rms_norm(x, weight, eps)

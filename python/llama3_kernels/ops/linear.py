"""The linear layer on the library's GEMMs (cuBLASLt on CUDA), with the residual
add fused into the GEMM (beta = 1, out of place)."""

from __future__ import annotations

import torch

from ..raw import (  # re-exported: the raw calls live in the torch-free raw module
    linear_backward_input_into,
    linear_backward_weight_into,
    linear_forward_into,
    linear_workspace_size,
)
from ._common import needs_grad, rows_view
from ._registry import define, differentiable, ops, traced

_workspace_bytes: list[int] = []  # l3k_linear_workspace_size for CUDA tensors, asked once


def gemm_workspace(device: torch.device) -> torch.Tensor | None:
    """A cuBLASLt workspace for one call on `device`.

    Allocated per call from PyTorch's caching allocator (a few microseconds) and never
    cached: a cached buffer would be shared by concurrent streams, and one first made
    while a CUDA graph is captured or warmed up (torch.compile's reduce-overhead) would
    live in that graph's private pool and outlive it."""
    if device.type != "cuda":
        return None
    if not _workspace_bytes:
        _workspace_bytes.append(linear_workspace_size(torch.empty(0, device=device)))
    return torch.empty(_workspace_bytes[0], dtype=torch.uint8, device=device)


# ---- bodies: the registered ops' kernels, called directly by the eager route ----------------


def _linear(x, weight, residual=None):
    x = rows_view(x)
    y = x.new_empty(*x.shape[:-1], weight.shape[0])
    linear_forward_into(x, weight, y, rows_view(residual) if residual is not None else None, gemm_workspace(x.device))
    return y


def _linear_backward_input(dy, weight):
    dy = rows_view(dy)
    dx = dy.new_empty(*dy.shape[:-1], weight.shape[1])
    linear_backward_input_into(dy, weight, dx, workspace=gemm_workspace(dy.device))
    return dx


def _linear_backward_weight(dy, x):
    dy, x = rows_view(dy), rows_view(x)
    dw = x.new_empty(dy.shape[-1], x.shape[-1])
    linear_backward_weight_into(dy, x, dw, workspace=gemm_workspace(dy.device))
    return dw


# ---- registrations -----------------------------------------------------------------------------

define(
    "linear(Tensor x, Tensor weight, Tensor? residual=None) -> Tensor",
    _linear,
    lambda x, weight, residual=None: x.new_empty(*x.shape[:-1], weight.shape[0]),
)
define(
    "linear_backward_input(Tensor dy, Tensor weight) -> Tensor",
    _linear_backward_input,
    lambda dy, weight: dy.new_empty(*dy.shape[:-1], weight.shape[1]),
)
define(
    "linear_backward_weight(Tensor dy, Tensor x) -> Tensor",
    _linear_backward_weight,
    lambda dy, x: x.new_empty(dy.shape[-1], x.shape[-1]),
)


def _linear_setup(ctx, inputs, output):
    x, weight, residual = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_residual = residual is not None


def _linear_grads(ctx, dy):
    x, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    eager = not traced(dy)
    dx = dw = None
    if need[0]:
        dx = (_linear_backward_input if eager else ops.linear_backward_input)(dy, weight)
    if need[1]:
        dw = (_linear_backward_weight if eager else ops.linear_backward_weight)(dy, x)
        if dw.dtype != weight.dtype:
            dw = dw.to(weight.dtype)
    dres = dy if ctx.has_residual and need[2] else None
    return dx, dw, dres


LinearFunction = differentiable("linear", _linear, _linear_setup, _linear_grads, "LinearFunction")


# ---- public ops ------------------------------------------------------------------------------


def linear(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ residual, fused into the GEMM epilogue and rounded once)."""
    if traced(x):
        return ops.linear(x, weight, residual)
    if needs_grad(x, weight, residual):
        return LinearFunction.apply(x, weight, residual)
    return _linear(x, weight, residual)

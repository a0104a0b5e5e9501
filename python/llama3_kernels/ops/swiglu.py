"""SwiGLU: the fused activation silu(g) * u (separate or fused gate_up layout), and the
whole LLaMA MLP around it."""

from __future__ import annotations

import math

import torch

from ..raw import (  # re-exported: the raw calls live in the torch-free raw module
    swiglu_backward_into,
    swiglu_forward_into,
    swiglu_fused_backward_into,
    swiglu_fused_forward_into,
)
from ._common import needs_grad, rows_view
from ._registry import define, differentiable, none_slot, ops, traced

# ---- bodies: the registered ops' kernels, called directly by the eager route ----------------


def _empty(shape, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(shape)


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _half(gu: torch.Tensor):
    return (*gu.shape[:-1], gu.shape[-1] // 2)


def _swiglu(g, u):
    g, u = rows_view(g), rows_view(u)
    a = _empty_like(g)
    swiglu_forward_into(g, u, a)
    return a


def _swiglu_backward(da, g, u):
    g, u, da = rows_view(g), rows_view(u), rows_view(da)
    dg, du = _empty_like(g), _empty_like(u)
    swiglu_backward_into(da, g, u, dg, du)
    return dg, du


def _swiglu_fused(gu):
    gu = rows_view(gu)
    a = _empty(_half(gu), gu)
    swiglu_fused_forward_into(gu, a)
    return a


def _swiglu_fused_backward(da, gu):
    gu, da = rows_view(gu), rows_view(da)
    dgu = _empty_like(gu)
    swiglu_fused_backward_into(da, gu, dgu)
    return dgu


def gate_up_weight(gate_weight: torch.Tensor, up_weight: torch.Tensor) -> torch.Tensor:
    """[gate; up] as one (2h, dim) matrix: a zero-copy view when up directly follows gate in
    memory (e.g. both are slices of one fused parameter), else a concatenated copy."""
    if (
        gate_weight.shape == up_weight.shape
        and gate_weight.dim() == 2
        and gate_weight.is_contiguous()
        and up_weight.is_contiguous()
        and gate_weight.dtype == up_weight.dtype
        and gate_weight.device == up_weight.device
        and up_weight.data_ptr() == gate_weight.data_ptr() + gate_weight.numel() * gate_weight.element_size()
        and gate_weight.untyped_storage().data_ptr() == up_weight.untyped_storage().data_ptr()
    ):
        h, dim = gate_weight.shape
        return torch.as_strided(gate_weight, (2 * h, dim), (dim, 1))
    return torch.cat([gate_weight, up_weight], 0)


def _swiglu_mlp(x, gate_weight, up_weight, down_weight):
    """(out, gu): down(silu(x @ gate.T) * (x @ up.T)) with gate/up as ONE GEMM (torch matmul
    for now) and the activation fused; gu, the gate/up projection (rows, 2h), is what the
    backward needs besides x and the weights.  The one GEMM takes the two weights as they lie
    when up directly follows gate in memory (a test only real tensors can make, which is why
    the whole MLP is one op rather than a graph of GEMMs)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    gu = x2 @ gate_up_weight(gate_weight, up_weight).t()
    a = _empty((gu.shape[0], gu.shape[1] // 2), gu)
    swiglu_fused_forward_into(gu, a)
    out = a @ down_weight.t()
    return (out if x.dim() == 2 else out.reshape(*x.shape[:-1], down_weight.shape[0])), gu


def _swiglu_mlp_backward(
    dout, x, gate_weight, up_weight, down_weight, gu, need_dx=True, need_dgate_up=True, need_ddown=True
):
    """(dx, d[gate; up] as one (2h, dim) tensor, ddown); size-0 placeholders for those not wanted.
    The activation for ddown is recomputed by the backward kernel (written over da)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    dout2 = dout if dout.dim() == 2 else dout.reshape(-1, dout.shape[-1])
    da = dout2 @ down_weight  # (rows, h)
    dgu = torch.empty_like(gu)
    swiglu_fused_backward_into(da, gu, dgu, a=da)  # da now holds the activation
    ddown = dout2.t() @ da if need_ddown else none_slot(down_weight)
    dgate_up = dgu.t() @ x2 if need_dgate_up else none_slot(gate_weight)
    if need_dx:
        dx = (dgu @ gate_up_weight(gate_weight, up_weight)).reshape(x.shape)
    else:
        dx = none_slot(x)
    return dx, dgate_up, ddown


# ---- registrations -----------------------------------------------------------------------------


def _swiglu_mlp_fake(x, gate_weight, up_weight, down_weight):
    rows = math.prod(x.shape[:-1])
    return (_empty((*x.shape[:-1], down_weight.shape[0]), x), _empty((rows, 2 * gate_weight.shape[0]), x))


def _swiglu_mlp_backward_fake(
    dout, x, gate_weight, up_weight, down_weight, gu, need_dx=True, need_dgate_up=True, need_ddown=True
):
    h, dim = gate_weight.shape
    return (
        _empty(x.shape, x) if need_dx else none_slot(x),
        _empty((2 * h, dim), gate_weight) if need_dgate_up else none_slot(gate_weight),
        _empty(down_weight.shape, down_weight) if need_ddown else none_slot(down_weight),
    )


define("swiglu(Tensor g, Tensor u) -> Tensor", _swiglu, lambda g, u: _empty_like(g))
define(
    "swiglu_backward(Tensor da, Tensor g, Tensor u) -> (Tensor dg, Tensor du)",
    _swiglu_backward,
    lambda da, g, u: (_empty_like(g), _empty_like(u)),
)
define("swiglu_fused(Tensor gu) -> Tensor", _swiglu_fused, lambda gu: _empty(_half(gu), gu))
define("swiglu_fused_backward(Tensor da, Tensor gu) -> Tensor", _swiglu_fused_backward, lambda da, gu: _empty_like(gu))
define(
    "swiglu_mlp(Tensor x, Tensor gate_weight, Tensor up_weight, Tensor down_weight) -> (Tensor out, Tensor gu)",
    _swiglu_mlp,
    _swiglu_mlp_fake,
)
define(
    "swiglu_mlp_backward(Tensor dout, Tensor x, Tensor gate_weight, Tensor up_weight, Tensor down_weight, "
    "Tensor gu, bool need_dx=True, bool need_dgate_up=True, bool need_ddown=True) "
    "-> (Tensor dx, Tensor dgate_up, Tensor ddown)",
    _swiglu_mlp_backward,
    _swiglu_mlp_backward_fake,
)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_grads(ctx, da):
    g, u = ctx.saved_tensors
    return (ops.swiglu_backward if traced(da) else _swiglu_backward)(da, g, u)


def _swiglu_fused_grads(ctx, da):
    (gu,) = ctx.saved_tensors
    return (ops.swiglu_fused_backward if traced(da) else _swiglu_fused_backward)(da, gu)


def _swiglu_mlp_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zeros made up for gu, which gets no gradient


def _swiglu_mlp_grads(ctx, dout, _dgu):
    x, gate_w, up_w, down_w, gu = ctx.saved_tensors
    need_dx, need_dgate, need_dup, need_ddown = ctx.needs_input_grad
    bwd = ops.swiglu_mlp_backward if traced(dout) else _swiglu_mlp_backward
    dx, dgate_up, ddown = bwd(dout, x, gate_w, up_w, down_w, gu, need_dx, need_dgate or need_dup, need_ddown)
    h = gate_w.shape[0]
    return (
        (dx if need_dx else None),
        (dgate_up[:h] if need_dgate else None),
        (dgate_up[h:] if need_dup else None),
        (ddown if need_ddown else None),
    )


SwiGLUFunction = differentiable("swiglu", _swiglu, _save_inputs, _swiglu_grads, "SwiGLUFunction")
SwiGLUFusedFunction = differentiable(
    "swiglu_fused", _swiglu_fused, _save_inputs, _swiglu_fused_grads, "SwiGLUFusedFunction"
)
SwiGLUMLPFunction = differentiable("swiglu_mlp", _swiglu_mlp, _swiglu_mlp_setup, _swiglu_mlp_grads, "SwiGLUMLPFunction")


# ---- public ops ------------------------------------------------------------------------------


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u in one kernel (float32 inside).  Differentiable in g and u."""
    if traced(g):
        return ops.swiglu(g, u)
    if needs_grad(g, u):
        return SwiGLUFunction.apply(g, u)
    return _swiglu(g, u)


def swiglu_fused(gu: torch.Tensor) -> torch.Tensor:
    """silu(gu[..., :h]) * gu[..., h:] for a fused gate_up tensor (..., 2h).  Differentiable."""
    if gu.shape[-1] % 2:
        raise ValueError(f"swiglu_fused: gu.shape[-1] is {gu.shape[-1]}, expected an even size (2 * hidden)")
    if traced(gu):
        return ops.swiglu_fused(gu)
    if needs_grad(gu):
        return SwiGLUFusedFunction.apply(gu)
    return _swiglu_fused(gu)


def swiglu_mlp(
    x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor, down_weight: torch.Tensor
) -> torch.Tensor:
    """The LLaMA MLP: (silu(x @ gate.T) * (x @ up.T)) @ down.T.  gate/up run as one GEMM
    (torch matmul for now), the activation is the fused kernel.  Differentiable."""
    if traced(x):
        return ops.swiglu_mlp(x, gate_weight, up_weight, down_weight)[0]
    if needs_grad(x, gate_weight, up_weight, down_weight):
        return SwiGLUMLPFunction.apply(x, gate_weight, up_weight, down_weight)[0]
    return _swiglu_mlp(x, gate_weight, up_weight, down_weight)[0]


def triton_swiglu(
    x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor, down_weight: torch.Tensor
) -> torch.Tensor:
    """The tutorial's name and signature for the whole SwiGLU MLP (weights in nn.Linear
    layout (out, in)).  A CUDA C activation kernel between torch GEMMs here."""
    return swiglu_mlp(x, gate_weight, up_weight, down_weight)

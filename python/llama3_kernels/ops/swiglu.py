"""SwiGLU: the fused activation silu(g) * u (separate or fused gate_up layout), and the
whole LLaMA MLP around it."""
from __future__ import annotations

import torch

from .._dlpack import Borrowed, current_stream
from .._lib import LIB, check
from ._common import needs_grad, rows_view


# ---- raw calls: caller-owned buffers, any DLPack producer ------------------------------

def swiglu_forward_into(g, u, a, stream: int | None = None) -> None:
    """a = silu(g) * u (a may be g or u itself: in place)."""
    b = Borrowed(g, u, a)
    check(LIB.l3k_swiglu_forward(*b.ptrs, current_stream(g) if stream is None else stream))


def swiglu_fused_forward_into(gu, a, stream: int | None = None) -> None:
    """a = silu(gu[..., :h]) * gu[..., h:] for gu (..., 2h), a (..., h)."""
    b = Borrowed(gu, a)
    check(LIB.l3k_swiglu_fused_forward(*b.ptrs, current_stream(gu) if stream is None else stream))


def swiglu_backward_into(da, g, u, dg, du, a=None, stream: int | None = None) -> None:
    """dg, du of a = silu(g) * u (silu recomputed); `a` optionally receives silu(g) * u."""
    b = Borrowed(da, g, u, dg, du, a)
    check(LIB.l3k_swiglu_backward(*b.ptrs, current_stream(g) if stream is None else stream))


def swiglu_fused_backward_into(da, gu, dgu, a=None, stream: int | None = None) -> None:
    """dgu = [dg | du] for the fused layout; `a` optionally receives the activation."""
    b = Borrowed(da, gu, dgu, a)
    check(LIB.l3k_swiglu_fused_backward(*b.ptrs, current_stream(gu) if stream is None else stream))


# ---- torch-facing ops ------------------------------------------------------------------

def _empty(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device)


class SwiGLUFunction(torch.autograd.Function):
    """a = silu(g) * u; saves g and u, recomputes silu in the backward."""

    @staticmethod
    def forward(ctx, g, u):
        g, u = rows_view(g), rows_view(u)
        a = _empty(g.shape, g)
        swiglu_forward_into(g, u, a)
        ctx.save_for_backward(g, u)
        return a

    @staticmethod
    def backward(ctx, da):
        g, u = ctx.saved_tensors
        da = rows_view(da)
        dg, du = _empty(g.shape, g), _empty(u.shape, u)
        swiglu_backward_into(da, g, u, dg, du)
        return dg, du


class SwiGLUFusedFunction(torch.autograd.Function):
    """a = silu(gu[..., :h]) * gu[..., h:]; saves gu."""

    @staticmethod
    def forward(ctx, gu):
        gu = rows_view(gu)
        a = _empty((*gu.shape[:-1], gu.shape[-1] // 2), gu)
        swiglu_fused_forward_into(gu, a)
        ctx.save_for_backward(gu)
        return a

    @staticmethod
    def backward(ctx, da):
        (gu,) = ctx.saved_tensors
        da = rows_view(da)
        dgu = _empty(gu.shape, gu)
        swiglu_fused_backward_into(da, gu, dgu)
        return dgu


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u in one kernel (float32 inside).  Differentiable in g and u."""
    if torch.compiler.is_compiling():  # torch.compile: the opaque torch.ops.llama3_kernels op
        from .. import library  # (imported here: library.py imports this module)
        return library.swiglu(g, u)
    if needs_grad(g, u):
        return SwiGLUFunction.apply(g, u)
    g, u = rows_view(g), rows_view(u)
    a = _empty(g.shape, g)
    swiglu_forward_into(g, u, a)
    return a


def swiglu_fused(gu: torch.Tensor) -> torch.Tensor:
    """silu(gu[..., :h]) * gu[..., h:] for a fused gate_up tensor (..., 2h).  Differentiable."""
    if torch.compiler.is_compiling():  # torch.compile: the opaque torch.ops.llama3_kernels op
        from .. import library  # (imported here: library.py imports this module)
        return library.swiglu_fused(gu)
    if gu.shape[-1] % 2:
        raise ValueError(f"swiglu_fused: gu.shape[-1] is {gu.shape[-1]}, expected an even size (2 * hidden)")
    if needs_grad(gu):
        return SwiGLUFusedFunction.apply(gu)
    gu = rows_view(gu)
    a = _empty((*gu.shape[:-1], gu.shape[-1] // 2), gu)
    swiglu_fused_forward_into(gu, a)
    return a


# ---- the MLP ----------------------------------------------------------------------------

def gate_up_weight(gate_weight: torch.Tensor, up_weight: torch.Tensor) -> torch.Tensor:
    """[gate; up] as one (2h, dim) matrix: a zero-copy view when up directly follows gate in
    memory (e.g. both are slices of one fused parameter), else a concatenated copy."""
    if (gate_weight.shape == up_weight.shape and gate_weight.dim() == 2 and gate_weight.is_contiguous()
            and up_weight.is_contiguous() and gate_weight.dtype == up_weight.dtype
            and gate_weight.device == up_weight.device
            and up_weight.data_ptr() == gate_weight.data_ptr() + gate_weight.numel() * gate_weight.element_size()
            and gate_weight.untyped_storage().data_ptr() == up_weight.untyped_storage().data_ptr()):
        h, dim = gate_weight.shape
        return torch.as_strided(gate_weight, (2 * h, dim), (dim, 1))
    return torch.cat([gate_weight, up_weight], 0)


class SwiGLUMLPFunction(torch.autograd.Function):
    """down(silu(x @ gate.T) * (x @ up.T)) with gate/up as ONE GEMM and the activation fused.

    Saves x and the gate_up projection only: the activation needed for the down
    projection's weight gradient is recomputed by the backward kernel (written over da)."""

    @staticmethod
    def forward(ctx, x, gate_w, up_w, down_w):
        w_gu = gate_up_weight(gate_w, up_w)
        x2 = x.reshape(-1, x.shape[-1])
        gu = x2 @ w_gu.t()
        a = _empty((gu.shape[0], gu.shape[1] // 2), gu)
        swiglu_fused_forward_into(gu, a)
        out = a @ down_w.t()
        ctx.save_for_backward(x2, gate_w, up_w, down_w, gu)
        ctx.x_shape = x.shape
        return out.reshape(*x.shape[:-1], down_w.shape[0])

    @staticmethod
    def backward(ctx, dout):
        x2, gate_w, up_w, down_w, gu = ctx.saved_tensors
        dout2 = dout.reshape(-1, dout.shape[-1])
        da = dout2 @ down_w                       # (rows, h)
        dgu = torch.empty_like(gu)
        swiglu_fused_backward_into(da, gu, dgu, a=da)  # da now holds the activation
        a = da
        h = gate_w.shape[0]
        dx = dgate = dup = ddown = None
        if ctx.needs_input_grad[3]:
            ddown = dout2.t() @ a
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dw_gu = dgu.t() @ x2
            dgate, dup = dw_gu[:h], dw_gu[h:]
        if ctx.needs_input_grad[0]:
            dx = (dgu @ gate_up_weight(gate_w, up_w)).reshape(ctx.x_shape)
        return dx, dgate, dup, ddown


def swiglu_mlp(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor,
               down_weight: torch.Tensor) -> torch.Tensor:
    """The LLaMA MLP: (silu(x @ gate.T) * (x @ up.T)) @ down.T.  gate/up run as one GEMM
    (torch matmul for now), the activation is the fused kernel.  Differentiable."""
    if torch.compiler.is_compiling():  # torch.compile: the opaque torch.ops.llama3_kernels op
        from .. import library  # (imported here: library.py imports this module)
        return library.swiglu_mlp(x, gate_weight, up_weight, down_weight)
    if needs_grad(x, gate_weight, up_weight, down_weight):
        return SwiGLUMLPFunction.apply(x, gate_weight, up_weight, down_weight)
    gu = x.reshape(-1, x.shape[-1]) @ gate_up_weight(gate_weight, up_weight).t()
    a = _empty((gu.shape[0], gu.shape[1] // 2), gu)
    swiglu_fused_forward_into(gu, a)
    return (a @ down_weight.t()).reshape(*x.shape[:-1], down_weight.shape[0])


def triton_swiglu(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor,
                  down_weight: torch.Tensor) -> torch.Tensor:
    """The tutorial's name and signature for the whole SwiGLU MLP (weights in nn.Linear
    layout (out, in)).  A CUDA C activation kernel between torch GEMMs here."""
    return swiglu_mlp(x, gate_weight, up_weight, down_weight)

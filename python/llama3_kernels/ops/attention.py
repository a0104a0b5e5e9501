"""Flash attention (forward and backward CUDA kernels, a tiled C reference on the CPU)."""

from __future__ import annotations

import torch

from .._lib import SHAPE, L3KArgumentError
from ..raw import (  # re-exported: the raw calls live in the torch-free raw module
    attention_backward_into,
    attention_backward_workspace_size,
    attention_forward_into,
)
from ._common import key_range_for, needs_grad
from ._registry import define, differentiable, ops, traced

# ---- bodies: the registered ops' kernels, called directly by the eager route ----------------


def _bshd_like(t: torch.Tensor) -> torch.Tensor:
    """An empty (batch, heads, seq, head_dim) tensor stored as (batch, seq, heads, head_dim):
    the layout the output projection reads without a copy."""
    b, h, s, d = t.shape
    return t.new_empty_strided((b, h, s, d), (s * h * d, d, h * d, 1))


def _kernel_ready(t: torch.Tensor) -> torch.Tensor:
    """Copy only when the kernels cannot read t's layout (head_dim strided, or unaligned on CUDA)."""
    if t.stride(-1) != 1 and t.shape[-1] != 1:
        return t.contiguous()
    if t.is_cuda and not (
        t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s, n in zip(t.stride()[:3], t.shape[:3]) if n > 1)
    ):
        return t.contiguous()
    return t


def _lse_buffer(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape[:3], dtype=torch.float32)


def _flash_attn(q, k, v, causal=False, scale=0.0, deterministic=False, key_range=None):
    """(o, lse): o (B, H, Sq, D) stored as (B, Sq, H, D), lse (B, H, Sq) float32."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise L3KArgumentError(
                SHAPE, f"attention_forward: {name} has ndim {t.dim()}, expected 4 (batch, heads, seq, head_dim)"
            )
    q, k, v = _kernel_ready(q), _kernel_ready(k), _kernel_ready(v)
    o = _bshd_like(q)
    lse = _lse_buffer(q)
    attention_forward_into(q, k, v, o, lse, causal, scale, key_range=key_range)
    return o, lse


def _flash_attn_backward(dout, q, k, v, o, lse, causal=False, scale=0.0, deterministic=False, key_range=None):
    """(dq, dk, dv), each stored as (B, S, H, D) like o."""
    q, k, v = _kernel_ready(q), _kernel_ready(k), _kernel_ready(v)
    dout, o = _kernel_ready(dout), _kernel_ready(o)
    dq, dk, dv = _bshd_like(q), _bshd_like(k), _bshd_like(v)
    ws = q.new_empty(attention_backward_workspace_size(q, k, deterministic), dtype=torch.uint8)
    attention_backward_into(dout, q, k, v, o, lse, dq, dk, dv, causal, scale, deterministic, ws, key_range=key_range)
    return dq, dk, dv


# ---- registrations -----------------------------------------------------------------------------


def _flash_attn_fake(q, k, v, causal=False, scale=0.0, deterministic=False, key_range=None):
    return _bshd_like(q), _lse_buffer(q)


define(
    "flash_attn(Tensor q, Tensor k, Tensor v, bool causal=False, float scale=0.0, bool deterministic=False, "
    "Tensor? key_range=None) -> (Tensor o, Tensor lse)",
    _flash_attn,
    _flash_attn_fake,
)
define(
    "flash_attn_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, bool causal=False, "
    "float scale=0.0, bool deterministic=False, Tensor? key_range=None) -> (Tensor dq, Tensor dk, Tensor dv)",
    _flash_attn_backward,
    lambda dout, q, k, v, o, lse, causal=False, scale=0.0, deterministic=False, key_range=None: (
        _bshd_like(q),
        _bshd_like(k),
        _bshd_like(v),
    ),
)


def _flash_attn_setup(ctx, inputs, output):
    q, k, v, causal, scale, deterministic, *rest = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, rest[0] if rest else None)
    ctx.causal, ctx.scale, ctx.deterministic = causal, scale, deterministic
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zeros made up for lse, which gets no gradient


def _flash_attn_grads(ctx, do, _dlse):
    q, k, v, o, lse, key_range = ctx.saved_tensors
    bwd = ops.flash_attn_backward if traced(do) else _flash_attn_backward
    dq, dk, dv = bwd(do, q, k, v, o, lse, ctx.causal, ctx.scale, ctx.deterministic, key_range)
    return dq, dk, dv, None, None, None, None


FlashAttnFunction = differentiable("flash_attn", _flash_attn, _flash_attn_setup, _flash_attn_grads, "FlashAttnFunction")


# ---- public ops ------------------------------------------------------------------------------


def flash_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    deterministic: bool = False,
    key_range: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(scale * q k^T [+ causal mask]) v for q (B, H, Sq, D), k/v (B, Hkv, Sk, D).

    GQA when H is a multiple of Hkv.  Causal is aligned bottom-right when Sq != Sk.
    key_range (B, 2), integers: sequence b sees only keys key_range[b, 0] .. key_range[b, 1] - 1
    (padding on either side, with no Sq x Sk mask; values are clamped into [0, Sk)); a query that
    sees no key gets zeros and passes no gradient on.
    The result has shape (B, H, Sq, D) and is stored as (B, Sq, H, D), so
    ``o.transpose(1, 2).reshape(B, Sq, H * D)`` is free.  Differentiable in q, k, v.
    """
    s = 0.0 if scale is None else float(scale)
    key_range = key_range_for(key_range, q)
    if traced(q):
        return ops.flash_attn(q, k, v, bool(causal), s, bool(deterministic), key_range)[0]
    if needs_grad(q, k, v):
        return FlashAttnFunction.apply(q, k, v, causal, s, deterministic, key_range)[0]
    return _flash_attn(q, k, v, causal, s, key_range=key_range)[0]


def triton_flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """The tutorial's name and signature: SDPA semantics (non-causal by default), on the
    library's flash-attention kernels."""
    return flash_attn(q, k, v, causal=causal)

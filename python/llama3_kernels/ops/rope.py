"""Rotary position embedding (RoPE) on q and k in one kernel, and LLaMA-3 tables."""

from __future__ import annotations

import math

import torch

from ..raw import (  # re-exported: the raw calls live in the torch-free raw module
    rope_backward_into,
    rope_forward_into,
)
from ._common import needs_grad
from ._registry import TORCH_LIB, define, differentiable, none_slot, ops, traced

HALF, INTERLEAVED = 0, 1  # L3K_ROPE_HALF, L3K_ROPE_INTERLEAVED


# ---- tables -------------------------------------------------------------------------------

LLAMA31_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


def rope_inv_freq(head_dim: int, theta: float = 500000.0, scaling=None, device=None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/head_dim), i < head_dim/2, in float64.

    scaling: None, True (LLaMA-3.1 defaults) or a dict with factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings: wavelengths longer than
    original/low_freq_factor are divided by `factor`, shorter than original/high_freq_factor
    are kept, and those between are blended linearly in original/wavelength.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim is {head_dim}, expected an even number")
    inv = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    if scaling:
        s = dict(LLAMA31_SCALING)
        if isinstance(scaling, dict):
            s.update(scaling)
        ctx = float(s["original_max_position_embeddings"])
        lo, hi, factor = float(s["low_freq_factor"]), float(s["high_freq_factor"]), float(s["factor"])
        wavelen = 2 * math.pi / inv
        blend = ((ctx / wavelen - lo) / (hi - lo)).clamp(0.0, 1.0)  # 0: long waves, 1: short waves
        inv = torch.where(
            wavelen < ctx / hi,
            inv,
            torch.where(wavelen > ctx / lo, inv / factor, (1 - blend) * inv / factor + blend * inv),
        )
    return inv


def llama3_rope_cos_sin(
    seq_len: int,
    head_dim: int,
    theta: float = 500000.0,
    scaling=None,
    offset: int = 0,
    device=None,
    dtype=torch.float32,
):
    """(cos, sin), each (seq_len, head_dim/2), for positions offset .. offset + seq_len - 1,
    built on `device`.  Angles are computed in float64, then rounded to `dtype`
    (float32 by default: the kernel reads float32 tables at full precision).
    scaling=True applies LLaMA-3.1's frequency scaling (factor 8, low/high 1/4, 8192)."""
    inv = rope_inv_freq(head_dim, theta, scaling, device)
    pos = torch.arange(offset, offset + seq_len, dtype=torch.float64, device=inv.device)
    ang = torch.outer(pos, inv)
    return ang.cos().to(dtype), ang.sin().to(dtype)


# ---- bodies: the registered ops' kernels, called directly by the eager route ----------------


def _last_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _table(t: torch.Tensor, like: torch.Tensor, head_dim: int, interleaved: bool) -> torch.Tensor:
    """cos/sin as the kernel takes them: (.., head_dim/2), contiguous, float32 or like's dtype.
    Full-width tables (.., head_dim) are accepted too: Hugging Face's cat(f, f) for
    rotate-half, Meta's repeat_interleave(f, 2) for interleaved."""
    if t.is_cuda != like.is_cuda or t.get_device() != like.get_device():  # the library's devices: CPU, CUDA
        t = t.to(like.device)
    if t.shape[-1] == head_dim and head_dim > 0:
        t = t[..., 0::2] if interleaved else t[..., : head_dim // 2]
    if t.dtype is not torch.float32 and t.dtype is not like.dtype:
        t = t.float()
    return t if t.is_contiguous() else t.contiguous()


def _prep(q, k, cos, sin, interleaved):
    d = q.shape[-1]
    return _table(cos, q, d, interleaved), _table(sin, q, d, interleaved)


def _rotate(into, q, k, cos, sin, offset, interleaved):
    """Rotation (forward or inverse, per `into`) into new contiguous tensors."""
    q = _last_contig(q)
    q_out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if k is None:
        into(q, None, cos, sin, q_out, None, offset, interleaved)
        return q_out, none_slot(q)
    k = _last_contig(k)
    k_out = torch.empty_like(k, memory_format=torch.contiguous_format)
    into(q, k, cos, sin, q_out, k_out, offset, interleaved)
    return q_out, k_out


def _rope(q, k, cos, sin, offset=0, interleaved=False):
    """(q_rot, k_rot) in new tensors; k_rot is a size-0 placeholder when k is None."""
    return _rotate(rope_forward_into, q, k, cos, sin, offset, interleaved)


def _rope_backward(dq, dk, cos, sin, offset=0, interleaved=False):
    return _rotate(rope_backward_into, dq, dk, cos, sin, offset, interleaved)


def _rope_inplace(q, k, cos, sin, offset=0, interleaved=False):
    rope_forward_into(q, k, cos, sin, q, k, offset, interleaved)


def _rope_backward_inplace(dq, dk, cos, sin, offset=0, interleaved=False):
    rope_backward_into(dq, dk, cos, sin, dq, dk, offset, interleaved)


# ---- registrations -----------------------------------------------------------------------------


def _rope_fake(q, k, cos, sin, offset=0, interleaved=False):
    new = torch.empty_like
    cf = torch.contiguous_format
    return new(q, memory_format=cf), (new(k, memory_format=cf) if k is not None else none_slot(q))


def _no_output(*args):
    return None


_ARGS = "Tensor cos, Tensor sin, int offset=0, bool interleaved=False"
define(f"rope(Tensor q, Tensor? k, {_ARGS}) -> (Tensor q_out, Tensor k_out)", _rope, _rope_fake)
define(f"rope_backward(Tensor dq, Tensor? dk, {_ARGS}) -> (Tensor dq_in, Tensor dk_in)", _rope_backward, _rope_fake)
define(f"rope_(Tensor(a!) q, Tensor(b!)? k, {_ARGS}) -> ()", _rope_inplace, _no_output)
define(f"rope_backward_(Tensor(a!) dq, Tensor(b!)? dk, {_ARGS}) -> ()", _rope_backward_inplace, _no_output)


def _rope_setup(ctx, inputs, output):
    _, k, cos, sin, offset, interleaved = inputs
    ctx.save_for_backward(cos, sin)
    ctx.offset, ctx.interleaved = offset, interleaved
    if k is None:
        ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: nothing to rotate


def _rope_grads(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    if dq is None and dk is None:
        return None, None, None, None, None, None
    first = dq if dq is not None else dk
    bwd = ops.rope_backward if traced(first) else _rope_backward
    a, b = bwd(first, dk if dq is not None else None, cos, sin, ctx.offset, ctx.interleaved)
    dq_in, dk_in = (a, b if dk is not None else None) if dq is not None else (None, a)
    return dq_in, dk_in, None, None, None, None


RoPEFunction = differentiable("rope", _rope, _rope_setup, _rope_grads, "RoPEFunction")


# ---- in place, with autograd -------------------------------------------------------------------
#
# register_autograd takes functional ops only, so rope_ has one autograd.Function, used by the
# eager route and by rope_'s Autograd kernel (the traced route) alike.  It rotates q and k where
# they are and marks dirty the tensors that own them, its `targets`: q and k themselves when
# neither is a view, or the contiguous tensor both are views of (q and k cut from one fused QKV
# projection: autograd refuses a Function that dirties two views and returns both).  Views of
# different tensors take one call each.  Either way one launch rotates everything a call holds,
# and the backward rotates the gradients back in place on copies of them.


def _geom(t: torch.Tensor, base: torch.Tensor):
    return t.shape, t.stride(), t.storage_offset() - base.storage_offset()


def _split(targets, geoms):
    """dq and dk in the targets' gradients: those gradients themselves (geoms None), or the views
    at geoms (size, stride, storage offset relative to the target) of the one target's."""
    if geoms is None:
        return (targets[0], targets[1]) if len(targets) == 2 else (targets[0], None)
    base = targets[0]
    at = base.storage_offset()
    (q_size, q_stride, q_rel), (k_size, k_stride, k_rel) = geoms
    return base.as_strided(q_size, q_stride, at + q_rel), base.as_strided(k_size, k_stride, at + k_rel)


class RoPEInplaceFunction(torch.autograd.Function):
    """rope_ under autograd: forward(cos, sin, offset, interleaved, (q, k), geoms, *targets).

    q and k travel in a tuple, hidden from autograd: their history is their targets'."""

    @staticmethod
    def forward(ctx, cos, sin, offset, interleaved, qk, geoms, *targets):
        q, k = qk
        (ops.rope_ if traced(q) else _rope_inplace)(q, k, cos, sin, offset, interleaved)
        ctx.mark_dirty(*targets)
        ctx.save_for_backward(cos, sin)
        ctx.offset, ctx.interleaved, ctx.geoms = offset, interleaved, geoms
        return targets if len(targets) > 1 else targets[0]

    @staticmethod
    def backward(ctx, *grads):
        cos, sin = ctx.saved_tensors
        # gradients rotated back on copies: the part that is neither q nor k (v) passes through
        grads = tuple([g.clone(memory_format=torch.contiguous_format) for g in grads])
        dq, dk = _split(grads, ctx.geoms)
        (ops.rope_backward_ if traced(dq) else _rope_backward_inplace)(dq, dk, cos, sin, ctx.offset, ctx.interleaved)
        return (None, None, None, None, None, None) + grads


def _rope_inplace_grad(q, k, cos, sin, offset, interleaved):
    apply = RoPEInplaceFunction.apply
    if k is None:
        apply(cos, sin, offset, interleaved, (q, None), None, q)
        return
    q_view, k_view = q._is_view(), k._is_view()
    if not q_view and not k_view:
        apply(cos, sin, offset, interleaved, (q, k), None, q, k)
        return
    base = q._base if q_view else None
    if base is not None and k_view and k._base is base and base.is_contiguous():
        apply(cos, sin, offset, interleaved, (q, k), (_geom(q, base), _geom(k, base)), base)
        return
    apply(cos, sin, offset, interleaved, (q, None), None, q)
    apply(cos, sin, offset, interleaved, (k, None), None, k)


def _rope_inplace_autograd(keyset, q, k, cos, sin, offset=0, interleaved=False):
    """rope_'s Autograd kernel (the traced route, and direct calls of the op)."""
    if needs_grad(q, k):
        _rope_inplace_grad(q, k, cos, sin, offset, interleaved)
        return
    with torch._C._AutoDispatchBelowAutograd():
        ops.rope_.default.redispatch(keyset & torch._C._after_autograd_keyset, q, k, cos, sin, offset, interleaved)


def _rope_inplace_version_bump(keyset, q, k, cos, sin, offset=0, interleaved=False):
    """ADInplaceOrView: bump the version counters of the mutated q and k (as custom_op does),
    so autograd notices if a tensor it saved was overwritten."""
    torch.autograd.graph.increment_version(q)
    if k is not None:
        torch.autograd.graph.increment_version(k)
    ops.rope_.default.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, q, k, cos, sin, offset, interleaved)


TORCH_LIB.impl("rope_", _rope_inplace_autograd, "Autograd", with_keyset=True)
TORCH_LIB.impl("rope_", _rope_inplace_version_bump, "ADInplaceOrView", with_keyset=True)


# ---- public ops ------------------------------------------------------------------------------


def _public_op(name, traced_op, autograd_call, kernel, result, doc):
    """One public entry point: the tables prepared, then the op under tracing, the autograd route
    when q or k needs a gradient, else the kernel directly; result(q, k, out) is what it returns."""

    def op(
        q: torch.Tensor,
        k: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        offset: int = 0,
        interleaved: bool = False,
    ):
        cos, sin = _prep(q, k, cos, sin, interleaved)
        if traced(q):
            out = traced_op(q, k, cos, sin, int(offset), bool(interleaved))
        elif needs_grad(q, k):
            out = autograd_call(q, k, cos, sin, offset, interleaved)
        else:
            out = kernel(q, k, cos, sin, offset, interleaved)
        return result(q, k, out)

    op.__name__ = op.__qualname__ = name
    op.__doc__ = doc
    return op


rope = _public_op(
    "rope",
    ops.rope,
    RoPEFunction.apply,
    _rope,
    lambda q, k, out: (out[0], out[1] if k is not None else None),
    """Rotary embedding of q (batch, heads, seq, head_dim) and k (batch, kv_heads, seq,
    head_dim; may be None), out of place: returns new (q_rot, k_rot).  Differentiable.

    cos, sin: (rows, head_dim/2) or (batch, rows, head_dim/2) with rows >= seq + offset
    (full-width (.., head_dim) tables are accepted too); float32 or q's dtype, else converted.
    interleaved=False rotates pairs (i, i + head_dim/2) (Hugging Face), True pairs (2i, 2i+1)
    (Meta).  q and k may be strided views (e.g. of one fused QKV projection).""",
)

rope_ = _public_op(
    "rope_",
    ops.rope_,
    _rope_inplace_grad,
    _rope_inplace,
    lambda q, k, out: (q, k),
    """In-place rotary embedding of q and k (see `rope`); returns (q, k).  Differentiable
    (autograd sees the in-place update).  q and k need a contiguous last dim.""",
)


def triton_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The tutorial's name and signature: rotate q and k in place (rotate-half convention,
    cos/sin of shape (seq, head_dim/2)); returns (q, k).  A CUDA C kernel here."""
    return rope_(q, k, cos, sin)

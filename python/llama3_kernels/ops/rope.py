"""Rotary position embedding (RoPE) on q and k in one kernel, and LLaMA-3 tables."""
from __future__ import annotations

import math

import torch

from .._dlpack import Borrowed, current_stream
from .._lib import LIB, check
from ._common import needs_grad

HALF, INTERLEAVED = 0, 1  # L3K_ROPE_HALF, L3K_ROPE_INTERLEAVED


# ---- raw calls: caller-owned buffers, any DLPack producer ------------------------------

def rope_forward_into(q, k, cos, sin, q_out, k_out=None, offset: int = 0,
                      interleaved: bool = False, stream: int | None = None) -> None:
    """Rotate q (batch, heads, seq, head_dim) and optional k (batch, kv_heads, seq, head_dim)
    into q_out / k_out (pass q / k themselves for in place).  cos, sin: (rows, head_dim/2)
    or (batch, rows, head_dim/2) with rows >= seq + offset."""
    b = Borrowed(q, k, cos, sin, q_out, k_out)
    if stream is None:
        stream = current_stream(q)
    p = b.ptrs
    check(LIB.l3k_rope_forward(p[0], p[1], p[2], p[3], int(offset), int(bool(interleaved)), p[4], p[5],
                               stream))


def rope_backward_into(dq, dk, cos, sin, dq_out, dk_out=None, offset: int = 0,
                       interleaved: bool = False, stream: int | None = None) -> None:
    """Gradient of RoPE: the inverse rotation of dq (and dk) into dq_out (and dk_out)."""
    b = Borrowed(dq, dk, cos, sin, dq_out, dk_out)
    if stream is None:
        stream = current_stream(dq)
    p = b.ptrs
    check(LIB.l3k_rope_backward(p[0], p[1], p[2], p[3], int(offset), int(bool(interleaved)), p[4], p[5],
                                stream))


# ---- tables -------------------------------------------------------------------------------

LLAMA31_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192)


def rope_inv_freq(head_dim: int, theta: float = 500000.0, scaling=None,
                  device=None) -> torch.Tensor:
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
        inv = torch.where(wavelen < ctx / hi, inv,
                          torch.where(wavelen > ctx / lo, inv / factor,
                                      (1 - blend) * inv / factor + blend * inv))
    return inv


def llama3_rope_cos_sin(seq_len: int, head_dim: int, theta: float = 500000.0, scaling=None,
                        offset: int = 0, device=None, dtype=torch.float32):
    """(cos, sin), each (seq_len, head_dim/2), for positions offset .. offset + seq_len - 1,
    built on `device`.  Angles are computed in float64, then rounded to `dtype`
    (float32 by default: the kernel reads float32 tables at full precision).
    scaling=True applies LLaMA-3.1's frequency scaling (factor 8, low/high 1/4, 8192)."""
    inv = rope_inv_freq(head_dim, theta, scaling, device)
    pos = torch.arange(offset, offset + seq_len, dtype=torch.float64, device=inv.device)
    ang = torch.outer(pos, inv)
    return ang.cos().to(dtype), ang.sin().to(dtype)


# ---- torch-facing ops ------------------------------------------------------------------

def _last_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _table(t: torch.Tensor, like: torch.Tensor, head_dim: int, interleaved: bool) -> torch.Tensor:
    """cos/sin as the kernel takes them: (.., head_dim/2), contiguous, float32 or like's dtype.
    Full-width tables (.., head_dim) are accepted too: Hugging Face's cat(f, f) for
    rotate-half, Meta's repeat_interleave(f, 2) for interleaved."""
    if t.device != like.device:
        t = t.to(like.device)
    if t.shape[-1] == head_dim and head_dim > 0:
        t = t[..., 0::2] if interleaved else t[..., : head_dim // 2]
    if t.dtype not in (torch.float32, like.dtype):
        t = t.float()
    return t.contiguous()


def _prep(q, k, cos, sin, interleaved):
    d = q.shape[-1]
    return _table(cos, q, d, interleaved), _table(sin, q, d, interleaved)


def _grad_in(g: torch.Tensor | None) -> torch.Tensor | None:
    return None if g is None else _last_contig(g)


def _rotate_back(ctx, dq, dk):
    """Inverse rotation of the incoming gradients, into new tensors."""
    cos, sin = ctx.saved_tensors
    dq = _grad_in(dq)
    dk = _grad_in(dk) if ctx.has_k else None
    if dq is None and dk is None:
        return None, None
    first, second = (dq, dk) if dq is not None else (dk, None)
    out1 = torch.empty(first.shape, dtype=first.dtype, device=first.device)
    out2 = torch.empty(second.shape, dtype=second.dtype, device=second.device) if second is not None else None
    rope_backward_into(first, second, cos, sin, out1, out2, ctx.offset, ctx.interleaved)
    return (out1, out2) if dq is not None else (None, out1)


class RoPEFunction(torch.autograd.Function):
    """Out of place: (q_rot, k_rot) in new (batch, heads, seq, head_dim) tensors."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, offset, interleaved):
        q = _last_contig(q)
        k = _last_contig(k) if k is not None else None
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device) if k is not None else None
        rope_forward_into(q, k, cos, sin, q_out, k_out, offset, interleaved)
        ctx.save_for_backward(cos, sin)
        ctx.offset, ctx.interleaved, ctx.has_k = offset, interleaved, k is not None
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq, dk):
        dq_in, dk_in = _rotate_back(ctx, dq, dk)
        return dq_in, dk_in, None, None, None, None


class RoPEInplaceFunction(torch.autograd.Function):
    """In place: q and k are rotated where they are (strided views included)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, offset, interleaved):
        rope_forward_into(q, k, cos, sin, q, k, offset, interleaved)
        ctx.save_for_backward(cos, sin)
        ctx.offset, ctx.interleaved, ctx.has_k = offset, interleaved, k is not None
        if k is not None:
            ctx.mark_dirty(q, k)
        else:
            ctx.mark_dirty(q)
        return q, k

    @staticmethod
    def backward(ctx, dq, dk):
        dq_in, dk_in = _rotate_back(ctx, dq, dk)
        return dq_in, dk_in, None, None, None, None


class RoPEInplaceOneFunction(torch.autograd.Function):
    """In place on one tensor, one output: autograd accepts it for a view as well."""

    @staticmethod
    def forward(ctx, x, cos, sin, offset, interleaved):
        rope_forward_into(x, None, cos, sin, x, None, offset, interleaved)
        ctx.save_for_backward(cos, sin)
        ctx.offset, ctx.interleaved, ctx.has_k = offset, interleaved, False
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, dx):
        dx_in, _ = _rotate_back(ctx, dx, None)
        return dx_in, None, None, None, None


class RoPEBaseInplaceFunction(torch.autograd.Function):
    """In place on q and k that are views of one contiguous tensor (e.g. a fused QKV
    projection): the base is the Function's one dirty input, so autograd accepts the
    in-place update of both views, still with one launch each way.  `q_geom` / `k_geom`
    are (size, stride, storage offset relative to the base)."""

    @staticmethod
    def forward(ctx, base, q_geom, k_geom, cos, sin, offset, interleaved):
        q, k = _views(base, q_geom), _views(base, k_geom)
        rope_forward_into(q, k, cos, sin, q, k, offset, interleaved)
        ctx.mark_dirty(base)
        ctx.save_for_backward(cos, sin)
        ctx.q_geom, ctx.k_geom, ctx.offset, ctx.interleaved = q_geom, k_geom, offset, interleaved
        return base

    @staticmethod
    def backward(ctx, dbase):
        cos, sin = ctx.saved_tensors
        out = dbase.clone(memory_format=torch.contiguous_format)  # the other parts (v) pass through
        dq, dk = _views(out, ctx.q_geom), _views(out, ctx.k_geom)
        rope_backward_into(dq, dk, cos, sin, dq, dk, ctx.offset, ctx.interleaved)
        return out, None, None, None, None, None, None


def _geom(t: torch.Tensor | None, base: torch.Tensor):
    if t is None:
        return None
    return tuple(t.shape), tuple(t.stride()), t.storage_offset() - base.storage_offset()


def _views(base: torch.Tensor, geom):
    if geom is None:
        return None
    size, stride, rel = geom
    return base.as_strided(size, stride, base.storage_offset() + rel)


def _rope_inplace_autograd(q, k, cos, sin, offset, interleaved):
    """Autograd refuses a Function that dirties two views and returns both: views of one
    contiguous base go through the base (one launch); views of different bases take one
    Function each (two launches); plain tensors one Function."""
    qb = q._base if q._is_view() else None
    kb = k._base if k is not None and k._is_view() else None
    if qb is None and kb is None:
        return RoPEInplaceFunction.apply(q, k, cos, sin, offset, interleaved)
    if qb is not None and (k is None or kb is qb) and qb.is_contiguous():
        RoPEBaseInplaceFunction.apply(qb, _geom(q, qb), _geom(k, qb), cos, sin, offset, interleaved)
        return q, k
    RoPEInplaceOneFunction.apply(q, cos, sin, offset, interleaved)
    if k is not None:
        RoPEInplaceOneFunction.apply(k, cos, sin, offset, interleaved)
    return q, k


def rope(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
         offset: int = 0, interleaved: bool = False):
    """Rotary embedding of q (batch, heads, seq, head_dim) and k (batch, kv_heads, seq,
    head_dim; may be None), out of place: returns new (q_rot, k_rot).  Differentiable.

    cos, sin: (rows, head_dim/2) or (batch, rows, head_dim/2) with rows >= seq + offset
    (full-width (.., head_dim) tables are accepted too); float32 or q's dtype, else converted.
    interleaved=False rotates pairs (i, i + head_dim/2) (Hugging Face), True pairs (2i, 2i+1)
    (Meta).  q and k may be strided views (e.g. of one fused QKV projection)."""
    if torch.compiler.is_compiling():  # torch.compile: the opaque torch.ops.llama3_kernels op
        from .. import library  # (imported here: library.py imports this module)
        return library.rope(q, k, cos, sin, offset, interleaved)
    cos, sin = _prep(q, k, cos, sin, interleaved)
    if needs_grad(q, k):
        return RoPEFunction.apply(q, k, cos, sin, int(offset), bool(interleaved))
    q = _last_contig(q)
    k = _last_contig(k) if k is not None else None
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device) if k is not None else None
    rope_forward_into(q, k, cos, sin, q_out, k_out, offset, interleaved)
    return q_out, k_out


def rope_(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
          offset: int = 0, interleaved: bool = False):
    """In-place rotary embedding of q and k (see `rope`); returns (q, k).  Differentiable
    (autograd sees the in-place update).  q and k need a contiguous last dim."""
    if torch.compiler.is_compiling():  # torch.compile: the opaque torch.ops.llama3_kernels op
        from .. import library  # (imported here: library.py imports this module)
        return library.rope_(q, k, cos, sin, offset, interleaved)
    cos, sin = _prep(q, k, cos, sin, interleaved)
    if needs_grad(q, k):
        return _rope_inplace_autograd(q, k, cos, sin, int(offset), bool(interleaved))
    rope_forward_into(q, k, cos, sin, q, k, offset, interleaved)
    return q, k


def triton_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The tutorial's name and signature: rotate q and k in place (rotate-half convention,
    cos/sin of shape (seq, head_dim/2)); returns (q, k).  A CUDA C kernel here."""
    return rope_(q, k, cos, sin)

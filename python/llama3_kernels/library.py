"""Layer 6: every op as an opaque ``torch.ops.llama3_kernels.*`` operator, so that
``torch.compile`` puts the library's kernels in its graph (no graph break), AOTAutograd
traces their backward, and CUDA-graph capture (``mode="reduce-overhead"``) sees plain ops.

Registered with ``torch.library.Library.define`` / ``impl`` rather than ``custom_op``:
a call through the dispatcher then costs ~0.5 us over the kernel's Python body, where
``custom_op``'s wrapper costs ~9 us; ``register_autograd``'s kernel adds ~3.5 us to every
call, grad or not (CPU, torch 2.11).  Measured on a tiny CPU tensor, an op here costs
~6-14 us more per call than the direct ctypes path of ``ops/`` without grad, ~10-25 us
with grad, which is why eager calls do not come here.  Each op has

* a schema; CPU and CUDA kernels that allocate outputs (and workspaces, from the size
  queries) with torch and call the raw ``*_into`` functions of ``ops/`` (the C ABI picks
  the device);
* a fake kernel (``register_fake``) whose outputs match the real ones in shape, dtype
  and strides (every output is a new contiguous tensor);
* for the forward ops, autograd through ``torch.library.register_autograd`` whose
  backward calls the registered backward ops, so AOTAutograd traces it; except
  ``llama_block_inference`` (the whole block forward in one C call), which
  TritonLlama3Block takes only when no gradient is wanted.

Layout conventions of the op level (the Python wrappers below hide them):

* ``flash_attn`` returns ``o`` as the contiguous (B, Sq, H, D) buffer the kernel writes;
  the wrapper returns ``o.transpose(1, 2)``, the (B, H, Sq, D) view the eager op returns.
  ``flash_attn_backward`` takes (B, H, S, D)-shaped tensors (any strides the C ABI takes)
  and returns dq, dk, dv as contiguous (B, S, H, D) buffers in the same way.
* Ops whose C function takes an optional tensor return a size-0 placeholder for the
  output they did not compute (``rope``'s ``k_out`` when ``k`` is None, the backward
  ops' ``dweight`` when not asked for): custom-op schemas cannot return ``Tensor?``.
* ``rope_`` mutates q and k in place and returns nothing; with grad it runs as
  ``rope`` + ``copy_`` (autograd is defined only for functional ops).

The public functional ops in ``ops/`` route here only when
``torch.compiler.is_compiling()`` is true; eager calls keep the direct ctypes path.
"""
from __future__ import annotations

import torch

from .ops import attention as _attn
from .ops import linear as _linear
from .ops import rmsnorm as _rms
from .ops import rope as _rope
from .ops import swiglu as _swiglu
from .ops._common import rows_view

NAMESPACE = "llama3_kernels"
_LIB = torch.library.Library(NAMESPACE, "DEF")
ops = torch.ops.llama3_kernels


def _define(schema: str, kernel, fake) -> str:
    """Define an op, its CPU and CUDA kernels (one Python function: the C ABI dispatches
    on the tensors' device) and its fake kernel."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, kernel, "CPU")
    _LIB.impl(name, kernel, "CUDA")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)
    return name


def _empty(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype if dtype is None else dtype, device=like.device)


def _none_slot(like: torch.Tensor) -> torch.Tensor:
    """The size-0 placeholder returned for an output that was not computed."""
    return torch.empty(0, dtype=like.dtype, device=like.device)


# ======================================================================================
# RMSNorm and fused residual add + RMSNorm
# ======================================================================================

def _rms_norm_kernel(x, weight, eps):
    w = _rms._weight_like(weight, x)
    x = rows_view(x)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    rstd = _rms._rstd_buffer(x)
    _rms.rmsnorm_forward_into(x, w, eps, y, rstd)
    return y, rstd


def _rms_norm_fake(x, weight, eps):
    return _empty(x.shape, x), _empty(x.shape[:-1], x, torch.float32)


_define("rms_norm(Tensor x, Tensor weight, float eps) -> (Tensor y, Tensor rstd)",
        _rms_norm_kernel, _rms_norm_fake)


def _rms_backward(dy, dh, x, weight, rstd, eps, need_dweight):
    w = _rms._weight_like(weight, x)
    x, dy = rows_view(x), rows_view(dy)
    dh = rows_view(dh) if dh is not None else None
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    if need_dweight:
        dw = torch.empty_like(w)
        ws = _rms._workspace(x)
    else:
        dw = ws = None
    _rms.rmsnorm_backward_into(dy, x, w, rstd, eps, dx, dw, ws, dh=dh)
    if dw is None:
        dw = _none_slot(weight)
    elif dw.dtype != weight.dtype:
        dw = dw.to(weight.dtype)
    return dx, dw


def _rms_backward_fake(x, weight, need_dweight):
    return _empty(x.shape, x), (torch.empty_like(weight) if need_dweight else _none_slot(weight))


_define("rms_norm_backward(Tensor dy, Tensor x, Tensor weight, Tensor rstd, float eps, "
        "bool need_dweight=True) -> (Tensor dx, Tensor dweight)",
        lambda dy, x, weight, rstd, eps, need_dweight=True:
            _rms_backward(dy, None, x, weight, rstd, eps, need_dweight),
        lambda dy, x, weight, rstd, eps, need_dweight=True:
            _rms_backward_fake(x, weight, need_dweight))


def _add_rms_norm_kernel(x, residual, weight, eps):
    w = _rms._weight_like(weight, x)
    x, residual = rows_view(x), rows_view(residual)
    h = torch.empty_like(x, memory_format=torch.contiguous_format)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    rstd = _rms._rstd_buffer(x)
    _rms.add_rmsnorm_forward_into(x, residual, w, eps, h, y, rstd)
    return h, y, rstd


def _add_rms_norm_fake(x, residual, weight, eps):
    return _empty(x.shape, x), _empty(x.shape, x), _empty(x.shape[:-1], x, torch.float32)


_define("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) "
        "-> (Tensor h, Tensor y, Tensor rstd)",
        _add_rms_norm_kernel, _add_rms_norm_fake)

# dx of the fused op (= d residual): RMSNorm's backward of dy through h, plus dh.
_define("add_rms_norm_backward(Tensor dy, Tensor dh, Tensor h, Tensor weight, Tensor rstd, "
        "float eps, bool need_dweight=True) -> (Tensor dx, Tensor dweight)",
        lambda dy, dh, h, weight, rstd, eps, need_dweight=True:
            _rms_backward(dy, dh, h, weight, rstd, eps, need_dweight),
        lambda dy, dh, h, weight, rstd, eps, need_dweight=True:
            _rms_backward_fake(h, weight, need_dweight))


def _rms_norm_setup(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.eps = eps
    ctx.mark_non_differentiable(output[1])


def _rms_norm_bwd(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = ops.rms_norm_backward(dy, x, weight, rstd, ctx.eps, ctx.needs_input_grad[1])
    return dx, (dw if ctx.needs_input_grad[1] else None), None


def _add_rms_norm_setup(ctx, inputs, output):
    x, residual, weight, eps = inputs
    h, _, rstd = output
    ctx.save_for_backward(h, weight, rstd)
    ctx.eps = eps
    ctx.mark_non_differentiable(rstd)


def _add_rms_norm_bwd(ctx, dh, dy, _drstd):
    h, weight, rstd = ctx.saved_tensors
    dx, dw = ops.add_rms_norm_backward(dy, dh, h, weight, rstd, ctx.eps, ctx.needs_input_grad[2])
    return (dx if ctx.needs_input_grad[0] else None, dx if ctx.needs_input_grad[1] else None,
            dw if ctx.needs_input_grad[2] else None, None)


torch.library.register_autograd(f"{NAMESPACE}::rms_norm", _rms_norm_bwd,
                                setup_context=_rms_norm_setup, lib=_LIB)
torch.library.register_autograd(f"{NAMESPACE}::add_rms_norm", _add_rms_norm_bwd,
                                setup_context=_add_rms_norm_setup, lib=_LIB)


# ======================================================================================
# RoPE
# ======================================================================================

def _rope_apply(into, q, k, cos, sin, offset, interleaved):
    """Out-of-place forward or backward rotation into new contiguous tensors."""
    q = _rope._last_contig(q)
    k = _rope._last_contig(k) if k is not None else None
    q_out = _empty(q.shape, q)
    k_out = _empty(k.shape, k) if k is not None else None
    into(q, k, cos, sin, q_out, k_out, offset, interleaved)
    return q_out, (k_out if k_out is not None else _none_slot(q))


def _rope_fake(q, k, cos, sin, offset=0, interleaved=False):
    return _empty(q.shape, q), (_empty(k.shape, k) if k is not None else _none_slot(q))


_define("rope(Tensor q, Tensor? k, Tensor cos, Tensor sin, int offset=0, bool interleaved=False) "
        "-> (Tensor q_out, Tensor k_out)",
        lambda q, k, cos, sin, offset=0, interleaved=False:
            _rope_apply(_rope.rope_forward_into, q, k, cos, sin, offset, interleaved),
        _rope_fake)
_define("rope_backward(Tensor dq, Tensor? dk, Tensor cos, Tensor sin, int offset=0, "
        "bool interleaved=False) -> (Tensor dq_in, Tensor dk_in)",
        lambda dq, dk, cos, sin, offset=0, interleaved=False:
            _rope_apply(_rope.rope_backward_into, dq, dk, cos, sin, offset, interleaved),
        _rope_fake)


def _rope_inplace_kernel(q, k, cos, sin, offset=0, interleaved=False):
    _rope.rope_forward_into(q, k, cos, sin, q, k, offset, interleaved)


_define("rope_(Tensor(a!) q, Tensor(b!)? k, Tensor cos, Tensor sin, int offset=0, "
        "bool interleaved=False) -> ()",
        _rope_inplace_kernel, lambda q, k, cos, sin, offset=0, interleaved=False: None)


def _rope_setup(ctx, inputs, output):
    _, k, cos, sin, offset, interleaved = inputs
    ctx.save_for_backward(cos, sin)
    ctx.offset, ctx.interleaved, ctx.has_k = offset, interleaved, k is not None
    if k is None:
        ctx.mark_non_differentiable(output[1])


def _rope_bwd(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq_in, dk_in = ops.rope_backward(dq, dk if ctx.has_k else None, cos, sin, ctx.offset,
                                     ctx.interleaved)
    return dq_in, (dk_in if ctx.has_k else None), None, None, None, None


torch.library.register_autograd(f"{NAMESPACE}::rope", _rope_bwd, setup_context=_rope_setup,
                                lib=_LIB)


def _rope_inplace_autograd(keyset, q, k, cos, sin, offset=0, interleaved=False):
    """rope_'s Autograd kernel: with grad, the functional op (its registered autograd) and
    copy_ back (autograd handles in-place updates of views); without, the in-place kernel.
    Written by hand because register_autograd accepts functional ops only."""
    if torch.is_grad_enabled() and (q.requires_grad or (k is not None and k.requires_grad)):
        q_out, k_out = ops.rope(q, k, cos, sin, offset, interleaved)
        q.copy_(q_out)
        if k is not None:
            k.copy_(k_out)
        return
    with torch._C._AutoDispatchBelowAutograd():
        ops.rope_.default.redispatch(keyset & torch._C._after_autograd_keyset, q, k, cos, sin,
                                     offset, interleaved)


def _rope_inplace_version_bump(keyset, q, k, cos, sin, offset=0, interleaved=False):
    """ADInplaceOrView: bump the version counters of the mutated q and k (as custom_op does),
    so autograd notices if a tensor it saved was overwritten."""
    torch.autograd.graph.increment_version(q)
    if k is not None:
        torch.autograd.graph.increment_version(k)
    ops.rope_.default.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, q, k, cos, sin,
                                 offset, interleaved)


_LIB.impl("rope_", _rope_inplace_autograd, "Autograd", with_keyset=True)
_LIB.impl("rope_", _rope_inplace_version_bump, "ADInplaceOrView", with_keyset=True)


# ======================================================================================
# SwiGLU
# ======================================================================================

def _swiglu_kernel(g, u):
    g, u = rows_view(g), rows_view(u)
    a = _empty(g.shape, g)
    _swiglu.swiglu_forward_into(g, u, a)
    return a


def _swiglu_backward_kernel(da, g, u):
    g, u, da = rows_view(g), rows_view(u), rows_view(da)
    dg, du = _empty(g.shape, g), _empty(u.shape, u)
    _swiglu.swiglu_backward_into(da, g, u, dg, du)
    return dg, du


def _swiglu_fused_kernel(gu):
    gu = rows_view(gu)
    a = _empty((*gu.shape[:-1], gu.shape[-1] // 2), gu)
    _swiglu.swiglu_fused_forward_into(gu, a)
    return a


def _swiglu_fused_backward_kernel(da, gu):
    gu, da = rows_view(gu), rows_view(da)
    dgu = _empty(gu.shape, gu)
    _swiglu.swiglu_fused_backward_into(da, gu, dgu)
    return dgu


_define("swiglu(Tensor g, Tensor u) -> Tensor", _swiglu_kernel,
        lambda g, u: _empty(g.shape, g))
_define("swiglu_backward(Tensor da, Tensor g, Tensor u) -> (Tensor dg, Tensor du)",
        _swiglu_backward_kernel, lambda da, g, u: (_empty(g.shape, g), _empty(u.shape, u)))
_define("swiglu_fused(Tensor gu) -> Tensor", _swiglu_fused_kernel,
        lambda gu: _empty((*gu.shape[:-1], gu.shape[-1] // 2), gu))
_define("swiglu_fused_backward(Tensor da, Tensor gu) -> Tensor", _swiglu_fused_backward_kernel,
        lambda da, gu: _empty(gu.shape, gu))


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_bwd(ctx, da):
    g, u = ctx.saved_tensors
    return ops.swiglu_backward(da, g, u)


def _swiglu_fused_bwd(ctx, da):
    (gu,) = ctx.saved_tensors
    return ops.swiglu_fused_backward(da, gu)


torch.library.register_autograd(f"{NAMESPACE}::swiglu", _swiglu_bwd, setup_context=_save_inputs,
                                lib=_LIB)
torch.library.register_autograd(f"{NAMESPACE}::swiglu_fused", _swiglu_fused_bwd,
                                setup_context=_save_inputs, lib=_LIB)


# ======================================================================================
# Flash attention
# ======================================================================================

def _bshd(t: torch.Tensor, like=None) -> torch.Tensor:
    """A new contiguous (B, S, H, D) buffer for a (B, H, S, D)-shaped tensor."""
    b, h, s, d = t.shape
    return _empty((b, s, h, d), t if like is None else like)


def _flash_attn_kernel(q, k, v, causal=False, scale=0.0, deterministic=False):
    q, k, v = _attn._kernel_ready(q), _attn._kernel_ready(k), _attn._kernel_ready(v)
    o = _bshd(q)
    lse = _attn._lse_buffer(q)
    _attn.attention_forward_into(q, k, v, o.transpose(1, 2), lse, causal, scale)
    return o, lse


def _flash_attn_fake(q, k, v, causal=False, scale=0.0, deterministic=False):
    b, h, s, _ = q.shape
    return _bshd(q), _empty((b, h, s), q, torch.float32)


def _flash_attn_backward_kernel(dout, q, k, v, o, lse, causal=False, scale=0.0,
                                deterministic=False):
    q, k, v = _attn._kernel_ready(q), _attn._kernel_ready(k), _attn._kernel_ready(v)
    dout, o = _attn._kernel_ready(dout), _attn._kernel_ready(o)
    dq, dk, dv = _bshd(q), _bshd(k), _bshd(v)
    ws = torch.empty(_attn.attention_backward_workspace_size(q, k, deterministic),
                     dtype=torch.uint8, device=q.device)
    _attn.attention_backward_into(dout, q, k, v, o, lse, dq.transpose(1, 2), dk.transpose(1, 2),
                                  dv.transpose(1, 2), causal, scale, deterministic, ws)
    return dq, dk, dv


_define("flash_attn(Tensor q, Tensor k, Tensor v, bool causal=False, float scale=0.0, "
        "bool deterministic=False) -> (Tensor o, Tensor lse)",
        _flash_attn_kernel, _flash_attn_fake)
_define("flash_attn_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, "
        "bool causal=False, float scale=0.0, bool deterministic=False) "
        "-> (Tensor dq, Tensor dk, Tensor dv)",
        _flash_attn_backward_kernel,
        lambda dout, q, k, v, o, lse, causal=False, scale=0.0, deterministic=False:
            (_bshd(q), _bshd(k), _bshd(v)))


def _flash_attn_setup(ctx, inputs, output):
    q, k, v, causal, scale, deterministic = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.scale, ctx.deterministic = causal, scale, deterministic
    ctx.mark_non_differentiable(lse)


def _flash_attn_bwd(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = ops.flash_attn_backward(do.transpose(1, 2), q, k, v, o.transpose(1, 2), lse,
                                         ctx.causal, ctx.scale, ctx.deterministic)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None, None, None


torch.library.register_autograd(f"{NAMESPACE}::flash_attn", _flash_attn_bwd,
                                setup_context=_flash_attn_setup, lib=_LIB)


# ======================================================================================
# Linear
# ======================================================================================

def _linear_kernel(x, weight, residual=None):
    x = rows_view(x)
    y = x.new_empty(*x.shape[:-1], weight.shape[0])
    _linear.linear_forward_into(x, weight, y, rows_view(residual) if residual is not None else None,
                                _linear.gemm_workspace(x.device))
    return y


def _linear_backward_input_kernel(dy, weight):
    dy = rows_view(dy)
    dx = dy.new_empty(*dy.shape[:-1], weight.shape[1])
    _linear.linear_backward_input_into(dy, weight, dx, workspace=_linear.gemm_workspace(dy.device))
    return dx


def _linear_backward_weight_kernel(dy, x):
    dy, x = rows_view(dy), rows_view(x)
    dw = x.new_empty(dy.shape[-1], x.shape[-1])
    _linear.linear_backward_weight_into(dy, x, dw, workspace=_linear.gemm_workspace(dy.device))
    return dw


_define("linear(Tensor x, Tensor weight, Tensor? residual=None) -> Tensor", _linear_kernel,
        lambda x, weight, residual=None: x.new_empty(*x.shape[:-1], weight.shape[0]))
_define("linear_backward_input(Tensor dy, Tensor weight) -> Tensor", _linear_backward_input_kernel,
        lambda dy, weight: dy.new_empty(*dy.shape[:-1], weight.shape[1]))
_define("linear_backward_weight(Tensor dy, Tensor x) -> Tensor", _linear_backward_weight_kernel,
        lambda dy, x: x.new_empty(dy.shape[-1], x.shape[-1]))


def _linear_setup(ctx, inputs, output):
    x, weight, residual = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_residual = residual is not None


def _linear_bwd(ctx, dy):
    x, weight = ctx.saved_tensors
    dx = ops.linear_backward_input(dy, weight) if ctx.needs_input_grad[0] else None
    dw = None
    if ctx.needs_input_grad[1]:
        dw = ops.linear_backward_weight(dy, x)
        if dw.dtype != weight.dtype:
            dw = dw.to(weight.dtype)
    dres = dy if ctx.has_residual and ctx.needs_input_grad[2] else None
    return dx, dw, dres


torch.library.register_autograd(f"{NAMESPACE}::linear", _linear_bwd, setup_context=_linear_setup,
                                lib=_LIB)


# ======================================================================================
# Python wrappers: the public ops' signatures and results on top of the registered ops.
# The functions in ops/ call these when torch.compiler.is_compiling() is true.
# ======================================================================================

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return ops.rms_norm(x, _rms._weight_like(weight, x), eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    h, y, _ = ops.add_rms_norm(x, residual, _rms._weight_like(weight, x), eps)
    return h, y


def rope(q, k, cos, sin, offset: int = 0, interleaved: bool = False):
    cos, sin = _rope._prep(q, k, cos, sin, interleaved)
    q_out, k_out = ops.rope(q, k, cos, sin, int(offset), bool(interleaved))
    return q_out, (k_out if k is not None else None)


def rope_(q, k, cos, sin, offset: int = 0, interleaved: bool = False):
    cos, sin = _rope._prep(q, k, cos, sin, interleaved)
    ops.rope_(q, k, cos, sin, int(offset), bool(interleaved))
    return q, k


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return ops.swiglu(g, u)


def swiglu_fused(gu: torch.Tensor) -> torch.Tensor:
    return ops.swiglu_fused(gu)


def swiglu_mlp(x, gate_weight, up_weight, down_weight):
    """The MLP with gate and up as two GEMMs: the eager path's single GEMM needs the two
    weights adjacent in memory (a data_ptr test a compiled graph cannot make) or a copy
    of both weights per call; two GEMMs of half the width cost about the same."""
    g = torch.nn.functional.linear(x, gate_weight)
    u = torch.nn.functional.linear(x, up_weight)
    return torch.nn.functional.linear(ops.swiglu(g, u), down_weight)


def flash_attn(q, k, v, causal: bool = False, scale: float | None = None,
               deterministic: bool = False) -> torch.Tensor:
    o, _ = ops.flash_attn(q, k, v, bool(causal), 0.0 if scale is None else float(scale),
                          bool(deterministic))
    return o.transpose(1, 2)


def linear(x, weight, residual=None) -> torch.Tensor:
    return ops.linear(x, weight, residual)

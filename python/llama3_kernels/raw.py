"""The raw calls: each op of the C ABI on buffers the caller passes, for any object with
``__dlpack__`` (NumPy, CuPy, JAX, torch), without copies and without PyTorch.

The torch ops in ``ops/`` allocate their outputs and call these; a program without PyTorch
(NumPy on the CPU, CuPy on the GPU) calls them directly.  ``stream`` is a raw
``cudaStream_t`` (an int); left as None it is torch's current stream for a torch CUDA tensor,
else the default stream.
"""

from __future__ import annotations

import ctypes

from ._dlpack import Borrowed, current_stream
from ._lib import LIB, VALUE, L3KArgumentError, check


def _offset(op: str, offset) -> int:
    """A RoPE position offset as the C ABI's int64_t: ctypes would wrap a larger one silently."""
    offset = int(offset)
    if offset >= 2**63:
        raise L3KArgumentError(VALUE, f"{op}: offset is {offset}, expected at most 2^63 - 1")
    if offset < -(2**63):
        raise L3KArgumentError(VALUE, f"{op}: offset is {offset}, expected >= 0")  # as the C call says
    return offset


# ---- rmsnorm -------------------------------------------------------------------------------


def rmsnorm_forward_into(x, weight, eps: float, y, rstd=None, stream: int | None = None) -> None:
    """y = rmsnorm(x) * weight, written into `y` (and per-row float32 `rstd` if given)."""
    b = Borrowed(x, weight, y, rstd)
    if stream is None:
        stream = current_stream(x)
    check(LIB.l3k_rmsnorm_forward(b.ptrs[0], b.ptrs[1], eps, b.ptrs[2], b.ptrs[3], stream))


def add_rmsnorm_forward_into(x, residual, weight, eps: float, h, y, rstd=None, stream: int | None = None) -> None:
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


def rmsnorm_backward_into(
    dy, x, weight, rstd, eps: float, dx, dweight=None, workspace=None, dh=None, stream: int | None = None
) -> None:
    """dx (and dweight) of RMSNorm; `dh` adds the gradient reaching h directly (fused op)."""
    b = Borrowed(dy, dh, x, weight, rstd, dx, dweight, workspace)
    if stream is None:
        stream = current_stream(x)
    p = b.ptrs
    check(LIB.l3k_rmsnorm_backward(p[0], p[1], p[2], p[3], p[4], eps, p[5], p[6], p[7], stream))


# ---- rope ----------------------------------------------------------------------------------


def _rope(fn, op: str, q, k, cos, sin, q_out, k_out, offset, interleaved: bool, stream) -> None:
    """One RoPE call of the C ABI (`fn`: forward or backward, which take the same arguments)."""
    b = Borrowed(q, k, cos, sin, q_out, k_out)
    if stream is None:
        stream = current_stream(q)
    p = b.ptrs
    check(fn(p[0], p[1], p[2], p[3], _offset(op, offset), int(bool(interleaved)), p[4], p[5], stream))


def rope_forward_into(
    q, k, cos, sin, q_out, k_out=None, offset: int = 0, interleaved: bool = False, stream: int | None = None
) -> None:
    """Rotate q (batch, heads, seq, head_dim) and optional k (batch, kv_heads, seq, head_dim)
    into q_out / k_out (pass q / k themselves for in place).  cos, sin: (rows, head_dim/2)
    or (batch, rows, head_dim/2) with rows >= seq + offset."""
    _rope(LIB.l3k_rope_forward, "rope_forward", q, k, cos, sin, q_out, k_out, offset, interleaved, stream)


def rope_backward_into(
    dq, dk, cos, sin, dq_out, dk_out=None, offset: int = 0, interleaved: bool = False, stream: int | None = None
) -> None:
    """Gradient of RoPE: the inverse rotation of dq (and dk) into dq_out (and dk_out)."""
    _rope(LIB.l3k_rope_backward, "rope_backward", dq, dk, cos, sin, dq_out, dk_out, offset, interleaved, stream)


# ---- swiglu --------------------------------------------------------------------------------


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


# ---- linear --------------------------------------------------------------------------------


def linear_workspace_size(like) -> int:
    """Bytes of the GEMM workspace the linear calls want for tensors on `like`'s device
    (0 on the CPU); the calls run without one too, on fewer algorithms."""
    b = Borrowed(like)
    size = ctypes.c_size_t(0)
    check(LIB.l3k_linear_workspace_size(b.ptrs[0], ctypes.byref(size)))
    return size.value


def linear_forward_into(x, weight, y, residual=None, workspace=None, stream=None) -> None:
    b = Borrowed(x, weight, residual, y, workspace)
    check(LIB.l3k_linear_forward(*b.ptrs, current_stream(x) if stream is None else stream))


def _linear_backward(fn, dy, other, out, accumulate, workspace, stream) -> None:
    """The two linear backward calls take (dy, the weight or x, dx or dweight, accumulate,
    workspace, stream)."""
    b = Borrowed(dy, other, out, workspace)
    dy_p, other_p, out_p, workspace_p = b.ptrs
    check(fn(dy_p, other_p, out_p, int(accumulate), workspace_p, current_stream(dy) if stream is None else stream))


def linear_backward_input_into(dy, weight, dx, accumulate=False, workspace=None, stream=None) -> None:
    _linear_backward(LIB.l3k_linear_backward_input, dy, weight, dx, accumulate, workspace, stream)


def linear_backward_weight_into(dy, x, dweight, accumulate=False, workspace=None, stream=None) -> None:
    _linear_backward(LIB.l3k_linear_backward_weight, dy, x, dweight, accumulate, workspace, stream)


# ---- attention -----------------------------------------------------------------------------


def attention_forward_into(
    q, k, v, o, lse, causal: bool = False, scale: float = 0.0, stream=None, key_range=None
) -> None:
    """o and lse of attention, written into the caller's buffers (scale 0: 1/sqrt(head_dim)).

    key_range: None (every key) or int32 (batch, 2), contiguous, on q's device: sequence b sees
    keys key_range[b, 0] .. key_range[b, 1] - 1 (clamped into [0, seq_k) by the kernels)."""
    b = Borrowed(q, k, v, key_range, o, lse)
    p = b.ptrs
    check(
        LIB.l3k_attention_forward(
            p[0], p[1], p[2], p[3], scale, int(causal), p[4], p[5], current_stream(q) if stream is None else stream
        )
    )


def attention_backward_workspace_size(q, k, deterministic: bool = False) -> int:
    b = Borrowed(q, k)
    size = ctypes.c_size_t(0)
    check(LIB.l3k_attention_backward_workspace_size(b.ptrs[0], b.ptrs[1], int(deterministic), ctypes.byref(size)))
    return size.value


def attention_backward_into(
    dout,
    q,
    k,
    v,
    o,
    lse,
    dq,
    dk,
    dv,
    causal: bool = False,
    scale: float = 0.0,
    deterministic: bool = False,
    workspace=None,
    stream=None,
    key_range=None,
) -> None:
    """dq, dk, dv into the caller's buffers; key_range as given to the forward."""
    b = Borrowed(dout, q, k, v, key_range, o, lse, dq, dk, dv, workspace)
    p = b.ptrs
    check(
        LIB.l3k_attention_backward(
            p[0],
            p[1],
            p[2],
            p[3],
            p[4],
            p[5],
            p[6],
            scale,
            int(causal),
            int(deterministic),
            p[7],
            p[8],
            p[9],
            p[10],
            current_stream(q) if stream is None else stream,
        )
    )


# ---- cross-entropy -------------------------------------------------------------------------


def cross_entropy_into(
    logits, target, loss, dlogits, ignore_index: int = -100, grad_scale=None, stream: int | None = None
) -> None:
    """Per-row loss (float32) and dlogits = (softmax - onehot) * grad_scale of `logits` (..., V)
    for int64 `target` (one per row); `dlogits` may be `logits` itself.  Rows whose target is
    ignore_index get loss 0 and dlogits 0."""
    b = Borrowed(logits, target, grad_scale, loss, dlogits)
    if stream is None:
        stream = current_stream(logits)
    p = b.ptrs
    check(LIB.l3k_cross_entropy_forward_backward(p[0], p[1], int(ignore_index), p[2], p[3], p[4], stream))


# ---- KV cache ------------------------------------------------------------------------------


def kv_cache_append_into(
    k,
    v,
    cos,
    sin,
    cache_range,
    k_cache,
    v_cache,
    q=None,
    q_out=None,
    positions=None,
    interleaved: bool = False,
    stream: int | None = None,
) -> None:
    """Write `seq` new tokens into a layer's cache: k (batch, n_kv_heads, seq, head_dim) rotated
    by RoPE and v as it is, at slots end - seq .. end - 1 of each sequence (cache_range int32
    (batch, 2) [start, end) after the append); q (optional) rotated into q_out (q itself: in
    place).  positions: optional int32 (batch,), the table row of each sequence's first new token
    (None: row i for new token i)."""
    b = Borrowed(q, k, v, cos, sin, positions, cache_range, q_out, k_cache, v_cache)
    if stream is None:
        stream = current_stream(k)
    p = b.ptrs
    check(LIB.l3k_kv_cache_append(*p[:7], int(bool(interleaved)), *p[7:], stream))


def attention_decode_workspace_size(q, k_cache) -> int:
    """Bytes of workspace attention_decode_into needs (0 on the CPU)."""
    b = Borrowed(q, k_cache)
    size = ctypes.c_size_t(0)
    check(LIB.l3k_attention_decode_workspace_size(b.ptrs[0], b.ptrs[1], ctypes.byref(size)))
    return size.value


def attention_decode_into(
    q, k_cache, v_cache, cache_range, o, scale: float = 0.0, workspace=None, stream: int | None = None
) -> None:
    """o = attention of each sequence's `seq` newest queries q (batch, heads, seq, head_dim) over
    its cache: query i attends slots start .. end - seq + i (cache_range [start, end))."""
    b = Borrowed(q, k_cache, v_cache, cache_range, o, workspace)
    if stream is None:
        stream = current_stream(q)
    p = b.ptrs
    check(LIB.l3k_attention_decode(p[0], p[1], p[2], p[3], float(scale), p[4], p[5], stream))

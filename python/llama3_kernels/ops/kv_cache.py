"""KV cache: appending rotated keys and values, and attention of new queries over the cache.

A layer's cache is k_cache and v_cache, each (batch, n_kv_heads, capacity, head_dim), and
``cache_range``, int32 (batch, 2): [start, end) of the slots each sequence holds once the call's
``seq`` new tokens are in (the new ones last, at end - seq .. end - 1; start > 0 is left padding).
The kernels read the ranges on the device, so a decoding loop advances them in place and can be
captured in a CUDA graph.  No autograd: these ops serve inference.
"""

from __future__ import annotations

import torch

from .._lib import SHAPE, L3KArgumentError
from ..raw import (  # re-exported: the raw calls live in the torch-free raw module
    attention_decode_into,
    attention_decode_workspace_size,
    kv_cache_append_into,
)
from ._common import key_range_for
from ._registry import define, ops, traced


def _check_4d(op: str, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.dim() != 4:
            raise L3KArgumentError(SHAPE, f"{op}: {name} has ndim {t.dim()}, expected 4 (batch, heads, seq, head_dim)")


# ---- bodies: the registered ops' kernels, called directly by the eager route ----------------


def _kv_cache_append(k, v, cos, sin, cache_range, k_cache, v_cache, q=None, positions=None, interleaved=False):
    """Writes the new tokens into k_cache / v_cache; returns q rotated (a new tensor), or an empty
    tensor without q."""
    _check_4d("kv_cache_append", k=k, v=v, q=q)
    q_out = torch.empty_like(q) if q is not None else None
    cos, sin = cos.contiguous(), sin.contiguous()
    cache_range, positions = key_range_for(cache_range, k), key_range_for(positions, k)
    kv_cache_append_into(k, v, cos, sin, cache_range, k_cache, v_cache, q, q_out, positions, interleaved)
    return q_out if q_out is not None else k.new_empty(0)


def _attention_decode(q, k_cache, v_cache, cache_range, scale=0.0):
    _check_4d("attention_decode", q=q)
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    ws_bytes = attention_decode_workspace_size(q, k_cache)
    ws = q.new_empty(ws_bytes, dtype=torch.uint8) if ws_bytes else None
    attention_decode_into(q, k_cache, v_cache, key_range_for(cache_range, q), o, scale, ws)
    return o


define(
    "kv_cache_append(Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor cache_range, Tensor(a!) k_cache, "
    "Tensor(b!) v_cache, Tensor? q=None, Tensor? positions=None, bool interleaved=False) -> Tensor",
    _kv_cache_append,
    lambda k, v, cos, sin, cache_range, k_cache, v_cache, q=None, positions=None, interleaved=False: (
        torch.empty_like(q) if q is not None else k.new_empty(0)
    ),
)
define(
    "attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_range, float scale=0.0) -> Tensor",
    _attention_decode,
    lambda q, k_cache, v_cache, cache_range, scale=0.0: torch.empty_like(q, memory_format=torch.contiguous_format),
)


# ---- public functions ----------------------------------------------------------------------


def kv_cache_append(
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache_range: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    interleaved: bool = False,
) -> torch.Tensor | None:
    """Write k (batch, n_kv_heads, seq, head_dim), rotated by RoPE, and v into the cache at slots
    end - seq .. end - 1 of each sequence, in place.  Returns q (batch, n_heads, seq, head_dim)
    rotated in the same launch when q is given, else None.  cos, sin: (rows, head_dim/2) or
    (batch, rows, head_dim/2); new token i of sequence b reads row positions[b] + i (positions:
    int32 (batch,)), or row i without positions."""
    fn = ops.kv_cache_append if traced(k) else _kv_cache_append
    out = fn(k, v, cos, sin, cache_range, k_cache, v_cache, q, positions, interleaved)
    return out if q is not None else None


def attention_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_range: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """softmax(scale q k_cache^T) v_cache for each sequence's `seq` newest queries q (batch,
    n_heads, seq, head_dim): query i sees slots start .. end - seq + i of its sequence.  GQA when
    n_heads is a multiple of the cache's heads.  Returns o shaped like q (contiguous)."""
    fn = ops.attention_decode if traced(q) else _attention_decode
    return fn(q, k_cache, v_cache, cache_range, 0.0 if scale is None else float(scale))

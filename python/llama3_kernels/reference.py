"""The pure-PyTorch LLaMA-3 block the library is measured and tested against.

This is the block a user would write without the library (the tutorial's block
with a real rotate-half RoPE, SDPA attention, GQA and causal masking), with
the same constructor and parameter names as ``TritonLlama3Block``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def torch_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def torch_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on (batch, heads, seq, head_dim) with (seq, head_dim/2) tables."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Llama3BlockBase(nn.Module):
    """The constructor both blocks share (``Llama3Block`` and ``TorchLlama3Block``), so that one
    stands in for the other: the hyperparameters, checked and kept once as attributes; each
    block makes its parameters in ``_make_parameters(device, dtype)``.

    ``deterministic`` and ``recompute_attention`` choose how the library's backward runs; the
    reference, on PyTorch's autograd, keeps them as attributes and computes the same either way.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        causal: bool = True,
        eps: float = 1e-5,
        deterministic: bool = False,
        recompute_attention: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        name = type(self).__name__
        if dim % n_heads:
            raise ValueError(f"{name}: dim {dim} is not a multiple of n_heads {n_heads}")
        self.dim, self.hidden_dim = dim, hidden_dim
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads or n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{name}: n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
        self.head_dim = dim // n_heads
        self.causal, self.eps, self.deterministic = causal, eps, deterministic
        self.recompute_attention = recompute_attention
        self._make_parameters(device=device, dtype=dtype)

    def _make_parameters(self, device, dtype) -> None:
        raise NotImplementedError


class TorchLlama3Block(Llama3BlockBase):
    """The block in PyTorch: separate projections under the tutorial's names (attn_q, ...,
    mlp_down, norm1_weight, norm2_weight), rotate-half RoPE and SDPA."""

    def _make_parameters(self, device, dtype) -> None:
        dim, hidden_dim, kv_dim = self.dim, self.hidden_dim, self.n_kv_heads * self.head_dim
        kw = dict(bias=False, device=device, dtype=dtype)
        self.attn_q = nn.Linear(dim, dim, **kw)
        self.attn_k = nn.Linear(dim, kv_dim, **kw)
        self.attn_v = nn.Linear(dim, kv_dim, **kw)
        self.attn_o = nn.Linear(dim, dim, **kw)
        self.mlp_gate = nn.Linear(dim, hidden_dim, **kw)
        self.mlp_up = nn.Linear(dim, hidden_dim, **kw)
        self.mlp_down = nn.Linear(hidden_dim, dim, **kw)
        self.norm1_weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.norm2_weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h = torch_rmsnorm(x, self.norm1_weight, self.eps)
        q = self.attn_q(h).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.attn_k(h).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.attn_v(h).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = torch_rope(q, cos, sin), torch_rope(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=self.n_kv_heads != self.n_heads)
        h = x + self.attn_o(o.transpose(1, 2).reshape(b, s, -1))
        n = torch_rmsnorm(h, self.norm2_weight, self.eps)
        return h + self.mlp_down(F.silu(self.mlp_gate(n)) * self.mlp_up(n))

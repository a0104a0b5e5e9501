"""Layer 5: nn.Modules built on the library's ops."""

from __future__ import annotations

import torch
from torch import nn

from .ops.rmsnorm import rms_norm
from .ops.rope import llama3_rope_cos_sin, rope, rope_
from .ops.swiglu import swiglu_mlp


class RMSNorm(nn.Module):
    """LLaMA RMSNorm over the last dim, on the library's fused kernel."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RotaryEmbedding(nn.Module):
    """LLaMA-3 rotary embedding of q and k on the library's fused kernel.

    Holds float32 cos/sin tables of (max_seq_len, head_dim/2) (theta 500000; scaling=True
    applies LLaMA-3.1 frequency scaling, or pass a dict of its parameters), grown on demand.
    forward(q, k, offset=0) rotates q (batch, heads, seq, head_dim) and k (batch, kv_heads,
    seq, head_dim; may be None) for positions offset .. offset + seq - 1 and returns them:
    new tensors, or q and k themselves when inplace=True.
    """

    def __init__(
        self,
        head_dim: int,
        max_seq_len: int = 8192,
        theta: float = 500000.0,
        scaling=None,
        interleaved: bool = False,
        inplace: bool = False,
        device=None,
    ):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.interleaved, self.inplace = interleaved, inplace
        cos, sin = llama3_rope_cos_sin(max_seq_len, head_dim, theta, scaling, device=device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def tables(self, rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cos.shape[0] < rows or self.cos.device != torch.device(device):
            n = max(rows, self.cos.shape[0])
            self.cos, self.sin = llama3_rope_cos_sin(n, self.head_dim, self.theta, self.scaling, device=device)
        return self.cos, self.sin

    def forward(self, q: torch.Tensor, k: torch.Tensor | None = None, offset: int = 0):
        cos, sin = self.tables(q.shape[2] + offset, q.device)
        op = rope_ if self.inplace else rope
        return op(q, k, cos, sin, offset=offset, interleaved=self.interleaved)

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, theta={self.theta}, scaling={bool(self.scaling)}, "
            f"interleaved={self.interleaved}, inplace={self.inplace}"
        )


class SwiGLUMLP(nn.Module):
    """The LLaMA MLP, down(silu(gate(x)) * up(x)), with gate and up stored as ONE (2*hidden,
    dim) parameter (one GEMM) and the activation fused (its backward recomputes it)."""

    def __init__(self, dim: int, hidden_dim: int, device=None, dtype=None):
        super().__init__()
        self.dim, self.hidden_dim = dim, hidden_dim
        self.gate_up_weight = nn.Parameter(torch.empty(2 * hidden_dim, dim, device=device, dtype=dtype))
        self.down_weight = nn.Parameter(torch.empty(dim, hidden_dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        nn.init.uniform_(self.gate_up_weight, -(self.dim**-0.5), self.dim**-0.5)
        nn.init.uniform_(self.down_weight, -(self.hidden_dim**-0.5), self.hidden_dim**-0.5)

    @property
    def gate_weight(self) -> torch.Tensor:
        return self.gate_up_weight[: self.hidden_dim]

    @property
    def up_weight(self) -> torch.Tensor:
        return self.gate_up_weight[self.hidden_dim :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu_mlp(x, self.gate_weight, self.up_weight, self.down_weight)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden_dim={self.hidden_dim}"

"""Layer 5: nn.Modules built on the library's ops."""
from __future__ import annotations

import torch
from torch import nn

from .ops.rmsnorm import rms_norm


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

"""Helpers every op module shares."""

from __future__ import annotations

import torch

_any_requires_grad = torch._C._any_requires_grad  # skips None and non-tensors


def needs_grad(*ts) -> bool:
    """True when autograd must record a Function for these inputs."""
    return torch.is_grad_enabled() and _any_requires_grad(*ts)


def rows_layout_ok(t: torch.Tensor) -> bool:
    """True when the C ABI accepts t's strides: last dim contiguous, rows of one stride."""
    if t.dim() == 0:
        return False
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return False
    expect = None
    for size, stride in zip(reversed(t.shape[:-1]), reversed(t.stride()[:-1])):
        if size == 1:
            continue
        if expect is None:
            expect = stride * size
        elif stride != expect:
            return False
        else:
            expect *= size
    return True


def rows_view(t: torch.Tensor) -> torch.Tensor:
    """t itself when the C ABI reads its layout as rows, else a contiguous copy."""
    return t if t.is_contiguous() or rows_layout_ok(t) else t.contiguous()


def key_range_for(key_range, like: torch.Tensor):
    """key_range as the C ABI takes it: int32, contiguous, on `like`'s device (None stays None)."""
    if key_range is None:
        return None
    if key_range.dtype != torch.int32 or key_range.device != like.device:
        key_range = key_range.to(device=like.device, dtype=torch.int32)
    return key_range if key_range.is_contiguous() else key_range.contiguous()

"""Cross-entropy of logits against class targets, the loss and its gradient from one kernel.

The kernel reads the logits once, in their own dtype, and writes the gradient
(softmax - onehot, scaled) next to the per-row losses, so the float32 copy of the
logits that ``F.cross_entropy(logits.float(), ...)`` makes, and the passes over it in
the forward and the backward, never happen.  The gradient is kept from the forward;
the backward only scales it by the loss's incoming gradient.
"""

from __future__ import annotations

import torch

from ..raw import cross_entropy_into  # re-exported: the raw call lives in the torch-free raw module
from ._common import needs_grad, rows_view
from ._registry import define, differentiable, ops, traced

_REDUCTIONS = ("mean", "sum")


# ---- body: the registered op's kernel, called directly by the eager route -------------------


def _cross_entropy(logits, target, ignore_index, scale):
    """(loss, dlogits): sum over rows of the per-row losses times `scale` (a float32 tensor of
    one element, or None for 1), and its gradient with respect to `logits`."""
    logits = rows_view(logits)
    target = target.reshape(-1)
    if target.dtype != torch.int64 or not target.is_contiguous() or target.device != logits.device:
        target = target.to(device=logits.device, dtype=torch.int64, memory_format=torch.contiguous_format)
    losses = torch.empty(target.shape, dtype=torch.float32, device=logits.device)
    dlogits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    cross_entropy_into(logits, target, losses, dlogits, ignore_index, scale)
    loss = losses.sum()
    return (loss if scale is None else loss * scale.reshape(())), dlogits


define(
    "cross_entropy(Tensor logits, Tensor target, int ignore_index, Tensor? scale) -> (Tensor, Tensor)",
    _cross_entropy,
    lambda logits, target, ignore_index, scale: (
        logits.new_empty((), dtype=torch.float32),
        torch.empty_like(logits, memory_format=torch.contiguous_format),
    ),
)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dloss, _):
    (dlogits,) = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        # The gradient was computed for an incoming 1: scale it, in place unless the graph is kept
        # for another backward (which must find it as the forward left it).
        keep = traced(dloss) or torch._C._autograd._get_current_graph_task_keep_graph()
        grad = dlogits * dloss if keep else dlogits.mul_(dloss)
    return grad, None, None, None


CrossEntropyFunction = differentiable("cross_entropy", _cross_entropy, _setup, _backward, "CrossEntropyFunction")


# ---- public op -------------------------------------------------------------------------------


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(logits.float(), target, ignore_index=..., reduction=...)`` for logits
    (..., V) in float32, float16 or bfloat16 and int targets (one per row), as a float32 scalar,
    without a float32 copy of the logits.  ``num_items``: divide the sum by this count instead
    (a gradient-accumulation step's token count, as transformers passes ``num_items_in_batch``);
    ``reduction="mean"`` divides by the number of targets that are not ignore_index (NaN when
    there are none).  Targets outside [0, V) other than ignore_index give NaN."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction is {reduction!r}, expected one of {_REDUCTIONS}")
    count = num_items if num_items is not None else (target != ignore_index).sum() if reduction == "mean" else None
    scale = None  # the sum's factor, on the device: no host synchronization
    if count is not None:
        scale = torch.as_tensor(count, device=logits.device).to(torch.float32).reshape(1).reciprocal()
    if traced(logits):
        return ops.cross_entropy(logits, target, ignore_index, scale)[0]
    if needs_grad(logits):
        return CrossEntropyFunction.apply(logits, target, ignore_index, scale)[0]
    return _cross_entropy(logits, target, ignore_index, scale)[0]

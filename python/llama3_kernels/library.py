"""Layer 6: every op as an opaque ``torch.ops.llama3_kernels.*`` operator, so that
``torch.compile`` puts the library's kernels in its graph (no graph break), AOTAutograd
traces their backward, and CUDA-graph capture (``mode="reduce-overhead"``) sees plain ops.

The registrations live with their ops (``ops/*.py``, through ``ops/_registry.py``): each op's
body (allocate outputs, call the C ABI) is its CPU and CUDA kernel and also what the eager
route calls, and one ``setup_context`` / ``backward`` pair serves the op's registered autograd
and the eager autograd.Function.  Importing this module (the package does) imports them all.

Each op has

* a schema, and the body as its CPU and CUDA kernel (the C ABI picks the device);
* a fake kernel (``register_fake``) whose outputs match the real ones in shape, dtype and
  strides: new contiguous tensors, except ``flash_attn``'s ``o`` and its backward's ``dq``,
  ``dk``, ``dv``, which are (B, H, S, D) views of (B, S, H, D) buffers, as eager returns them;
* for the forward ops, autograd through ``torch.library.register_autograd`` whose backward
  calls the registered backward ops while traced, so AOTAutograd records them.

Ops whose C function takes an optional tensor return a size-0 placeholder for the output they
did not compute (``rope``'s ``k_out`` when ``k`` is None, the backward ops' gradients when not
asked for): schemas cannot return ``Tensor?``.  ``rope_`` (and ``rope_backward_``) rotate in
place and return nothing; rope_'s autograd is a hand-written Autograd kernel (register_autograd
takes functional ops only) over the same autograd.Function eager in-place RoPE uses.

The public functions route to these ops whenever their inputs are traced (Dynamo,
AOTAutograd, fake tensors, dispatch modes); eager calls run the bodies directly.
"""

from __future__ import annotations

import torch

from .ops import attention, kv_cache, linear, rmsnorm, rope, swiglu  # noqa: F401  (their imports register the ops)
from .ops._registry import NAMESPACE

ops = torch.ops.llama3_kernels

__all__ = ["NAMESPACE", "ops"]

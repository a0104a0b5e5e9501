"""Registration of the ops as ``torch.ops.llama3_kernels.*``, shared by every op module.

Each op is written once: a body (allocate outputs, call the C ABI), a fake kernel, and for
differentiable ops a ``setup_context`` / ``backward`` pair.  The body is the op's CPU and CUDA
kernel, and the eager route calls it directly (no dispatcher); the same ``setup_context`` and
``backward`` serve the op's registered autograd and the eager ``autograd.Function``.  A backward
reaches its backward body directly for eager tensors and the registered backward op while it is
traced (``traced``), so AOTAutograd records the op.

``Library.define`` / ``impl`` rather than ``custom_op``: a call through the dispatcher then costs
~4 us over the body on a small CPU tensor (torch 2.15, this machine's CPU), where ``custom_op``'s
wrapper added ~9 us more (torch 2.11); the eager route skips even those 4 us.
"""

from __future__ import annotations

import torch

NAMESPACE = "llama3_kernels"
# A fragment, so the block's registrations (block.py) may come before or after these.
TORCH_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
ops = torch.ops.llama3_kernels

_EAGER_TYPES = (torch.Tensor, torch.nn.Parameter)
_dispatch_modes = torch._C._len_torch_dispatch_stack
# Dynamo reads this as True while it traces; in eager it is a bare `return False`, a third of
# is_compiling()'s cost.  The other tracers (AOTAutograd, export) show as fake or functional tensors.
_is_compiling = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)


def traced(t: torch.Tensor) -> bool:
    """True when `t` is seen by a tracer rather than computed: under Dynamo, as a fake or
    functional tensor (AOTAutograd, FakeTensorMode), or with a dispatch mode active (make_fx,
    flop counters).  Calls must then go through the registered ops, which tracers record;
    otherwise the bodies run directly."""
    return _is_compiling() or type(t) not in _EAGER_TYPES or _dispatch_modes() > 0


def define(schema: str, body, fake) -> torch._ops.OpOverload:
    """Define an op whose CPU and CUDA kernel is `body` (the C ABI dispatches on the tensors'
    device) and whose fake kernel is `fake`; returns the op's default overload."""
    name = schema.split("(", 1)[0]
    TORCH_LIB.define(schema)
    TORCH_LIB.impl(name, body, "CPU")
    TORCH_LIB.impl(name, body, "CUDA")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=TORCH_LIB)
    return getattr(ops, name).default


def register_autograd(name: str, backward, setup_context) -> None:
    """torch.library.register_autograd for the op `name`, with `setup_context` always seeing every
    argument and `backward` returning one gradient per argument the call passed.  The dispatcher
    drops trailing arguments equal to their defaults; torch 2.11 then wants only that many
    gradients back from an op with a list argument (later versions trim them), and not every
    version fills the defaults in for setup_context."""
    defaults = tuple(a.default_value for a in getattr(ops, name).default._schema.arguments)

    def full_setup(ctx, inputs, output):
        setup_context(ctx, tuple(inputs) + defaults[len(inputs) :], output)

    def fitted_backward(ctx, *grads):
        got = backward(ctx, *grads)
        got = got if isinstance(got, tuple) else (got,)
        return got[: len(ctx.needs_input_grad)]  # one flag per argument passed

    torch.library.register_autograd(f"{NAMESPACE}::{name}", fitted_backward, setup_context=full_setup, lib=TORCH_LIB)


def differentiable(name: str, body, setup_context, backward, cls_name: str) -> type[torch.autograd.Function]:
    """Register `setup_context` / `backward` as the autograd of the op `name`, and return the
    eager route's autograd.Function `cls_name` over the same three functions.

    The Function's forward calls `body` and then `setup_context` itself: a Function that
    defines setup_context as such costs ~15 us more per call (CPU, torch 2.15)."""
    register_autograd(name, backward, setup_context)

    def forward(ctx, *args):
        out = body(*args)
        setup_context(ctx, args, out)
        return out

    return type(
        cls_name,
        (torch.autograd.Function,),
        {
            "__doc__": f"The eager autograd of {NAMESPACE}::{name}: the op's body, setup_context and backward.",
            "__module__": body.__module__,
            "forward": staticmethod(forward),
            "backward": staticmethod(backward),
        },
    )


def none_slot(like: torch.Tensor) -> torch.Tensor:
    """The size-0 placeholder an op returns for an output it did not compute: schemas cannot
    return ``Tensor?``."""
    return like.new_empty(0)

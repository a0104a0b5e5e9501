"""llama3_kernels: fused CUDA C kernels for the LLaMA-3 block, behind a C ABI over DLPack.

Layers, each calling only the one below: ``_lib`` (ctypes), ``_dlpack``
(zero-copy exchange), ``raw`` (the C calls on caller-owned buffers), ``ops``
(functional ops and autograd), ``modules`` (nn.Modules).

The first three need only NumPy (or any ``__dlpack__`` producer): without PyTorch the
package offers the raw ``*_into`` calls, ``has_cuda``, ``version`` and ``library_path``;
the torch-level names raise an ImportError saying so.
"""

from ._lib import (
    L3KArgumentError,
    L3KBackendError,
    L3KDTypeError,
    L3KError,
    has_cuda,
    library_path,
    set_graph_replay,
    version,
)
from .raw import (
    add_rmsnorm_forward_into,
    attention_backward_into,
    attention_backward_workspace_size,
    attention_decode_into,
    attention_decode_workspace_size,
    attention_forward_into,
    cross_entropy_into,
    kv_cache_append_into,
    linear_backward_input_into,
    linear_backward_weight_into,
    linear_forward_into,
    linear_workspace_size,
    rmsnorm_backward_into,
    rmsnorm_backward_workspace_size,
    rmsnorm_forward_into,
    rope_backward_into,
    rope_forward_into,
    swiglu_backward_into,
    swiglu_forward_into,
    swiglu_fused_backward_into,
    swiglu_fused_forward_into,
)

__version__ = ".".join(str(v) for v in version())

# The names below need PyTorch.
_TORCH_NAMES = (
    "hf",
    "library",
    "Llama3Block",
    "TritonLlama3Block",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLUMLP",
    "flash_attn",
    "triton_flash_attn",
    "linear",
    "add_rms_norm",
    "rms_norm",
    "triton_rmsnorm",
    "llama3_rope_cos_sin",
    "rope",
    "rope_",
    "rope_inv_freq",
    "triton_rope",
    "swiglu",
    "swiglu_fused",
    "swiglu_mlp",
    "cross_entropy",
    "kv_cache_append",
    "attention_decode",
    "KVCache",
    "CacheSlots",
    "llama_block_decode",
    "triton_swiglu",
    "TorchLlama3Block",
    "ops",
    "modules",
    "block",
    "reference",
)

try:
    import torch as _torch  # noqa: F401
except ImportError as _e:
    _torch_error = _e
else:
    _torch_error = None
    from . import (
        hf,  # Hugging Face Llama on these kernels (imports transformers only when used)
        library,  # registers torch.ops.llama3_kernels.* (torch.compile, torch.library)
    )
    from .block import Llama3Block, TritonLlama3Block, llama_block_decode
    from .cache import CacheSlots, KVCache
    from .modules import RMSNorm, RotaryEmbedding, SwiGLUMLP
    from .ops.attention import flash_attn, triton_flash_attn
    from .ops.cross_entropy import cross_entropy
    from .ops.kv_cache import attention_decode, kv_cache_append
    from .ops.linear import linear
    from .ops.rmsnorm import add_rms_norm, rms_norm, triton_rmsnorm
    from .ops.rope import llama3_rope_cos_sin, rope, rope_, rope_inv_freq, triton_rope
    from .ops.swiglu import swiglu, swiglu_fused, swiglu_mlp, triton_swiglu
    from .reference import TorchLlama3Block


def __getattr__(name):
    if _torch_error is not None and name in _TORCH_NAMES:
        raise ImportError(
            f"llama3_kernels.{name} needs PyTorch, which did not import ({_torch_error}); "
            "install torch, or use the raw *_into calls, which work on NumPy arrays without it"
        ) from _torch_error
    raise AttributeError(f"module 'llama3_kernels' has no attribute {name!r}")

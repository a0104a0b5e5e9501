"""llama3_kernels: fused CUDA C kernels for the LLaMA-3 block, behind a C ABI over DLPack.

Layers, each calling only the one below: ``_lib`` (ctypes), ``_dlpack``
(zero-copy exchange), ``ops`` (functional ops and autograd), ``modules``
(nn.Modules).
"""

from . import (
    hf,  # Hugging Face Llama on these kernels (imports transformers only when used)
    library,  # registers torch.ops.llama3_kernels.* (torch.compile, torch.library)
)
from ._lib import L3KArgumentError, L3KBackendError, L3KDTypeError, L3KError, has_cuda, library_path, version
from .block import Llama3Block, TritonLlama3Block
from .modules import RMSNorm, RotaryEmbedding, SwiGLUMLP
from .ops.attention import (
    attention_backward_into,
    attention_backward_workspace_size,
    attention_forward_into,
    flash_attn,
    triton_flash_attn,
)
from .ops.linear import linear, linear_backward_input_into, linear_backward_weight_into, linear_forward_into
from .ops.rmsnorm import (
    add_rms_norm,
    add_rmsnorm_forward_into,
    rms_norm,
    rmsnorm_backward_into,
    rmsnorm_backward_workspace_size,
    rmsnorm_forward_into,
    triton_rmsnorm,
)
from .ops.rope import (
    llama3_rope_cos_sin,
    rope,
    rope_,
    rope_backward_into,
    rope_forward_into,
    rope_inv_freq,
    triton_rope,
)
from .ops.swiglu import (
    swiglu,
    swiglu_backward_into,
    swiglu_forward_into,
    swiglu_fused,
    swiglu_fused_backward_into,
    swiglu_fused_forward_into,
    swiglu_mlp,
    triton_swiglu,
)
from .reference import TorchLlama3Block

__version__ = ".".join(str(v) for v in version())

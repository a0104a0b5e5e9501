"""Layer 1: find and load the shared library, declare its functions once, and
turn a non-zero ``l3k_status`` into a Python exception carrying the C message.

``L3K_LIBRARY=/path/to/libl3k.so`` loads a separately built library instead of
the one packaged in the wheel.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

# l3k_status values (capi/l3k.h).
SUCCESS = 0
NULL_POINTER, DEVICE, NO_CUDA, DTYPE, SHAPE, LAYOUT, ALIGNMENT, VALUE, WORKSPACE = range(1, 10)
CUDA, CUBLAS, INTERNAL = 10, 11, 12


class L3KError(Exception):
    """Base of every error the library reports; ``.status`` is the C status code."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class L3KArgumentError(L3KError, ValueError):
    """A bad argument: NULL, device, shape, layout, alignment, value or workspace."""


class L3KDTypeError(L3KError, TypeError):
    """An unsupported dtype, or dtypes that must match and do not."""


class L3KBackendError(L3KError, RuntimeError):
    """CUDA or cuBLAS failed, the library lacks CUDA, or an internal error."""


def _error_class(status: int) -> type:
    if status == DTYPE:
        return L3KDTypeError
    if status in (NO_CUDA, CUDA, CUBLAS, INTERNAL):
        return L3KBackendError
    return L3KArgumentError


_P = ctypes.c_void_p  # DLTensor* and cudaStream_t travel as plain pointers
_F = ctypes.c_float
_SZ = ctypes.c_size_t
_I64 = ctypes.c_int64
_INT = ctypes.c_int

# name -> argtypes; every function returns l3k_status (int) unless listed in _RESTYPES.
_SIGNATURES: dict[str, list] = {
    "l3k_status_string": [_INT],
    "l3k_last_error": [],
    "l3k_version": [],
    "l3k_has_cuda": [],
    "l3k_set_graph_replay": [_INT],
    "l3k_rmsnorm_forward": [_P, _P, _F, _P, _P, _P],
    "l3k_add_rmsnorm_forward": [_P, _P, _P, _F, _P, _P, _P, _P],
    "l3k_rmsnorm_backward_workspace_size": [_P, ctypes.POINTER(_SZ)],
    "l3k_rmsnorm_backward": [_P, _P, _P, _P, _P, _F, _P, _P, _P, _P],
    "l3k_attention_forward": [_P, _P, _P, _P, _F, _INT, _P, _P, _P],
    "l3k_attention_backward_workspace_size": [_P, _P, _INT, ctypes.POINTER(_SZ)],
    "l3k_attention_backward": [_P, _P, _P, _P, _P, _P, _P, _F, _INT, _INT, _P, _P, _P, _P, _P],
    "l3k_llama_block_forward_workspace_size": [_P, _P, _P, ctypes.POINTER(_SZ)],
    "l3k_llama_block_forward": [_P, _P, _P, _P, _P, _P, _P, _P],
    "l3k_llama_block_training_layout": [_P, _P, _P, _P],
    "l3k_llama_block_forward_train": [_P, _P, _P, _P, _P, _P, _P, _P, _P],
    "l3k_llama_block_backward": [_P, _P, _P, _P, _P, _P, _P, ctypes.c_uint, _P, _P, _P, _P],
    "l3k_linear_workspace_size": [_P, ctypes.POINTER(_SZ)],
    "l3k_linear_forward": [_P, _P, _P, _P, _P, _P],
    "l3k_linear_backward_input": [_P, _P, _P, _INT, _P, _P],
    "l3k_linear_backward_weight": [_P, _P, _P, _INT, _P, _P],
    "l3k_rope_forward": [_P, _P, _P, _P, _I64, _INT, _P, _P, _P],
    "l3k_rope_backward": [_P, _P, _P, _P, _I64, _INT, _P, _P, _P],
    "l3k_swiglu_forward": [_P, _P, _P, _P],
    "l3k_swiglu_fused_forward": [_P, _P, _P],
    "l3k_swiglu_backward": [_P, _P, _P, _P, _P, _P, _P],
    "l3k_swiglu_fused_backward": [_P, _P, _P, _P, _P],
    "l3k_cross_entropy_forward_backward": [_P, _P, _I64, _P, _P, _P, _P],
    "l3k_kv_cache_append": [_P, _P, _P, _P, _P, _P, _P, _INT, _P, _P, _P, _P],
    "l3k_attention_decode_workspace_size": [_P, _P, ctypes.POINTER(_SZ)],
    "l3k_attention_decode": [_P, _P, _P, _P, _F, _P, _P, _P],
    "l3k_llama_block_decode_workspace_size": [_P, _P, _P, _P, ctypes.POINTER(_SZ)],
    "l3k_llama_block_decode": [_P, _P, _P, _P, _P, _P, _P, _P, _P],
}
_RESTYPES = {
    "l3k_status_string": ctypes.c_char_p,
    "l3k_last_error": ctypes.c_char_p,
}


# ---- the public structs of capi/l3k.h (a test checks them against the header) ------------


def _sized(cls):
    """A struct whose first field, struct_size, holds its own size (the header's *_INIT macros)."""

    def init(self, *args, **kwargs):
        ctypes.Structure.__init__(self, ctypes.sizeof(cls), *args, **kwargs)

    cls.__init__ = init
    return cls


# The tensors of l3k_llama_block_weights (and of l3k_llama_block_grads, their gradients, in the
# same order), and the activations of l3k_llama_block_activations (l3k_llama_block_layout
# describes each with an l3k_buffer_desc).
_WEIGHT_FIELDS = (
    "qkv_weight",
    "o_weight",
    "gate_up_weight",
    "down_weight",
    "norm1_weight",
    "norm2_weight",
    "q_weight",
    "k_weight",
    "v_weight",
    "gate_weight",
    "up_weight",
)
_ACTIVATION_FIELDS = ("qkv", "residual", "gate_up", "rstd1", "rstd2", "attn_out", "lse")


@_sized
class BlockWeights(ctypes.Structure):  # l3k_llama_block_weights: DLTensor pointers
    _fields_ = [("struct_size", _SZ)] + [(n, _P) for n in _WEIGHT_FIELDS]


@_sized
class BlockConfig(ctypes.Structure):  # l3k_llama_block_config
    _fields_ = [
        ("struct_size", _SZ),
        ("n_heads", _I64),
        ("n_kv_heads", _I64),
        ("causal", _INT),
        ("eps", _F),
        ("deterministic", _INT),
        ("key_range", _P),
    ]


@_sized
class BlockActivations(ctypes.Structure):  # l3k_llama_block_activations: DLTensor pointers
    _fields_ = [("struct_size", _SZ)] + [(n, _P) for n in _ACTIVATION_FIELDS]


class BufferDesc(ctypes.Structure):  # l3k_buffer_desc
    _fields_ = [
        ("rows", _I64),
        ("cols", _I64),
        ("dtype_code", ctypes.c_uint8),
        ("dtype_bits", ctypes.c_uint8),
        ("dtype_lanes", ctypes.c_uint16),
    ]


@_sized
class BlockLayout(ctypes.Structure):  # l3k_llama_block_layout
    _fields_ = (
        [("struct_size", _SZ)]
        + [(n, BufferDesc) for n in _ACTIVATION_FIELDS]
        + [
            ("forward_workspace_bytes", _SZ),
            ("backward_workspace_bytes", _SZ),
            ("backward_workspace_bytes_preserving", _SZ),
            ("backward_workspace_extra_split_gate_up", _SZ),
        ]
    )


@_sized
class BlockGrads(ctypes.Structure):  # l3k_llama_block_grads: DLTensor pointers, as in the weights
    _fields_ = [("struct_size", _SZ)] + [(n, _P) for n in _WEIGHT_FIELDS]


@_sized
class KVCacheArgs(ctypes.Structure):  # l3k_kv_cache: DLTensor pointers
    _fields_ = [("struct_size", _SZ), ("k", _P), ("v", _P), ("cache_range", _P), ("positions", _P)]


# Header name -> mirror, for the header test.
STRUCTS: dict = {
    "l3k_llama_block_weights": BlockWeights,
    "l3k_llama_block_config": BlockConfig,
    "l3k_llama_block_activations": BlockActivations,
    "l3k_buffer_desc": BufferDesc,
    "l3k_llama_block_layout": BlockLayout,
    "l3k_llama_block_grads": BlockGrads,
    "l3k_kv_cache": KVCacheArgs,
}
PRESERVE_ACTIVATIONS = 1  # L3K_BLOCK_PRESERVE_ACTIVATIONS


def _candidates() -> list[Path]:
    override = os.environ.get("L3K_LIBRARY")
    if override:
        return [Path(override)]
    here = Path(__file__).resolve().parent
    # The wheel holds one file, libl3k.so; versioned names are for a library copied in by hand.
    return (
        [p for p in [here / "libl3k.so"] if p.exists()]
        + sorted(here.glob("libl3k.so.*"))
        + sorted(here.glob("l3k.dll"))
    )


def _load() -> ctypes.CDLL:
    try:  # PyTorch first, where it is installed: the first GEMM then finds its cuBLASLt loaded and shares it
        import torch  # noqa: F401
    except ImportError:
        pass  # the raw calls need no torch; cuBLASLt is looked for at the first CUDA GEMM
    paths = _candidates()
    if not paths:
        raise ImportError(
            "llama3_kernels: the shared library libl3k.so was not found next to the package; "
            "install with `pip install .` or set L3K_LIBRARY=/path/to/libl3k.so"
        )
    path = paths[0]
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise ImportError(f"llama3_kernels: cannot load {path}: {e}") from e
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name, None)
        if fn is None:
            continue  # an older library: calls to it fail with a clear AttributeError below
        fn.argtypes = argtypes
        fn.restype = _RESTYPES.get(name, ctypes.c_int)
    lib._l3k_path = str(path)
    return lib


LIB = _load()


def declare(name: str, argtypes: list, restype=ctypes.c_int) -> None:
    """Declare one more C function (for op modules that add their own)."""
    _SIGNATURES[name] = argtypes
    fn = getattr(LIB, name)
    fn.argtypes = argtypes
    fn.restype = restype


def check(status: int) -> None:
    """Raise the exception for a non-zero status, with the library's message."""
    if status != SUCCESS:
        msg = LIB.l3k_last_error().decode("utf-8", "replace")
        raise _error_class(status)(status, msg or LIB.l3k_status_string(status).decode())


def version() -> tuple[int, int, int]:
    v = LIB.l3k_version()
    return v // 10000, v // 100 % 100, v % 100


def has_cuda() -> bool:
    return bool(LIB.l3k_has_cuda())


def set_graph_replay(enabled: bool) -> bool:
    """Turn the library's CUDA-graph replay of repeated block calls on or off (l3k.h:
    l3k_set_graph_replay); returns the previous setting.  On by default."""
    return bool(LIB.l3k_set_graph_replay(int(bool(enabled))))


def library_path() -> str:
    return LIB._l3k_path

"""Layer 2: zero-copy exchange of tensors with the C ABI through DLPack.

A torch tensor goes through ``torch.utils.dlpack.to_dlpack`` (~1.5 us); any
other object with ``__dlpack__`` (NumPy, CuPy, JAX) through that protocol.
The capsule is kept alive by the caller for the duration of the C call and is
never consumed: its producer still owns the memory and frees it as usual.
"""

from __future__ import annotations

import ctypes

try:
    import torch
    from torch.utils.dlpack import to_dlpack as _to_dlpack
except ImportError:  # the raw ops still work on NumPy arrays
    torch = None
    _to_dlpack = None

_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_get_pointer.restype = ctypes.c_void_p
_get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_get_name = ctypes.pythonapi.PyCapsule_GetName
_get_name.restype = ctypes.c_char_p
_get_name.argtypes = [ctypes.py_object]

# DLManagedTensorVersioned: {uint32 major, minor; void* ctx; void (*deleter)(); uint64 flags; DLTensor}
_VERSIONED_OFFSET = 8 + 8 + 8 + 8


def to_capsule(obj):
    """A DLPack capsule for `obj` (torch tensor or any __dlpack__ producer)."""
    if torch is not None and isinstance(obj, torch.Tensor):
        return _to_dlpack(obj)
    if hasattr(obj, "__dlpack__"):
        return obj.__dlpack__()
    raise TypeError(f"expected a tensor with __dlpack__, got {type(obj).__name__}")


def capsule_tensor_ptr(capsule) -> int:
    """Address of the DLTensor inside a 'dltensor' or 'dltensor_versioned' capsule."""
    try:  # the common, unversioned capsule (torch's): no name query, a third of the cost
        return _get_pointer(capsule, b"dltensor")  # DLTensor is the first member of DLManagedTensor
    except ValueError:
        pass
    name = _get_name(capsule)
    if name == b"dltensor_versioned":
        return _get_pointer(capsule, name) + _VERSIONED_OFFSET
    raise ValueError(f"not an unconsumed DLPack capsule (name {name!r})")


class Borrowed:
    """DLTensor pointers for the tensors of one C call; keeps their capsules alive."""

    __slots__ = ("capsules", "ptrs")

    def __init__(self, *objs):
        self.capsules = []
        self.ptrs = []
        for obj in objs:
            if obj is None:
                self.ptrs.append(None)
                continue
            cap = to_capsule(obj)
            self.capsules.append(cap)
            self.ptrs.append(capsule_tensor_ptr(cap))


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):  # dlpack.h's DLTensor
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


_DL_DTYPES = (
    {}
    if torch is None
    else {torch.float16: (2, 16), torch.bfloat16: (4, 16), torch.float32: (2, 32), torch.uint8: (1, 8)}
)


class Slots:
    """Compact row-major DLTensors of fixed shapes and dtypes, made once, whose data pointers
    are set per call: one field write per tensor instead of a DLPack capsule (~2 us each).
    Only for buffers the caller knows to be contiguous (fresh allocations, .contiguous()
    results) and keeps alive over the C call."""

    __slots__ = ("structs", "shapes", "ptrs")

    def __init__(self, device, specs):
        """device: a torch.device; specs: (shape, torch dtype) of each tensor."""
        where = (2, device.index) if device.type == "cuda" else (1, 0)  # kDLCUDA, kDLCPU
        self.structs, self.shapes = [], []
        for shape, dtype in specs:
            dims = (ctypes.c_int64 * max(len(shape), 1))(*shape)
            code, bits = _DL_DTYPES[dtype]
            self.shapes.append(dims)
            self.structs.append(
                DLTensor(None, _DLDevice(*where), len(shape), _DLDataType(code, bits, 1), dims, None, 0)
            )
        self.ptrs = [ctypes.addressof(t) for t in self.structs]

    def fill(self, addresses) -> list:
        """Point the tensors at `addresses` (data pointers, in the specs' order); their DLTensor
        pointers."""
        for t, a in zip(self.structs, addresses):
            t.data = a
        return self.ptrs


def current_stream(tensor) -> int | None:
    """The raw cudaStream_t torch is using for `tensor`'s device (None for CPU)."""
    if torch is not None and isinstance(tensor, torch.Tensor) and tensor.is_cuda:
        return torch._C._cuda_getCurrentRawStream(tensor.device.index)
    return None

"""TritonLlama3Block: the LLaMA-3 transformer block on the library's kernels.

    h   = x + o_proj(attention(rope(qkv_proj(rmsnorm(x)))))       residual in the GEMM epilogue
    out = h + down_proj(silu(g) * u),  [g | u] = gate_up_proj(rmsnorm(h))

q/k/v are one GEMM and gate/up one GEMM; RoPE rotates q and k in place inside
the QKV output; attention reads those strided views and writes its output in
the (batch, seq, heads, head_dim) layout the output projection reads; both
residual adds ride on the GEMMs (beta = 1, out of place).  Training runs one
block-level autograd Function whose backward calls the library's backward
kernels and GEMMs; it saves x, qkv, h, the second norm's output and the gate/up
output, and recomputes the first norm and the SiLU product.  The second norm's
output is live at the backward's memory peak either way (the gate/up weight
gradient reads it there), so keeping it costs no peak memory and saves an RMSNorm
pass; keeping the first norm's would raise that peak.  The attention output is
recomputed too (one forward attention kernel), which takes the backward's memory
peak down by batch * seq * dim elements; recompute_attention=False saves it and
its LSE instead.
"""
from __future__ import annotations

import ctypes
import math
import weakref

import torch
from torch import nn

from ._dlpack import Borrowed, current_stream
from ._lib import LIB, check

from .ops.attention import attention_backward_into, attention_backward_workspace_size, attention_forward_into
from .ops.linear import (gemm_workspace, linear_backward_input_into, linear_backward_weight_into,
                         linear_forward_into)
from .ops.rmsnorm import rmsnorm_backward_into, rmsnorm_backward_workspace_size, rmsnorm_forward_into
from .ops.rope import rope_backward_into, rope_forward_into
from .ops.swiglu import swiglu_fused_backward_into, swiglu_fused_forward_into

# Parameter names of the tutorial's block and of Hugging Face's LlamaDecoderLayer,
# mapped onto this block's fused parameters: (fused name, part index).
_QKV, _GU = ("q", "k", "v"), ("gate", "up")
_ALIASES = {
    "attn_q.weight": ("qkv_weight", 0), "attn_k.weight": ("qkv_weight", 1), "attn_v.weight": ("qkv_weight", 2),
    "attn_o.weight": ("o_weight", None),
    "mlp_gate.weight": ("gate_up_weight", 0), "mlp_up.weight": ("gate_up_weight", 1),
    "mlp_down.weight": ("down_weight", None),
    "self_attn.q_proj.weight": ("qkv_weight", 0), "self_attn.k_proj.weight": ("qkv_weight", 1),
    "self_attn.v_proj.weight": ("qkv_weight", 2), "self_attn.o_proj.weight": ("o_weight", None),
    "mlp.gate_proj.weight": ("gate_up_weight", 0), "mlp.up_proj.weight": ("gate_up_weight", 1),
    "mlp.down_proj.weight": ("down_weight", None),
    "input_layernorm.weight": ("norm1_weight", None), "post_attention_layernorm.weight": ("norm2_weight", None),
}


class _Shapes:
    """Sizes of one call, and the q/k/v views of a (tokens, qkv width) buffer."""

    def __init__(self, block: "TritonLlama3Block", x: torch.Tensor):
        self.b, self.s, self.dim = x.shape
        self.t = self.b * self.s
        self.h, self.hkv, self.hd = block.n_heads, block.n_kv_heads, block.head_dim

    def qkv_views(self, qkv: torch.Tensor):
        v4 = qkv.view(self.b, self.s, self.h + 2 * self.hkv, self.hd)
        q = v4[:, :, : self.h].transpose(1, 2)
        k = v4[:, :, self.h: self.h + self.hkv].transpose(1, 2)
        v = v4[:, :, self.h + self.hkv:].transpose(1, 2)
        return q, k, v

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        """(tokens, heads * head_dim) as (batch, heads, seq, head_dim), no copy."""
        return t.view(self.b, self.s, -1, self.hd).transpose(1, 2)


def _tables(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype):
    """RoPE reads float32 tables or tables in the activation dtype."""
    if cos.dtype not in (torch.float32, dtype):
        cos, sin = cos.float(), sin.float()
    return cos.contiguous(), sin.contiguous()


def _forward(m: "TritonLlama3Block", x: torch.Tensor, cos, sin):
    """Training forward: returns the output and the activations the backward needs."""
    z = _Shapes(m, x)
    x2 = x.reshape(z.t, z.dim)
    ws = gemm_workspace(x.device)
    new = lambda *shape, dtype=x.dtype: torch.empty(*shape, dtype=dtype, device=x.device)

    h1, rstd1 = new(z.t, z.dim), new(z.t, dtype=torch.float32)
    rmsnorm_forward_into(x2, m.norm1_weight, m.eps, h1, rstd1)
    qkv = new(z.t, m.qkv_weight.shape[0])
    linear_forward_into(h1, m.qkv_weight, qkv, None, ws)
    del h1
    q, k, v = z.qkv_views(qkv)
    rope_forward_into(q, k, cos, sin, q, k)
    o, lse = new(z.t, z.h * z.hd), new(z.b, z.h, z.s, dtype=torch.float32)
    attention_forward_into(q, k, v, z.heads(o), lse, m.causal)
    h = new(z.t, z.dim)
    linear_forward_into(o, m.o_weight, h, x2, ws)
    attn = {} if m.recompute_attention else dict(o=o, lse=lse)
    del o, lse
    h2, rstd2 = new(z.t, z.dim), new(z.t, dtype=torch.float32)
    rmsnorm_forward_into(h, m.norm2_weight, m.eps, h2, rstd2)
    gu = new(z.t, m.gate_up_weight.shape[0])
    linear_forward_into(h2, m.gate_up_weight, gu, None, ws)
    a = new(z.t, m.gate_up_weight.shape[0] // 2)
    swiglu_fused_forward_into(gu, a)
    out = new(z.t, z.dim)
    linear_forward_into(a, m.down_weight, out, h, ws)
    saved = dict(x=x2, qkv=qkv, h=h, h2=h2, gu=gu, rstd1=rstd1, rstd2=rstd2, **attn)
    return out.view(z.b, z.s, z.dim), saved


def _backward(m: "TritonLlama3Block", dout: torch.Tensor, saved: dict, cos, sin, x_shape):
    """`saved` is emptied as the backward goes, so each activation is freed once used;
    gu is overwritten with its gradient: the backward can run only once."""
    x2, qkv, rstd1, rstd2 = (saved[k] for k in ("x", "qkv", "rstd1", "rstd2"))
    o, lse = saved.get("o"), saved.get("lse")
    h, h2, gu = saved.pop("h"), saved.pop("h2"), saved.pop("gu")
    z = _Shapes(m, torch.empty(x_shape, device="meta"))
    dev, dt = x2.device, x2.dtype
    ws = gemm_workspace(dev)
    new = lambda *shape, dtype=dt: torch.empty(*shape, dtype=dtype, device=dev)
    dout = dout.reshape(z.t, z.dim)
    if not dout.is_contiguous():
        dout = dout.contiguous()

    # MLP: out = h + a Wd^T, a = silu(g) * u.  dgu is written over gu and a over da.
    da = new(z.t, m.down_weight.shape[1])
    linear_backward_input_into(dout, m.down_weight, da, workspace=ws)
    swiglu_fused_backward_into(da, gu, gu, a=da)
    d_down = torch.empty_like(m.down_weight)
    linear_backward_weight_into(dout, da, d_down, workspace=ws)
    del da
    dgu = gu
    # The backward's memory peak is here (d_down, d_gate_up, dgu and h2 or dh live at once): these two
    # GEMMs run without the cuBLASLt workspace (cuBLASLt then picks a kernel as fast on H100: 1.237
    # vs 1.251 ms for the weight gradient), and the RMSNorm scratch is made after them.
    del ws
    d_gate_up = torch.empty_like(m.gate_up_weight)
    linear_backward_weight_into(dgu, h2, d_gate_up)
    del h2
    dh = new(z.t, z.dim)
    linear_backward_input_into(dgu, m.gate_up_weight, dh)
    del dgu, gu
    ws = gemm_workspace(dev)
    d_norm2 = torch.empty_like(m.norm2_weight)
    norm_ws = torch.empty(rmsnorm_backward_workspace_size(x2), dtype=torch.uint8, device=dev)
    rmsnorm_backward_into(dh, h, m.norm2_weight, rstd2, m.eps, dh, d_norm2, norm_ws, dh=dout)
    del h

    # Attention: h = x + o Wo^T.
    q, k, v = z.qkv_views(qkv)
    if o is None:  # recomputed: past the MLP's memory peak, where keeping o would have counted
        o, lse = new(z.t, z.h * z.hd), new(z.b, z.h, z.s, dtype=torch.float32)
        attention_forward_into(q, k, v, z.heads(o), lse, m.causal)
    do = new(z.t, z.h * z.hd)
    linear_backward_input_into(dh, m.o_weight, do, workspace=ws)
    d_o = torch.empty_like(m.o_weight)
    linear_backward_weight_into(dh, o, d_o, workspace=ws)
    saved.clear()  # from here on, only this frame holds qkv, o and lse
    dqkv = new(z.t, m.qkv_weight.shape[0])
    dq, dk, dv = z.qkv_views(dqkv)
    attn_ws = torch.empty(attention_backward_workspace_size(q, k, m.deterministic), dtype=torch.uint8,
                          device=dev)
    attention_backward_into(z.heads(do), q, k, v, z.heads(o), lse, dq, dk, dv, m.causal, 0.0,
                            m.deterministic, attn_ws)
    del do, attn_ws, q, k, v, qkv, o, lse
    rope_backward_into(dq, dk, cos, sin, dq, dk)
    h1 = new(z.t, z.dim)
    rmsnorm_forward_into(x2, m.norm1_weight, m.eps, h1)
    dh1 = new(z.t, z.dim)
    linear_backward_input_into(dqkv, m.qkv_weight, dh1, workspace=ws)
    d_qkv = torch.empty_like(m.qkv_weight)
    linear_backward_weight_into(dqkv, h1, d_qkv, workspace=ws)
    del dqkv, h1
    d_norm1 = torch.empty_like(m.norm1_weight)
    rmsnorm_backward_into(dh1, x2, m.norm1_weight, rstd1, m.eps, dh1, d_norm1, norm_ws, dh=dh)
    return dh1.view(x_shape), (d_qkv, d_o, d_gate_up, d_down, d_norm1, d_norm2)


# The fused parameters, in the order of l3k_llama_block_weights and of the backward's gradients.
_PARAM_NAMES = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight", "norm1_weight", "norm2_weight")


class _Weights(ctypes.Structure):  # l3k_llama_block_weights: six DLTensor pointers
    _fields_ = [(n, ctypes.c_void_p) for n in ("qkv", "o", "gate_up", "down", "norm1", "norm2")]


class _Config(ctypes.Structure):  # l3k_llama_block_config
    _fields_ = [("n_heads", ctypes.c_int64), ("n_kv_heads", ctypes.c_int64), ("causal", ctypes.c_int),
                ("eps", ctypes.c_float)]


class _InferenceCall:
    """What a block's inference forward keeps between calls, so that a call at a host-bound shape
    costs little more than the C call itself: the weights' DLTensors, the config struct, and the
    workspace size per input shape.  Valid while the parameters keep their storage (checked each
    call by data pointer and shape); it holds references to the weights it borrowed."""

    __slots__ = ("key", "borrowed", "weights", "cfg", "ws_bytes")

    def __init__(self, params, n_heads: int, n_kv_heads: int, causal: bool, eps: float, key=None):
        self.key = key
        self.borrowed = Borrowed(*params)
        self.weights = _Weights(*self.borrowed.ptrs)
        self.cfg = _Config(n_heads, n_kv_heads, int(causal), eps)
        self.ws_bytes: dict = {}

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The block's output for contiguous x (batch, seq, dim), in one C call."""
        b = Borrowed(x, cos, sin)
        out = torch.empty_like(x)
        ws = torch.empty(self.workspace_bytes(x, b.ptrs[0]), dtype=torch.uint8, device=x.device)
        o = Borrowed(out, ws)
        check(LIB.l3k_llama_block_forward(b.ptrs[0], b.ptrs[1], b.ptrs[2], ctypes.byref(self.weights),
                                          ctypes.byref(self.cfg), o.ptrs[0], o.ptrs[1], current_stream(x)))
        return out

    def workspace_bytes(self, x, x_ptr) -> int:
        k = (x.shape, x.dtype)
        n = self.ws_bytes.get(k)
        if n is None:
            size = ctypes.c_size_t(0)
            check(LIB.l3k_llama_block_forward_workspace_size(x_ptr, ctypes.byref(self.weights),
                                                             ctypes.byref(self.cfg), ctypes.byref(size)))
            n = self.ws_bytes[k] = size.value
        return n


# Kept outside the modules so that copying or pickling a block never meets a DLPack capsule.
_INFERENCE_CALLS: "weakref.WeakKeyDictionary[TritonLlama3Block, _InferenceCall]" = weakref.WeakKeyDictionary()


def _forward_one_call(m: "TritonLlama3Block", x: torch.Tensor, cos, sin, params) -> torch.Tensor:
    """Inference: the whole block in one C call (l3k_llama_block_forward), its
    intermediates in one workspace tensor, so a forward costs a handful of host calls."""
    key = (tuple([(p.data_ptr(), p.shape) for p in params]), m.n_heads, m.n_kv_heads, m.causal, m.eps)
    call = _INFERENCE_CALLS.get(m)
    if call is None or call.key != key:
        call = _INFERENCE_CALLS[m] = _InferenceCall(params, m.n_heads, m.n_kv_heads, m.causal, m.eps, key)
    return call.run(x, cos, sin)


class LlamaBlockFunction(torch.autograd.Function):
    """The whole block as one autograd node.  Its activations are kept on ctx (not through
    save_for_backward) so that the backward can free each as soon as it is used."""

    @staticmethod
    def forward(ctx, x, cos, sin, block, *params):
        out, saved = _forward(block, x, cos, sin)
        ctx.block, ctx.x_shape, ctx.activations = block, x.shape, saved
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, dout):
        if ctx.activations is None:
            raise RuntimeError("TritonLlama3Block: backward through the block a second time "
                               "(retain_graph=True) is not supported: its activations are consumed")
        saved, ctx.activations = ctx.activations, None
        cos, sin = ctx.saved_tensors
        dx, dparams = _backward(ctx.block, dout, saved, cos, sin, ctx.x_shape)
        return (dx, None, None, None, *dparams)


class TritonLlama3Block(nn.Module):
    """The LLaMA-3 transformer block on fused CUDA C kernels (the tutorial's exercise, solved).

    ``TritonLlama3Block(dim, hidden_dim, n_heads)`` and ``forward(x, cos, sin)`` work as in the
    tutorial, with cos/sin of shape (seq, head_dim/2) for the rotate-half RoPE.  ``n_kv_heads``
    gives GQA; attention is causal by default as in a LLaMA decoder (``causal=False`` is the
    tutorial's stand-in).  ``recompute_attention`` (default) has the backward rerun the attention
    forward instead of keeping its output: batch * seq * dim fewer elements at the memory peak
    for one attention forward kernel (0.14 ms at the LLaMA-3-8B layer, B2 S2048, on an H100).
    ``deterministic`` makes the attention backward's dq reduction run-to-run identical.
    Weights load from the tutorial's parameter names (attn_q, ..., norm2_weight) and from a
    Hugging Face ``LlamaDecoderLayer`` state dict.
    """

    def __init__(self, dim: int, hidden_dim: int, n_heads: int, n_kv_heads: int | None = None,
                 causal: bool = True, eps: float = 1e-5, deterministic: bool = False,
                 recompute_attention: bool = True, device=None, dtype=None):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"TritonLlama3Block: dim {dim} is not a multiple of n_heads {n_heads}")
        self.dim, self.hidden_dim = dim, hidden_dim
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads or n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"TritonLlama3Block: n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
        self.head_dim = dim // n_heads
        self.causal, self.eps, self.deterministic = causal, eps, deterministic
        self.recompute_attention = recompute_attention
        kv = self.n_kv_heads * self.head_dim
        kw = dict(device=device, dtype=dtype)
        self.qkv_weight = nn.Parameter(torch.empty(dim + 2 * kv, dim, **kw))
        self.o_weight = nn.Parameter(torch.empty(dim, dim, **kw))
        self.gate_up_weight = nn.Parameter(torch.empty(2 * hidden_dim, dim, **kw))
        self.down_weight = nn.Parameter(torch.empty(dim, hidden_dim, **kw))
        self.norm1_weight = nn.Parameter(torch.ones(dim, **kw))
        self.norm2_weight = nn.Parameter(torch.ones(dim, **kw))
        self.reset_parameters()
        self._register_load_state_dict_pre_hook(self._map_foreign_names)

    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation for each projection; norms at one."""
        for w in (self.qkv_weight, self.o_weight, self.gate_up_weight, self.down_weight):
            bound = 1 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
        nn.init.ones_(self.norm1_weight)
        nn.init.ones_(self.norm2_weight)

    def _split_sizes(self, name: str):
        kv = self.n_kv_heads * self.head_dim
        return (self.dim, kv, kv) if name == "qkv_weight" else (self.hidden_dim, self.hidden_dim)

    def _map_foreign_names(self, state_dict, prefix, *args):
        """Fold the tutorial's or Hugging Face's separate weights into the fused parameters."""
        parts: dict[str, dict[int, torch.Tensor]] = {}
        for key in [k for k in state_dict if k.startswith(prefix)]:
            alias = _ALIASES.get(key[len(prefix):])
            if alias is None:
                continue
            name, idx = alias
            tensor = state_dict.pop(key)
            if idx is None:
                state_dict[prefix + name] = tensor
            else:
                parts.setdefault(name, {})[idx] = tensor
        for name, got in parts.items():
            n = len(self._split_sizes(name))
            if sorted(got) != list(range(n)):
                missing = [(_QKV if name == "qkv_weight" else _GU)[i] for i in range(n) if i not in got]
                raise KeyError(f"TritonLlama3Block: {name} needs all of its parts, missing {missing}")
            state_dict[prefix + name] = torch.cat([got[i] for i in range(n)], dim=0)

    def split_weights(self) -> dict[str, torch.Tensor]:
        """The weights under the tutorial's names (views of the fused parameters)."""
        q, k, v = self.qkv_weight.split(self._split_sizes("qkv_weight"))
        g, u = self.gate_up_weight.split(self._split_sizes("gate_up_weight"))
        return {"attn_q.weight": q, "attn_k.weight": k, "attn_v.weight": v, "attn_o.weight": self.o_weight,
                "mlp_gate.weight": g, "mlp_up.weight": u, "mlp_down.weight": self.down_weight,
                "norm1_weight": self.norm1_weight, "norm2_weight": self.norm2_weight}

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"TritonLlama3Block: x has shape {tuple(x.shape)}, expected (batch, seq, {self.dim})")
        cos, sin = _tables(cos, sin, x.dtype)
        ps = self._parameters  # not six trips through nn.Module.__getattr__ (~1 us each)
        params = tuple([ps[n] for n in _PARAM_NAMES])
        grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
        if torch.compiler.is_compiling():  # torch.compile: the block as registered opaque ops
            from .library import llama_block, llama_block_inference
            return (llama_block if grad else llama_block_inference)(self, x, cos, sin)
        x = x if x.is_contiguous() else x.contiguous()
        if grad:
            return LlamaBlockFunction.apply(x, cos, sin, self, *params)
        return _forward_one_call(self, x, cos, sin, params)

    def _apply(self, fn, *args, **kwargs):
        _INFERENCE_CALLS.pop(self, None)  # .to(), .half(), ...: let go of the old weights now
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden_dim={self.hidden_dim}, n_heads={self.n_heads}, "
                f"n_kv_heads={self.n_kv_heads}, causal={self.causal}, eps={self.eps}")

"""Llama3Block: the LLaMA-3 transformer block, composed once in C.

    residual = x + o_proj(attention(rope(qkv_proj(rmsnorm(x)))))
    out      = residual + down_proj(silu(gate) * up),  [gate | up] = gate_up_proj(rmsnorm(residual))

The composition lives in the C library (capi/block.c): an inference forward, a
training forward that keeps the activations the backward needs in buffers this
module allocates, and a backward that computes every gradient; each is one C call.
This module allocates, calls, and wires autograd.  The same two bodies serve the
eager route (an autograd Function that calls them directly) and ``torch.compile``
(the registered ops ``llama_block_train`` / ``llama_block_backward``, with fake
kernels; the inference forward is ``llama_block_inference``).

What the forward keeps: the QKV projection (q and k rotated), the residual stream
between the sublayers, the gate/up projection and each norm's 1/rms.  The norms'
outputs are recomputed in the backward, and so is the attention output unless
``recompute_attention=False``.  The backward writes the gate/up gradient over the
gate/up activation, so one forward's activations serve one backward; under
``backward(retain_graph=True)`` (and always under ``torch.compile``, whose graphs
are functional) the backward preserves them instead, at the cost of a workspace
that large.
"""

from __future__ import annotations

import collections
import ctypes
import math
import threading
import weakref

import torch
from torch import nn

from ._dlpack import Borrowed, Slots, current_stream
from ._lib import (
    LIB,
    PRESERVE_ACTIVATIONS,
    BlockActivations,
    BlockConfig,
    BlockGrads,
    BlockLayout,
    BlockWeights,
    KVCacheArgs,
    check,
)
from .cache import CacheSlots
from .ops._common import key_range_for
from .ops._registry import define, ops, register_autograd, traced
from .reference import Llama3BlockBase

# The block's weights in either form the C ABI takes, as l3k_llama_block_weights names them:
# fused (this module's parameters) or split (e.g. a Hugging Face layer's own parameters).
PARAM_NAMES = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight", "norm1_weight", "norm2_weight")
SPLIT_PARAM_NAMES = (
    "q_weight",
    "k_weight",
    "v_weight",
    "o_weight",
    "gate_weight",
    "up_weight",
    "down_weight",
    "norm1_weight",
    "norm2_weight",
)

# Parameter names of the tutorial's block and of Hugging Face's LlamaDecoderLayer, mapped onto
# this block's fused parameters: (tutorial name, Hugging Face name, fused name, part index).  The
# tutorial's norm weights have this block's names already.
_QKV_PARTS, _GATE_UP_PARTS = ("q", "k", "v"), ("gate", "up")
_FOREIGN_NAMES = (
    ("attn_q.weight", "self_attn.q_proj.weight", "qkv_weight", 0),
    ("attn_k.weight", "self_attn.k_proj.weight", "qkv_weight", 1),
    ("attn_v.weight", "self_attn.v_proj.weight", "qkv_weight", 2),
    ("attn_o.weight", "self_attn.o_proj.weight", "o_weight", None),
    ("mlp_gate.weight", "mlp.gate_proj.weight", "gate_up_weight", 0),
    ("mlp_up.weight", "mlp.up_proj.weight", "gate_up_weight", 1),
    ("mlp_down.weight", "mlp.down_proj.weight", "down_weight", None),
    (None, "input_layernorm.weight", "norm1_weight", None),
    (None, "post_attention_layernorm.weight", "norm2_weight", None),
)
_ALIASES = {
    foreign: (name, part)
    for tutorial, hf, name, part in _FOREIGN_NAMES
    for foreign in (tutorial, hf)
    if foreign is not None
}


# ---- the C calls ----------------------------------------------------------------------------


class BlockCall:
    """The weights and configuration of one block as the C ABI takes them.  A module keeps one
    between calls (so a call at a host-bound shape costs little more than the C call), and so do
    the registered ops, per set of weights (``_op_call``).  With `hold` it keeps the weights it
    borrowed alive; without, it describes them by address (contiguous weights only), and the
    caller passes weights with those very addresses and shapes to every call."""

    __slots__ = ("key", "param_specs", "data_ptrs", "spec", "borrowed", "weights", "cfg", "frame_key")

    def __init__(
        self,
        params,
        n_heads: int,
        n_kv_heads: int,
        causal: bool,
        eps: float,
        deterministic: bool = False,
        key=None,
        hold: bool = True,
    ):
        self.key = key
        self.param_specs = tuple([(p.shape, p.dtype, p.device) for p in params])
        self.data_ptrs = tuple([p.data_ptr() for p in params])  # what the DLTensors below point at
        self.spec = (n_heads, n_kv_heads, causal, eps, deterministic)
        if hold:
            self.borrowed = Borrowed(*params)
            ptrs = self.borrowed.ptrs
        else:
            self.borrowed = Slots(params[0].device, [(p.shape, p.dtype) for p in params])
            ptrs = self.borrowed.fill(self.data_ptrs)
        names = SPLIT_PARAM_NAMES if len(params) == len(SPLIT_PARAM_NAMES) else PARAM_NAMES
        self.weights = BlockWeights(**dict(zip(names, ptrs)))
        self.cfg = BlockConfig(n_heads, n_kv_heads, int(causal), eps, int(deterministic))
        # What a call's frame (sizes, DLTensors) depends on besides x.
        self.frame_key = (tuple([tuple(p.shape) for p in params]), self.spec)

    def config(self, key_range_ptr) -> BlockConfig:
        """The configuration of one call: this block's, with the call's key range (a DLTensor
        pointer, or None for every key)."""
        if key_range_ptr is None:
            return self.cfg
        cfg = BlockConfig.from_buffer_copy(self.cfg)
        cfg.key_range = key_range_ptr
        return cfg

    def tables(self, cos: torch.Tensor, sin: torch.Tensor, key_range):
        """What every block call takes besides its own buffers: (the borrowed tables, which the
        caller keeps alive over the call; cos and sin DLTensor pointers; the weights; the call's
        configuration), as ctypes arguments."""
        t = Borrowed(cos, sin, key_range)
        return t, t.ptrs[0], t.ptrs[1], ctypes.byref(self.weights), ctypes.byref(self.config(t.ptrs[2]))

    def frame(self, kind: str, x: torch.Tensor, flag=None, cache=None):
        """This thread's frame of a call for x's shape (`kind` "inference", "forward" with `flag`
        keep_attention, "backward" with `flag` (preserve, attention kept), or "decode" with `flag`
        the cache's layout and `cache` its KVCacheArgs struct): made once, reused by every later call
        of that shape."""
        frames = _frames()
        key = (kind, x.shape, x.dtype, x.device, flag, self.frame_key)
        f = frames.get(key)
        if f is None:
            if len(frames) >= 256:  # e.g. many sequence lengths: start over rather than grow
                frames.clear()
            frame_class = _BackwardFrame if kind == "backward" else _ForwardFrame
            f = frames[key] = frame_class(self, x, kind, cache if kind == "decode" else flag)
        return f

    def inference(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_range=None) -> torch.Tensor:
        """The block's output for contiguous x (batch, seq, dim); nothing kept."""
        f = self.frame("inference", x)
        out = torch.empty_like(x)
        ws = torch.empty(f.workspace_bytes, dtype=torch.uint8, device=x.device)
        xp, outp, wsp = f.slots.fill([x.data_ptr(), out.data_ptr(), ws.data_ptr()])[:3]
        t, cos_p, sin_p, w, cfg = self.tables(cos, sin, key_range)
        check(LIB.l3k_llama_block_forward(xp, cos_p, sin_p, w, cfg, outp, wsp, current_stream(x)))
        return out

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache, v_cache, cache_range, positions):
        """The decode step's output for contiguous x (batch, seq, dim) of `seq` new tokens per
        sequence; their k and v are written into the cache (see llama_block_decode)."""
        c = Borrowed(k_cache, v_cache, cache_range, positions)
        cache = KVCacheArgs(*c.ptrs)
        layout = (k_cache.shape, k_cache.stride(), v_cache.stride(), positions is None)
        f = self.frame("decode", x, layout, cache)
        out = torch.empty_like(x)
        ws = torch.empty(f.workspace_bytes, dtype=torch.uint8, device=x.device)
        xp, outp, wsp = f.slots.fill([x.data_ptr(), out.data_ptr(), ws.data_ptr()])[:3]
        t, cos_p, sin_p, w, cfg = self.tables(cos, sin, None)
        check(LIB.l3k_llama_block_decode(xp, cos_p, sin_p, w, cfg, ctypes.byref(cache), outp, wsp, current_stream(x)))
        return out

    def train_forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keep_attention: bool, key_range=None
    ):
        """(out, *activations) of a training forward; the activations in BlockActivations' order,
        size-0 tensors for an attention output and LSE that are not kept."""
        f = self.frame("forward", x, keep_attention)
        dev = x.device
        out = torch.empty_like(x)
        acts = [torch.empty(shape, dtype=dt, device=dev) for shape, dt in f.activations]
        ws = torch.empty(f.workspace_bytes, dtype=torch.uint8, device=dev)
        ptrs = f.slots.fill([x.data_ptr(), out.data_ptr(), ws.data_ptr()] + [a.data_ptr() for a in acts])
        t, cos_p, sin_p, w, cfg = self.tables(cos, sin, key_range)
        check(
            LIB.l3k_llama_block_forward_train(
                ptrs[0], cos_p, sin_p, w, cfg, ptrs[1], f.saved_ref, ptrs[2], current_stream(x)
            )
        )
        if not keep_attention:
            acts += [torch.empty(0, dtype=x.dtype, device=dev), torch.empty(0, dtype=torch.float32, device=dev)]
        return (out, *acts)

    def backward(
        self,
        dout: torch.Tensor,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        acts,
        preserve: bool,
        key_range=None,
    ):
        """(dx, *weight gradients) from the activations train_forward returned (given the same
        key_range).  Without `preserve` the gate/up activation is overwritten."""
        if not dout.is_contiguous():
            dout = dout.contiguous()
        kept = acts[5].numel() > 0
        f = self.frame("backward", x, (preserve, kept))
        dx = torch.empty_like(x)
        grads = _gradient_buffers(self.param_specs)
        ws = torch.empty(f.workspace_bytes, dtype=torch.uint8, device=x.device)
        ptrs = f.slots.fill(
            [dout.data_ptr(), x.data_ptr(), dx.data_ptr(), ws.data_ptr()]
            + [g.data_ptr() for g in grads]
            + [a.data_ptr() for a in (acts if kept else acts[:5])]
        )
        t, cos_p, sin_p, w, cfg = self.tables(cos, sin, key_range)
        check(
            LIB.l3k_llama_block_backward(
                ptrs[0],
                ptrs[1],
                cos_p,
                sin_p,
                w,
                cfg,
                f.saved_ref,
                PRESERVE_ACTIVATIONS if preserve else 0,
                ptrs[2],
                f.grads_ref,
                ptrs[3],
                current_stream(x),
            )
        )
        return (dx, *grads)


# ---- frames: what the C calls of one input shape reuse ----------------------------------------

_THREAD = threading.local()


def _frames() -> dict:
    """This thread's frames (a frame's DLTensors are written at each call, so threads each
    have their own)."""
    frames = getattr(_THREAD, "frames", None)
    if frames is None:
        frames = _THREAD.frames = {}
    return frames


def _ask(call: BlockCall, x: torch.Tensor, query, answer, *more):
    """`answer`, filled by one of the library's size queries for x's shape (x is only described);
    `more`: the query's arguments between cfg and the answer (ctypes structs)."""
    xs = Slots(x.device, [(x.shape, x.dtype)])
    refs = [ctypes.byref(a) for a in (call.weights, call.cfg, *more, answer)]
    check(query(xs.fill([x.data_ptr()])[0], *refs))
    return answer


def _layout(call: BlockCall, x: torch.Tensor) -> BlockLayout:
    return _ask(call, x, LIB.l3k_llama_block_training_layout, BlockLayout())


def _activation_specs(lay: BlockLayout, dtype: torch.dtype, kept: bool) -> list:
    """(shape, dtype) of each activation a training forward keeps, in BlockActivations' order."""
    specs = [
        ((lay.qkv.rows, lay.qkv.cols), dtype),
        ((lay.residual.rows, lay.residual.cols), dtype),
        ((lay.gate_up.rows, lay.gate_up.cols), dtype),
        ((lay.rstd1.rows,), torch.float32),
        ((lay.rstd2.rows,), torch.float32),
    ]
    if kept:
        specs += [((lay.attn_out.rows, lay.attn_out.cols), dtype), ((lay.lse.rows,), torch.float32)]
    return specs


class _ForwardFrame:
    """x, out, the workspace and (training) the activations of a forward, as DLTensors (Slots),
    with the sizes asked of the library once."""

    def __init__(self, call: BlockCall, x: torch.Tensor, kind: str, flag):
        """flag: keep_attention for a training forward; the KVCacheArgs struct for a decode step."""
        if kind == "inference":
            size = _ask(call, x, LIB.l3k_llama_block_forward_workspace_size, ctypes.c_size_t(0))
            self.workspace_bytes, self.activations = size.value, []
        elif kind == "decode":
            size = _ask(call, x, LIB.l3k_llama_block_decode_workspace_size, ctypes.c_size_t(0), flag)
            self.workspace_bytes, self.activations = size.value, []
        else:
            lay = _layout(call, x)
            self.workspace_bytes = lay.forward_workspace_bytes
            self.activations = _activation_specs(lay, x.dtype, flag)
        self.slots = Slots(
            x.device, [(x.shape, x.dtype)] * 2 + [((self.workspace_bytes,), torch.uint8)] + self.activations
        )
        self.saved = BlockActivations(*self.slots.ptrs[3:])
        self.saved_ref = ctypes.byref(self.saved)


class _BackwardFrame:
    """dout, x, dx, the workspace, the gradients and the activations of a backward."""

    def __init__(self, call: BlockCall, x: torch.Tensor, kind: str, flags):
        preserve, kept = flags
        lay = _layout(call, x)
        self.workspace_bytes = lay.backward_workspace_bytes_preserving if preserve else lay.backward_workspace_bytes
        grads = [(shape, dtype) for shape, dtype, _ in call.param_specs]
        self.slots = Slots(
            x.device,
            [(x.shape, x.dtype)] * 3
            + [((self.workspace_bytes,), torch.uint8)]
            + grads
            + _activation_specs(lay, x.dtype, kept),
        )
        n = 4 + len(grads)
        names = SPLIT_PARAM_NAMES if len(grads) == len(SPLIT_PARAM_NAMES) else PARAM_NAMES
        self.grads = BlockGrads(**dict(zip(names, self.slots.ptrs[4:n])))
        self.saved = BlockActivations(*self.slots.ptrs[n:])
        self.grads_ref, self.saved_ref = ctypes.byref(self.grads), ctypes.byref(self.saved)


def _gradient_buffers(specs) -> list:
    """A contiguous gradient for each weight, from the weights' (shape, dtype, device).  Split
    q/k/v and gate/up get views of one buffer each, in the fused order, so the C backward sees
    them adjacent: one GEMM per projection, and the gate/up gradient's memory can hold its
    scratch before it is written."""

    def new(shape, dtype, device):
        return torch.empty(shape, dtype=dtype, device=device)

    if len(specs) != len(SPLIT_PARAM_NAMES):
        return [new(*s) for s in specs]
    q, k, v, o, gate, up, down, n1, n2 = specs

    def joined(*parts):
        whole = new((sum(p[0][0] for p in parts), parts[0][0][1]), *parts[0][1:])
        return list(whole.split([p[0][0] for p in parts]))

    return [*joined(q, k, v), new(*o), *joined(gate, up), new(*down), new(*n1), new(*n2)]


# ---- registered ops (torch.compile) --------------------------------------------------------

# weights: the fused 6 or the split 9, in PARAM_NAMES / SPLIT_PARAM_NAMES order.  key_range (each
# op's last argument): None, or int32 (batch, 2) on x's device, as llama_block takes it.
_SPEC = "Tensor[] weights, int n_heads, int n_kv_heads, bool causal, float eps, bool deterministic"


# The registered ops' calls, per weights (address, shape, dtype, device) and settings: a compiled
# model passes the same weights every step.  They hold no weight (hold=False), so a model that is
# dropped is freed; the least recently used go first.
_OP_CALLS: collections.OrderedDict = collections.OrderedDict()


def _op_call(weights, *spec) -> BlockCall:
    if not all(w.is_contiguous() for w in weights) or len({w.device for w in weights}) != 1:
        return BlockCall(weights, *spec)
    key = (tuple([(w.data_ptr(), w.shape, w.dtype, w.device) for w in weights]), spec)
    call = _OP_CALLS.get(key)
    if call is None:
        if len(_OP_CALLS) >= 256:
            _OP_CALLS.popitem(last=False)
        call = _OP_CALLS[key] = BlockCall(weights, *spec, hold=False)
    else:
        _OP_CALLS.move_to_end(key)
    return call


def _inference_kernel(x, cos, sin, weights, n_heads, n_kv_heads, causal, eps, deterministic, key_range=None):
    call = _op_call(weights, n_heads, n_kv_heads, causal, eps, deterministic)
    return call.inference(x.contiguous(), cos, sin, key_range)


def _train_kernel(
    x, cos, sin, weights, n_heads, n_kv_heads, causal, eps, deterministic, keep_attention, key_range=None
):
    call = _op_call(weights, n_heads, n_kv_heads, causal, eps, deterministic)
    return list(call.train_forward(x.contiguous(), cos, sin, keep_attention, key_range))


def _backward_kernel(
    dout, x, cos, sin, acts, weights, n_heads, n_kv_heads, causal, eps, deterministic, preserve, key_range=None
):
    call = _op_call(weights, n_heads, n_kv_heads, causal, eps, deterministic)
    return list(call.backward(dout, x.contiguous(), cos, sin, acts, preserve, key_range))


def _train_fake(x, cos, sin, weights, n_heads, n_kv_heads, causal, eps, deterministic, keep_attention, key_range=None):
    b, s, dim = x.shape
    t = b * s
    new = x.new_empty
    qkv_rows = sum(w.shape[0] for w in weights[:3]) if len(weights) == 9 else weights[0].shape[0]
    gate_up_rows = sum(w.shape[0] for w in weights[4:6]) if len(weights) == 9 else weights[2].shape[0]
    kept = (
        [new(t, dim), new(b * n_heads * s, dtype=torch.float32)]
        if keep_attention
        else [new(0), new(0, dtype=torch.float32)]
    )
    return [
        torch.empty_like(x),
        new(t, qkv_rows),
        new(t, dim),
        new(t, gate_up_rows),
        new(t, dtype=torch.float32),
        new(t, dtype=torch.float32),
        *kept,
    ]


def _backward_fake(dout, x, cos, sin, acts, weights, *spec):
    return [torch.empty_like(x), *[torch.empty_like(w) for w in weights]]


define(
    f"llama_block_inference(Tensor x, Tensor cos, Tensor sin, {_SPEC}, Tensor? key_range=None) -> Tensor",
    _inference_kernel,
    lambda x, *rest: torch.empty_like(x),
)
define(
    f"llama_block_train(Tensor x, Tensor cos, Tensor sin, {_SPEC}, bool keep_attention, "
    "Tensor? key_range=None) -> Tensor[]",
    _train_kernel,
    _train_fake,
)
define(
    f"llama_block_backward(Tensor dout, Tensor x, Tensor cos, Tensor sin, Tensor[] acts, {_SPEC}, "
    "bool preserve, Tensor? key_range=None) -> Tensor[]",
    _backward_kernel,
    _backward_fake,
)


def _decode_kernel(
    x, cos, sin, weights, n_heads, n_kv_heads, causal, eps, deterministic, k_cache, v_cache, cache_range, positions=None
):
    call = _op_call(weights, n_heads, n_kv_heads, causal, eps, deterministic)
    return call.decode(x.contiguous(), cos, sin, k_cache, v_cache, cache_range, positions)


define(
    f"llama_block_decode(Tensor x, Tensor cos, Tensor sin, {_SPEC}, Tensor(a!) k_cache, Tensor(b!) v_cache, "
    "Tensor cache_range, Tensor? positions=None) -> Tensor",
    _decode_kernel,
    lambda x, *rest: torch.empty_like(x),
)


def _train_setup(ctx, inputs, output):
    x, cos, sin, weights = inputs[:4]
    key_range = inputs[10]
    ctx.save_for_backward(x, cos, sin, key_range, *output[1:], *weights)
    ctx.spec = tuple(inputs[4:9])
    ctx.mark_non_differentiable(*output[1:])


def _train_backward(ctx, douts):
    x, cos, sin, key_range, *rest = ctx.saved_tensors
    acts, weights = rest[:7], rest[7:]
    # Functional graphs: the activations are preserved (the op must not mutate its inputs).
    dx, *grads = ops.llama_block_backward(douts[0], x, cos, sin, acts, weights, *ctx.spec, True, key_range)
    return dx, None, None, grads, None, None, None, None, None, None, None


register_autograd("llama_block_train", _train_backward, _train_setup)


# ---- eager autograd ----------------------------------------------------------------------------


class LlamaBlockFunction(torch.autograd.Function):
    """The whole block as one autograd node over the two C calls.  Inputs, weights and
    activations go through save_for_backward, so that saved-tensor hooks (non-reentrant
    checkpointing, offloading) see them; the backward consumes the activations unless the graph
    is retained."""

    @staticmethod
    def forward(ctx, x, cos, sin, call: BlockCall, keep_attention: bool, key_range, *weights):
        out, *acts = call.train_forward(x, cos, sin, keep_attention, key_range)
        ctx.save_for_backward(x, cos, sin, key_range, *weights, *acts)
        ctx.call, ctx.n_weights, ctx.consumed = call, len(weights), False
        return out

    @staticmethod
    def backward(ctx, dout):
        if ctx.consumed:
            raise RuntimeError(
                "Llama3Block: backward through the block a second time: the first backward consumed its "
                "activations (it writes the gate/up gradient over them). Pass retain_graph=True to the "
                "first backward to keep them."
            )
        x, cos, sin, key_range, *rest = ctx.saved_tensors
        weights, acts = rest[: ctx.n_weights], rest[ctx.n_weights :]
        preserve = torch._C._autograd._get_current_graph_task_keep_graph()
        ctx.consumed = not preserve
        call = ctx.call
        # Sharded training (FSDP) frees the weights' memory after the forward and gathers them
        # anew for the backward: borrow them again where their storage moved.
        if any(w.data_ptr() != ptr for w, ptr in zip(weights, call.data_ptrs)):
            call = BlockCall(weights, *call.spec)
        dx, *grads = call.backward(dout, x, cos, sin, acts, preserve, key_range)
        return (dx, None, None, None, None, None, *grads)


# Per-owner C-call state, kept outside the owners so that copying or pickling one never meets a
# DLPack capsule.
_CALLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tables(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype):
    """RoPE reads float32 tables or tables in the activation dtype."""
    if cos.dtype not in (torch.float32, dtype):
        cos, sin = cos.float(), sin.float()
    return cos.contiguous(), sin.contiguous()


def llama_block(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    weights,
    n_heads: int,
    n_kv_heads: int,
    eps: float = 1e-5,
    causal: bool = True,
    deterministic: bool = False,
    recompute_attention: bool = True,
    owner=None,
    key_range: torch.Tensor | None = None,
) -> torch.Tensor:
    """The block as a function of its weights: PARAM_NAMES' six (fused q/k/v and gate/up) or
    SPLIT_PARAM_NAMES' nine, in that order.  Differentiable in x and every weight; under
    torch.compile the registered ops.  `owner` (any weak-referenceable object, e.g. the module
    holding the weights) keeps the C-call state between calls, rebuilt when a weight's storage
    changes.  cos/sin: rotate-half tables (seq', head_dim/2) or (batch, seq', head_dim/2).

    key_range: a padded batch, (batch, 2) integers: sequence b's attention sees only the keys
    key_range[b, 0] .. key_range[b, 1] - 1 (its valid positions; values are clamped into
    [0, seq)), with no seq x seq mask.  The valid positions' outputs are then those of each
    sequence alone (given per-sequence RoPE tables that start each sequence at position 0); the
    padded positions get outputs too, which a loss should ignore: with zero gradient there, the
    weight gradients are those of the sequences alone."""
    cos, sin = _tables(cos, sin, x.dtype)
    weights = tuple(weights)
    spec = (int(n_heads), int(n_kv_heads), bool(causal), float(eps), bool(deterministic))
    key_range = key_range_for(key_range, x)
    grad = torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))
    if torch.compiler.is_compiling():  # the same C calls as registered ops
        if grad:
            return ops.llama_block_train(x, cos, sin, weights, *spec, not recompute_attention, key_range)[0]
        return ops.llama_block_inference(x, cos, sin, weights, *spec, key_range)
    x = x if x.is_contiguous() else x.contiguous()
    call = _call_for(owner, weights, spec)
    if grad:
        return LlamaBlockFunction.apply(x, cos, sin, call, not recompute_attention, key_range, *weights)
    return call.inference(x, cos, sin, key_range)


def llama_block_decode(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    weights,
    cache: CacheSlots,
    n_heads: int,
    n_kv_heads: int,
    eps: float = 1e-5,
    owner=None,
) -> torch.Tensor:
    """The block's decode step, one C call: the output for x (batch, seq, dim), `seq` new tokens
    per sequence, whose k (rotated) and v are written into cache.k / cache.v in place; their
    queries attend the cache (causal, after each sequence's left padding).  `cache` is a
    CacheSlots (``KVCache.layer(i)`` gives one): its cache_range says which slots each sequence
    holds, its positions which RoPE table row new token 0 reads (row positions[b] + i for token i;
    row i without positions: tables holding this call's tokens).  weights and `owner` as for
    llama_block.  Inference only: where autograd would record it (grad mode on and x or a weight
    requiring grad) it refuses, rather than return an output without a gradient; call it under
    torch.no_grad() or torch.inference_mode()."""
    weights = tuple(weights)
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        raise RuntimeError(
            "llama_block_decode: the decode step has no backward, and gradients are wanted here (grad mode is on "
            "and x or a weight requires grad); call it under torch.no_grad() or torch.inference_mode()"
        )
    cos, sin = _tables(cos, sin, x.dtype)
    spec = (int(n_heads), int(n_kv_heads), True, float(eps), False)
    k_cache, v_cache = cache.k, cache.v
    cache_range, positions = key_range_for(cache.cache_range, x), key_range_for(cache.positions, x)
    if traced(x):
        return ops.llama_block_decode(x, cos, sin, weights, *spec, k_cache, v_cache, cache_range, positions)
    x = x if x.is_contiguous() else x.contiguous()
    return _call_for(owner, weights, spec).decode(x, cos, sin, k_cache, v_cache, cache_range, positions)


def _call_for(owner, weights, spec) -> BlockCall:
    """The C-call state of `owner`'s weights (kept between calls, rebuilt when a weight's storage
    changes), or a new one without an owner."""
    if owner is None:
        return BlockCall(weights, *spec)
    key = (tuple([(w.data_ptr(), w.shape, w.dtype) for w in weights]), spec)
    call = _CALLS.get(owner)
    if call is None or call.key != key:
        call = _CALLS[owner] = BlockCall(weights, *spec, key=key)
    return call


# ---- the module ----------------------------------------------------------------------------


class Llama3Block(Llama3BlockBase):
    """The LLaMA-3 transformer block on fused CUDA C kernels.

    ``Llama3Block(dim, hidden_dim, n_heads)`` and ``forward(x, cos, sin)`` as in the tutorial
    (``TritonLlama3Block`` is the same class), with cos/sin of shape (seq, head_dim/2) for the
    rotate-half RoPE.  ``n_kv_heads`` gives GQA; attention is causal by default as in a LLaMA
    decoder (``causal=False`` is the tutorial's stand-in).  ``recompute_attention`` (default)
    has the backward rerun the attention forward instead of keeping its output: batch * seq *
    dim fewer elements kept, for one attention forward kernel.  ``deterministic`` makes the
    attention backward's dq reduction run-to-run identical.  Weights load from the tutorial's
    parameter names (attn_q, ..., norm2_weight) and from a Hugging Face ``LlamaDecoderLayer``
    state dict.
    """

    def _make_parameters(self, device, dtype) -> None:
        """The fused parameters (the constructor's hyperparameters are in Llama3BlockBase)."""
        dim, hidden_dim, kv = self.dim, self.hidden_dim, self.n_kv_heads * self.head_dim
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

    def _spec(self):
        return (int(self.n_heads), int(self.n_kv_heads), bool(self.causal), float(self.eps), bool(self.deterministic))

    def _split_sizes(self, name: str):
        kv = self.n_kv_heads * self.head_dim
        return (self.dim, kv, kv) if name == "qkv_weight" else (self.hidden_dim, self.hidden_dim)

    def _map_foreign_names(self, state_dict, prefix, *args):
        """Fold the tutorial's or Hugging Face's separate weights into the fused parameters."""
        parts: dict[str, dict[int, torch.Tensor]] = {}
        for key in [k for k in state_dict if k.startswith(prefix)]:
            alias = _ALIASES.get(key[len(prefix) :])
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
                labels = _QKV_PARTS if name == "qkv_weight" else _GATE_UP_PARTS
                missing = [labels[i] for i in range(n) if i not in got]
                raise KeyError(f"Llama3Block: {name} needs all of its parts, missing {missing}")
            state_dict[prefix + name] = torch.cat([got[i] for i in range(n)], dim=0)

    def split_weights(self) -> dict[str, torch.Tensor]:
        """The weights under the tutorial's names (views of the fused parameters)."""
        q, k, v = self.qkv_weight.split(self._split_sizes("qkv_weight"))
        g, u = self.gate_up_weight.split(self._split_sizes("gate_up_weight"))
        return {
            "attn_q.weight": q,
            "attn_k.weight": k,
            "attn_v.weight": v,
            "attn_o.weight": self.o_weight,
            "mlp_gate.weight": g,
            "mlp_up.weight": u,
            "mlp_down.weight": self.down_weight,
            "norm1_weight": self.norm1_weight,
            "norm2_weight": self.norm2_weight,
        }

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_range: torch.Tensor | None = None
    ) -> torch.Tensor:
        """key_range: optional (batch, 2) [start, end) of each sequence's valid positions in a
        padded batch (see llama_block)."""
        weights = self._weights_for(x)
        return llama_block(
            x,
            cos,
            sin,
            weights,
            self.n_heads,
            self.n_kv_heads,
            self.eps,
            self.causal,
            self.deterministic,
            self.recompute_attention,
            owner=self,
            key_range=key_range,
        )

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, layer: int = 0) -> torch.Tensor:
        """The block over `seq` new tokens of each sequence, x (batch, seq, dim), with a KV cache
        (a ``llama3_kernels.KVCache``, advanced by `seq` for this step before the first layer):
        their keys and values go into the cache's layer `layer`, and their queries attend every
        token the cache holds for their sequence.  cos/sin: (rows, head_dim/2) tables of every
        position the cache will hold (the cache gives each sequence's position).  One C call;
        inference only."""
        if not self.causal:
            raise ValueError("Llama3Block: decode needs a causal block (causal=True)")
        weights = self._weights_for(x)
        return llama_block_decode(
            x, cos, sin, weights, cache.layer(layer), self.n_heads, self.n_kv_heads, self.eps, owner=self
        )

    def _weights_for(self, x: torch.Tensor) -> list:
        """The fused parameters in PARAM_NAMES order, once x is known to be (batch, seq, dim)."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"Llama3Block: x has shape {tuple(x.shape)}, expected (batch, seq, {self.dim})")
        ps = self._parameters  # not six trips through nn.Module.__getattr__ (~1 us each)
        return [ps[n] for n in PARAM_NAMES]

    def _apply(self, fn, *args, **kwargs):
        _CALLS.pop(self, None)  # .to(), .half(), ...: let go of the old weights now
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden_dim={self.hidden_dim}, n_heads={self.n_heads}, "
            f"n_kv_heads={self.n_kv_heads}, causal={self.causal}, eps={self.eps}"
        )


TritonLlama3Block = Llama3Block  # the tutorial's name

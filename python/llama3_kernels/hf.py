"""Hugging Face Llama models on the library's block.

    model = transformers.AutoModelForCausalLM.from_pretrained(...)
    llama3_kernels.hf.apply_to_llama(model)     # every LlamaDecoderLayer: one C call forward, one backward
    llama3_kernels.hf.revert_llama(model)       # back to transformers' own forward

Each ``LlamaDecoderLayer`` (and each ``LlamaModel``'s final ``LlamaRMSNorm``) gets its class
swapped for a subclass whose ``forward`` calls ``llama_block`` on the layer's own nine
parameters, and a ``LlamaForCausalLM`` computes its loss with the library's cross-entropy (the
logits in their own dtype, no float32 copy).  Nothing is copied or renamed, so ``state_dict``
keys, optimizers, ``save_pretrained``, gradient checkpointing (transformers' own machinery wraps
the subclass like any layer) and ``torch.compile`` of the whole model keep working, and
``revert_llama`` puts the original class (and loss) back.

What the layer is handed is honoured: the model's rotary tables (any rope scaling, any position
ids) and the attention mask, read as one range of valid keys per sequence (left or right padding).
With a KV cache (``generate``; DynamicCache or StaticCache) each layer is one decode step
(``llama_block_decode``): the cache makes room for the new tokens, and the step writes their
rotated keys and values there and attends the cache.  ``GreedyDecoder`` (and ``greedy_generate``)
decodes greedily without transformers' generate loop: the same tokens, one CUDA graph replay a
token.
What the block cannot compute is refused with an error naming it: biases, activations other than
SiLU, a head_dim other than hidden_size / num_attention_heads, attention dropout in training,
``output_attentions``, packed sequences, flex-attention masks,
float32 on CUDA (its attention takes float16/bfloat16; run float32 models under ``torch.autocast``).

Importing ``llama3_kernels`` imports this module but not transformers, which is imported when
first used.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref

import torch
from torch import nn

from . import block as _block
from .cache import CacheSlots
from .ops.cross_entropy import cross_entropy
from .ops.rmsnorm import rms_norm

__all__ = [
    "apply_to_llama",
    "revert_llama",
    "patched",
    "from_pretrained",
    "GreedyDecoder",
    "greedy_generate",
    "UnsupportedLlamaError",
]


class UnsupportedLlamaError(ValueError):
    """The model, its configuration or a call asks for something the fused block does not compute."""


def _llama():
    from transformers.models.llama import modeling_llama

    return modeling_llama


# The library entry point, looked up at call time (a test may stand a reference block in for it).
_llama_block = _block.llama_block
# Padded batches need llama_block's key_range; without it only unpadded batches run.
_TAKES_KEY_RANGE = "key_range" in inspect.signature(_block.llama_block).parameters

# A layer's cache argument, by the names transformers has used for it.
_CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
# Keyword arguments with which flash-attention integrations describe packed sequences.
_PACKED_ARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens_q", "cu_seqlens_k", "max_length_q", "max_length_k")


# ---- configuration and module checks --------------------------------------------------------


def _check_config(cfg) -> None:
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    problems = []
    if getattr(cfg, "attention_bias", False):
        problems.append("attention_bias=True (the block's projections have no bias)")
    if getattr(cfg, "mlp_bias", False):
        problems.append("mlp_bias=True (the block's MLP has no bias)")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg.hidden_act!r} (the block's MLP is SwiGLU: silu)")
    if hidden % heads:
        problems.append(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim is not None and head_dim * heads != hidden:
        problems.append(f"head_dim {head_dim} != hidden_size / num_attention_heads = {hidden / heads:g}")
    head_dim = hidden // heads
    if head_dim % 8 or not 8 <= head_dim <= 256:
        problems.append(f"head_dim {head_dim} (the attention takes a multiple of 8 in [8, 256])")
    if heads % kv_heads:
        problems.append(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if not getattr(cfg, "is_causal", True):
        problems.append("is_causal=False (the block's attention is causal)")
    if problems:
        raise UnsupportedLlamaError(
            "llama3_kernels.hf: this Llama configuration cannot run on the fused block: " + "; ".join(problems)
        )


def _is_plain_linear(mod) -> bool:
    return type(mod).forward is nn.Linear.forward and mod.bias is None


def _projections(layer):
    a, m = layer.self_attn, layer.mlp
    return (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)


def _refuse_foreign_projection(layer, mod) -> None:
    name = next(n for n, m in layer.named_modules() if m is mod)
    why = (
        f"is a {type(mod).__name__} (an adapter or quantized layer?)"
        if type(mod).forward is not nn.Linear.forward
        else "has a bias"
        if mod.bias is not None
        else "has its forward replaced or hooked (accelerate, ZeRO-3?), which the fused block would skip"
    )
    raise UnsupportedLlamaError(
        f"llama3_kernels.hf: {name} {why}; the fused block reads the plain weight of an nn.Linear without bias. "
        "Merge adapters into the weights, or call llama3_kernels.hf.revert_llama(model) first."
    )


def _layer_weights(layer):
    """The layer's own nine parameters in SPLIT_PARAM_NAMES order, after checking that each projection
    is still a plain bias-free nn.Linear whose forward the block may stand in for."""
    mods = _projections(layer)
    for mod in mods:
        if not _is_plain_linear(mod) or mod._forward_hooks or mod._forward_pre_hooks or "forward" in mod.__dict__:
            _refuse_foreign_projection(layer, mod)
    return [mod.weight for mod in mods] + [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]


def _check_layer(layer) -> None:
    _check_config(layer.self_attn.config)
    if "forward" in layer.__dict__:
        raise UnsupportedLlamaError(
            "llama3_kernels.hf: a LlamaDecoderLayer has its forward replaced on the instance (accelerate hooks from a "
            "device_map?), which would bypass the patched class; load the model onto one device without a device_map"
        )
    _layer_weights(layer)
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if not all(isinstance(n, _llama().LlamaRMSNorm) for n in norms):
        raise UnsupportedLlamaError("llama3_kernels.hf: the layer's norms are not LlamaRMSNorm")
    if norms[0].variance_epsilon != norms[1].variance_epsilon:
        raise UnsupportedLlamaError(
            "llama3_kernels.hf: the layer's two RMSNorms have different eps "
            f"({norms[0].variance_epsilon}, {norms[1].variance_epsilon}); the block takes one"
        )


# ---- the attention mask as a range of keys per sequence -----------------------------------------

# The last mask turned into key ranges, with what was learnt checking it (one device sync per
# model call instead of one per layer: every layer is handed the same mask object).
_MASK_MEMO: list = [None]


def _mask_version(mask):
    try:
        return mask._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """True where a key may be attended: boolean masks as they are, float masks where they add 0,
    integer (2-D padding) masks where nonzero."""
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        return mask == 0
    return mask != 0


def _refuse_mask(what: str):
    raise UnsupportedLlamaError(
        f"llama3_kernels.hf: {what}. The fused block's attention is causal over one contiguous range of keys per "
        "sequence (left or right padding); packed sequences and custom masks are not supported."
    )


def _key_range(mask, x: torch.Tensor, cfg, position_ids, kwargs):
    """key_range (batch, 2) int32 on x's device from the mask a decoder layer receives, or None
    when every key is valid.

    transformers hands a layer no mask (nothing padded), a 2-D padding mask (flash-attention
    implementations), or a 4-D mask (batch or 1, heads or 1, queries, keys), boolean or additive
    (SDPA, eager).  Under a causal mask a sequence's last query sees every valid key, so its row
    gives [start, end), and every row is checked against that range: a real query's (start <= i
    < end) must see exactly the keys start..i; a padded query's that pattern, nothing or
    everything (implementations differ there), which a packed sequence's queries do not.  The
    ranges are computed without a host sync so that torch.compile traces them; the check needs one
    and runs only eagerly (once per mask: every layer is handed the same one)."""
    for name in _PACKED_ARGS:
        if kwargs.get(name) is not None:
            _refuse_mask(f"the layer was given {name} (packed sequences)")
    batch, seq = x.shape[0], x.shape[1]
    compiling = torch.compiler.is_compiling()
    if mask is None:
        if (
            not compiling
            and position_ids is not None
            and "flash" in str(getattr(cfg, "_attn_implementation", ""))
            and position_ids.shape[-1] > 1
            and bool((position_ids.diff(dim=-1) != 1).any())
        ):
            # Flash-attention integrations read position ids that restart as packed sequences.
            _refuse_mask("position_ids restart within a sequence under a flash-attention implementation")
        return None
    if not isinstance(mask, torch.Tensor):
        raise UnsupportedLlamaError(
            f"llama3_kernels.hf: a {type(mask).__name__} attention mask (flex attention?) is not supported; load "
            "the model with attn_implementation='sdpa' or 'eager'."
        )
    memo_key = ("keys", batch, seq, x.device)
    if not compiling and _memo_holds(mask, memo_key):
        return _MASK_MEMO[0][3]
    if mask.dim() == 2:
        if mask.shape[-1] != seq:
            _refuse_mask(f"the mask covers {mask.shape[-1]} keys for a sequence of {seq} (a KV cache or a prefix?)")
        rows = mask
    elif mask.dim() == 4:
        if mask.shape[-2] != seq:
            _refuse_mask(f"the 4-D mask has {mask.shape[-2]} query rows for a sequence of {seq}")
        if mask.shape[-1] < seq:
            _refuse_mask(f"the 4-D mask covers {mask.shape[-1]} keys for a sequence of {seq}")
        # Keys past the sequence (transformers 4.4x sizes its mask seq + 1 without a cache) must be
        # masked for every real query: the check below holds them to that.
        rows = mask[:, 0, -1, :seq]
    else:
        _refuse_mask(f"the attention mask has {mask.dim()} dimensions (expected 2 or 4)")
    allowed = _allowed(rows).to(x.device)
    if allowed.shape[0] != batch:
        allowed = allowed.expand(batch, seq)
    start, end, key_range = _span(allowed)
    if compiling:
        return key_range
    bad, padded = _check_ranges(mask, x.device, start, end, seq)
    if bad:
        _refuse_mask("the attention mask is not one contiguous range of keys per sequence")
    result = key_range if padded else None
    _MASK_MEMO[0] = (weakref.ref(mask), _mask_version(mask), memo_key, result)
    return result


def _memo_holds(mask, key) -> bool:
    """Whether _MASK_MEMO holds what was learnt from this very mask (unchanged since) for `key`."""
    memo = _MASK_MEMO[0]
    return memo is not None and memo[0]() is mask and memo[1] == _mask_version(mask) and memo[2] == key


def _span(allowed: torch.Tensor):
    """(start, end, their (batch, 2) int32 stack) of the allowed keys in each row of `allowed`
    (batch, keys): the first allowed key and one past the last, without a host sync."""
    n = allowed.shape[-1]
    idx = torch.arange(n, device=allowed.device, dtype=torch.int32)
    start = torch.where(allowed, idx, n).amin(-1)
    end = torch.where(allowed, idx + 1, 0).amax(-1)
    start = torch.minimum(start, end)  # a sequence with no valid key: an empty range at 0
    return start, end, torch.stack([start, end], dim=-1).to(torch.int32)


def _check_ranges(mask, device, start, end, seq):
    """(the mask differs from the ranges, some range is not [0, seq)), with one sync."""
    j = torch.arange(mask.shape[-1], device=device)
    s, e = start.view(-1, 1), end.view(-1, 1)
    in_range = (j >= s) & (j < e)  # (batch, keys)
    allowed = _allowed(mask).to(device)
    if mask.dim() == 2:
        bad = (allowed != in_range).any()
    else:
        i = j[:seq].view(-1, 1)
        want = in_range[:, None, None, :] & (j <= i)  # (batch, 1, queries, keys)
        real = ((i >= s[:, :, None]) & (i < e[:, :, None]))[:, None]  # (batch, 1, queries, 1)
        row_differs = (allowed != want).any(-1, keepdim=True)
        row_uniform = allowed.all(-1, keepdim=True) | ~allowed.any(-1, keepdim=True)
        bad = (row_differs & (real | ~row_uniform)).any()
    padded = ((start != 0) | (end != seq)).any()
    bad, padded = torch.stack([bad, padded]).tolist()
    return bad, padded


# ---- the patched forwards ----------------------------------------------------------------------


def _refuse_call(layer, cfg, kwargs) -> None:
    if kwargs.get("output_attentions"):
        raise UnsupportedLlamaError(
            "llama3_kernels.hf: output_attentions=True is not supported: the fused block "
            "never forms the attention weights"
        )
    if layer.training and getattr(cfg, "attention_dropout", 0.0) > 0:
        raise UnsupportedLlamaError(
            f"llama3_kernels.hf: attention_dropout={cfg.attention_dropout} in training is not supported; set "
            "model.config.attention_dropout = 0.0 or put the model in eval mode"
        )


def _half_tables(cos: torch.Tensor, sin: torch.Tensor, head_dim: int):
    """transformers' rotary tables are full width, cat(f, f); the block reads the half f,
    per sequence (batch, seq, head_dim/2) or shared (seq, head_dim/2)."""
    half = head_dim // 2
    cos, sin = cos[..., :half], sin[..., :half]
    if cos.dim() == 3 and cos.shape[0] == 1:
        cos, sin = cos[0], sin[0]
    return cos.contiguous(), sin.contiguous()


def _compute_dtype(x: torch.Tensor, weights):
    """The dtype the block runs in: autocast's where it is on for x's device (the block is one
    opaque op, so it casts x and the weights itself), else x's, which the weights must share."""
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    for w in weights:
        if w.dtype != x.dtype:
            raise TypeError(
                f"llama3_kernels.hf: a layer weight is {w.dtype} but the hidden states are {x.dtype}; "
                "the block takes one dtype (cast the model, or run under torch.autocast)"
            )
    return x.dtype


def _decoder_layer_forward(self, hidden_states, *args, **kwargs):
    if args:
        names = type(self)._l3k_positional
        if len(args) > len(names):
            raise TypeError(
                f"llama3_kernels.hf: {len(args) + 1} positional arguments for a decoder layer that "
                f"takes at most {len(names) + 1}"
            )
        kwargs.update(zip(names, args))
    cfg = self.self_attn.config
    _refuse_call(self, cfg, kwargs)
    pe = kwargs.get("position_embeddings")
    if pe is None:
        raise UnsupportedLlamaError(
            "llama3_kernels.hf: the layer was called without position_embeddings; this "
            "transformers version computes RoPE inside the attention, which is not supported"
        )
    x = hidden_states
    if x.dim() != 3:
        raise ValueError(f"llama3_kernels.hf: hidden states of shape {tuple(x.shape)}, expected (batch, seq, hidden)")
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    cos, sin = _half_tables(*pe, cfg.hidden_size // heads)
    weights = _layer_weights(self)
    cache = next((kwargs[n] for n in _CACHE_ARGS if kwargs.get(n) is not None), None)
    dtype = _compute_dtype(x, weights)
    if cache is not None:
        if dtype != x.dtype or any(w.dtype != dtype for w in weights):
            x, weights = x.to(dtype), [w.to(dtype) for w in weights]
        out = _decode_with_cache(self, x, cos, sin, weights, heads, kv_heads, cache, kwargs)
        out = out.to(hidden_states.dtype)
        return (out,) if type(self)._l3k_returns_tuple else out
    key_range = _key_range(kwargs.get("attention_mask"), x, cfg, kwargs.get("position_ids"), kwargs)
    if x.device.type == "cuda" and dtype == torch.float32:
        raise TypeError(
            "llama3_kernels.hf: the CUDA attention takes float16 or bfloat16, and this model runs in "
            "float32: load it with torch_dtype=torch.bfloat16, call model.to(torch.bfloat16), or train "
            "under torch.autocast('cuda', dtype=torch.bfloat16)"
        )
    owner = self
    if dtype != x.dtype or any(w.dtype != dtype for w in weights):
        x, weights, owner = x.to(dtype), [w.to(dtype) for w in weights], None
    extra = {}
    if key_range is not None:
        if _TAKES_KEY_RANGE:
            extra["key_range"] = key_range
        elif not torch.compiler.is_compiling():
            raise NotImplementedError(
                "llama3_kernels.hf: padded batches need llama_block(key_range=...), which this "
                "version of the library lacks"
            )
    out = _llama_block(
        x,
        cos,
        sin,
        weights,
        heads,
        kv_heads,
        eps=self.input_layernorm.variance_epsilon,
        causal=True,
        owner=owner,
        **extra,
    )
    out = out.to(hidden_states.dtype)
    return (out,) if type(self)._l3k_returns_tuple else out


# ---- generation with a KV cache -------------------------------------------------------------------


def _stored_tensors(cache, layer_idx: int):
    """The (keys, values) a cache keeps for a layer, across transformers' cache layouts."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        layer = layers[layer_idx]
        return getattr(layer, "keys", None), getattr(layer, "values", None)
    return cache.key_cache[layer_idx], cache.value_cache[layer_idx]


def _refuse_cache(cache, why: str):
    raise UnsupportedLlamaError(
        f"llama3_kernels.hf: a {type(cache).__name__} {why}; the fused decode step writes each new token's key and "
        "value into the cache's own (batch, kv_heads, length, head_dim) tensors, as DynamicCache and StaticCache "
        "hold them. Use one of those, or revert_llama(model) for this cache."
    )


def _cache_range(mask, x: torch.Tensor, cache, layer_idx: int, slots: int):
    """cache_range (batch, 2) int32 on x's device: [start, end) of each sequence's slots once this
    call's tokens are in, from the mask's last query row (its keys are start .. end - 1), or
    [0, the cache's length) without a mask.  The mask's other rows are checked against the
    causal pattern of those ranges (eagerly, once per mask, one sync)."""
    batch, seq = x.shape[0], x.shape[1]
    if mask is None:
        end = torch.as_tensor(cache.get_seq_length(layer_idx), device=x.device).reshape(-1)[:1]
        return torch.stack([torch.zeros_like(end), end], dim=-1).expand(batch, 2).to(torch.int32).contiguous()
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        _refuse_mask(f"a KV-cache call was given a {getattr(mask, 'dim', lambda: type(mask).__name__)()}-D mask")
    if mask.shape[-1] != slots or mask.shape[-2] != seq:
        _refuse_mask(f"the mask is {tuple(mask.shape)} for {seq} queries over a cache of {slots} slots")
    compiling = torch.compiler.is_compiling()
    memo_key = ("cache", batch, seq, x.device)
    if not compiling and _memo_holds(mask, memo_key):
        return _MASK_MEMO[0][3]
    allowed = _allowed(mask[:, 0]).to(x.device)
    if allowed.shape[0] != batch:
        allowed = allowed.expand(batch, seq, slots)
    start, end, cache_range = _span(allowed[:, -1])
    if compiling:
        return cache_range
    # Query i of a sequence sits at slot end - seq + i and sees start .. its own slot.
    i = torch.arange(seq, device=x.device).view(1, -1, 1)
    j = torch.arange(slots, device=x.device).view(1, 1, -1)
    own = end.view(-1, 1, 1) - seq + i
    want = (j >= start.view(-1, 1, 1)) & (j <= own)
    real = own >= start.view(-1, 1, 1)  # padding queries: implementations differ, not held to it
    if bool(((allowed != want) & real).any()):
        _refuse_mask("the attention mask of a KV-cache call is not one causal range of slots per sequence")
    _MASK_MEMO[0] = (weakref.ref(mask), _mask_version(mask), memo_key, cache_range)
    return cache_range


def _decode_with_cache(layer, x, cos, sin, weights, heads: int, kv_heads: int, cache, kwargs):
    """The layer over this call's tokens with a KV cache, as one decode step: the cache makes room
    for the tokens (its own update, with placeholders), then the step writes their rotated keys and
    values into those slots and attends the cache."""
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        raise UnsupportedLlamaError(
            "llama3_kernels.hf: a KV cache in a forward that needs gradients: the decode step is inference only. "
            "Call the model with use_cache=False to train, or under torch.no_grad() to generate."
        )
    batch, seq = x.shape[0], x.shape[1]
    head_dim = x.shape[-1] // heads
    layer_idx = layer.self_attn.layer_idx
    k_new = x.new_empty(batch, kv_heads, seq, head_dim)
    keys, values = cache.update(k_new, torch.empty_like(k_new), layer_idx, kwargs=kwargs)
    stored = _stored_tensors(cache, layer_idx)
    if stored[0] is not keys or stored[1] is not values:
        _refuse_cache(cache, "does not return the tensors it keeps (a quantized, offloaded or sliding-window cache?)")
    if keys.dim() != 4 or keys.shape[1] != kv_heads or keys.shape[-1] != head_dim:
        _refuse_cache(cache, f"holds keys of shape {tuple(keys.shape)}")
    cache_range = _cache_range(kwargs.get("attention_mask"), x, cache, layer_idx, keys.shape[2])
    x = x if x.is_contiguous() else x.contiguous()
    slots = CacheSlots(keys, values, cache_range)  # no positions: the model's tables hold this call's tokens
    eps = layer.input_layernorm.variance_epsilon
    return _block.llama_block_decode(x, cos, sin, weights, slots, heads, kv_heads, eps, owner=layer)


def _rms_norm_forward(self, hidden_states):
    w = self.weight
    out = rms_norm(hidden_states, w, self.variance_epsilon)
    # transformers' norm returns weight * normalized: the wider of the two dtypes.
    return out.to(torch.promote_types(w.dtype, hidden_states.dtype))


def _drop_block_state(self, fn, *args, **kwargs):
    _block._CALLS.pop(self, None)  # .to(), .half(), ...: let go of the old weights now
    return type(self)._l3k_base._apply(self, fn, *args, **kwargs)


def _returns_tuple(forward) -> bool:
    """Whether transformers' layer forward returns a tuple (up to 4.53) or the hidden states (later)."""
    ann = inspect.signature(forward).return_annotation
    if ann is inspect.Signature.empty:
        from transformers import __version__

        major, minor = (int(p) for p in __version__.split(".")[:2])
        return (major, minor) < (4, 54)
    return "tuple" in (ann if isinstance(ann, str) else repr(ann)).lower()


def _positional_names(forward):
    """The parameters a caller may pass positionally after hidden_states (older transformers
    versions checkpoint layers with every argument positional)."""
    params = list(inspect.signature(forward).parameters.values())[2:]  # self, hidden_states
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in params if p.kind in kinds)


# One subclass per patched class.  A subclass (not an instance attribute) so that transformers'
# gradient-checkpointing wrapper, which wraps each subclass's forward, wraps this forward too; it
# keeps the class name so that name-based wrapping policies (_no_split_modules, FSDP) still match.
_PATCHED: dict = {}


def _patched_class(base, kind: str):
    cls = _PATCHED.get(base)
    if cls is None:
        ns = {"__module__": __name__, "_l3k_base": base, "_l3k_kind": kind, "_apply": _drop_block_state}
        if kind == "layer":
            ns.update(
                forward=_decoder_layer_forward,
                _l3k_positional=_positional_names(base.forward),
                _l3k_returns_tuple=_returns_tuple(base.forward),
            )
        else:
            ns["forward"] = _rms_norm_forward
        cls = type(base.__name__, (base,), ns)
        cls.__qualname__ = f"patched_classes.{base.__name__}"
        _PATCHED[base] = cls
    return cls


class _PatchedClasses:
    """Where pickle finds the patched classes by name (transformers' own Llama classes only)."""

    def __getattr__(self, name):
        kinds = {"LlamaDecoderLayer": "layer", "LlamaRMSNorm": "norm"}
        if name not in kinds:
            raise AttributeError(name)
        return _patched_class(getattr(_llama(), name), kinds[name])


patched_classes = _PatchedClasses()


def _is_patched(mod) -> bool:
    return "_l3k_base" in type(mod).__dict__


# ---- the model-level hook: no cache unless asked, no attention weights ---------------------------


def _model_pre_hook(module, args, kwargs):
    if kwargs.get("output_attentions") or (
        kwargs.get("output_attentions") is None and getattr(module.config, "output_attentions", False)
    ):
        raise UnsupportedLlamaError(
            "llama3_kernels.hf: output_attentions=True is not supported: the fused block "
            "never forms the attention weights"
        )
    # use_cache defaults to the config's (True for most checkpoints): a plain forward (training
    # among them) would build a cache and decode with it.  Left unset, it runs without one; asked
    # for (generate does), the layers run the decode step on it.
    if kwargs.get("use_cache") is None and len(args) <= _USE_CACHE_INDEX.get(type(module), 0):
        kwargs["use_cache"] = False
    return args, kwargs


# Where use_cache sits among a model class's positional parameters (after self).
_USE_CACHE_INDEX: dict = {}


def _use_cache_index(cls) -> int:
    names = list(inspect.signature(cls.forward).parameters)[1:]
    return names.index("use_cache") if "use_cache" in names else len(names)


def _hook_ids(module):
    return [k for k, fn in module._forward_pre_hooks.items() if fn is _model_pre_hook]


# ---- the causal-LM loss ---------------------------------------------------------------------------


def causal_lm_loss(
    logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100, shift_labels=None, **kwargs
):
    """transformers' ``ForCausalLMLoss`` (labels shifted by one, the mean over counted tokens or the
    sum over ``num_items_in_batch``) on the library's cross-entropy: the logits are read in their
    own dtype, where transformers first copies them to float32."""
    if shift_labels is None:
        labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    return cross_entropy(
        logits.reshape(-1, vocab_size),
        shift_labels.reshape(-1),
        ignore_index=ignore_index,
        num_items=num_items_in_batch,
    )


def _uses_default_loss(model) -> bool:
    """A causal LM whose loss is transformers' default (not one its owner set or configured)."""
    if "_loss_function" in vars(model):
        return False
    from transformers.loss.loss_utils import ForCausalLMLoss

    return getattr(model, "loss_function", None) is ForCausalLMLoss


# ---- public entry points ----------------------------------------------------------------------------


def _targets(model):
    """The Llama decoder layers of `model` whose forward is transformers' own (not a subclass that
    computes something else; wrappers such as FSDP's subclasses and checkpointing pass), and the
    LlamaModels holding them."""
    llama = _llama()
    layer_fwd = inspect.unwrap(llama.LlamaDecoderLayer.forward)
    layers, models = [], []
    for mod in model.modules():
        base = type(mod)._l3k_base if _is_patched(mod) else type(mod)
        if isinstance(mod, llama.LlamaDecoderLayer) and inspect.unwrap(base.forward) is layer_fwd:
            layers.append(mod)
        elif isinstance(mod, llama.LlamaModel):
            models.append(mod)
    return layers, models


def _patch(model, final_norm: bool = True, loss: bool = True):
    """Patch `model`; returns the modules this call changed (for `patched` to undo)."""
    layers, models = _targets(model)
    if not layers:
        raise UnsupportedLlamaError(f"llama3_kernels.hf: {type(model).__name__} has no LlamaDecoderLayer to patch")
    todo = [m for m in layers if not _is_patched(m)]
    for layer in todo:
        _check_layer(layer)
    changed = []
    for layer in todo:
        layer.__class__ = _patched_class(type(layer), "layer")
        changed.append(layer)
    llama = _llama()
    for m in models:
        if not _hook_ids(m):
            _USE_CACHE_INDEX.setdefault(type(m), _use_cache_index(type(m)))
            m.register_forward_pre_hook(_model_pre_hook, with_kwargs=True)
            changed.append(m)
        norm = getattr(m, "norm", None)
        if final_norm and type(norm) is llama.LlamaRMSNorm:
            norm.__class__ = _patched_class(type(norm), "norm")
            changed.append(norm)
    for m in model.modules():
        if loss and isinstance(m, llama.LlamaForCausalLM) and _uses_default_loss(m):
            m._loss_function = causal_lm_loss  # PreTrainedModel.loss_function returns it first
            changed.append(m)
    return changed


def _revert(modules) -> None:
    for mod in modules:
        if vars(mod).get("_loss_function") is causal_lm_loss:
            del mod._loss_function
        if _is_patched(mod):
            _block._CALLS.pop(mod, None)
            mod.__class__ = type(mod)._l3k_base
        elif any(_is_patched_cls(c) for c in type(mod).__mro__[1:]):
            raise RuntimeError(
                f"llama3_kernels.hf: cannot revert {type(mod).__name__}: it was wrapped in another "
                "class after it was patched"
            )
        for k in _hook_ids(mod):
            del mod._forward_pre_hooks[k]
            mod._forward_pre_hooks_with_kwargs.pop(k, None)


def _is_patched_cls(cls) -> bool:
    return "_l3k_base" in cls.__dict__


def apply_to_llama(model, *, final_norm: bool = True, loss: bool = True):
    """Run every ``LlamaDecoderLayer`` of `model` (a ``LlamaForCausalLM``, ``LlamaModel``, or any module
    holding them) on the fused block, each ``LlamaModel``'s final norm on the library's RMSNorm
    (unless ``final_norm=False``) and each ``LlamaForCausalLM``'s default loss on the library's
    cross-entropy (unless ``loss=False``).  In place, on the model's own parameters; returns `model`.

    Raises ``UnsupportedLlamaError`` for a configuration the block cannot compute (biases, an
    activation other than SiLU, head_dim != hidden_size / num_attention_heads, ...) or for projections
    that are not plain ``nn.Linear`` (adapters, quantized layers).  Calls are refused for what the
    block does not do: ``output_attentions``, attention dropout in training, masks that are not one
    range of keys per sequence, caches other than DynamicCache / StaticCache.  Forward passes run
    without a cache unless one is asked for; ``generate`` asks for one and decodes on the library.
    """
    _patch(model, final_norm, loss)
    return model


def revert_llama(model):
    """Undo ``apply_to_llama``: every patched module gets transformers' class (and forward) back."""
    _revert(list(model.modules()))
    return model


@contextlib.contextmanager
def patched(model, *, final_norm: bool = True, loss: bool = True):
    """``with patched(model): ...`` runs `model` on the block inside the block only; what was
    patched before entering stays patched."""
    changed = _patch(model, final_norm, loss)
    try:
        yield model
    finally:
        _revert(changed)


def from_pretrained(
    pretrained_model_name_or_path, *args, model_class=None, final_norm: bool = True, loss: bool = True, **kwargs
):
    """``model_class.from_pretrained(...)`` (``AutoModelForCausalLM`` by default), patched."""
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    model = model_class.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
    return apply_to_llama(model, final_norm=final_norm, loss=loss)


# ---- greedy decoding without transformers' generate loop ---------------------------------------

_WHO = "llama3_kernels.hf.GreedyDecoder"
_DEFAULT = object()


def _token_ids(value, what: str) -> list[int]:
    if value is None:
        return []
    ids = [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    if any(v < 0 for v in ids):
        raise ValueError(f"{_WHO}: {what} {ids} holds a negative id")
    return ids


def _left_padding(ids: torch.Tensor, mask) -> torch.Tensor:
    """Each prompt's count of left padding tokens, from a mask of zeros then ones per row."""
    batch, prompt = ids.shape
    if mask is None:
        return torch.zeros(batch, dtype=torch.int32, device=ids.device)
    if tuple(mask.shape) != (batch, prompt):
        raise ValueError(f"{_WHO}: attention_mask has shape {tuple(mask.shape)}, expected input_ids' {(batch, prompt)}")
    pad = (mask == 0).sum(1)
    left = torch.arange(prompt, device=mask.device)[None] >= pad[:, None]
    if not torch.equal(left, mask != 0) or bool((pad >= prompt).any()):
        raise ValueError(
            f"{_WHO}: attention_mask must be left padding (zeros, then ones, and at least one token a row); "
            "pad the prompts on the left, as for generate()"
        )
    return pad.to(torch.int32)


class GreedyDecoder:
    """Greedy decoding of a ``LlamaForCausalLM`` on the library, without transformers' generate
    loop, for `batch` sequences of up to `capacity` tokens (prompt and new ones); reusable.

        decoder = llama3_kernels.hf.GreedyDecoder(model, batch=8, capacity=1024)
        tokens = decoder.generate(input_ids, attention_mask, max_new_tokens=64)

    ``generate`` returns what ``model.generate(input_ids, attention_mask=..., do_sample=False,
    max_new_tokens=...)`` does, (batch, prompt + new) int64: the prompt (left padding given by
    `attention_mask`, zeros then ones) goes through every layer's decode step
    (``llama_block_decode``, one C call a layer) into the decoder's ``KVCache``; then each new
    token is one step: embedding, the layers, the final norm of the last position, ``lm_head``,
    argmax.  On CUDA with ``cuda_graph`` that step is captured once as a CUDA graph (at the second
    step the decoder runs; the first runs uncaptured, so that the library's set-up happens outside
    the capture) and replayed for every later token of every later call: the step's device work,
    with no per-token host work or synchronization (finished sequences are looked at every 8
    tokens).  The model's own parameters are read, patched by ``apply_to_llama`` or not; nothing is
    copied but the RoPE tables of the cache's positions.  A graph reads the parameters' storage:
    where a parameter's storage has changed since (new weights loaded), the next call captures
    again.

    ``eos_token_id`` / ``pad_token_id``: the model's ``generation_config`` values by default, as
    generate() takes them; after a sequence's EOS its tokens are the pad id, and decoding stops
    once every sequence has finished (the output is then shorter, as generate()'s).  Raises
    ``UnsupportedLlamaError`` for a model the block cannot run (as ``apply_to_llama`` does, and for
    RoPE types that rescale their tables as the sequence grows) and ``ValueError`` for bad
    arguments (a mask that is not left padding, a batch other than the decoder's, more tokens
    than its capacity, max_new_tokens < 1)."""

    def __init__(
        self,
        model,
        batch: int,
        capacity: int,
        *,
        eos_token_id=_DEFAULT,
        pad_token_id=_DEFAULT,
        cuda_graph: bool = True,
    ):
        from .cache import KVCache

        inner = getattr(model, "model", None)
        needed = ("layers", "embed_tokens", "norm", "rotary_emb")
        if inner is None or not hasattr(model, "lm_head") or any(not hasattr(inner, n) for n in needed):
            raise UnsupportedLlamaError(
                f"{_WHO}: {type(model).__name__} is not a LlamaForCausalLM "
                "(it wants model.model.layers, embed_tokens, norm, rotary_emb and model.lm_head)"
            )
        if not _is_plain_linear(model.lm_head):
            _refuse_foreign_projection(model, model.lm_head)
        cfg = model.config
        _check_config(cfg)
        rope_type = str(getattr(inner.rotary_emb, "rope_type", "default"))
        if "dynamic" in rope_type or rope_type == "longrope":
            # The tables are computed once for every slot; these scale them by the longest sequence.
            raise UnsupportedLlamaError(
                f"{_WHO}: rope type {rope_type!r} rescales its tables as the sequence grows; use "
                "model.generate() on the patched model"
            )
        if int(batch) < 1 or int(capacity) < 2:
            raise ValueError(f"{_WHO}: batch {batch} and capacity {capacity}: want batch >= 1 and capacity >= 2")
        self.model, self.layers = model, list(inner.layers)
        for layer in self.layers:
            _check_layer(layer)
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        head_dim = cfg.hidden_size // self.heads
        self.eps = [layer.input_layernorm.variance_epsilon for layer in self.layers]
        self.weights, self.param_ptrs = None, None  # read at each call (_refresh)
        weight = inner.embed_tokens.weight
        dev, dtype = weight.device, weight.dtype
        self.batch, self.capacity = int(batch), int(capacity)
        probe = torch.zeros(1, 1, cfg.hidden_size, device=dev, dtype=dtype)
        with torch.no_grad():
            cos, sin = inner.rotary_emb(probe, torch.arange(self.capacity, device=dev)[None])
        self.cos, self.sin = _half_tables(cos, sin, head_dim)
        self.cache = KVCache(
            len(self.layers), self.batch, self.kv_heads, head_dim, self.capacity, dtype=dtype, device=dev
        )

        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if eos_token_id is _DEFAULT else eos_token_id
        self.eos = _token_ids(eos, "eos_token_id")
        pad = getattr(gen, "pad_token_id", None) if pad_token_id is _DEFAULT else pad_token_id
        if pad is None and self.eos:
            pad = self.eos[0]  # as generate() does when the model names no pad token
        self.pad = pad
        # The step's fixed buffers: its input token, the finished flags, the EOS ids.
        self.step_in = torch.zeros(self.batch, 1, dtype=torch.long, device=dev)
        self.done = torch.zeros(self.batch, dtype=torch.bool, device=dev)
        self.eos_ids = torch.tensor(self.eos, dtype=torch.long, device=dev)
        self.use_graph = bool(cuda_graph) and dev.type == "cuda"
        self.graph, self.warm = None, False

    def _logits_after(self, ids: torch.Tensor) -> torch.Tensor:
        """The cache advanced by ids' tokens (batch, seq), every layer's decode step over them, and
        the logits of each sequence's last one (batch, vocab)."""
        inner = self.model.model
        self.cache.advance(ids.shape[1])
        x = inner.embed_tokens(ids)
        for i, layer in enumerate(self.layers):
            x = _block.llama_block_decode(
                x, self.cos, self.sin, self.weights[i], self.cache.layer(i), self.heads, self.kv_heads,
                self.eps[i], owner=layer,
            )  # fmt: skip
        h = rms_norm(x[:, -1], inner.norm.weight, inner.norm.variance_epsilon)
        return self.model.lm_head(h)

    def _choose(self, logits: torch.Tensor) -> None:
        """The argmax into step_in; a finished sequence gets the pad id, and one that meets an EOS
        finishes."""
        nxt = logits.argmax(-1)
        if self.eos:
            nxt = torch.where(self.done, torch.full_like(nxt, self.pad), nxt)
            self.done.logical_or_(torch.isin(nxt, self.eos_ids))
        self.step_in.copy_(nxt[:, None])

    def _refresh(self) -> None:
        """The layers' weights as they are now; where a parameter's storage changed (new weights
        loaded), the graph, which read the old, is dropped."""
        ptrs = tuple(p.data_ptr() for p in self.model.parameters())  # lm_head's and the embedding's too
        if ptrs != self.param_ptrs:
            self.weights = [tuple(_layer_weights(layer)) for layer in self.layers]
            self.param_ptrs, self.graph, self.warm = ptrs, None, False

    def _step(self) -> None:
        """One new token per sequence into step_in: replayed, run, or captured then replayed."""
        if self.graph is not None:
            self.cache.length += 1  # the host's count, which the graph does not keep
            with torch.cuda.device(self.step_in.device):
                self.graph.replay()
            return
        if not self.use_graph or not self.warm:
            self._choose(self._logits_after(self.step_in))
            self.warm = True
            return
        length, dev = self.cache.length, self.step_in.device
        with torch.cuda.device(dev):  # the model's device, whichever is current
            graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream(device=dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.graph(graph, stream=side):
                self._choose(self._logits_after(self.step_in))  # recorded, not run
            torch.cuda.current_stream(dev).wait_stream(side)
        self.graph, self.cache.length = graph, length
        self._step()

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask=None, max_new_tokens: int = 32) -> torch.Tensor:
        """Greedy tokens after each prompt, (batch, prompt + max_new_tokens) int64 (fewer where every
        sequence finished sooner), as model.generate() gives them; see the class."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"{_WHO}: input_ids must be a (batch, prompt) integer tensor, got {input_ids.dtype} of shape "
                f"{tuple(input_ids.shape)}"
            )
        batch, prompt = input_ids.shape
        new = int(max_new_tokens)
        if batch != self.batch:
            raise ValueError(f"{_WHO}: input_ids hold {batch} sequences; this decoder was made for {self.batch}")
        if new < 1:
            raise ValueError(f"{_WHO}: max_new_tokens must be at least 1, got {max_new_tokens}")
        if prompt + new - 1 > self.capacity:  # the last token is chosen, never stored
            raise ValueError(
                f"{_WHO}: a prompt of {prompt} and {new} new tokens need {prompt + new - 1} slots; the capacity is "
                f"{self.capacity}"
            )
        ids = input_ids.to(device=self.step_in.device, dtype=torch.long)
        padding = _left_padding(ids, attention_mask)
        self._refresh()
        self.cache.reset(padding)
        self.done.zero_()
        self._choose(self._logits_after(ids))  # the prompt, uncaptured (its length varies)
        out = [ids, self.step_in.clone()]
        for n in range(1, new):
            if self.eos and n % 8 == 0 and bool(self.done.all()):
                break
            self._step()
            out.append(self.step_in.clone())
        tokens = torch.cat(out, dim=1)
        if self.eos and bool(self.done.all()):  # generate() stops after the token that finished the last
            ended = torch.isin(tokens[:, prompt:], self.eos_ids)
            first = torch.where(ended.any(1), ended.int().argmax(1), ended.shape[1])
            tokens = tokens[:, : prompt + int(first.max()) + 1]
        return tokens


def greedy_generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    *,
    eos_token_id=_DEFAULT,
    pad_token_id=_DEFAULT,
    cuda_graph: bool = True,
) -> torch.Tensor:
    """``GreedyDecoder(model, batch, prompt + max_new_tokens).generate(...)`` in one call: the tokens
    of ``model.generate(input_ids, attention_mask=..., do_sample=False, max_new_tokens=...)`` from
    the library's own loop (see GreedyDecoder).  A decoder kept between calls keeps its cache and
    its CUDA graph; this captures a new graph each call."""
    if input_ids.dim() != 2:
        raise ValueError(f"{_WHO}: input_ids must be (batch, prompt), got shape {tuple(input_ids.shape)}")
    batch, prompt = input_ids.shape
    decoder = GreedyDecoder(
        model,
        batch,
        max(prompt + int(max_new_tokens), 2),
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        cuda_graph=cuda_graph,
    )
    return decoder.generate(input_ids, attention_mask, max_new_tokens)

"""Export a Hugging Face ``LlamaForCausalLM`` for the C example ``examples/generate.c``.

    python -m llama3_kernels.examples.export_c MODEL_DIR model.bin --max-positions 2048
    cc -O2 examples/generate.c -I capi -L <libdir> -ll3k -Wl,-rpath,<libdir> -o l3k_generate
    ./l3k_generate model.bin 128000,791,6864 16

``write_model(model, path, max_positions)`` writes the model's weights as float32 in the file format
documented once, in the top comment of ``examples/generate.c``: a header, the rotate-half RoPE tables
of positions 0 .. max_positions - 1 (from the model's own rotary embedding, so any rope scaling is
in them), the embedding, each layer's weights in the fused layout of ``l3k_llama_block_weights``
(``block.PARAM_NAMES``), the final norm and the LM head.
"""

from __future__ import annotations

import argparse
import struct

import torch

from .. import hf
from ..block import PARAM_NAMES, Llama3Block

__all__ = ["write_model"]

MAGIC, VERSION = b"L3KM", 1


def _rope_tables(model, max_positions: int):
    """cos, sin (max_positions, head_dim/2) float32: what the model's rotary embedding hands a layer
    for positions 0 .. max_positions - 1, halved as llama3_kernels.hf does for the block."""
    cfg = model.config
    rope_type = getattr(model.model.rotary_emb, "rope_type", "default")
    if "dynamic" in rope_type:  # tables that depend on the sequence's length: no one table to store
        raise hf.UnsupportedLlamaError(f"export_c: rope_type {rope_type!r} has no fixed RoPE tables to write")
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    device = model.model.embed_tokens.weight.device
    positions = torch.arange(max_positions, device=device).unsqueeze(0)
    probe = torch.zeros((), dtype=torch.float32, device=device)  # only its dtype and device are read
    cos, sin = model.model.rotary_emb(probe, positions)
    return hf._half_tables(cos, sin, head_dim)


def _fused_layer(layer, cfg) -> list[torch.Tensor]:
    """A LlamaDecoderLayer's weights in PARAM_NAMES order, q/k/v and gate/up fused by Llama3Block's own
    loading of a Hugging Face layer's state dict (on the meta device: nothing is initialised or copied
    but the fusion)."""
    heads = cfg.num_attention_heads
    block = Llama3Block(
        cfg.hidden_size,
        cfg.intermediate_size,
        heads,
        getattr(cfg, "num_key_value_heads", None) or heads,
        eps=layer.input_layernorm.variance_epsilon,
        device="meta",
    )
    block.load_state_dict(layer.state_dict(), assign=True)
    return [getattr(block, name) for name in PARAM_NAMES]


def _write(f, t: torch.Tensor) -> None:
    f.write(t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes())


@torch.no_grad()
def write_model(model, path, max_positions: int) -> None:
    """Write `model` (a transformers ``LlamaForCausalLM``, any dtype and device) to `path` as float32
    for ``examples/generate.c`` (format: that file's top comment), with RoPE tables for positions
    0 .. max_positions - 1 (a generation may hold that many tokens).  Raises
    ``llama3_kernels.hf.UnsupportedLlamaError`` for a model the block cannot run."""
    cfg = model.config
    if max_positions < 1:
        raise ValueError(f"export_c: max_positions {max_positions}, expected >= 1")
    layers = model.model.layers
    for layer in layers:  # before the file is opened: refuses what the block cannot compute (biases, ...)
        hf._check_layer(layer)
    norm_eps = model.model.norm.variance_epsilon
    eps = {norm_eps} | {layer.input_layernorm.variance_epsilon for layer in layers}
    if len(eps) != 1:
        raise hf.UnsupportedLlamaError(
            f"export_c: the model's RMSNorms have different eps {sorted(eps)}; the file holds one"
        )
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    embedding = model.model.embed_tokens.weight
    header = struct.pack(
        "<4s8if",
        MAGIC,
        VERSION,
        embedding.shape[0],
        cfg.hidden_size,
        cfg.intermediate_size,
        len(layers),
        heads,
        kv_heads,
        max_positions,
        norm_eps,
    )
    cos, sin = _rope_tables(model, max_positions)
    with open(path, "wb") as f:
        f.write(header)
        for t in (cos, sin, embedding):
            _write(f, t)
        for layer in layers:
            for t in _fused_layer(layer, cfg):
                _write(f, t)
        _write(f, model.model.norm.weight)
        _write(f, model.lm_head.weight)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m llama3_kernels.examples.export_c",
        description="Export a Hugging Face Llama checkpoint (float32 copy) for examples/generate.c.",
    )
    parser.add_argument("model", help="a model name or directory for transformers' from_pretrained")
    parser.add_argument("out", help="the model file to write")
    parser.add_argument(
        "--max-positions", type=int, default=2048, help="RoPE table rows: at least prompt + new tokens - 1"
    )
    args = parser.parse_args(argv)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    write_model(model, args.out, args.max_positions)


if __name__ == "__main__":
    main()

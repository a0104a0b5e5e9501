"""Random-init Hugging Face Llama models for the tests (transformers is imported when a model is
made): small configurations (GQA, MHA, MQA, odd sizes, llama3 rope scaling) and the model with its
norm weights drawn away from one, so that their gradients and values matter."""

import torch

LLAMA3_ROPE = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
)

_CONFIG_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_hidden_layers",
    "vocab_size",
    "rope_scaling",
)
CONFIGS = {
    name: dict(zip(_CONFIG_FIELDS, values))
    for name, values in {  # hidden, intermediate, heads, kv heads, layers, vocab, rope scaling
        "gqa-llama3rope": (64, 160, 4, 2, 2, 101, LLAMA3_ROPE),
        "mha-odd": (96, 200, 3, 3, 2, 77, None),
        "mqa-odd": (80, 136, 5, 1, 3, 53, LLAMA3_ROPE),
    }.items()
}


def make_config(name="gqa-llama3rope", **over):
    kw = dict(
        CONFIGS[name], max_position_embeddings=64, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False
    )
    kw.update(over)
    from transformers import LlamaConfig

    return LlamaConfig(**kw)


def make_model(cfg, device="cpu", dtype=torch.float32, seed=0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # norms away from one, so that their gradients and weights matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    return model.to(device=device, dtype=dtype)


def cache_kw() -> str:
    """The name under which this transformers' LlamaForCausalLM.forward takes a cache ("cache" in
    later versions, "past_key_values" before)."""
    import inspect

    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"

"""llama3_kernels.hf.GreedyDecoder and greedy_generate: greedy decoding of a Hugging Face
LlamaForCausalLM on the library's decode step with its own loop (one CUDA graph a token on CUDA),
held to the token ids of transformers' generate() on the unpatched model, EOS and padding included."""

import pytest
import torch

pytest.importorskip("transformers")

import llama3_kernels as l3k  # noqa: E402
from hf_models import CONFIGS, make_config, make_model  # noqa: E402

greedy_generate = l3k.hf.greedy_generate


def _model(name, device="cpu", dtype=torch.float32):
    # Weights drawn with std 0.2 and no EOS in the config, as in test_c_generate: the tokens depend
    # on every layer, and generate() runs to max_new_tokens unless told an EOS.
    cfg = make_config(name, eos_token_id=None, initializer_range=0.2, max_position_embeddings=256)
    return make_model(cfg, device, dtype).eval()


def _prompts(model, batch, device="cpu", length=9):
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=g).to(device)
    mask = torch.ones_like(ids)
    for row, pad in zip(range(1, batch), (3, 1, length - 1)):  # left padding of different lengths
        mask[row, :pad] = 0
    return ids, mask


def _hf_generate(model, ids, mask, new, **kw):
    return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new, pad_token_id=0, **kw)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_tokens_equal_hf_generate(name, batch):
    model = _model(name)
    ids, mask = _prompts(model, batch)
    want = _hf_generate(model, ids, mask, 40)
    got = greedy_generate(model, ids, mask, 40)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    with l3k.hf.patched(model):  # a patched model: the same parameters, the same tokens
        assert torch.equal(greedy_generate(model, ids, mask, 40), want)


def test_eos_pads_finished_sequences_and_stops_like_generate():
    model = _model("gqa-llama3rope")
    ids, mask = _prompts(model, 2)
    free = _hf_generate(model, ids, mask, 30)
    # Row 0's 6th new token as EOS: row 0 finishes there, row 1 (unless it meets it) runs on padded.
    eos = int(free[0, ids.shape[1] + 5])
    want = _hf_generate(model, ids, mask, 30, eos_token_id=eos)
    got = greedy_generate(model, ids, mask, 30, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want)
    # Every row finishing: generate() stops early, and so does greedy_generate, at the same length.
    one = _hf_generate(model, ids[:1], mask[:1], 30, eos_token_id=eos)
    assert one.shape[1] < ids.shape[1] + 30
    assert torch.equal(greedy_generate(model, ids[:1], mask[:1], 30, eos_token_id=eos, pad_token_id=0), one)
    # The defaults are the model's generation_config, as for generate().
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, 0
    assert torch.equal(greedy_generate(model, ids[:1], mask[:1], 30), one)


def test_a_decoder_serves_call_after_call():
    """One GreedyDecoder, its cache and (on CUDA) its graph kept: prompts of other lengths and
    paddings, fewer new tokens, and new weights loaded in between."""
    model = _model("mqa-odd")
    decoder = l3k.hf.GreedyDecoder(model, batch=3, capacity=40)
    for length, new in ((9, 24), (5, 30), (12, 3)):
        ids, mask = _prompts(model, 3, length=length)
        assert torch.equal(decoder.generate(ids, mask, new), _hf_generate(model, ids, mask, new))
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # in place: the same storage
        model.model.layers[0].mlp.down_proj.weight = torch.nn.Parameter(model.model.layers[0].mlp.down_proj.weight * 2)
    ids, mask = _prompts(model, 3)  # the same decoder: one parameter was replaced, one changed in place
    assert torch.equal(decoder.generate(ids, mask, 20), _hf_generate(model, ids, mask, 20))
    with pytest.raises(ValueError, match="made for 3"):
        decoder.generate(ids[:2], mask[:2], 4)
    with pytest.raises(ValueError, match="capacity is 40"):
        decoder.generate(ids, mask, 33)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_decoder_recaptures_after_new_weights():
    model = _model("gqa-llama3rope", "cuda", torch.bfloat16)
    decoder = l3k.hf.GreedyDecoder(model, batch=2, capacity=64)
    ids, mask = _prompts(model, 2, "cuda")
    first = decoder.generate(ids, mask, 32)
    assert decoder.graph is not None
    assert torch.equal(decoder.generate(ids, mask, 32), first)  # replayed from the first token on
    head = model.lm_head
    head.weight = torch.nn.Parameter(head.weight.flip(0))  # new storage: the graph would read the old
    want = l3k.hf.GreedyDecoder(model, batch=2, capacity=64, cuda_graph=False).generate(ids, mask, 32)
    assert torch.equal(decoder.generate(ids, mask, 32), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 4])
def test_cuda_graph_replay_gives_the_uncaptured_tokens(batch):
    """bf16 on CUDA: the step replayed from one CUDA graph a token against the same step run
    token by token, and against generate() on the patched model (the same kernels)."""
    model = _model("gqa-llama3rope", "cuda", torch.bfloat16)
    ids, mask = _prompts(model, batch, "cuda")
    eager = greedy_generate(model, ids, mask, 48, cuda_graph=False)
    assert torch.equal(greedy_generate(model, ids, mask, 48), eager)
    with l3k.hf.patched(model):
        via_hf = _hf_generate(model, ids, mask, 48)
    assert (via_hf == eager).float().mean().item() > 0.95, "bf16 ties may differ; most tokens must not"


def test_refusals():
    model = _model("mha-odd")
    ids, mask = _prompts(model, 2)
    right = mask.flip(1)
    with pytest.raises(ValueError, match="left padding"):
        greedy_generate(model, ids, right, 4)
    with pytest.raises(ValueError, match="left padding"):
        greedy_generate(model, ids, torch.zeros_like(mask), 4)
    with pytest.raises(ValueError, match="shape"):
        greedy_generate(model, ids, mask[:, 1:], 4)
    with pytest.raises(ValueError, match="batch 0"):
        l3k.hf.GreedyDecoder(model, batch=0, capacity=8)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, ids, mask, 0)
    with pytest.raises(ValueError, match="input_ids"):
        greedy_generate(model, ids.float(), mask, 4)
    with pytest.raises(l3k.hf.UnsupportedLlamaError, match="not a LlamaForCausalLM"):
        greedy_generate(model.model, ids, mask, 4)
    dynamic = _model("mha-odd")
    dynamic.model.rotary_emb.rope_type = "dynamic"
    with pytest.raises(l3k.hf.UnsupportedLlamaError, match="dynamic"):
        greedy_generate(dynamic, ids, mask, 4)
    biased = _model("mha-odd")
    biased.config.attention_bias = True
    with pytest.raises(l3k.hf.UnsupportedLlamaError, match="attention_bias"):
        greedy_generate(biased, ids, mask, 4)

"""Hugging Face Llama models on the block (llama3_kernels.hf): random-init LlamaForCausalLM
configurations (GQA, MHA, MQA, odd sizes, llama3 rope scaling), patched against unpatched.

Tolerance, stated once: in each dtype, the patched model's logits and every parameter's
gradient are at most twice as far from a float64 run of the unpatched model as the unpatched
model in that dtype is, plus the dtype's rtol of the reference's largest magnitude (both run the
same arithmetic in a different order; neither is the truth).  Padded batches: each row's real
positions equal that sequence run alone (float32, the dtype's tolerance).

Padding runs on the library's block once llama_block takes key_range; until then the same tests
run on a pure-PyTorch block (below) that honours the key_range contract, which checks how the
masks transformers hands a layer become key ranges.
"""

import copy
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import LlamaForCausalLM  # noqa: E402

from conftest import TOL, assert_close  # noqa: E402
from hf_models import CONFIGS, make_config, make_model  # noqa: E402
from llama3_kernels import hf  # noqa: E402


def skip_cuda_float32(device, dtype):
    if device == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA attention takes float16/bfloat16 (float32 is refused: test_refusals)")


def run(model, ids, params_of=None, **kw):
    out = model(ids, labels=ids, **kw)
    out.loss.backward()
    named = (params_of or model).named_parameters()
    return out.logits.detach(), {n: p.grad.detach().clone() for n, p in named}


def assert_tracks(ours, theirs, ref, dtype, what):
    """ours within twice theirs' distance from ref, plus rtol of ref's scale (the module docstring)."""
    ours, theirs, ref = ours.double(), theirs.double(), ref.double()
    err_ours, err_theirs = (ours - ref).abs().max().item(), (theirs - ref).abs().max().item()
    bound = 2 * err_theirs + TOL[dtype]["rtol"] * ref.abs().max().item()
    assert err_ours <= bound, f"{what}: patched error {err_ours:.3g}, unpatched {err_theirs:.3g}, bound {bound:.3g}"


# ---- patched against unpatched --------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_gradients_match_unpatched(name, dtype, device):
    skip_cuda_float32(device, dtype)
    cfg = make_config(name)
    base = make_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 13), device=device)
    ref_logits, ref_grads = run(copy.deepcopy(base).to(device=device, dtype=torch.float64), ids)
    unpatched = copy.deepcopy(base).to(device=device, dtype=dtype)
    patched = hf.apply_to_llama(copy.deepcopy(base).to(device=device, dtype=dtype))
    their_logits, their_grads = run(unpatched, ids)
    our_logits, our_grads = run(patched, ids)
    assert_tracks(our_logits, their_logits, ref_logits, dtype, "logits")
    assert our_grads.keys() == ref_grads.keys()
    for n in ref_grads:
        assert_tracks(our_grads[n], their_grads[n], ref_grads[n], dtype, f"grad {n}")


def test_position_ids_and_hidden_states(device):
    """Any position ids (an offset, a different start per row) reach the block through the
    model's rotary tables; output_hidden_states sees every patched layer's output."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = make_config()
    unpatched = make_model(cfg, device, dtype)
    patched = hf.apply_to_llama(copy.deepcopy(unpatched))
    ids = torch.randint(0, cfg.vocab_size, (2, 11), device=device)
    pos = torch.arange(11, device=device) + torch.tensor([[5], [30]], device=device)
    with torch.no_grad():
        want = unpatched(ids, position_ids=pos, output_hidden_states=True)
        got = patched(ids, position_ids=pos, output_hidden_states=True)
    assert_close(got.logits, want.logits, dtype, 3.0, "logits")
    assert len(got.hidden_states) == len(want.hidden_states) == cfg.num_hidden_layers + 1
    for i, (a, b) in enumerate(zip(got.hidden_states, want.hidden_states)):
        assert_close(a, b, dtype, 3.0, f"hidden state {i}")


def test_training_tracks_unpatched(device):
    """20 AdamW steps from the same weights on the same batches: the patched losses track the
    unpatched ones."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = make_config("gqa-llama3rope")
    models = [make_model(cfg, device, dtype), None]
    models[1] = hf.apply_to_llama(copy.deepcopy(models[0]))
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in models]
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (4, 16), generator=gen).to(device) for _ in range(2)]
    losses = [[], []]
    for step in range(20):
        ids = batches[step % 2]
        for m, opt, out in zip(models, opts, losses):
            loss = m(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
    theirs, ours = torch.tensor(losses[0]), torch.tensor(losses[1])
    assert theirs[-1] < theirs[0] - 0.1, "the run should learn something"
    rtol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=0)


def test_autocast_float32_model(device):
    """A float32 model under autocast (how mixed-precision training runs one): the block runs in
    the autocast dtype, as the unpatched model's matmuls and attention do."""
    cfg = make_config()
    unpatched = make_model(cfg, device)
    patched = hf.apply_to_llama(copy.deepcopy(unpatched))
    ids = torch.randint(0, cfg.vocab_size, (2, 13), device=device)
    ref_logits, ref_grads = run(copy.deepcopy(unpatched).double(), ids)
    with torch.autocast(device, dtype=torch.bfloat16):
        their_logits, their_grads = run(unpatched, ids)
        our_logits, our_grads = run(patched, ids)
    assert our_logits.dtype == their_logits.dtype
    assert_tracks(our_logits, their_logits, ref_logits, torch.bfloat16, "logits")
    for n in ref_grads:
        assert our_grads[n].dtype == torch.float32
        assert_tracks(our_grads[n], their_grads[n], ref_grads[n], torch.bfloat16, f"grad {n}")


# ---- padding ----------------------------------------------------------------------------------------


def _rope(t, cos, sin):
    half = t.shape[-1] // 2
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    t1, t2 = t[..., :half].float(), t[..., half:].float()
    return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], -1).to(t.dtype)


def reference_block(x, cos, sin, weights, n_heads, n_kv_heads, eps=1e-5, causal=True, owner=None, key_range=None):
    """The block in PyTorch with llama_block's key_range contract: query i sees key j iff
    start <= j < end (and j <= i); a query that sees no key outputs zero attention."""
    wq, wk, wv, wo, wg, wu, wd, n1, n2 = weights
    b, s, dim = x.shape
    hd = dim // n_heads

    def norm(t, w):
        t32 = t.float()
        return (t32 * torch.rsqrt(t32.pow(2).mean(-1, keepdim=True) + eps)).to(t.dtype) * w

    h = norm(x, n1)
    q = (h @ wq.T).view(b, s, n_heads, hd).transpose(1, 2)
    k = (h @ wk.T).view(b, s, n_kv_heads, hd).transpose(1, 2)
    v = (h @ wv.T).view(b, s, n_kv_heads, hd).transpose(1, 2)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    k = k.repeat_interleave(n_heads // n_kv_heads, 1)
    v = v.repeat_interleave(n_heads // n_kv_heads, 1)
    j = torch.arange(s, device=x.device)
    allowed = (j[None, :] <= j[:, None]).expand(b, 1, s, s) if causal else torch.ones(b, 1, s, s, dtype=torch.bool)
    if key_range is not None:
        start, end = key_range[:, 0].long(), key_range[:, 1].long()
        allowed = allowed & ((j >= start[:, None]) & (j < end[:, None]))[:, None, None, :]
    scores = (q.float() @ k.float().transpose(-1, -2)) / hd**0.5
    p = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    attn = (p @ v.float()).to(x.dtype).transpose(1, 2).reshape(b, s, dim)
    r = x + attn @ wo.T
    m = norm(r, n2)
    return r + (F.silu(m @ wg.T) * (m @ wu.T)) @ wd.T


@pytest.fixture(params=["library", "reference"])
def block_impl(request, monkeypatch):
    """The block the padding tests run on: the library's (once it takes key_range) or the
    reference above standing in for it."""
    if request.param == "library":
        if not hf._TAKES_KEY_RANGE:
            pytest.skip("llama_block does not take key_range yet")
    else:
        monkeypatch.setattr(hf, "_llama_block", reference_block)
        monkeypatch.setattr(hf, "_TAKES_KEY_RANGE", True)
    return request.param


LENGTHS = (13, 9, 4)


def padded_batch(lengths, side, vocab, device, seed=3):
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, vocab, (n,), generator=gen) for n in lengths]
    s = max(lengths)
    ids = torch.zeros(len(seqs), s, dtype=torch.long)
    mask = torch.zeros(len(seqs), s, dtype=torch.long)
    for i, t in enumerate(seqs):
        sl = slice(s - len(t), s) if side == "left" else slice(0, len(t))
        ids[i, sl], mask[i, sl] = t, 1
    # What generate() passes: each sequence's positions count from its first real token.
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return [t.to(device) for t in seqs], ids.to(device), mask.to(device), pos.to(device)


def real(side, n, s):
    return slice(s - n, s) if side == "left" else slice(0, n)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padded_rows_equal_sequences_alone(side, attn, block_impl, device):
    """Each row of a left- or right-padded batch, at its real positions, equals that sequence
    run alone (and the unpatched model on the padded batch); the gradients of a loss over the
    real positions equal the unpatched model's (nothing leaks from the padded positions)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = make_config("gqa-llama3rope", attn_implementation=attn)
    unpatched = make_model(cfg, device, dtype)
    patched = hf.apply_to_llama(copy.deepcopy(unpatched))
    seqs, ids, mask, pos = padded_batch(LENGTHS, side, cfg.vocab_size, device)
    # Logits at a padded position are not meaningful: no label may be predicted from one (the
    # first real token of a left-padded row is predicted from the pad before it).
    first = torch.zeros_like(mask).scatter_(1, mask.argmax(-1, keepdim=True), 1)
    labels = ids.masked_fill((mask == 0) | (first == 1), -100)
    got = patched(ids, attention_mask=mask, position_ids=pos, labels=labels)
    got.loss.backward()
    want = unpatched(ids, attention_mask=mask, position_ids=pos, labels=labels)
    want.loss.backward()
    s = ids.shape[1]
    with torch.no_grad():
        for b, t in enumerate(seqs):
            alone = patched(t[None]).logits[0]
            rows = real(side, len(t), s)
            assert_close(got.logits[b, rows], alone, dtype, 3.0, f"row {b} against alone")
            assert_close(got.logits[b, rows], want.logits[b, rows], dtype, 3.0, f"row {b} against unpatched")
    assert_close(got.loss, want.loss, dtype, 3.0, "loss")
    for (n, p), q in zip(patched.named_parameters(), unpatched.parameters()):
        assert torch.isfinite(p.grad).all(), n
        assert_close(p.grad, q.grad, dtype, 12.0, f"grad {n}")


def test_generate_without_cache_left_padded(block_impl, device):
    """generate(use_cache=False) on a left-padded batch (each step a full padded forward) gives
    the unpatched model's greedy tokens."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = make_config("gqa-llama3rope", pad_token_id=0)
    unpatched = make_model(cfg, device, dtype).eval()
    patched = hf.apply_to_llama(copy.deepcopy(unpatched))
    _, ids, mask, _ = padded_batch((7, 4), "left", cfg.vocab_size, device)
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(patched.generate(ids, **kw), unpatched.generate(ids, **kw))


def test_key_range_from_each_mask_form(device):
    """The masks transformers hands a layer (2-D for flash attention, 4-D boolean for SDPA, 4-D
    additive for eager) become the same [start, end) per sequence; without padding, none."""
    cfg = make_config()
    x = torch.zeros(3, 6, 64, device=device)
    pad = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], device=device)
    j = torch.arange(6, device=device)
    m4 = (j[None, :] <= j[:, None])[None, None] & pad.bool()[:, None, None, :]
    additive = torch.zeros(m4.shape, device=device).masked_fill(~m4, torch.finfo(torch.float32).min)
    want = torch.tensor([[2, 6], [0, 6], [0, 3]], dtype=torch.int32, device=device)
    for mask in (pad, m4, additive):
        hf._MASK_MEMO[0] = None
        got = hf._key_range(mask, x, cfg, None, {})
        assert got.dtype == torch.int32 and got.device == x.device
        assert torch.equal(got, want), mask.dtype
    full = torch.ones(3, 6, dtype=torch.long, device=device)
    assert hf._key_range(full, x, cfg, None, {}) is None
    assert hf._key_range(None, x, cfg, None, {}) is None


# ---- the model keeps working as a transformers model ----------------------------------------------


def test_state_dict_parameters_and_save_pretrained(tmp_path, device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = make_config()
    model = make_model(cfg, device, dtype)
    keys = list(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    hf.apply_to_llama(model)
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())  # no copies
    ids = torch.randint(0, cfg.vocab_size, (2, 9), device=device)
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = hf.from_pretrained(tmp_path, model_class=LlamaForCausalLM).to(device=device, dtype=dtype)
    assert isinstance(loaded.model.layers[0], transformers.models.llama.modeling_llama.LlamaDecoderLayer)
    assert hf._is_patched(loaded.model.layers[0]) and hf._is_patched(loaded.model.norm)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)


def test_revert_and_context_manager(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = make_config()
    model = make_model(cfg, device, dtype)
    layer_cls, norm_cls = type(model.model.layers[0]), type(model.model.norm)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), device=device)
    with torch.no_grad():
        want = model(ids).logits
        with hf.patched(model) as m:
            assert m is model and hf._is_patched(model.model.layers[1])
            assert_close(model(ids).logits, want, dtype, 3.0, "patched")
        assert type(model.model.layers[0]) is layer_cls and type(model.model.norm) is norm_cls
        assert "forward" not in vars(model.model.layers[0]) and not model.model._forward_pre_hooks
        assert torch.equal(model(ids).logits, want)
        hf.apply_to_llama(model)
        with hf.patched(model):  # already patched: stays patched after
            pass
        assert hf._is_patched(model.model.layers[0])
        hf.apply_to_llama(model)  # idempotent
        hf.revert_llama(model)
        assert type(model.model.layers[0]) is layer_cls and not model.model._forward_pre_hooks
        assert torch.equal(model(ids).logits, want)


def test_loss_on_the_library_cross_entropy(device):
    """The patch gives a causal LM the library's cross-entropy as its loss (and revert takes it
    back); with labels ignored in places and transformers' num_items_in_batch, the loss and the
    gradients equal those of transformers' own loss on the same logits; a loss the owner set is
    left alone, and loss=False patches the layers only."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = make_config()
    model = make_model(cfg, device, dtype)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), device=device)
    labels = ids.masked_fill(torch.rand(ids.shape, device=device) < 0.3, -100)
    hf.apply_to_llama(model)
    assert model.loss_function is hf.causal_lm_loss
    for kw in ({}, {"num_items_in_batch": torch.tensor(11, device=device)}):
        assert model.loss_function is hf.causal_lm_loss
        model.zero_grad()
        got = model(ids, labels=labels, **kw).loss
        got.backward()
        ours = {n: p.grad.clone() for n, p in model.named_parameters()}
        model._loss_function = ForCausalLMLoss  # transformers' loss on the same patched layers
        model.zero_grad()
        want = model(ids, labels=labels, **kw).loss
        want.backward()
        model._loss_function = hf.causal_lm_loss
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        for n, p in model.named_parameters():
            assert_close(ours[n], p.grad, dtype, 3.0, f"{n} with {list(kw)}")
    hf.revert_llama(model)
    assert model.loss_function is ForCausalLMLoss
    hf.apply_to_llama(model, loss=False)
    assert model.loss_function is ForCausalLMLoss
    hf.revert_llama(model)
    model._loss_function = ForCausalLMLoss  # set by its owner: kept
    hf.apply_to_llama(model)
    assert vars(model)["_loss_function"] is ForCausalLMLoss


def test_deepcopy_and_pickle(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = make_config()
    model = hf.apply_to_llama(make_model(cfg, device, dtype))
    ids = torch.randint(0, cfg.vocab_size, (1, 9), device=device)
    with torch.no_grad():
        want = model(ids).logits
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert hf._is_patched(clone.model.layers[0])
            assert torch.equal(clone(ids).logits, want)


def _checkpointing(reentrant, device, monkeypatch):
    """(block calls without checkpointing, with; logits and gradients without, with)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = make_config()
    plain = hf.apply_to_llama(make_model(cfg, device, dtype)).train()
    ckpt = copy.deepcopy(plain)
    if hasattr(ckpt, "activation_checkpointing_enable"):  # transformers 5's name
        ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    calls = []

    def counting_block(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return block(*args, **kwargs)

    block = hf._llama_block
    monkeypatch.setattr(hf, "_llama_block", counting_block)
    ids = torch.randint(0, cfg.vocab_size, (2, 13), device=device)
    want = run(plain, ids)
    n_plain = len(calls)
    got = run(ckpt, ids)
    return n_plain, len(calls) - n_plain, want, got


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing(reentrant, device, monkeypatch):
    """transformers' checkpointing wraps the patched layers and gives the gradients of the model
    without it; reentrant checkpointing runs each layer's block again in the backward."""
    n_plain, n_ckpt, (want_logits, want_grads), (got_logits, got_grads) = _checkpointing(reentrant, device, monkeypatch)
    if reentrant:
        assert n_ckpt == 2 * n_plain  # forward, then again in the backward
    dtype = got_logits.dtype
    assert_close(got_logits, want_logits, dtype, 1.0, "logits")
    for n in want_grads:
        assert_close(got_grads[n], want_grads[n], dtype, 1.0, f"grad {n}")


def test_non_reentrant_checkpointing_recomputes(device, monkeypatch):
    """Non-reentrant checkpointing (transformers 5's default) drops the block's saved tensors and
    reruns the layer in the backward to get them back."""
    n_plain, n_ckpt, _, _ = _checkpointing(False, device, monkeypatch)
    assert n_ckpt == 2 * n_plain


def test_torch_compile_of_the_patched_model(device):
    """torch.compile of the whole patched model (aot_eager on the CPU): no graph break, each layer
    one block op forward and one backward, and the eager model's logits and gradients."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = make_config()
    eager = hf.apply_to_llama(make_model(cfg, device, dtype))
    compiled_model = copy.deepcopy(eager)
    ids = torch.randint(0, cfg.vocab_size, (2, 13), device=device)
    want_logits, want_grads = run(eager, ids)
    seen = []

    def record(gm, _):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    compiled = torch.compile(
        compiled_model, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record)
    )
    got_logits, got_grads = run(compiled, ids, params_of=compiled_model)
    blocks = [t for t in seen if "llama3_kernels.llama_block" in t]
    assert blocks.count("llama3_kernels.llama_block_train.default") == cfg.num_hidden_layers, seen
    assert blocks.count("llama3_kernels.llama_block_backward.default") == cfg.num_hidden_layers, seen
    assert_close(got_logits, want_logits, dtype, 3.0, "logits")
    for n in want_grads:
        assert_close(got_grads[n], want_grads[n], dtype, 12.0, f"grad {n}")


@pytest.mark.parametrize("side", ["left", "right"])
def test_torch_compile_padded(side, block_impl, device):
    """Under torch.compile the key ranges come from the mask without a host sync (traced, no
    graph break): the compiled model gives the eager model's logits at every real position."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = make_config()
    eager = hf.apply_to_llama(make_model(cfg, device, dtype))
    _, ids, mask, pos = padded_batch(LENGTHS, side, cfg.vocab_size, device)
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        want = eager(ids, attention_mask=mask, position_ids=pos).logits
        got = compiled(ids, attention_mask=mask, position_ids=pos).logits
    for b, n in enumerate(LENGTHS):
        rows = real(side, n, ids.shape[1])
        assert_close(got[b, rows], want[b, rows], dtype, 3.0, f"row {b}")


def test_import_does_not_import_transformers():
    code = "import sys, llama3_kernels; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "over, words",
    [
        (dict(attention_bias=True), "attention_bias"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(head_dim=32), "head_dim"),
    ],
)
def test_refuses_configurations(over, words):
    model = make_model(make_config(**over))
    with pytest.raises(hf.UnsupportedLlamaError, match=words):
        hf.apply_to_llama(model)
    assert not hf._is_patched(model.model.layers[0])


def test_refuses_layers_it_would_not_reach():
    """A layer whose forward is replaced on the instance (accelerate's hooks do that) would never
    call the patched class: refused, and nothing is patched."""
    model = make_model(make_config())
    layer = model.model.layers[1]
    layer.forward = layer.forward
    with pytest.raises(hf.UnsupportedLlamaError, match="instance"):
        hf.apply_to_llama(model)
    assert not any(hf._is_patched(m) for m in model.modules())


def test_refuses_calls(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = make_config()
    model = hf.apply_to_llama(make_model(cfg, device, dtype))
    ids = torch.randint(0, cfg.vocab_size, (2, 8), device=device)
    with pytest.raises(hf.UnsupportedLlamaError, match="output_attentions"):
        model(ids, output_attentions=True)
    with pytest.raises(hf.UnsupportedLlamaError, match="KV cache in a forward that needs gradients"):
        model(ids, use_cache=True)  # the decode step has no backward
    # packed sequences: positions restart mid-row, which transformers 5 turns into a block-diagonal mask
    pos = torch.cat([torch.arange(5), torch.arange(3)]).to(device)[None].expand(2, -1)
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401

        builds_packed_masks = True
    except ImportError:  # 4.x: such positions are positions, the mask stays causal
        builds_packed_masks = False
    if builds_packed_masks:
        with pytest.raises(hf.UnsupportedLlamaError, match="contiguous range"):
            model(ids, position_ids=pos)
    j = torch.arange(8, device=device)
    custom = ((j[None, :] <= j[:, None]) & (j[None, :] % 2 == 0) | (j[None, :] == j[:, None]))[None, None]
    with pytest.raises(hf.UnsupportedLlamaError, match="contiguous range"):
        model(ids, attention_mask=custom.expand(2, 1, 8, 8))
    model.config.attention_dropout = 0.1
    model.train()
    with pytest.raises(hf.UnsupportedLlamaError, match="attention_dropout"):
        model(ids)
    model.eval()
    model(ids)  # dropout is off in eval
    model.config.attention_dropout = 0.0
    model.model.layers[1].self_attn.q_proj = _Adapted(model.model.layers[1].self_attn.q_proj)
    with pytest.raises(hf.UnsupportedLlamaError, match="q_proj"):
        model(ids)


class _Adapted(torch.nn.Linear):
    """A projection with its own forward (as an adapter's): the block cannot stand in for it."""

    def __init__(self, base):
        super().__init__(base.in_features, base.out_features, bias=False)
        self.weight = base.weight

    def forward(self, x):
        return super().forward(x) * 2


def test_refuses_float32_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cfg = make_config()
    model = hf.apply_to_llama(make_model(cfg, "cuda", torch.float32))
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        model(torch.randint(0, cfg.vocab_size, (1, 8), device="cuda"))


def test_refuses_padding_without_key_range(monkeypatch, device):
    """Until llama_block takes key_range, a padded batch is refused, not run wrong."""
    monkeypatch.setattr(hf, "_TAKES_KEY_RANGE", False)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = make_config()
    model = hf.apply_to_llama(make_model(cfg, device, dtype))
    _, ids, mask, pos = padded_batch((6, 3), "right", cfg.vocab_size, device)
    with pytest.raises(NotImplementedError, match="key_range"):
        model(ids, attention_mask=mask)
    model(ids, attention_mask=torch.ones_like(mask))  # no padding: runs

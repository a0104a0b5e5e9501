"""Generation with a KV cache: the cache ops against PyTorch, the block's decode step against its
full forward, and greedy generate() of a patched Hugging Face model against unpatched.

References: attention_decode against SDPA in float32 over the same rounded inputs with an
explicit mask (the dtype's tolerance); kv_cache_append against torch_rope written into the slots
(the dtype's tolerance; the other slots exactly untouched); the decode step (prefill, then one
token or a chunk at a time) against Llama3Block's forward over the whole sequence (the dtype's
tolerance, scaled by 4 for the block's longer reductions); generate() of random-init models in
float32: the same tokens as unpatched for 64 new tokens.
"""

import pytest
import torch
import torch.nn.functional as F

import llama3_kernels as l3k
from conftest import assert_close
from hf_models import cache_kw, make_config, make_model
from llama3_kernels.ops.rope import llama3_rope_cos_sin
from llama3_kernels.reference import torch_rope


def skip_unsupported(device, dtype):
    if device == "cuda" and not l3k.has_cuda():
        pytest.skip("the library was built without CUDA")


def cache_tensors(b, hkv, cap, d, dtype, device, fill=float("nan")):
    return (
        torch.full((b, hkv, cap, d), fill, dtype=dtype, device=device),
        torch.full((b, hkv, cap, d), fill, dtype=dtype, device=device),
    )


def reference_decode(q, kc, vc, cache_range):
    """SDPA in float32 with the decode mask: query i of sequence b sees start .. end - seq + i."""
    b, h, s, d = q.shape
    hkv, cap = kc.shape[1], kc.shape[2]
    r = cache_range.long().cpu()
    end = r[:, 1].clamp(0, cap)
    start = torch.minimum(r[:, 0].clamp(min=0), end)
    j = torch.arange(cap).view(1, 1, -1)
    own = end.view(-1, 1, 1) - s + torch.arange(s).view(1, -1, 1)
    mask = (j >= start.view(-1, 1, 1)) & (j <= own)  # (b, s, cap)
    kf = kc.float().nan_to_num(0.0).repeat_interleave(h // hkv, dim=1)
    vf = vc.float().nan_to_num(0.0).repeat_interleave(h // hkv, dim=1)
    scores = (q.float() @ kf.transpose(-1, -2)) / d**0.5
    scores = scores.masked_fill(~mask[:, None].to(q.device), float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key: o = 0
    return p @ vf


@pytest.mark.parametrize(
    "h, hkv, d, seq, cap",
    [(4, 2, 64, 1, 40), (6, 2, 72, 3, 17), (4, 1, 128, 2, 300), (3, 3, 8, 1, 5)],
)
def test_attention_decode_matches_sdpa(h, hkv, d, seq, cap, dtype, device):
    skip_unsupported(device, dtype)
    b = 3
    q = torch.randn(b, h, seq, d, device=device, dtype=dtype)
    kc, vc = cache_tensors(b, hkv, cap, d, dtype, device)
    # sequence 0 fills part of the cache, 1 is left-padded, 2 has fewer slots than queries
    ranges = torch.tensor([[0, cap // 2 + seq], [2, cap], [0, seq - 1]], dtype=torch.int32, device=device)
    for bi in range(b):
        lo, hi = int(ranges[bi, 0]), int(ranges[bi, 1])
        kc[bi, :, lo:hi] = torch.randn(hkv, hi - lo, d, device=device).to(dtype)
        vc[bi, :, lo:hi] = torch.randn(hkv, hi - lo, d, device=device).to(dtype)
    o = l3k.attention_decode(q, kc, vc, ranges)
    ref = reference_decode(q, kc, vc, ranges)
    assert_close(o, ref, dtype, what="attention_decode")
    if seq == 1:  # the third sequence's only query is at slot -1: it sees nothing
        assert torch.equal(o[2], torch.zeros_like(o[2]))


@pytest.mark.parametrize("kernel", ["tensor_cores", "cuda_cores"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_attention_decode_both_cuda_kernels(kernel, head_dim, half, monkeypatch):
    """Each CUDA decode kernel at the shapes both serve (the tensor-core one by default,
    L3K_DECODE_MMA=0 the CUDA-core one) against SDPA: one query and several, GQA and MHA, one
    split and many, padding, a query that sees nothing."""
    if not (torch.cuda.is_available() and l3k.has_cuda()):
        pytest.skip("needs CUDA")
    monkeypatch.setenv("L3K_DECODE_MMA", "1" if kernel == "tensor_cores" else "0")
    for b, h, hkv, seq, cap in [(3, 32, 8, 1, 4096), (2, 8, 2, 3, 300), (3, 4, 4, 5, 70)]:
        q = torch.randn(b, h, seq, head_dim, device="cuda", dtype=half)
        kc = torch.randn(b, hkv, cap, head_dim, device="cuda", dtype=half)
        vc = torch.randn(b, hkv, cap, head_dim, device="cuda", dtype=half)
        ranges = torch.tensor([[0, cap], [5, cap // 2], [0, seq - 1]][:b], dtype=torch.int32, device="cuda")
        for bi in range(b):  # NaN outside each range must not reach o
            lo, hi = int(ranges[bi, 0]), int(ranges[bi, 1])
            kc[bi, :, :lo] = float("nan")
            kc[bi, :, max(hi, 0) :] = float("nan")
            vc[bi, :, :lo] = float("nan")
            vc[bi, :, max(hi, 0) :] = float("nan")
        o = l3k.attention_decode(q, kc, vc, ranges)
        assert_close(o, reference_decode(q, kc, vc, ranges), half, what=f"B{b} H{h}/{hkv} seq {seq} cache {cap}")


def test_attention_decode_long_cache_splits(device):
    """A cache long enough for the CUDA kernel to cut each sequence's keys into pieces."""
    dtype = torch.bfloat16
    b, h, hkv, d, cap = 1, 8, 2, 128, 4096
    q = torch.randn(b, h, 1, d, device=device, dtype=dtype)
    kc = torch.randn(b, hkv, cap, d, device=device, dtype=dtype)
    vc = torch.randn(b, hkv, cap, d, device=device, dtype=dtype)
    for lo, hi in [(0, cap), (100, 3001), (0, 1)]:
        r = torch.tensor([[lo, hi]], dtype=torch.int32, device=device)
        assert_close(l3k.attention_decode(q, kc, vc, r), reference_decode(q, kc, vc, r), dtype, what=f"[{lo}, {hi})")


@pytest.mark.parametrize("shared_table", [True, False])
def test_kv_cache_append_rotates_into_the_slots(shared_table, dtype, device):
    skip_unsupported(device, dtype)
    b, h, hkv, seq, d, cap = 2, 4, 2, 3, 16, 10
    q = torch.randn(b, h, seq, d, device=device, dtype=dtype)
    k = torch.randn(b, hkv, seq, d, device=device, dtype=dtype)
    v = torch.randn(b, hkv, seq, d, device=device, dtype=dtype)
    kc, vc = cache_tensors(b, hkv, cap, d, dtype, device, fill=7.0)
    ranges = torch.tensor([[0, 5], [1, cap]], dtype=torch.int32, device=device)
    cos, sin = llama3_rope_cos_sin(cap, d, device=device)
    if shared_table:
        positions = torch.tensor([2, 6], dtype=torch.int32, device=device)
        rows = [torch.arange(p, p + seq) for p in positions.tolist()]
        tables = cos, sin
    else:  # per-sequence tables of this call's tokens: token i reads row i
        positions, rows = None, [torch.arange(seq) for _ in range(b)]
        tables = torch.stack([cos[3 : 3 + seq], cos[:seq]]), torch.stack([sin[3 : 3 + seq], sin[:seq]])
        rows = [torch.arange(3, 3 + seq), torch.arange(seq)]
    q_rot = l3k.kv_cache_append(k, v, *tables, ranges, kc, vc, q=q, positions=positions)
    for bi in range(b):
        c, s = cos[rows[bi]].to(device), sin[rows[bi]].to(device)
        end = int(ranges[bi, 1])
        slots = slice(end - seq, end)
        assert_close(q_rot[bi], torch_rope(q[bi : bi + 1].float(), c, s)[0], dtype, what="q")
        assert_close(kc[bi, :, slots], torch_rope(k[bi : bi + 1].float(), c, s)[0], dtype, what="k_cache")
        assert torch.equal(vc[bi, :, slots], v[bi])
        untouched = torch.ones(cap, dtype=torch.bool)
        untouched[slots] = False
        assert (kc[bi, :, untouched] == 7.0).all() and (vc[bi, :, untouched] == 7.0).all()


def test_kv_cache_append_refuses_bad_arguments(device):
    d = 16
    k = torch.randn(1, 2, 1, d, device=device)
    kc, vc = cache_tensors(1, 2, 4, d, torch.float32, device)
    cos, sin = llama3_rope_cos_sin(4, d, device=device)
    r = torch.tensor([[0, 1]], dtype=torch.int32, device=device)
    with pytest.raises(l3k.L3KDTypeError, match="kv_cache_append: k dtype"):
        l3k.kv_cache_append(k.half(), k.half(), cos, sin, r, kc, vc)
    with pytest.raises(l3k.L3KArgumentError, match="cache_range"):
        l3k.kv_cache_append(k, k, cos, sin, torch.zeros(1, 3, dtype=torch.int32, device=device), kc, vc)
    with pytest.raises(l3k.L3KArgumentError, match="k_cache overlaps v_cache|v_cache overlaps k_cache"):
        l3k.kv_cache_append(k, k, cos, sin, r, kc, kc)
    with pytest.raises(l3k.L3KArgumentError, match="attention_decode: scale"):
        l3k.attention_decode(torch.randn(1, 2, 1, d, device=device), kc, vc, r, scale=-1.0)


# ---- the block's decode step -------------------------------------------------------------------


def make_block(dim, hidden, heads, kv_heads, device, dtype):
    blk = l3k.Llama3Block(dim, hidden, heads, kv_heads, device=device, dtype=dtype)
    with torch.no_grad():
        blk.norm1_weight.normal_(1.0, 0.2)
        blk.norm2_weight.normal_(1.0, 0.2)
    return blk


@pytest.mark.parametrize("chunks", [(5, 1, 1, 1), (2, 3, 1, 2)])
def test_decode_steps_match_the_full_forward(chunks, dtype, device):
    """Prefill and then chunks of new tokens through Llama3Block.decode give the rows of one forward
    over the whole sequence, for every layer of a two-block stack."""
    skip_unsupported(device, dtype)
    if device == "cuda" and dtype == torch.float32:
        pytest.skip("the block's forward (the reference here) takes float16/bfloat16 on CUDA")
    b, dim, heads, kv_heads, hidden = 2, 128, 4, 2, 96
    seq = sum(chunks)
    blocks = [make_block(dim, hidden, heads, kv_heads, device, dtype) for _ in range(2)]
    x = torch.randn(b, seq, dim, device=device, dtype=dtype)
    cos, sin = llama3_rope_cos_sin(16, dim // heads, device=device)
    with torch.no_grad():
        ref = x
        for blk in blocks:
            ref = blk(ref, cos[:seq], sin[:seq])
        cache = l3k.KVCache(2, b, kv_heads, dim // heads, 16, dtype=dtype, device=device)
        outs, at = [], 0
        for n in chunks:
            cache.advance(n)
            h = x[:, at : at + n]
            for i, blk in enumerate(blocks):
                h = blk.decode(h, cos, sin, cache, i)
            outs.append(h)
            at += n
    assert_close(torch.cat(outs, 1), ref, dtype, scale=4, what="decode steps")


def test_decode_left_padding_equals_sequences_alone(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    b, dim, heads, kv_heads, hidden, seq, pad = 2, 64, 4, 1, 80, 6, 3
    blk = make_block(dim, hidden, heads, kv_heads, device, dtype)
    x = torch.randn(b, seq, dim, device=device, dtype=dtype)
    cos, sin = llama3_rope_cos_sin(16, dim // heads, device=device)
    with torch.no_grad():
        alone = blk(x, cos[:seq], sin[:seq])
        padded = torch.zeros(b, seq + pad, dim, device=device, dtype=dtype)
        padded[0, :seq], padded[1, pad:] = x[0], x[1]  # row 0 right-padded, row 1 left-padded
        cache = l3k.KVCache(1, b, kv_heads, dim // heads, 16, dtype=dtype, device=device)
        cache.reset(torch.tensor([0, pad], device=device))
        cache.advance(seq + pad)
        out = blk.decode(padded, cos, sin, cache)
    assert_close(out[1, pad:], alone[1], dtype, scale=4, what="left-padded row")
    assert_close(out[0, :seq], alone[0], dtype, scale=4, what="right-padded row")


def test_decode_refuses_what_it_does_not_compute(device):
    blk = make_block(64, 80, 4, 2, device, torch.float32)
    cache = l3k.KVCache(1, 1, 2, 16, 8, dtype=torch.float16, device=device).advance(1)
    cos, sin = llama3_rope_cos_sin(8, 16, device=device)
    with torch.no_grad(), pytest.raises(l3k.L3KDTypeError, match="cache->k dtype float16, expected float32 like x"):
        blk.decode(torch.randn(1, 1, 64, device=device), cos, sin, cache)
    with pytest.raises(ValueError, match="capacity"):
        cache.advance(8)
    x = torch.randn(1, 1, 64, device=device)
    cache32 = l3k.KVCache(1, 1, 2, 16, 8, device=device).advance(1)
    with pytest.raises(RuntimeError, match="no backward.*torch.no_grad"):
        blk.decode(x, cos, sin, cache32)  # grad mode on, and the weights require grad


def test_decode_op_under_torch_compile():
    """The decode step as a registered op that mutates the cache: opcheck, and a compiled step."""
    dtype, device = torch.float32, "cpu"
    blk = make_block(64, 80, 4, 2, device, dtype)
    cos, sin = llama3_rope_cos_sin(8, 16, device=device)
    x = torch.randn(2, 1, 64)
    cache = l3k.KVCache(1, 2, 2, 16, 8, dtype=dtype).advance(3)
    weights = [blk._parameters[n] for n in l3k.block.PARAM_NAMES]
    args = (x, cos, sin, [w.detach() for w in weights], 4, 2, True, 1e-5, False)
    args += (cache.k[0], cache.v[0], cache.cache_range, cache.positions)
    torch.library.opcheck(torch.ops.llama3_kernels.llama_block_decode.default, args)
    with torch.no_grad():
        eager_k = cache.k[0].clone()
        want = blk.decode(x, cos, sin, cache)
        cache.k[0].copy_(eager_k)
        got = torch.compile(lambda t: blk.decode(t, cos, sin, cache), fullgraph=True)(x)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


# ---- generate() on a patched Hugging Face model ------------------------------------------------


def _hf_model(device, dtype):
    pytest.importorskip("transformers")
    # 9 prompt + 64 new positions; llama3 rope scaling
    return make_model(make_config("gqa-llama3rope", max_position_embeddings=256), device, dtype).eval()


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_generate_gives_the_unpatched_tokens(batch, cache_implementation, device):
    if device == "cuda":
        pytest.skip("float32 greedy tokens are compared on the CPU path (CUDA GEMMs may use TF32)")
    model = _hf_model(device, torch.float32)
    ids = torch.randint(1, 101, (batch, 9), device=device)
    mask = torch.ones_like(ids)
    if batch > 1:  # left padding of different lengths
        mask[1, :3] = 0
        mask[3, :5] = 0
    kw = dict(attention_mask=mask, max_new_tokens=64, do_sample=False, pad_token_id=0)
    if cache_implementation == "static":
        kw["cache_implementation"] = "static"
    want = model.generate(ids, **kw)
    with l3k.hf.patched(model):
        got = model.generate(ids, **kw)
    assert torch.equal(got, want)


def test_teacher_forced_logits_bf16(device):
    """Every step's logits, patched with a cache against unpatched with its cache, in bfloat16."""
    from transformers import DynamicCache

    model = _hf_model(device, torch.bfloat16)
    ids = torch.randint(1, 101, (2, 24), device=device)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0

    def stepwise():
        cache, logits, name = DynamicCache(), [], cache_kw()
        with torch.no_grad():
            for at, n in [(0, 8)] + [(t, 1) for t in range(8, 24)]:
                out = model(ids[:, at : at + n], attention_mask=mask[:, : at + n], **{name: cache}, use_cache=True)
                logits.append(out.logits.float())
        return torch.cat(logits, 1)

    want = stepwise()
    with l3k.hf.patched(model):
        got = stepwise()
    real = mask.bool()
    scale = want[real].abs().max().item()
    err = (got - want)[real].abs().max().item()
    assert err <= 3e-2 * scale, f"max logit error {err:.3g} at logit scale {scale:.3g}"
    assert F.cosine_similarity(got[real], want[real], dim=-1).min() > 0.999


def test_refuses_caches_it_cannot_write(device):
    from transformers import DynamicCache

    class CopyingCache(DynamicCache):  # returns copies, as quantized or offloaded caches do
        def update(self, *args, **kwargs):
            k, v = super().update(*args, **kwargs)
            return k.clone(), v.clone()

    model = l3k.hf.apply_to_llama(_hf_model(device, torch.float32 if device == "cpu" else torch.bfloat16))
    ids = torch.randint(1, 101, (1, 5), device=device)
    with torch.no_grad(), pytest.raises(l3k.hf.UnsupportedLlamaError, match="does not return the tensors it keeps"):
        model(ids, **{cache_kw(): CopyingCache()}, use_cache=True)


def test_kv_cache_append_to_a_cache_of_no_slot_still_rotates_q(device):
    d = 16
    q, k = torch.randn(1, 2, 3, d, device=device), torch.randn(1, 2, 3, d, device=device)
    kc, vc = cache_tensors(1, 2, 0, d, torch.float32, device)
    cos, sin = llama3_rope_cos_sin(4, d, device=device)
    r = torch.tensor([[0, 3]], dtype=torch.int32, device=device)
    got = l3k.kv_cache_append(k, k, cos, sin, r, kc, vc, q=q)
    assert_close(got, torch_rope(q, cos[:3], sin[:3]), torch.float32, what="q")
    with pytest.raises(l3k.L3KArgumentError, match="o stride\\[2\\] is 0"):
        l3k.attention_decode_into(q, kc, vc, r, q[:, :, :1].expand(1, 2, 3, d))

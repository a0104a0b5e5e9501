"""Llama3Block against the pure-PyTorch block with the same weights: output and every
gradient, MHA and GQA, causal and not; the eager route and torch.compile (the same C calls
as registered ops); retain_graph; weight loading from the tutorial's names and from Hugging
Face's LlamaDecoderLayer; the tutorial's own call."""

import copy

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import llama3_kernels as l3k
from conftest import assert_close

CONFIGS = [  # dim, hidden, heads, kv heads, batch, seq
    (64, 160, 4, 2, 2, 12),
    (128, 256, 2, 2, 1, 33),
    (128, 352, 8, 1, 3, 7),
]


def make_pair(dim, hidden, h, hkv, causal, device, dtype):
    ref = l3k.TorchLlama3Block(dim, hidden, h, hkv, causal=causal).to(device=device, dtype=dtype)
    with torch.no_grad():
        ref.norm1_weight.normal_(1.0, 0.2)
        ref.norm2_weight.normal_(1.0, 0.2)
    blk = l3k.Llama3Block(dim, hidden, h, hkv, causal=causal).to(device=device, dtype=dtype)
    blk.load_state_dict(ref.state_dict())
    return ref, blk


# A chain of GEMMs, norms and attention: outputs and dx within 3x the dtype's tolerance of the
# float32 reference, weight gradients (sums over every token) within 12x.
OUT_SCALE, WEIGHT_GRAD_SCALE = 3.0, 12.0


def _reference32(ref, causal, x, cos, sin, g):
    """The pure-PyTorch block in float32 from the same rounded weights and input: output, dx and
    the weight gradients under the tutorial's names."""
    dim, hidden, h, hkv = ref.attn_q.in_features, ref.mlp_gate.out_features, ref.n_heads, ref.n_kv_heads
    ref32 = l3k.TorchLlama3Block(dim, hidden, h, hkv, causal=causal).to(x.device)
    ref32.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    xr = x.detach().float().requires_grad_()
    y = ref32(xr, cos, sin)
    y.backward(g.float())
    return y, xr.grad, {name: p.grad for name, p in ref32.named_parameters()}


def _assert_like_reference(y, dx, blk, want, dtype, what):
    y_ref, dx_ref, grads_ref = want
    assert_close(y, y_ref, dtype, OUT_SCALE, f"{what} output")
    assert_close(dx, dx_ref, dtype, OUT_SCALE, f"{what} dx")
    ours = _split_grads(blk)
    for name, grad in grads_ref.items():
        assert_close(ours[name], grad, dtype, WEIGHT_GRAD_SCALE, f"{what} d{name}")


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_block_matches_pytorch(cfg, causal, dtype, device):
    if device == "cuda" and dtype == torch.float32:
        pytest.skip("attention takes float16/bfloat16 on CUDA")
    dim, hidden, h, hkv, b, s = cfg
    torch.manual_seed(0)
    ref, blk = make_pair(dim, hidden, h, hkv, causal, device, dtype)
    cos, sin = l3k.llama3_rope_cos_sin(s, dim // h, device=device)
    x = torch.randn(b, s, dim, device=device, dtype=dtype, requires_grad=True)
    y = blk(x, cos, sin)
    g = torch.randn_like(y)
    y.backward(g)
    _assert_like_reference(y, x.grad, blk, _reference32(ref, causal, x, cos, sin, g), dtype, "eager")


def _split_grads(blk):
    """The fused parameters' gradients under the tutorial's names."""
    q, k, v = blk.qkv_weight.grad.split(blk._split_sizes("qkv_weight"))
    g, u = blk.gate_up_weight.grad.split(blk._split_sizes("gate_up_weight"))
    return {
        "attn_q.weight": q,
        "attn_k.weight": k,
        "attn_v.weight": v,
        "attn_o.weight": blk.o_weight.grad,
        "mlp_gate.weight": g,
        "mlp_up.weight": u,
        "mlp_down.weight": blk.down_weight.grad,
        "norm1_weight": blk.norm1_weight.grad,
        "norm2_weight": blk.norm2_weight.grad,
    }


def test_inference_path_equals_training_path(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    _, blk = make_pair(64, 128, 4, 1, True, device, dtype)
    cos, sin = l3k.llama3_rope_cos_sin(9, 16, device=device)
    x = torch.randn(2, 9, 64, device=device, dtype=dtype)
    with torch.no_grad():
        y0 = blk(x, cos, sin)
    y1 = blk(x.requires_grad_(), cos, sin)
    assert torch.equal(y0, y1.detach())


def test_inference_follows_weight_changes(device):
    """The inference path keeps the weights' DLTensors between calls: an in-place update, a
    new tensor assigned to a parameter, a copy of the block and a dtype change must all be seen
    (each call checked against the training path, which borrows the weights afresh)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ref, blk = make_pair(64, 128, 4, 2, True, device, dtype)
    cos, sin = l3k.llama3_rope_cos_sin(5, 16, device=device)
    x = torch.randn(2, 5, 64, device=device, dtype=dtype)

    def check(tag):
        with torch.no_grad():
            params = [getattr(blk, n) for n in l3k.block.PARAM_NAMES]
            y = blk(x, cos, sin)
            y_fresh = torch.ops.llama3_kernels.llama_block_train(x, cos, sin, params, *blk._spec(), False)[0]
        assert torch.equal(y, y_fresh), tag
        return y

    y0 = check("first call")
    with torch.no_grad():
        blk.down_weight.mul_(0.5)  # same storage
    y1 = check("in-place update")
    assert not torch.equal(y0, y1)
    blk.o_weight.data = torch.randn_like(blk.o_weight) * 0.05  # new storage
    y2 = check("new tensor")
    assert not torch.equal(y1, y2)
    clone = copy.deepcopy(blk)
    with torch.no_grad():
        assert torch.equal(clone(x, cos, sin), y2)
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    blk.to(other)
    x = x.to(other)
    check("after a dtype change")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_recomputed_attention_output_gives_the_same_gradients(causal, device):
    """The default backward reruns the attention forward; keeping its output instead
    (recompute_attention=False) must give bitwise the same gradients (deterministic dq)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    _, keep = make_pair(64, 160, 4, 2, causal, device, dtype)
    recompute = l3k.Llama3Block(64, 160, 4, 2, causal=causal, deterministic=True).to(device, dtype)
    keep.recompute_attention, keep.deterministic = False, True
    recompute.load_state_dict(keep.state_dict())
    cos, sin = l3k.llama3_rope_cos_sin(21, 16, device=device)
    x = torch.randn(2, 21, 64, device=device, dtype=dtype)
    g = torch.randn_like(x)
    grads = []
    for blk in (keep, recompute):
        xg = x.clone().requires_grad_()
        blk(xg, cos, sin).backward(g)
        grads.append([xg.grad] + [p.grad for p in blk.parameters()])
    assert recompute.recompute_attention
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_tutorial_exercise_call(device):
    """The tutorial's test: default constructor, .half(), random (seq, head_dim/2) tables."""
    if device != "cuda":
        pytest.skip("the tutorial's check runs on the GPU in half precision")
    dim, hidden, heads, batch, seq = 512, 2048, 8, 2, 128
    blk = l3k.Llama3Block(dim, hidden, heads).cuda().half()
    x = torch.randn(batch, seq, dim, device="cuda", dtype=torch.float16)
    cos = torch.randn(seq, dim // heads // 2, device="cuda", dtype=torch.float16)
    sin = torch.randn(seq, dim // heads // 2, device="cuda", dtype=torch.float16)
    out = blk(x, cos, sin)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_compiled_block_is_one_graph_and_matches_eager(device):
    """torch.compile(fullgraph=True) of the block: no graph break, the forward and backward
    graphs hold one op each (llama_block_train, llama_block_backward: the C calls eager runs);
    output and gradients held to the float32 reference as the eager block is, and equal to
    eager bit for bit where the kernels are deterministic (the CPU path)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ref, blk = make_pair(64, 128, 4, 2, True, device, dtype)
    cos, sin = l3k.llama3_rope_cos_sin(9, 16, device=device)
    x = torch.randn(2, 9, 64, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(2, 9, 64, device=device, dtype=dtype)
    want = _reference32(ref, True, x, cos, sin, g)
    y = blk(x, cos, sin)
    y.backward(g)
    _assert_like_reference(y, x.grad, blk, want, dtype, "eager")
    eager_grads = [blk.qkv_weight.grad, blk.down_weight.grad]
    x.grad = None
    for p in blk.parameters():
        p.grad = None
    torch._dynamo.reset()
    explain = torch._dynamo.explain(blk)(x, cos, sin)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    seen = []

    def record(gm, example_inputs):
        seen.extend(str(n.target).removesuffix(".default") for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    compiled = torch.compile(blk, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    yc = compiled(x, cos, sin)
    yc.backward(g)
    kernel_ops = [t for t in seen if "llama3_kernels" in t]
    assert kernel_ops == ["llama3_kernels.llama_block_train", "llama3_kernels.llama_block_backward"], seen
    _assert_like_reference(yc, x.grad, blk, want, dtype, "compiled")
    if device == "cpu":
        assert torch.equal(yc, y)
        assert torch.equal(blk.qkv_weight.grad, eager_grads[0]) and torch.equal(blk.down_weight.grad, eager_grads[1])


def test_compiled_inference_is_one_op(device):
    """Without grad, the compiled block is the single llama_block_inference op (one C call, as
    in eager inference), and gives the eager inference output bit for bit."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    _, blk = make_pair(64, 128, 4, 2, True, device, dtype)
    cos, sin = l3k.llama3_rope_cos_sin(9, 16, device=device)
    x = torch.randn(2, 9, 64, device=device, dtype=dtype)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        y = blk(x, cos, sin)
        yc = torch.compile(blk, fullgraph=True, backend=backend)(x, cos, sin)
    kernel_ops = [t.removesuffix(".default") for t in seen if "llama3_kernels" in t]
    assert kernel_ops == ["llama3_kernels.llama_block_inference"], seen
    assert torch.equal(yc, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_eager_block_in_a_hand_captured_cuda_graph():
    """The inference path (one C call, workspace from PyTorch's allocator) captured with
    torch.cuda.graph replays correctly with new inputs copied in."""
    _, blk = make_pair(128, 256, 4, 2, True, "cuda", torch.float16)
    cos, sin = l3k.llama3_rope_cos_sin(64, 32, device="cuda")
    static_x = torch.randn(2, 64, 128, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            blk(static_x, cos, sin)  # warm-up outside capture (cuBLASLt handle, kernel attributes)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = blk(static_x, cos, sin)
        for _ in range(2):
            x = torch.randn_like(static_x)
            static_x.copy_(x)
            graph.replay()
            assert_close(static_y, blk(x, cos, sin), torch.float16, what="graph replay")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="graph replay is a CUDA feature")
def test_graph_replay_gives_the_bits_of_kernel_by_kernel_launches():
    """Training steps and inference calls repeated on the same buffers are replayed by the
    library as CUDA graphs (captured at a call's second sight, replayed from the third); with
    new contents written into the same tensors before each step (inputs, dout, a weight updated
    in place), every output and gradient is bitwise what the calls give with replay off."""
    torch.manual_seed(0)
    blk = l3k.Llama3Block(128, 256, 4, 2, deterministic=True, device="cuda", dtype=torch.bfloat16)
    start = copy.deepcopy(blk.state_dict())
    cos, sin = l3k.llama3_rope_cos_sin(33, 32, device="cuda")
    x = torch.empty(2, 33, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.empty_like(x)

    def steps(replay):
        blk.load_state_dict(start)
        prev = l3k.set_graph_replay(replay)
        gen = torch.Generator(device="cuda").manual_seed(1)
        seen = []
        try:
            for _ in range(6):
                x.grad = None
                for p in blk.parameters():
                    p.grad = None
                with torch.no_grad():
                    x.copy_(torch.randn(x.shape, generator=gen, device="cuda"))
                    dy.copy_(torch.randn(x.shape, generator=gen, device="cuda"))
                    blk.down_weight.mul_(0.9)
                    y_inference = blk(x, cos, sin)
                y = blk(x, cos, sin)
                y.backward(dy)
                grads = [p.grad for p in blk.parameters()]
                seen.append([t.detach().cpu() for t in (y_inference, y, x.grad, *grads)])
        finally:
            l3k.set_graph_replay(prev)
        return seen

    assert l3k.set_graph_replay(True) is True  # on by default
    replayed, launched = steps(True), steps(False)
    for i, (a, b) in enumerate(zip(replayed, launched)):
        for j, (u, v) in enumerate(zip(a, b)):
            assert torch.equal(u, v), f"step {i}, tensor {j}"
    assert not torch.equal(replayed[0][1], replayed[-1][1])  # the steps did see new data


def test_retain_graph_and_a_second_backward(device):
    """backward(retain_graph=True) leaves the activations intact: the next backward gives the
    same gradients bitwise (deterministic dq); after a plain backward, which consumes them, a
    further one is refused with a message that names retain_graph."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    blk = l3k.Llama3Block(64, 96, 4, 2, deterministic=True).to(device, dtype)
    cos, sin = l3k.llama3_rope_cos_sin(5, 16, device=device)
    x = torch.randn(1, 5, 64, device=device, dtype=dtype, requires_grad=True)
    y = blk(x, cos, sin).float().square().sum()
    grads = []
    for retain in (True, False):
        x.grad = None
        blk.zero_grad(set_to_none=True)
        y.backward(retain_graph=retain)
        grads.append([x.grad] + [p.grad for p in blk.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="second time.*retain_graph=True"):
        y.backward()


def test_block_ops_pass_opcheck(device):
    """The registered block ops: schemas, fake kernels (shapes of the C layout), autograd.  The
    attention backward runs deterministic: opcheck compares repeated runs bit for bit."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    _, blk = make_pair(64, 96, 4, 2, True, device, dtype)
    blk.deterministic = True
    cos, sin = l3k.llama3_rope_cos_sin(5, 16, device=device)
    x = torch.randn(2, 5, 64, device=device, dtype=dtype, requires_grad=True)
    params = [p.detach().requires_grad_() for p in blk.parameters()]
    ops = torch.ops.llama3_kernels
    for keep in (False, True):
        torch.library.opcheck(ops.llama_block_train, (x, cos, sin, params, *blk._spec(), keep))
    detached = [p.detach() for p in params]
    acts = ops.llama_block_train(x.detach(), cos, sin, detached, *blk._spec(), True)[1:]
    dout = torch.randn_like(x)
    torch.library.opcheck(ops.llama_block_backward, (dout, x.detach(), cos, sin, acts, detached, *blk._spec(), True))
    with torch.no_grad():
        torch.library.opcheck(ops.llama_block_inference, (x.detach(), cos, sin, params, *blk._spec()))
    split = [t.detach().clone().requires_grad_() for t in _split_params(blk)]
    torch.library.opcheck(ops.llama_block_train, (x, cos, sin, split, *blk._spec(), False))


def _split_params(blk):
    """The block's weights as nine separate matrices (each its own storage), SPLIT_PARAM_NAMES order."""
    q, k, v = blk.qkv_weight.detach().split(blk._split_sizes("qkv_weight"))
    g, u = blk.gate_up_weight.detach().split(blk._split_sizes("gate_up_weight"))
    return [
        t.detach().clone() for t in (q, k, v, blk.o_weight, g, u, blk.down_weight, blk.norm1_weight, blk.norm2_weight)
    ]


def test_split_weights_give_the_same_bits_wherever_they_lie(device):
    """Nine separate weights computed on as the same nine weights placed one after the other in
    one buffer: output and every gradient bit for bit (the C block never joins adjacent weight
    parts into one GEMM, which would round dx differently)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    _, blk = make_pair(64, 160, 4, 2, True, device, dtype)
    cos, sin = l3k.llama3_rope_cos_sin(7, 16, device=device)
    x = torch.randn(2, 7, 64, device=device, dtype=dtype)
    g = torch.randn_like(x)
    apart = _split_params(blk)
    whole = torch.cat([t.reshape(-1) for t in apart])
    together = [v.view_as(t) for v, t in zip(whole.split([t.numel() for t in apart]), apart)]
    results = []
    for weights in (apart, together):
        leaves = [x.clone().requires_grad_()] + [t.detach().requires_grad_() for t in weights]
        y = l3k.block.llama_block(leaves[0], cos, sin, leaves[1:], 4, 2, deterministic=True)
        y.backward(g)
        results.append([y.detach()] + [t.grad for t in leaves])
    for what, a, b in zip(["output", "dx"] + [f"grad {i}" for i in range(9)], *results):
        assert torch.equal(a, b), f"{what} depends on where the split weights lie"


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_split_weights_match_the_fused_block(compiled, device):
    """llama_block on nine separate weights (a Hugging Face layer's form) computes what the fused
    block does: output and every gradient within the block's tolerances of the float32 reference."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ref, blk = make_pair(64, 160, 4, 2, True, device, dtype)
    cos, sin = l3k.llama3_rope_cos_sin(11, 16, device=device)
    x = torch.randn(2, 11, 64, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn_like(x)
    want = _reference32(ref, True, x, cos, sin, g)
    split = [t.requires_grad_() for t in _split_params(blk)]

    def run(x):
        return l3k.block.llama_block(x, cos, sin, split, 4, 2)

    fn = torch.compile(run, fullgraph=True, backend="aot_eager") if compiled else run
    torch._dynamo.reset()
    y = fn(x)
    y.backward(g)
    names = [
        "attn_q.weight",
        "attn_k.weight",
        "attn_v.weight",
        "attn_o.weight",
        "mlp_gate.weight",
        "mlp_up.weight",
        "mlp_down.weight",
        "norm1_weight",
        "norm2_weight",
    ]
    y_ref, dx_ref, grads_ref = want
    assert_close(y, y_ref, dtype, OUT_SCALE, "split output")
    assert_close(x.grad, dx_ref, dtype, OUT_SCALE, "split dx")
    for name, t in zip(names, split):
        assert t.grad.shape == t.shape
        assert_close(t.grad, grads_ref[name], dtype, WEIGHT_GRAD_SCALE, f"split d{name}")


def test_weight_names_round_trip():
    blk = l3k.Llama3Block(64, 96, 4, 2)
    tutorial = {k: v.detach().clone() for k, v in blk.split_weights().items()}
    other = l3k.Llama3Block(64, 96, 4, 2)
    other.load_state_dict(tutorial)
    for k, v in other.split_weights().items():
        assert torch.equal(v, tutorial[k])
    with pytest.raises(KeyError, match="qkv_weight needs all of its parts, missing \\['v'\\]"):
        other.load_state_dict({k: v for k, v in tutorial.items() if k != "attn_v.weight"})


def test_matches_hugging_face_llama_decoder_layer(device):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = transformers.LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=64,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = LlamaDecoderLayer(cfg, layer_idx=0).to(device=device, dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.05)
        hf.input_layernorm.weight.normal_(1, 0.2)
        hf.post_attention_layernorm.weight.normal_(1, 0.2)
    blk = l3k.Llama3Block(128, 256, 4, 2).to(device=device, dtype=dtype)
    blk.load_state_dict({k: v.to(dtype) for k, v in hf.state_dict().items()})
    b, s = 2, 16
    x = torch.randn(b, s, 128, device=device, dtype=dtype, requires_grad=True)
    pos = torch.arange(s, device=device)[None].expand(b, s)
    cos_full, sin_full = LlamaRotaryEmbedding(cfg).to(device)(x.float(), pos)
    hf_x = x.detach().float().requires_grad_()
    mask = torch.full((s, s), float("-inf"), device=device).triu(1)[None, None]
    out = hf(hf_x, attention_mask=mask, position_ids=pos, position_embeddings=(cos_full, sin_full))
    y_ref = out[0] if isinstance(out, tuple) else out
    cos, sin = cos_full[0, :, :16].contiguous(), sin_full[0, :, :16].contiguous()
    y = blk(x, cos, sin)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g.float())
    assert_close(y, y_ref, dtype, OUT_SCALE, "output vs LlamaDecoderLayer")
    assert_close(x.grad, hf_x.grad, dtype, OUT_SCALE, "dx vs LlamaDecoderLayer")
    q_grad = blk.qkv_weight.grad[:128]
    assert_close(q_grad, hf.self_attn.q_proj.weight.grad, dtype, WEIGHT_GRAD_SCALE, "dWq vs LlamaDecoderLayer")


def test_bad_block_inputs():
    with pytest.raises(ValueError, match="n_heads 6 is not a multiple of n_kv_heads 4"):
        l3k.Llama3Block(96, 64, 6, 4)
    blk = l3k.Llama3Block(64, 96, 4)
    with pytest.raises(ValueError, match=r"x has shape \(2, 5, 32\), expected \(batch, seq, 64\)"):
        blk(torch.randn(2, 5, 32), torch.randn(5, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="rope_forward"):
        blk(torch.randn(2, 5, 64), torch.randn(3, 8), torch.randn(3, 8))  # table too short


# ---- padding: key_range ------------------------------------------------------------------------


def _padded_batch(b, s, dim, device, dtype):
    """A batch padded on the left (even rows) and the right (odd rows), garbage in the padding:
    x, key_range, the per-row valid mask and per-row RoPE tables that start every sequence at
    position 0 (as Hugging Face's position ids do)."""
    lengths = [s - 2 * i - 1 for i in range(b)]
    x = torch.randn(b, s, dim, device=device, dtype=dtype) * 3
    ranges = [[s - n, s] if i % 2 == 0 else [0, n] for i, n in enumerate(lengths)]
    key_range = torch.tensor(ranges, dtype=torch.int32, device=device)
    pos = torch.arange(s, device=device)
    start, end = key_range[:, :1].long(), key_range[:, 1:].long()
    valid = (pos >= start) & (pos < end)  # (b, s)
    positions = (pos - start).clamp(min=0)  # (b, s)
    return x, key_range, valid, positions


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "keep"])
def test_padded_rows_equal_sequences_alone(compiled, recompute, device):
    """Llama3Block(x, cos, sin, key_range=...) on a padded batch: each sequence's valid rows are
    the sequence run alone; with the loss on the valid rows only, the padded positions get no
    gradient and the weight gradients are the sum of the sequences' own."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    dim, hidden, h, hkv, b, s = 64, 128, 4, 2, 3, 11
    _, blk = make_pair(dim, hidden, h, hkv, True, device, dtype)
    blk.recompute_attention = recompute
    x, key_range, valid, positions = _padded_batch(b, s, dim, device, dtype)
    cos_full, sin_full = l3k.llama3_rope_cos_sin(s, dim // h, device=device)
    cos, sin = cos_full[positions], sin_full[positions]  # (b, s, head_dim / 2)
    g = torch.randn(b, s, dim, device=device, dtype=dtype) * valid[..., None]
    run = torch.compile(blk, fullgraph=True) if compiled else blk
    if compiled:
        torch._dynamo.reset()
    xp = x.clone().requires_grad_()
    y = run(xp, cos, sin, key_range=key_range)
    y.backward(g)
    padded_grads = {n: p.grad.clone() for n, p in blk.named_parameters()}
    assert torch.all(xp.grad[~valid] == 0), "a padded position got a gradient"
    summed = {n: torch.zeros_like(p) for n, p in blk.named_parameters()}
    for i in range(b):
        blk.zero_grad(set_to_none=True)
        lo, hi = int(key_range[i, 0]), int(key_range[i, 1])
        xa = x[i : i + 1, lo:hi].clone().requires_grad_()
        ya = blk(xa, cos_full[: hi - lo], sin_full[: hi - lo])
        ya.backward(g[i : i + 1, lo:hi])
        assert_close(y[i : i + 1, lo:hi], ya, dtype, OUT_SCALE, f"sequence {i}: output")
        assert_close(xp.grad[i : i + 1, lo:hi], xa.grad, dtype, OUT_SCALE, f"sequence {i}: dx")
        for n, p in blk.named_parameters():
            summed[n] += p.grad.float()
    for n, grad in padded_grads.items():
        assert_close(grad, summed[n], dtype, WEIGHT_GRAD_SCALE, f"d{n} against the sequences' sum")


def test_block_ops_with_key_range_pass_opcheck(device):
    """The registered block ops with a key range: schemas, fake kernels, autograd."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    _, blk = make_pair(64, 96, 4, 2, True, device, dtype)
    blk.deterministic = True
    x, key_range, _, positions = _padded_batch(2, 5, 64, device, dtype)
    cos, sin = (t[positions] for t in l3k.llama3_rope_cos_sin(5, 16, device=device))
    x.requires_grad_()
    params = [p.detach().requires_grad_() for p in blk.parameters()]
    ops = torch.ops.llama3_kernels
    for keep in (False, True):
        torch.library.opcheck(ops.llama_block_train, (x, cos, sin, params, *blk._spec(), keep, key_range))
    detached = [p.detach() for p in params]
    acts = ops.llama_block_train(x.detach(), cos, sin, detached, *blk._spec(), True, key_range)[1:]
    dout = torch.randn_like(x)
    torch.library.opcheck(
        ops.llama_block_backward, (dout, x.detach(), cos, sin, acts, detached, *blk._spec(), True, key_range)
    )
    with torch.no_grad():
        torch.library.opcheck(ops.llama_block_inference, (x.detach(), cos, sin, params, *blk._spec(), key_range))
        eager = blk(x.detach(), cos, sin, key_range=key_range)
        assert torch.equal(ops.llama_block_inference(x.detach(), cos, sin, params, *blk._spec(), key_range), eager)

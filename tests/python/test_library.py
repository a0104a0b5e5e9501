"""torch.library registrations (made with each op, python/llama3_kernels/ops/): every op is an opaque
torch.ops.llama3_kernels.* operator that passes torch.library.opcheck, whose fake kernel
matches the real outputs (shape, dtype, strides), that torch.compile(fullgraph=True) traces
with no graph break forward and backward (the backward through the registered backward
ops), without a recompile per sequence length under dynamic=True, and that replays
correctly inside a CUDA graph (GPU only).

Most compile tests use the aot_eager backend (Dynamo + AOTAutograd, which is what runs
the fake kernels and traces the backward) because Inductor's C++ compile is slow on a CPU;
one test runs the real Inductor backend over every op at once.
"""

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from torch._dynamo.backends.common import aot_autograd
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map

import llama3_kernels as l3k
from conftest import DEVICES, TOL, assert_close
from llama3_kernels.modules import RMSNorm, RotaryEmbedding, SwiGLUMLP

ops = torch.ops.llama3_kernels
CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")


def _dtype(device):
    # Attention runs float16/bfloat16 on CUDA; the CPU reference takes float32 too.
    return torch.float32 if device == "cpu" else torch.bfloat16


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ---- inputs ------------------------------------------------------------------------------

B, H, HKV, D = 2, 4, 2, 64


def _t(*shape, device, dtype, grad=False, scale=1.0):
    t = torch.randn(*shape, device=device, dtype=torch.float32) * scale
    return t.to(dtype).requires_grad_(grad)


def _tables(s, device):
    return l3k.llama3_rope_cos_sin(s + 2, D, device=device)


def _qkv(s, device, dtype, grad=False):
    q = _t(B, H, s, D, device=device, dtype=dtype, grad=grad)
    k = _t(B, HKV, s, D, device=device, dtype=dtype, grad=grad)
    v = _t(B, HKV, s, D, device=device, dtype=dtype, grad=grad)
    return q, k, v


def op_cases(device, grad=True):
    """(id, op overload, args) for every registered op."""
    dt = _dtype(device)
    kw = dict(device=device, dtype=dt)
    s, n = 7, 48
    x = _t(3, s, n, grad=grad, **kw)
    w = _t(n, grad=grad, **kw)
    r = _t(3, s, n, grad=grad, **kw)
    with torch.no_grad():
        _, rstd = ops.rms_norm(x, w, 1e-5)
        h, _, rstd2 = ops.add_rms_norm(x, r, w, 1e-5)
    dy = _t(3, s, n, **kw)
    q, k, v = _qkv(s, device, dt, grad)
    cos, sin = _tables(s, device)
    g, u = _t(3, s, 40, grad=grad, **kw), _t(3, s, 40, grad=grad, **kw)
    gu = _t(3, s, 80, grad=grad, **kw)
    W = _t(32, n, grad=grad, **kw, scale=n**-0.5)
    with torch.no_grad():
        o, lse = ops.flash_attn(q, k, v, True, 0.0, False)
    do = _t(*o.shape, **kw)
    wg, wu, wd = (
        _t(40, n, grad=grad, **kw, scale=n**-0.5),
        _t(40, n, grad=grad, **kw, scale=n**-0.5),
        _t(n, 40, grad=grad, **kw, scale=40**-0.5),
    )
    with torch.no_grad():
        _, gu_mlp = ops.swiglu_mlp(x, wg, wu, wd)
    det = device == "cpu"
    d = lambda t: t.detach()
    return [
        ("rms_norm", ops.rms_norm.default, (x, w, 1e-5)),
        ("rms_norm_backward", ops.rms_norm_backward.default, (dy, d(x), d(w), rstd, 1e-5, True)),
        ("rms_norm_backward_nodw", ops.rms_norm_backward.default, (dy, d(x), d(w), rstd, 1e-5, False)),
        ("add_rms_norm", ops.add_rms_norm.default, (x, r, w, 1e-5)),
        (
            "add_rms_norm_backward",
            ops.add_rms_norm_backward.default,
            (dy, _t(3, s, n, **kw), h, d(w), rstd2, 1e-5, True),
        ),
        ("rope", ops.rope.default, (q, k, cos, sin, 1, False)),
        ("rope_q_only_interleaved", ops.rope.default, (q, None, cos, sin, 0, True)),
        ("rope_backward", ops.rope_backward.default, (d(q), d(k), cos, sin, 1, False)),
        ("rope_", ops.rope_.default, (d(q).clone(), d(k).clone(), cos, sin, 2, False)),
        ("rope_backward_", ops.rope_backward_.default, (d(q).clone(), d(k).clone(), cos, sin, 2, True)),
        ("swiglu", ops.swiglu.default, (g, u)),
        ("swiglu_backward", ops.swiglu_backward.default, (_t(3, s, 40, **kw), d(g), d(u))),
        ("swiglu_fused", ops.swiglu_fused.default, (gu,)),
        ("swiglu_fused_backward", ops.swiglu_fused_backward.default, (_t(3, s, 40, **kw), d(gu))),
        ("swiglu_mlp", ops.swiglu_mlp.default, (x, wg, wu, wd)),
        ("swiglu_mlp_backward", ops.swiglu_mlp_backward.default, (dy, d(x), d(wg), d(wu), d(wd), gu_mlp)),
        (
            "swiglu_mlp_backward_dx_only",
            ops.swiglu_mlp_backward.default,
            (dy, d(x), d(wg), d(wu), d(wd), gu_mlp, True, False, False),
        ),
        ("flash_attn", ops.flash_attn.default, (q, k, v, True, 0.0, False)),
        ("flash_attn_noncausal_scaled", ops.flash_attn.default, (q, k, v, False, 0.1, False)),
        ("flash_attn_backward", ops.flash_attn_backward.default, (do, d(q), d(k), d(v), o, lse, True, 0.0, det)),
        ("linear", ops.linear.default, (x, W, None)),
        ("linear_residual", ops.linear.default, (x, W, _t(3, s, 32, grad=grad, **kw))),
        ("linear_backward_input", ops.linear_backward_input.default, (_t(3, s, 32, **kw), d(W))),
        ("linear_backward_weight", ops.linear_backward_weight.default, (_t(3, s, 32, **kw), d(x))),
    ]


CASE_IDS = [c[0] for c in op_cases("cpu", grad=False)]


# ---- opcheck and fake kernels ----------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASE_IDS)
def test_opcheck(device, case):
    _, op, args = next(c for c in op_cases(device) if c[0] == case)
    dt = _dtype(device)
    torch.library.opcheck(op, args, atol=TOL[dt]["atol"] * 10, rtol=TOL[dt]["rtol"] * 10)


def _strided_variants(case, args):
    """Inputs as views the kernels take without a copy (and one they must copy)."""
    if case == "rope":  # q and k as views of one fused QKV projection
        q, k = args[0].detach(), args[1].detach()
        b, h, s, d = q.shape
        qkv = torch.randn(b, s, h + 2 * k.shape[1], d, dtype=q.dtype, device=q.device)
        return [(qkv[:, :, :h].transpose(1, 2), qkv[:, :, h : h + k.shape[1]].transpose(1, 2)) + args[2:]]
    if case == "rms_norm":  # rows of a wider tensor, and a transposed input (copied)
        x = args[0].detach()
        wide = torch.randn(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        return [(wide[..., : x.shape[-1]],) + args[1:], (x.transpose(0, 1),) + args[1:]]
    if case == "flash_attn":  # (B, S, H, D) buffers viewed as (B, H, S, D)
        return [tuple(t.detach().transpose(1, 2).contiguous().transpose(1, 2) for t in args[:3]) + args[3:]]
    if case == "swiglu_fused":
        gu = args[0].detach()
        return [(gu[:, ::2],)]
    return []


@pytest.mark.parametrize("device", DEVICES)
def test_fake_matches_real(device):
    """Fake outputs have the real outputs' shapes, dtypes and strides (also for strided inputs)."""
    for case, op, args in op_cases(device, grad=False):
        for a in [args] + _strided_variants(case, args):
            if case in ("rope_", "rope_backward_"):
                continue  # returns nothing
            real = op(*a)
            mode = FakeTensorMode()
            fake_args = tree_map(lambda t, mode=mode: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, a)
            with mode:
                fake = op(*fake_args)
            real = real if isinstance(real, tuple) else (real,)
            fake = fake if isinstance(fake, tuple) else (fake,)
            assert len(real) == len(fake), case
            for i, (r, f) in enumerate(zip(real, fake)):
                what = f"{case} output {i}"
                assert r.shape == f.shape, what
                assert r.dtype == f.dtype, what
                assert r.stride() == f.stride(), what
                assert r.device == f.device, what


def test_eager_route_and_registered_op_share_one_body():
    """Eager calls run the body in the op's eager autograd.Function (no dispatcher); the
    registered op runs the same body under its registered autograd, with the same backward:
    equal values and gradients, bit for bit."""
    from llama3_kernels.ops import rmsnorm

    x = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    y_eager = l3k.rms_norm(x, w)
    y_op = ops.rms_norm(x, w, 1e-5)[0]
    assert type(y_eager.grad_fn).__name__ == "RMSNormFunctionBackward"
    assert "GeneratedBackwardFor_llama3_kernels" in type(y_op.grad_fn).__name__
    assert rmsnorm.RMSNormFunction.backward is rmsnorm._rms_norm_grads
    dy = torch.randn(4, 16)
    g_eager = torch.autograd.grad(y_eager, (x, w), dy)
    g_op = torch.autograd.grad(y_op, (x, w), dy)
    assert torch.equal(y_eager, y_op)
    for a, b in zip(g_eager, g_op):
        assert torch.equal(a, b)


def test_traced_inputs_take_the_registered_op():
    """Under a dispatch mode (here make_fx) or with fake tensors, the public ops call the
    registered ops, so tracers record them instead of running the C call."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x, w = torch.randn(4, 16), torch.randn(16)
    gm = make_fx(lambda x, w: l3k.rms_norm(x, w))(x, w)
    assert "llama3_kernels.rms_norm.default" in Recorder.targets([gm])
    with FakeTensorMode() as mode:
        y = l3k.rms_norm(mode.from_tensor(x), mode.from_tensor(w))
    assert y.shape == x.shape


def test_rope_inplace_op_autograd():
    """rope_ through the dispatcher with grad: in-place on views of one tensor, gradients
    equal the eager op's."""
    s = 5
    cos, sin = _tables(s, "cpu")
    x = torch.randn(B, s, H + 2 * HKV, D, requires_grad=True)
    dout = torch.randn(B, s, H + 2 * HKV, D)

    def through_op(q, k, cos, sin):
        ops.rope_(q, k, cos, sin)

    grads = []
    for fn in (l3k.rope_, through_op):
        base = x * 1.0
        q, k = base[:, :, :H].transpose(1, 2), base[:, :, H : H + HKV].transpose(1, 2)
        fn(q, k, cos, sin)
        (gx,) = torch.autograd.grad(base, x, dout)
        grads.append((base.detach(), gx))
    assert_close(grads[1][0], grads[0][0], what="rope_ values")
    assert_close(grads[1][1], grads[0][1], what="rope_ grad")


# ---- torch.compile ------------------------------------------------------------------------------


class Recorder:
    """A torch.compile backend: AOTAutograd with no-op compilers that keeps the forward and
    backward graphs and counts Dynamo frames (one per graph: a break or a recompile adds one)."""

    def __init__(self):
        self.frames, self.fw, self.bw = 0, [], []

    def __call__(self, gm, example_inputs):
        from functorch.compile import make_boxed_func

        self.frames += 1

        def keep(graphs):
            def compiler(g, _):
                graphs.append(g)
                return make_boxed_func(g.forward)

            return compiler

        return aot_autograd(fw_compiler=keep(self.fw), bw_compiler=keep(self.bw))(gm, example_inputs)

    @staticmethod
    def targets(graphs):
        """Names of the ops called in `graphs` (also those wrapped by auto_functionalized)."""
        names = set()
        for g in graphs:
            for n in g.graph.nodes:
                if n.op == "call_function":
                    names.add(str(n.target))
                    names.update(str(a) for a in n.args if isinstance(a, torch._ops.OpOverload))
        return names


def _run(fn, args):
    """Forward output and the gradients of every input that requires grad."""
    args = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
    out = fn(*args)
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None]
    gen = torch.Generator().manual_seed(1)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outs)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad(loss, leaves) if leaves else ()
    return [o.detach() for o in outs], list(grads)


def _compare(fn, args, backend, dtype, dynamic=False):
    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic)
    out_e, g_e = _run(fn, args)
    out_c, g_c = _run(compiled, args)
    for i, (a, b) in enumerate(zip(out_c, out_e)):
        assert_close(a, b, dtype, scale=4, what=f"output {i}")
    assert len(g_c) == len(g_e)
    for i, (a, b) in enumerate(zip(g_c, g_e)):
        assert_close(a, b, dtype, scale=4, what=f"grad {i}")


def _fn_cases(device):
    """(id, function of public ops, args, ops expected in the forward / backward graphs)."""
    dt = _dtype(device)
    kw = dict(device=device, dtype=dt)
    s, n = 6, 32
    cos, sin = _tables(s, device)
    x, w, r = _t(2, s, n, grad=True, **kw), _t(n, grad=True, **kw), _t(2, s, n, grad=True, **kw)
    q, k, v = _qkv(s, device, dt, grad=True)
    W = _t(24, n, grad=True, **kw, scale=n**-0.5)
    Wqkv = _t((H + 2 * HKV) * D, n, grad=True, **kw, scale=n**-0.5)

    def rope_inplace_on_qkv(x, wqkv):  # the block's pattern: RoPE in place on views of QKV
        qkv = (x @ wqkv.t()).view(x.shape[0], x.shape[1], H + 2 * HKV, D)
        qh, kh = qkv[:, :, :H].transpose(1, 2), qkv[:, :, H : H + HKV].transpose(1, 2)
        vh = qkv[:, :, H + HKV :].transpose(1, 2)
        l3k.triton_rope(qh, kh, cos, sin)
        return l3k.flash_attn(qh, kh, vh, causal=True)

    return [
        ("rms_norm", lambda x, w: l3k.rms_norm(x, w) * 2, (x, w), "rms_norm", "rms_norm_backward"),
        ("add_rms_norm", lambda x, r, w: l3k.add_rms_norm(x, r, w), (x, r, w), "add_rms_norm", "add_rms_norm_backward"),
        ("rope", lambda q, k: l3k.rope(q, k, cos, sin, offset=1), (q, k), "rope", "rope_backward"),
        (
            "rope_",
            lambda q, k: l3k.rope_(q * 1.0, k * 1.0, cos, sin, interleaved=True),
            (q, k),
            "rope_",
            "rope_backward_",
        ),
        (
            "rope_no_grad",
            lambda q, k: l3k.rope_(q.clone(), k.clone(), cos, sin),
            (q.detach(), k.detach()),
            "rope_",
            None,
        ),
        ("rope_inplace_qkv_views", rope_inplace_on_qkv, (x, Wqkv), "rope_", "rope_backward_"),
        ("swiglu", lambda g, u: l3k.swiglu(g, u), (x, r), "swiglu", "swiglu_backward"),
        ("swiglu_fused", lambda gu: l3k.swiglu_fused(gu), (x,), "swiglu_fused", "swiglu_fused_backward"),
        (
            "swiglu_mlp",
            lambda x, a, b, c: l3k.triton_swiglu(x, a, b, c.t()),
            (x, W, W * 0.5, W * 2),
            "swiglu_mlp",
            "swiglu_mlp_backward",
        ),
        (
            "flash_attn",
            lambda q, k, v: l3k.triton_flash_attn(q, k, v, causal=True),
            (q, k, v),
            "flash_attn",
            "flash_attn_backward",
        ),
        (
            "linear_residual",
            lambda x, w, r: l3k.linear(x, w, r),
            (x, W, _t(2, s, 24, grad=True, **kw)),
            "linear",
            "linear_backward_weight",
        ),
    ]


FN_IDS = [c[0] for c in _fn_cases("cpu")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", FN_IDS)
def test_compile_fullgraph(device, case):
    """fullgraph=True (a graph break raises), one Dynamo frame, our ops in the forward graph and
    our backward ops in the backward graph, values and gradients equal to eager."""
    _, fn, args, fw_op, bw_op = next(c for c in _fn_cases(device) if c[0] == case)
    rec = Recorder()
    _compare(fn, args, rec, _dtype(device))
    assert rec.frames == 1
    assert f"llama3_kernels.{fw_op}.default" in Recorder.targets(rec.fw)
    if bw_op is not None:
        assert f"llama3_kernels.{bw_op}.default" in Recorder.targets(rec.bw)


def _all_ops(x, r, w, wqkv, wo, wgu, wd, cos, sin):
    """Every routed op once: a small pre-norm attention + MLP block of public ops."""
    b, s, n = x.shape
    h, y = l3k.add_rms_norm(x, r, w)
    qkv = l3k.linear(y, wqkv).view(b, s, H + 2 * HKV, D)
    q, k, v = (
        qkv[:, :, :H].transpose(1, 2),
        qkv[:, :, H : H + HKV].transpose(1, 2),
        qkv[:, :, H + HKV :].transpose(1, 2),
    )
    q, k = l3k.rope(q, k, cos, sin)
    q2, k2 = l3k.rope_(q * 1.0, k * 1.0, cos, sin, interleaved=True)
    o = l3k.flash_attn(q2, k2, v, causal=True).transpose(1, 2).reshape(b, s, H * D)
    h = l3k.linear(o, wo, h)
    gu = l3k.linear(l3k.rms_norm(h, w), wgu)
    a = l3k.swiglu_fused(gu) + l3k.swiglu(gu[..., : wd.shape[1]], gu[..., wd.shape[1] :])
    return l3k.linear(a, wd, h)


def test_inductor_all_ops_dynamic():
    """The Inductor backend over every op, forward and backward, dynamic=True over two
    sequence lengths with one compile (no recompile per length)."""
    dt, kw = torch.float32, dict(device="cpu", dtype=torch.float32)
    n, hid = H * D, 48
    ws = [
        _t(n, grad=True, **kw),
        _t((H + 2 * HKV) * D, n, grad=True, **kw, scale=n**-0.5),
        _t(n, H * D, grad=True, **kw, scale=n**-0.5),
        _t(2 * hid, n, grad=True, **kw, scale=n**-0.5),
        _t(n, hid, grad=True, **kw, scale=hid**-0.5),
    ]
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(_all_ops, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for s in (5, 9):
        x, r = _t(1, s, n, grad=True, **kw), _t(1, s, n, grad=True, **kw)
        cos, sin = _tables(s, "cpu")
        args = (x, r, *ws, cos, sin)
        out_e, g_e = _run(_all_ops, args)
        out_c, g_c = _run(compiled, args)
        frames.append(counter.frame_count)
        assert_close(out_c[0], out_e[0], dt, scale=10, what=f"s={s} output")
        for i, (a, b) in enumerate(zip(g_c, g_e)):
            assert_close(a, b, dt, scale=10, what=f"s={s} grad {i}")
    # The second length compiles nothing new.  (Some torch versions restart the first
    # trace once, so the first length may count two frames: torch 2.15 does.)
    assert frames[0] in (1, 2) and frames[1] == frames[0], frames
    assert {"llama3_kernels.flash_attn", "llama3_kernels.rope_", "llama3_kernels.swiglu_fused"} <= Recorder.targets(
        counter.graphs
    )


def _on_copies(rotary):
    """The in-place module applied to copies of q and k (non-leaf inputs, as autograd requires)."""
    return lambda q, k: rotary(q * 1.0, k * 1.0, offset=1)


@pytest.mark.parametrize("device", DEVICES)
def test_modules_dynamic(device):
    """RMSNorm, SwiGLUMLP and RotaryEmbedding (both modes) compiled with dynamic=True: one
    graph each over two sequence lengths, forward and backward equal to eager."""
    dt = _dtype(device)
    kw = dict(device=device, dtype=dt)
    n = 32
    norm = RMSNorm(n, **kw)
    mlp = SwiGLUMLP(n, 40, **kw)
    ropes = [
        RotaryEmbedding(D, max_seq_len=16, device=device),
        RotaryEmbedding(D, max_seq_len=16, inplace=True, interleaved=True, device=device),
    ]
    with torch.no_grad():
        norm.weight.normal_()
    cases = [
        ("RMSNorm", norm, lambda s: (_t(2, s, n, grad=True, **kw),)),
        ("SwiGLUMLP", mlp, lambda s: (_t(2, s, n, grad=True, **kw),)),
    ]
    for i, m in enumerate(ropes):
        # the in-place module rotates a non-leaf: wrap it so the inputs are intermediates
        cases.append((f"RotaryEmbedding{i}", _on_copies(m), lambda s: _qkv(s, device, dt, grad=True)[:2]))
    for name, m, make in cases:
        rec = Recorder()
        compiled = torch.compile(m, backend=rec, fullgraph=True, dynamic=True)
        frames = []
        for s in (5, 11):
            args = make(s)
            out_e, g_e = _run(m, args)
            out_c, g_c = _run(compiled, args)
            for a, b in zip(out_c, out_e):
                assert_close(a, b, dt, scale=4, what=f"{name} s={s}")
            for a, b in zip(g_c, g_e):
                assert_close(a, b, dt, scale=4, what=f"{name} s={s} grad")
            frames.append(rec.frames)
        # (a module's float attribute, e.g. eps, makes Dynamo restart the first trace once
        # with the float specialized: the backend then sees the frame twice, before any
        # second length; what matters is that the second length compiles nothing new)
        assert frames[1] == frames[0], f"{name}: recompiled for the second sequence length"
        assert any("llama3_kernels" in t for t in Recorder.targets(rec.fw))


def test_module_parameter_grads_compiled():
    """Compiled modules accumulate the same parameter gradients as eager ones."""
    n = 32
    for make in (lambda: RMSNorm(n), lambda: SwiGLUMLP(n, 40)):
        torch.manual_seed(0)
        m_e, m_c = make(), make()
        m_c.load_state_dict(m_e.state_dict())
        x = torch.randn(2, 7, n)
        m_e(x).square().sum().backward()
        torch.compile(m_c, backend=Recorder(), fullgraph=True)(x).square().sum().backward()
        for (name, p_e), p_c in zip(m_e.named_parameters(), m_c.parameters()):
            assert_close(p_c.grad, p_e.grad, torch.float32, scale=4, what=name)


# ---- CUDA graphs ----------------------------------------------------------------------------------


def _graph_replays(fn, inputs, fresh):
    """Capture fn(*inputs) in a CUDA graph, copy `fresh` into the static inputs, replay, and
    return (replayed outputs, eager outputs on `fresh`)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up (workspaces, cuBLASLt handles) on the capture stream
            fn(*inputs)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        out = fn(*inputs)
    with torch.no_grad():
        for dst, src in zip(inputs, fresh):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    ref = fn(*[f.detach().clone().requires_grad_(f.requires_grad) if isinstance(f, torch.Tensor) else f for f in fresh])
    return out, ref


@requires_cuda
@pytest.mark.parametrize("case", CASE_IDS)
def test_cuda_graph_ops(case):
    """Each registered op (forward and backward) captured in a CUDA graph replays correctly
    on new inputs copied into the captured buffers."""
    _, op, args = next(c for c in op_cases("cuda", grad=False) if c[0] == case)
    _, _, fresh = next(c for c in op_cases("cuda", grad=False) if c[0] == case)
    if case == "flash_attn_backward":  # o and lse must come from the forward of the same q, k, v
        fresh = args
    static = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    if case in ("rope_", "rope_backward_"):

        def fn(q, k, *rest):
            op(q, k, *rest)
            return q, k
    else:
        fn = op
    out, ref = _graph_replays(fn, static, fresh)
    out = out if isinstance(out, tuple) else (out,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    for i, (a, b) in enumerate(zip(out, ref)):
        assert a.shape == b.shape
        assert_close(a, b, _dtype("cuda"), scale=4, what=f"{case} output {i}")


@requires_cuda
def test_cuda_graph_public_ops_training_step():
    """A forward + backward of public ops (direct ctypes path) captured in one CUDA graph."""
    dt, kw = torch.bfloat16, dict(device="cuda", dtype=torch.bfloat16)
    s, n = 16, H * D
    cos, sin = _tables(s, "cuda")
    w = _t(n, grad=True, **kw)
    wqkv = _t((H + 2 * HKV) * D, n, grad=True, **kw, scale=n**-0.5)

    def step(x):
        y = l3k.rms_norm(x, w)
        qkv = l3k.linear(y, wqkv).view(1, s, H + 2 * HKV, D)
        q, k, v = (
            qkv[:, :, :H].transpose(1, 2),
            qkv[:, :, H : H + HKV].transpose(1, 2),
            qkv[:, :, H + HKV :].transpose(1, 2),
        )
        q, k = l3k.rope(q, k, cos, sin)
        o = l3k.flash_attn(q, k, v, causal=True)
        a = l3k.swiglu_fused(o.transpose(1, 2).reshape(1, s, -1))
        gx, gw = torch.autograd.grad(a.float().square().sum(), (x, w))
        return a.detach(), gx, gw

    x_static = _t(1, s, n, grad=True, **kw)
    x_new = _t(1, s, n, grad=True, **kw)
    out, ref = _graph_replays(step, [x_static], [x_new])
    for i, (a, b) in enumerate(zip(out, ref)):
        assert_close(a, b, dt, what=f"output {i}")


@requires_cuda
def test_compile_reduce_overhead_cuda():
    """torch.compile(mode="reduce-overhead") (Inductor + CUDA graphs) over every op."""
    kw = dict(device="cuda", dtype=torch.bfloat16)
    n, hid, s = H * D, 64, 16
    ws = [
        _t(n, **kw),
        _t((H + 2 * HKV) * D, n, **kw, scale=n**-0.5),
        _t(n, H * D, **kw, scale=n**-0.5),
        _t(2 * hid, n, **kw, scale=n**-0.5),
        _t(n, hid, **kw, scale=hid**-0.5),
    ]
    cos, sin = _tables(s, "cuda")
    compiled = torch.compile(_all_ops, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(3):  # record, then replay
            x, r = _t(1, s, n, **kw), _t(1, s, n, **kw)
            out = compiled(x, r, *ws, cos, sin).clone()
            ref = _all_ops(x, r, *ws, cos, sin)
            assert_close(out, ref, torch.bfloat16, scale=4, what="reduce-overhead")


@requires_cuda
def test_block_reduce_overhead_uses_cudagraphs_cuda():
    """torch.compile(TritonLlama3Block, mode="reduce-overhead"): Inductor skips no CUDA graph
    for this library's ops, and the replays match the eager block."""
    from torch._dynamo.utils import counters

    from llama3_kernels.block import TritonLlama3Block

    dim, hid, s = H * D, 128, 16
    m = TritonLlama3Block(dim, hid, H, HKV).to("cuda", torch.bfloat16)
    cos, sin = l3k.llama3_rope_cos_sin(s, D)
    cos, sin = cos.cuda(), sin.cuda()
    counters.clear()
    compiled = torch.compile(m, mode="reduce-overhead")
    with torch.no_grad():
        for _ in range(3):  # warm-up, record, replay
            x = torch.randn(2, s, dim, device="cuda", dtype=torch.bfloat16)
            out = compiled(x, cos, sin).clone()
            assert_close(out, m(x, cos, sin), torch.bfloat16, scale=4, what="reduce-overhead block")
    assert counters["inductor"].get("cudagraph_skips", 0) == 0, dict(counters["inductor"])

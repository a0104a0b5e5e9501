"""Flash attention against a float64/float32 PyTorch reference: o, lse and all three
gradients over dtypes, causal (bottom-right) and not, GQA ratios, odd sequence lengths,
seq_q != seq_k, head_dim 64/128/40, strided views; and the bad-input errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import llama3_kernels as l3k
from conftest import assert_close, poison


def reference(q, k, v, causal, scale=None):
    """Attention in float64 (CPU) or float32 (CUDA) with an explicit bottom-right mask."""
    ref_dtype = torch.float64 if q.device.type == "cpu" else torch.float32
    q, k, v = (t.to(ref_dtype) for t in (q, k, v))
    h, hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(h // hkv, dim=1)
    v = v.repeat_interleave(h // hkv, dim=1)
    sq, sk, d = q.shape[2], k.shape[2], q.shape[3]
    s = (q @ k.transpose(-1, -2)) * (scale or 1 / math.sqrt(d))
    if causal:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        s = s.masked_fill(j > i + sk - sq, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # fully masked rows: zeros
    return p @ v, lse


CPU_CASES = [  # batch, heads, kv heads, seq_q, seq_k, head_dim
    (1, 2, 2, 1, 1, 64),
    (2, 4, 1, 17, 17, 64),
    (1, 4, 2, 33, 70, 40),
    (3, 2, 2, 64, 48, 128),
]
CUDA_CASES = CPU_CASES + [
    (2, 8, 2, 128, 128, 128),
    (1, 8, 1, 1000, 1000, 64),
    (1, 4, 4, 300, 1000, 128),
    (2, 32, 8, 2048, 2048, 128),
    (1, 8, 8, 203, 113, 96),
]


def cases(device):
    return CUDA_CASES if device == "cuda" else CPU_CASES


@pytest.mark.parametrize("idx", range(len(CUDA_CASES)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_forward_backward(idx, causal, dtype, device):
    if idx >= len(cases(device)):
        pytest.skip("large case runs on CUDA only")
    if device == "cuda" and dtype == torch.float32:
        pytest.skip("float32 attention runs on the CPU reference only")
    b, h, hkv, sq, sk, d = cases(device)[idx]
    q = torch.randn(b, h, sq, d, device=device).to(dtype).requires_grad_()
    k = torch.randn(b, hkv, sk, d, device=device).to(dtype).requires_grad_()
    v = torch.randn(b, hkv, sk, d, device=device).to(dtype).requires_grad_()

    o = poison(torch.empty_like(q))
    lse = poison(torch.empty(b, h, sq, device=device))
    l3k.attention_forward_into(q.detach(), k.detach(), v.detach(), o, lse, causal)
    o_ref, lse_ref = reference(q, k, v, causal)
    assert_close(o, o_ref, dtype, what="o")
    finite = torch.isfinite(lse_ref)
    assert torch.all(torch.isinf(lse[~finite]) & (lse[~finite] > 0)), "fully masked rows: lse = +inf"
    assert_close(
        lse[finite], lse_ref[finite].float(), torch.float32, scale=100 if dtype != torch.float32 else 1, what="lse"
    )

    out = l3k.flash_attn(q, k, v, causal=causal)
    dout = torch.randn_like(out)
    out.backward(dout)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    o64, _ = reference(qr, kr, vr, causal)
    o64.backward(dout.double())
    grad_scale = 2 * max(1.0, math.sqrt(sk / 128))
    assert_close(q.grad, qr.grad, dtype, grad_scale, "dq")
    assert_close(k.grad, kr.grad, dtype, grad_scale, "dk")
    assert_close(v.grad, vr.grad, dtype, grad_scale, "dv")


def test_views_of_fused_qkv_projection(device):
    """q, k, v as (b, s, h, d).transpose(1, 2) views of one projection output: no copy."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    b, s, h, hkv, d = 2, 37, 4, 2, 64
    qkv = torch.randn(b, s, (h + 2 * hkv) * d, device=device, dtype=dtype)
    q = qkv[..., : h * d].view(b, s, h, d).transpose(1, 2)
    k = qkv[..., h * d : (h + hkv) * d].view(b, s, hkv, d).transpose(1, 2)
    v = qkv[..., (h + hkv) * d :].view(b, s, hkv, d).transpose(1, 2)
    o = l3k.flash_attn(q, k, v, causal=True)
    assert o.transpose(1, 2).is_contiguous(), "o is stored as (b, s, h, d)"
    assert_close(o, reference(q, k, v, True)[0], dtype, what="o")


def test_against_sdpa_and_tutorial_name(device):
    dtype = torch.float16 if device == "cuda" else torch.float32
    q, k, v = (torch.randn(2, 4, 50, 64, device=device, dtype=dtype) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert_close(l3k.triton_flash_attn(q, k, v), ref, dtype, what="non-causal (the tutorial's)")
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert_close(l3k.flash_attn(q, k, v, causal=True), ref, dtype, what="causal, seq_q == seq_k")
    assert_close(
        l3k.flash_attn(q, k, v, scale=0.3),
        F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=0.3),
        dtype,
        what="scale",
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_deterministic_backward_is_bitwise_reproducible():
    q, k, v = (torch.randn(1, 8, 300, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grads = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        l3k.flash_attn(q, k, v, causal=True, deterministic=True).sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


BAD = [
    (
        "head_dim mismatch",
        lambda q, k, v: (q, k[..., :32], v[..., :32]),
        ValueError,
        "k head_dim is 32, expected 64 like q",
    ),
    (
        "heads ratio",
        lambda q, k, v: (q[:, :3], k[:, :2], v[:, :2]),
        ValueError,
        "q has 3 heads, expected a multiple of k's 2 heads",
    ),
    (
        "k/v seq mismatch",
        lambda q, k, v: (q, k, v[:, :, :5]),
        ValueError,
        "v shape (1, 2, 5, 64), expected (1, 2, 9, 64) like k",
    ),
    (
        "head_dim not a multiple of 8",
        lambda q, k, v: (q[..., :36], k[..., :36], v[..., :36]),
        ValueError,
        "head_dim is 36, expected a multiple of 8 in [8, 256]",
    ),
    ("dtype mixing", lambda q, k, v: (q, k.double(), v), TypeError, "k dtype float64, expected"),
    (
        "head_dim strided",
        lambda q, k, v: (q, k, v.transpose(2, 3).contiguous().transpose(2, 3)),
        ValueError,
        "v stride[3] is 9, expected 1",
    ),
    ("3-D q", lambda q, k, v: (q[0], k, v), ValueError, "q has ndim 3, expected 4"),
]


def test_output_overlapping_an_input_is_rejected(device):
    dtype = torch.float16 if device == "cuda" else torch.float32
    q = torch.randn(1, 2, 8, 64, device=device, dtype=dtype)
    k = torch.randn(1, 2, 8, 64, device=device, dtype=dtype)
    lse = torch.empty(1, 2, 8, device=device)
    with pytest.raises(ValueError, match="attention_forward: o overlaps q, expected separate memory"):
        l3k.attention_forward_into(q, k, k, q, lse)


@pytest.mark.parametrize("case", BAD, ids=lambda c: c[0])
def test_bad_inputs(device, case):
    name, make, exc, message = case
    dtype = torch.float16 if device == "cuda" else torch.float32
    q = torch.randn(1, 4, 7, 64, device=device, dtype=dtype)
    k = torch.randn(1, 2, 9, 64, device=device, dtype=dtype)
    v = torch.randn(1, 2, 9, 64, device=device, dtype=dtype)
    q, k, v = make(q, k, v)
    o = (
        torch.full(q.shape, 5.0, device=device, dtype=dtype)
        if q.dim() == 4
        else torch.full((1, 4, 7, 64), 5.0, device=device, dtype=dtype)
    )
    lse = torch.empty(o.shape[:3], device=device)
    with pytest.raises(exc) as info:
        l3k.attention_forward_into(q, k, v, o, lse, causal=True)
    assert str(info.value).startswith("attention_forward: ") and message in str(info.value), str(info.value)
    assert torch.all(o == 5.0)

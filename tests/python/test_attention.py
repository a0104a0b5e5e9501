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


# ---- per-sequence key ranges (padding) ---------------------------------------------------------


def padded_ranges(b, s, side, device):
    """(batch, 2) int32 key ranges of a padded batch of length s: sequence i keeps s - 3i positions
    (at least 1), at the end (left padding) or the start (right padding); 'mixed' alternates and
    gives the last sequence an empty range and the first the full one."""
    lengths = [max(1, s - 3 * i) for i in range(b)]
    rows = []
    for i, n in enumerate(lengths):
        left = side == "left" or (side == "mixed" and i % 2 == 1)
        rows.append([s - n, s] if left else [0, n])
    if side == "mixed" and b > 2:
        rows[0], rows[-1] = [0, s], [s // 2, s // 2]
    return torch.tensor(rows, dtype=torch.int32, device=device)


def allowed_mask(key_range, sq, sk, causal, device):
    """(batch, 1, sq, sk) boolean: query i of sequence b sees key j (the key_range contract)."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    start, end = key_range[:, 0].long(), key_range[:, 1].long()
    m = (j >= start[:, None, None]) & (j < end[:, None, None])
    if causal:
        m = m & (j <= i + sk - sq)
    return m[:, None]


def sdpa_with_mask(q, k, v, allowed):
    """PyTorch SDPA (float32 math) with a boolean mask; rows that see no key get one dummy key so
    that SDPA stays finite (their outputs are not compared and their dout is zero)."""
    h, hkv = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
    live = allowed.any(-1, keepdim=True)
    mask = allowed | (~live & (torch.arange(allowed.shape[-1], device=q.device) == 0))
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)


KEY_RANGE_CASES = [  # batch, heads, kv heads, seq, head_dim, padding side
    (3, 4, 2, 37, 64, "left"),
    (3, 4, 1, 37, 64, "right"),
    (4, 2, 2, 20, 128, "mixed"),
]
KEY_RANGE_CUDA_CASES = [
    (3, 8, 2, 300, 128, "left"),
    (3, 8, 8, 257, 64, "right"),
    (4, 4, 1, 200, 96, "mixed"),
    (2, 4, 4, 1000, 256, "left"),
]


@pytest.mark.parametrize("idx", range(len(KEY_RANGE_CASES + KEY_RANGE_CUDA_CASES)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_key_range_matches_sdpa_with_mask(idx, causal, deterministic, dtype, device):
    """flash_attn(key_range=...) against SDPA given the equivalent boolean mask: o on every query
    row that sees a key (o = 0 and lse = +inf on the others), and dq, dk, dv with dout zero on the
    padded rows (a loss that ignores them)."""
    cases = KEY_RANGE_CASES + (KEY_RANGE_CUDA_CASES if device == "cuda" else [])
    if idx >= len(cases):
        pytest.skip("large case runs on CUDA only")
    if (device == "cuda") == (dtype == torch.float32):
        pytest.skip("float32 on the CPU, float16 and bfloat16 on CUDA")
    b, h, hkv, s, d, side = cases[idx]
    kr = padded_ranges(b, s, side, device)
    q = torch.randn(b, h, s, d, device=device).to(dtype).requires_grad_()
    k = torch.randn(b, hkv, s, d, device=device).to(dtype).requires_grad_()
    v = torch.randn(b, hkv, s, d, device=device).to(dtype).requires_grad_()
    allowed = allowed_mask(kr, s, s, causal, device)
    live = allowed.any(-1)  # (b, 1, s): the query sees a key
    pos = torch.arange(s, device=device)
    valid = ((pos >= kr[:, :1].long()) & (pos < kr[:, 1:].long()))[:, None, :, None]  # the sequences' rows

    o = poison(torch.empty_like(q))
    lse = poison(torch.empty(b, h, s, device=device))
    l3k.attention_forward_into(q.detach(), k.detach(), v.detach(), o, lse, causal, key_range=kr)
    ref = sdpa_with_mask(q.detach(), k.detach(), v.detach(), allowed)
    seen = live[..., None].expand_as(o)
    assert_close(o[seen], ref[seen], dtype, what="o (rows that see a key)")
    assert torch.all(o[~seen] == 0), "a row that sees no key: o = 0"
    dead = ~live.expand(b, h, s)
    assert torch.all(torch.isinf(lse[dead]) & (lse[dead] > 0)), "a row that sees no key: lse = +inf"

    out = l3k.flash_attn(q, k, v, causal=causal, deterministic=deterministic, key_range=kr)
    dout = torch.randn_like(out) * valid
    out.backward(dout)
    qr, kr_, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    sdpa_with_mask(qr, kr_, vr, allowed).backward(dout.float())
    grad_scale = 2 * max(1.0, math.sqrt(s / 128))
    assert_close(q.grad, qr.grad, dtype, grad_scale, "dq")
    assert_close(k.grad, kr_.grad, dtype, grad_scale, "dk")
    assert_close(v.grad, vr.grad, dtype, grad_scale, "dv")
    assert torch.all(q.grad[~seen] == 0), "a row that sees no key passes no gradient"
    keys_seen = allowed.any(-2)[:, :, :, None].expand(b, hkv, s, d)  # (b, 1, s): some query sees the key
    assert torch.all(k.grad[~keys_seen] == 0) and torch.all(v.grad[~keys_seen] == 0), "unseen keys: dk = dv = 0"


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_padded_rows_equal_the_sequence_alone(side, causal, device):
    """Each sequence of a padded batch, on its valid rows, is the sequence run alone: output and,
    with dout zero on the padding, every gradient (zero on the padded positions)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    b, h, hkv, s, d = 3, 4, 2, 150 if device == "cuda" else 40, 64
    kr = padded_ranges(b, s, side, device)
    q = torch.randn(b, h, s, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hkv, s, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(b, hkv, s, d, device=device, dtype=dtype, requires_grad=True)
    out = l3k.flash_attn(q, k, v, causal=causal, key_range=kr)
    pos = torch.arange(s, device=device)
    valid = ((pos >= kr[:, :1].long()) & (pos < kr[:, 1:].long()))[:, None, :, None]
    dout = torch.randn_like(out) * valid
    out.backward(dout)
    for i in range(b):
        lo, hi = int(kr[i, 0]), int(kr[i, 1])
        qa, ka, va = (t.detach()[i : i + 1, :, lo:hi].clone().requires_grad_() for t in (q, k, v))
        alone = l3k.flash_attn(qa, ka, va, causal=causal)
        alone.backward(dout[i : i + 1, :, lo:hi])
        assert_close(out[i : i + 1, :, lo:hi], alone, dtype, what=f"sequence {i}: o")
        assert_close(q.grad[i : i + 1, :, lo:hi], qa.grad, dtype, 2, f"sequence {i}: dq")
        assert_close(k.grad[i : i + 1, :, lo:hi], ka.grad, dtype, 2, f"sequence {i}: dk")
        assert_close(v.grad[i : i + 1, :, lo:hi], va.grad, dtype, 2, f"sequence {i}: dv")
        pad = torch.ones(s, dtype=torch.bool, device=device)
        pad[lo:hi] = False
        assert torch.all(k.grad[i, :, pad] == 0) and torch.all(v.grad[i, :, pad] == 0), "padded keys: no gradient"
        assert torch.all(q.grad[i, :, pad] == 0), "padded queries with zero dout: no gradient"


def test_key_range_through_the_registered_ops(device):
    """opcheck of flash_attn and its backward with a key range (schemas, fake kernels, autograd)."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    q = torch.randn(2, 4, 33, 64, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, 33, 64, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 2, 33, 64, device=device, dtype=dtype, requires_grad=True)
    kr = torch.tensor([[5, 33], [0, 20]], dtype=torch.int32, device=device)
    ops = torch.ops.llama3_kernels
    # deterministic: opcheck compares repeated runs bit for bit
    torch.library.opcheck(ops.flash_attn.default, (q, k, v, True, 0.0, True, kr))
    o, lse = ops.flash_attn(q.detach(), k.detach(), v.detach(), True, 0.0, True, kr)
    do = torch.randn_like(o)
    args = (do, q.detach(), k.detach(), v.detach(), o, lse, True, 0.0, True, kr)
    torch.library.opcheck(ops.flash_attn_backward.default, args)


def test_key_range_values_are_clamped(device):
    """Values past either end, reversed or extreme, read as their clamp into [0, seq_k): nothing
    read out of bounds, the same result as the clamped ranges."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    q = torch.randn(4, 2, 24, 64, device=device, dtype=dtype)
    k = torch.randn(4, 2, 24, 64, device=device, dtype=dtype)
    v = torch.randn(4, 2, 24, 64, device=device, dtype=dtype)
    wild = torch.tensor([[-7, 10], [3, 1000], [20, 5], [-(2**31), 2**31 - 1]], dtype=torch.int32, device=device)
    tame = torch.tensor([[0, 10], [3, 24], [5, 5], [0, 24]], dtype=torch.int32, device=device)
    for causal in (False, True):
        got = l3k.flash_attn(q, k, v, causal=causal, key_range=wild)
        assert torch.equal(got, l3k.flash_attn(q, k, v, causal=causal, key_range=tame))


KEY_RANGE_BAD = [
    ("dtype", lambda kr: kr.float(), TypeError, "key_range dtype float32, expected int32"),
    ("rows", lambda kr: kr[:1], ValueError, "key_range shape (1, 2), expected (2, 2)"),
    ("ndim", lambda kr: kr.flatten(), ValueError, "key_range has ndim 1, expected 2"),
]


@pytest.mark.parametrize("case", KEY_RANGE_BAD, ids=lambda c: c[0])
def test_bad_key_range(device, case):
    name, make, exc, message = case
    dtype = torch.float16 if device == "cuda" else torch.float32
    q = torch.randn(2, 2, 7, 64, device=device, dtype=dtype)
    o = torch.full_like(q, 5.0)
    lse = torch.empty(2, 2, 7, device=device)
    kr = make(torch.tensor([[0, 7], [2, 7]], dtype=torch.int32, device=device))
    with pytest.raises(exc) as info:
        l3k.attention_forward_into(q, q, q.clone(), o, lse, key_range=kr)
    assert str(info.value).startswith("attention_forward: ") and message in str(info.value), str(info.value)
    assert torch.all(o == 5.0)


# ---- NaN ---------------------------------------------------------------------------------------


def test_nan_propagates_like_pytorch(device):
    """A NaN in q or k makes the rows whose scores it reaches NaN (o and lse), not fully masked
    (o = 0, lse = +inf); rows it does not reach, other sequences among them, stay finite, and a row
    that sees no key stays o = 0, lse = +inf even with a NaN of its own.  The gradients of the
    sequence holding the NaN carry it; the other sequence's stay finite.  (Runs on the CPU
    reference too, which is the spec; CUDA is the case that matters.)"""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    b, h, hkv, sq, sk, d = 2, 4, 2, 200, 150, 128  # causal with sq > sk: rows 0..49 see no key
    for where in ("q", "k"):
        q = torch.randn(b, h, sq, d, device=device, dtype=dtype)
        k = torch.randn(b, hkv, sk, d, device=device, dtype=dtype)
        v = torch.randn(b, hkv, sk, d, device=device, dtype=dtype)
        if where == "q":
            q[0, 1, 120, 7] = float("nan")  # a row that sees keys 0..70
            q[0, 2, 10, 3] = float("nan")  # a row that sees no key
        else:
            k[0, 0, 90, 5] = float("nan")  # seen by rows 140.. of heads 0 and 1
        o = poison(torch.empty_like(q))
        lse = poison(torch.empty(b, h, sq, device=device))
        l3k.attention_forward_into(q, k, v, o, lse, causal=True)
        nan_rows = torch.zeros(b, h, sq, dtype=torch.bool, device=device)
        if where == "q":
            nan_rows[0, 1, 120] = True
        else:
            nan_rows[0, :2, 140:] = True
        assert torch.all(torch.isnan(lse[nan_rows])), f"{where}: NaN rows' lse"
        assert torch.all(torch.isnan(o[nan_rows])), f"{where}: NaN rows' o"
        masked = torch.zeros_like(nan_rows)
        masked[:, :, :50] = True
        assert torch.all(o[masked] == 0) and torch.all(torch.isinf(lse[masked]) & (lse[masked] > 0)), where
        rest = ~nan_rows & ~masked
        assert torch.all(torch.isfinite(o[rest])) and torch.all(torch.isfinite(lse[rest])), f"{where}: other rows"

        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        l3k.flash_attn(qg, kg, vg, causal=True).backward(torch.randn_like(q))
        assert torch.isnan(qg.grad[0]).any() and torch.isnan(kg.grad[0]).any(), f"{where}: gradients carry NaN"
        for g in (qg.grad[1], kg.grad[1], vg.grad[1]):
            assert torch.all(torch.isfinite(g)), f"{where}: the other sequence's gradients"
        if where == "q":  # (a NaN in k may reach them on CUDA: dq = dS k multiplies their dS = 0 by it)
            assert torch.all(qg.grad[masked] == 0), "rows that see no key, one of them NaN: no gradient"


@pytest.mark.parametrize("ndim", [0, 3, 5])
def test_wrong_ndim_is_refused_by_name(ndim):
    """q, k or v that is not (batch, heads, seq, head_dim) gets the library's error naming the
    argument, not an IndexError from unpacking its shape."""
    good = torch.randn(1, 2, 4, 8)
    bad = torch.randn([2] * ndim)
    for name, args in (("q", (bad, good, good)), ("k", (good, bad, good)), ("v", (good, good, bad))):
        with pytest.raises(ValueError, match=rf"attention_forward: {name} has ndim {ndim}, expected 4"):
            l3k.flash_attn(*args)

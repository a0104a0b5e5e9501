"""cross_entropy against F.cross_entropy over the float32 copy of the logits (what transformers
computes): the loss and the logits' gradient, every dtype, odd vocabularies, ignored targets,
mean / sum / a given item count, a retained graph, torch.compile and opcheck; bad inputs."""

import pytest
import torch
import torch.nn.functional as F

import llama3_kernels as l3k
from conftest import TOL, assert_close

ops = torch.ops.llama3_kernels


def _case(rows, vocab, dtype, device, ignored=0.2):
    logits = (torch.randn(rows, vocab, device=device) * 3).to(dtype)
    target = torch.randint(0, vocab, (rows,), device=device)
    target[torch.rand(rows, device=device) < ignored] = -100
    target[0] = vocab - 1  # at least one counted row (every row ignored: test_targets_ignored_...)
    return logits, target


def _reference(logits, target, **kw):
    x = logits.detach().float().requires_grad_()
    loss = F.cross_entropy(x, target, **kw)
    loss.backward()
    return loss, x.grad


@pytest.mark.parametrize("rows,vocab", [(1, 1), (7, 5), (37, 1000), (64, 32003), (3, 32000)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_float32_cross_entropy(rows, vocab, reduction, dtype, device):
    logits, target = _case(rows, vocab, dtype, device)
    logits.requires_grad_()
    want, want_grad = _reference(logits, target, reduction=reduction)
    got = l3k.cross_entropy(logits, target, reduction=reduction)
    got.backward()
    assert got.dtype == torch.float32 and got.shape == ()
    # The loss is a float32 sum over rows, rounded differently from PyTorch's.
    torch.testing.assert_close(got, want, atol=1e-5 * max(rows, 1), rtol=1e-5)
    assert logits.grad.dtype == dtype
    assert_close(logits.grad, want_grad, dtype, what="dlogits")


def test_item_count_and_incoming_gradient(device):
    """num_items divides the sum (transformers' num_items_in_batch); the backward scales the kept
    gradient by the loss's incoming gradient; a retained graph gives the same gradient twice."""
    logits, target = _case(16, 100, torch.float32, device)
    logits.requires_grad_()
    got = l3k.cross_entropy(logits, target, num_items=torch.tensor(40, device=device)) * 3.0
    want, want_grad = _reference(logits, target, reduction="sum")
    torch.testing.assert_close(got, want * 3.0 / 40)
    got.backward(retain_graph=True)
    first = logits.grad.clone()
    assert_close(first, want_grad * 3.0 / 40, torch.float32, what="dlogits")
    logits.grad = None
    got.backward()
    torch.testing.assert_close(logits.grad, first, atol=0, rtol=0)


def test_targets_ignored_or_out_of_range(device):
    """Every target ignored: mean NaN (as PyTorch), zero gradient; a target outside [0, V): NaN loss."""
    logits = torch.randn(4, 10, device=device, requires_grad=True)
    target = torch.full((4,), -100, device=device)
    loss = l3k.cross_entropy(logits, target)
    assert torch.isnan(loss)
    assert torch.isnan(F.cross_entropy(logits.detach(), target))
    assert l3k.cross_entropy(logits, target, reduction="sum").item() == 0.0
    l3k.cross_entropy(logits, target, reduction="sum").backward()
    assert torch.count_nonzero(logits.grad) == 0
    bad = torch.tensor([1, 2, 10, 3], device=device)
    assert torch.isnan(l3k.cross_entropy(logits.detach(), bad))
    other = torch.tensor([1, 2, 3, 3], device=device)
    assert torch.isfinite(l3k.cross_entropy(logits.detach(), other, ignore_index=3))


def test_batched_logits_and_strided_rows(device):
    """(batch, seq, V) logits and a row slice of a wider buffer read without a copy."""
    wide = torch.randn(2, 9, 130, device=device)
    logits = wide[..., :128]
    target = torch.randint(0, 128, (2, 9), device=device)
    want, _ = _reference(logits.reshape(-1, 128), target.reshape(-1))
    torch.testing.assert_close(l3k.cross_entropy(logits, target), want)


def test_compiled_and_opcheck(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    logits, target = _case(12, 257, dtype, device)
    scale = torch.tensor([0.125], device=device)
    tol = {k: v * 10 for k, v in TOL[dtype].items()}
    torch.library.opcheck(ops.cross_entropy.default, (logits.requires_grad_(), target, -100, scale), **tol)

    def loss_fn(x, t):
        return l3k.cross_entropy(x, t)

    compiled = torch.compile(loss_fn, fullgraph=True)
    got = compiled(logits, target)
    got.backward()
    grad = logits.grad.clone()
    logits.grad = None
    want = loss_fn(logits, target)
    want.backward()
    torch.testing.assert_close(got, want)
    assert_close(grad, logits.grad, dtype, what="compiled dlogits")


def test_bad_inputs():
    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match="reduction"):
        l3k.cross_entropy(logits, torch.zeros(4, dtype=torch.long), reduction="none")
    with pytest.raises(l3k.L3KError, match="target"):
        l3k.cross_entropy(logits, torch.zeros(5, dtype=torch.long))
    with pytest.raises(l3k.L3KError, match="logits"):
        l3k.cross_entropy(logits.to(torch.int32), torch.zeros(4, dtype=torch.long))

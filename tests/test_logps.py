"""Chunked completion log-probs must equal the naive full-logits path, values and gradients."""

import math

import pytest
import torch

from dpolab.logps import Head, completion_logps, naive_completion_logps


def make(dtype, *, B=3, T=17, D=24, V=3001, bias=False, softcap=None, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g, dtype=dtype) * 0.5).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=dtype) * 0.1).requires_grad_() if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.6
    mask[0] = False  # a row with no completion token at all
    return hidden, Head(weight, b, softcap, scale), labels, mask


def grads(out, tensors):
    g = torch.Generator().manual_seed(9)
    w = torch.randn(out.shape, generator=g, dtype=out.dtype)
    return torch.autograd.grad((out * w).sum(), tensors)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("bias,softcap,scale", [(False, None, 1.0), (True, None, 1.0),
                                                (False, 5.0, 1.0), (True, None, 0.0625),
                                                (False, 5.0, 2.5)])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_chunked_equals_naive(dtype, tol, bias, softcap, scale, chunk):
    """Values and gradients (hidden, weight, bias) agree with log_softmax(h W^T).gather to 1e-5
    in float32 and 1e-10 in float64, for any chunk size, with bias, Gemma-style softcap and
    Cohere-style logit scale."""
    hidden, head, labels, mask = make(dtype, bias=bias, softcap=softcap, scale=scale)
    fast = completion_logps(hidden, head, labels, mask, chunk_size=chunk)
    slow = naive_completion_logps(hidden, head, labels, mask)
    assert fast.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(fast, slow, atol=tol, rtol=tol)
    assert (fast[~mask] == 0).all()
    params = [hidden, head.weight] + ([head.bias] if bias else [])
    for a, b in zip(grads(fast, params), grads(slow, params)):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_tied_head_gets_both_gradients():
    """A head tied to the input embedding receives the embedding's and the head's gradient."""
    g = torch.Generator().manual_seed(3)
    emb = torch.nn.Embedding(50, 8)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(50, 8, generator=g))
    ids = torch.randint(0, 50, (2, 6), generator=g)
    labels, mask = ids.roll(-1, 1), torch.ones(2, 6, dtype=torch.bool)
    out = completion_logps(emb(ids), Head(emb.weight), labels, mask, chunk_size=5).sum()
    out.backward()
    fast = emb.weight.grad.clone()
    emb.weight.grad = None
    naive_completion_logps(emb(ids), Head(emb.weight), labels, mask).sum().backward()
    torch.testing.assert_close(fast, emb.weight.grad)


@pytest.mark.parametrize("softcap,scale", [(3.0, 1.0), (None, 0.0625), (3.0, 2.5)])
def test_gradcheck_float64(softcap, scale):
    """torch.autograd.gradcheck through the custom backward, with bias, softcap and a logit
    scale (the derivative of softcap(s * u) in u is s * (1 - tanh^2(s u / c)))."""
    hidden, head, labels, mask = make(torch.float64, B=2, T=4, D=5, V=11, bias=True)
    fn = lambda h, w, b: completion_logps(h, Head(w, b, softcap, scale), labels, mask,  # noqa
                                          chunk_size=3)
    assert torch.autograd.gradcheck(fn, (hidden, head.weight, head.bias))


def test_scale_matches_hand_computed_value():
    """Two logits u = (1, 0) (h = 1, W = [[1], [0]]) scaled by s = 0.5 give z = (0.5, 0):
    log pi(0) = 0.5 - log(e^0.5 + 1) = 0.5 - 1.474077 = -0.474077."""
    h = torch.ones(1, 1, dtype=torch.float64)
    w = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    got = completion_logps(h[None], Head(w, scale=0.5), torch.zeros(1, 1, dtype=torch.long),
                           torch.ones(1, 1, dtype=torch.bool))
    assert got.item() == pytest.approx(0.5 - math.log(math.exp(0.5) + 1.0), abs=1e-12)
    assert got.item() == pytest.approx(-0.474077, abs=1e-6)


def test_large_vocabulary_float32():
    """Several thousand tokens, float32: within 1e-5 of the naive path."""
    hidden, head, labels, mask = make(torch.float32, B=2, T=40, D=64, V=8192)
    torch.testing.assert_close(completion_logps(hidden, head, labels, mask, chunk_size=16),
                               naive_completion_logps(hidden, head, labels, mask),
                               atol=1e-5, rtol=1e-5)


def test_shape_mismatch_raises():
    hidden, head, labels, mask = make(torch.float32)
    with pytest.raises(ValueError, match="disagree"):
        completion_logps(hidden, head, labels[:, :-1], mask[:, :-1])
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        completion_logps(hidden, head, labels, mask, chunk_size=0)

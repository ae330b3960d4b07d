"""AuxDPO's exact head penalty equals ||A delta||^2 with A built column by column by autograd."""

import pytest
import torch

from dpolab.auxdpo import head_gradient_penalty, null_space_basis
from dpolab.logps import Head, label_logps


@pytest.mark.parametrize("bias,softcap", [(False, None), (True, None), (False, 4.0)])
def test_head_penalty_matches_autograd(bias, softcap):
    """For 3 responses of 2-4 tokens: sum_i delta_i d/dW log pi(y_i) computed by autograd,
    its squared norm equals the closed form, and so do its gradients w.r.t. delta."""
    g = torch.Generator().manual_seed(0)
    V, D, lens = 13, 5, [2, 4, 3]
    W = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    hs = [torch.randn(n, D, generator=g, dtype=torch.float64) for n in lens]
    ys = [torch.randint(0, V, (n,), generator=g) for n in lens]
    delta = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    cols = []
    for h, y in zip(hs, ys):
        lp = label_logps(h, Head(W, b, softcap), y).sum()
        grads = torch.autograd.grad(lp, [W] + ([b] if bias else []))
        cols.append(torch.cat([t.reshape(-1) for t in grads]))
    A = torch.stack(cols, dim=1)  # (P, 3)
    expected = (A @ delta).pow(2).sum()
    token_delta = torch.cat([delta[i].expand(n) for i, n in enumerate(lens)])
    head0 = Head(W.detach(), None if b is None else b.detach(), softcap)
    got = head_gradient_penalty(torch.cat(hs), torch.cat(ys), token_delta, head0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    g_exp, = torch.autograd.grad(expected, delta)
    g_got, = torch.autograd.grad(got, delta)
    torch.testing.assert_close(g_got.double(), g_exp, rtol=1e-4, atol=1e-6)


def test_penalty_zero_in_null_space():
    """A delta in N(A) (from null_space_basis of the autograd A) has zero penalty."""
    g = torch.Generator().manual_seed(1)
    V, D = 4, 1  # P = 4 parameters, 6 one-token responses -> a null space of dim >= 2
    W = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    hs = torch.randn(6, D, generator=g, dtype=torch.float64)
    ys = torch.randint(0, V, (6,), generator=g)
    A = torch.stack([torch.autograd.grad(label_logps(hs[i:i + 1], Head(W), ys[i:i + 1]).sum(),
                                         W)[0].reshape(-1) for i in range(6)], dim=1)
    basis = null_space_basis(A)
    assert basis.shape[1] >= 2
    delta = basis @ torch.randn(basis.shape[1], generator=g, dtype=torch.float64)
    pen = head_gradient_penalty(hs, ys, delta, Head(W.detach()))
    assert pen.item() < 1e-10


@pytest.mark.parametrize("bias,softcap", [(False, None), (True, None), (True, 3.0)])
def test_head_gradient_gram_equals_autograd(bias, softcap):
    """head_gradient_gram == A^T A with A's columns the autograd gradients of each response's
    log-prob w.r.t. the head (weight and bias), with and without a softcap; too little memory
    is a ValueError naming the sizes."""
    from dpolab.auxdpo import head_gradient_gram

    g = torch.Generator().manual_seed(3)
    V, D, lens = 7, 5, [3, 1, 4, 2]
    W = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    hs = [torch.randn(n, D, generator=g, dtype=torch.float64) for n in lens]
    ys = [torch.randint(0, V, (n,), generator=g) for n in lens]
    cols = []
    for h, y in zip(hs, ys):
        lp = label_logps(h, Head(W, b, softcap), y).sum()
        grads = torch.autograd.grad(lp, [W] + ([b] if bias else []))
        cols.append(torch.cat([t.reshape(-1) for t in grads]))
    A = torch.stack(cols, dim=1)
    head0 = Head(W.detach(), None if b is None else b.detach(), softcap)
    G = head_gradient_gram(list(zip(hs, ys)), head0, max_bytes=2**20)
    torch.testing.assert_close(G, A.T @ A, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="10 completion tokens over a vocabulary of 7"):
        head_gradient_gram(list(zip(hs, ys)), head0, max_bytes=100)

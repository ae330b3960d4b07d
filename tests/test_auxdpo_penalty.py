"""AuxDPO's exact head penalty equals ||A delta||^2 with A built column by column by autograd."""

import pytest
import torch

from dpolab.auxdpo import head_gradient_penalty, null_space_basis
from dpolab.logps import Head, label_logps


@pytest.mark.parametrize("bias,softcap,scale", [(False, None, 1.0), (True, None, 1.0),
                                                (False, 4.0, 1.0), (True, 4.0, 0.3)])
def test_head_penalty_matches_autograd(bias, softcap, scale):
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
        lp = label_logps(h, Head(W, b, softcap, scale), y).sum()
        grads = torch.autograd.grad(lp, [W] + ([b] if bias else []))
        cols.append(torch.cat([t.reshape(-1) for t in grads]))
    A = torch.stack(cols, dim=1)  # (P, 3)
    expected = (A @ delta).pow(2).sum()
    token_delta = torch.cat([delta[i].expand(n) for i, n in enumerate(lens)])
    head0 = Head(W.detach(), None if b is None else b.detach(), softcap, scale)
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


@pytest.mark.parametrize("bias,softcap,scale", [(False, None, 1.0), (True, None, 1.0),
                                                (True, 3.0, 1.0), (False, None, 0.0625)])
def test_head_gradient_gram_equals_autograd(bias, softcap, scale):
    """head_gradient_gram == A^T A with A's columns the autograd gradients of each response's
    log-prob w.r.t. the head (weight and bias), with and without a softcap or a logit scale;
    too little memory
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
        lp = label_logps(h, Head(W, b, softcap, scale), y).sum()
        grads = torch.autograd.grad(lp, [W] + ([b] if bias else []))
        cols.append(torch.cat([t.reshape(-1) for t in grads]))
    A = torch.stack(cols, dim=1)
    head0 = Head(W.detach(), None if b is None else b.detach(), softcap, scale)
    G = head_gradient_gram(list(zip(hs, ys)), head0, max_bytes=2**20)
    torch.testing.assert_close(G, A.T @ A, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="10 completion tokens over a vocabulary of 7"):
        head_gradient_gram(list(zip(hs, ys)), head0, max_bytes=100)


def _linear_responses(n: int, P: int, seed: int):
    """A forward whose log-prob of every token is x_t . w: the gradient of response a's summed
    log-prob is the sum of its tokens' x_t, so A is known without autograd."""
    from dpolab.policy import FlatLogps

    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(P, generator=g, dtype=torch.float64))
    feats = [torch.randn(1 + (a % 3), P, generator=g, dtype=torch.float64)
             for a in range(2 * n)]  # response a < n: chosen of pair a; n + i: rejected of i

    def forward(idx):
        xs = [feats[i] for i in idx] + [feats[n + i] for i in idx]
        seg = torch.cat([torch.full((x.shape[0],), j) for j, x in enumerate(xs)])
        return FlatLogps(torch.cat(xs) @ w, seg, len(idx), int(seg.numel()))

    A = torch.stack([x.sum(0) for x in feats], dim=1)  # (P, 2n)
    return forward, w, A


def test_response_gradient_gram_is_AtA():
    """response_gradient_gram (what AuxRewards.maybe computes for every scope) equals A^T A
    with A's columns the exact gradients of each response's log-prob; too little memory is a
    ValueError naming the sizes."""
    from dpolab.auxdpo import response_gradient_gram

    forward, w, A = _linear_responses(n=3, P=4, seed=5)
    G = response_gradient_gram(forward, [0, 1, 2], [w], max_bytes=2**20)
    torch.testing.assert_close(G, A.T @ A, rtol=1e-6, atol=1e-6)  # rows held in float32
    with pytest.raises(ValueError, match="4 trained parameters for 6 responses"):
        response_gradient_gram(forward, [0, 1, 2], [w], max_bytes=10)


def test_trainer_penalty_from_gram_equals_norm_of_A_delta():
    """AuxRewards.penalty (the term the training loop adds) with the Gram matrix of all
    responses is, for the batch B = pairs {0, 2} of n = 3 and n_global = 4,
        (|B| / n_global) * (lambda_null * ||A_B delta_B||^2 + lambda_amp * ||delta_B||^2),
    A_B the columns of B's chosen and rejected responses; gram_penalty alone is the norm."""
    from dpolab.auxdpo import AuxRewards, gram_penalty

    forward, w, A = _linear_responses(n=3, P=4, seed=6)
    G = A.T @ A
    aux = AuxRewards(3, device="cpu", null_weight=2.0, amp_weight=0.5, gram=G.float())  # as maybe()
    d = torch.tensor([0.3, -1.0, 0.7, 1.5, 0.2, -0.4], dtype=torch.float64)
    with torch.no_grad():
        aux.delta.copy_(d)
    resp = torch.tensor([0, 2, 3, 5])  # chosen 0, chosen 2, rejected 0, rejected 2
    dB = d[resp]
    norm = (A[:, resp] @ dB).pow(2).sum()
    assert gram_penalty(dB, G, resp).item() == pytest.approx(norm.item(), rel=1e-12)
    expected = (2 / 4) * (2.0 * norm + 0.5 * dB.pow(2).sum())
    got = aux.penalty([0, 2], n_global=4)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)  # delta is float32

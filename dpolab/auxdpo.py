"""AuxDPO's auxiliary rewards: the null space they live in (arXiv 2510.20413, Sec. 4.2).

Notation:
    n        number of responses that carry an auxiliary reward delta (n,)
    P        number of trainable parameters theta
    A        (P, n): column a is d/dtheta log pi_theta0(y_a), the gradient of the reference
             log-prob of response a (possibly weighted by its data frequency rho(a))

AuxDPO adds delta in N(A) = {delta : A delta = 0} to the implicit reward. Rewards that differ by
such a delta give the same locally-linearised RLHF policy (Sec. 4.1), so delta widens the
implicit-reward manifold to all of R^n without changing what the policy should be. For small
problems the constraint is exact: delta = Gamma c with Gamma an orthonormal basis of N(A).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def null_space_basis(A: Tensor, *, rtol: float | None = None) -> Tensor:
    """Orthonormal basis Gamma (n, n - rank) of N(A) for A (P, n), from the SVD A = U S V^T.

    rank = #{singular values s_k > rtol * s_max}. The default rtol = max(P, n) * eps(dtype) is
    the rank tolerance of numpy.linalg.matrix_rank: singular values below it are round-off of
    the exact zeros an SVD of a rank-deficient matrix would give. The right-singular vectors of
    the discarded singular values span N(A); A Gamma = 0 and Gamma^T Gamma = I up to round-off.
    An all-zero A has rank 0 and Gamma = I.
    """
    if A.dim() != 2:
        raise ValueError(f"null_space_basis: A must be (P, n), got shape {tuple(A.shape)}")
    P, n = A.shape
    if rtol is None:
        rtol = max(P, n) * torch.finfo(A.dtype).eps
    # full_matrices=True: Vh is (n, n), so its rows beyond the rank span the null space.
    _, s, vh = torch.linalg.svd(A, full_matrices=True)
    rank = int((s > rtol * s.max()).sum()) if s.numel() and s.max() > 0 else 0
    return vh[rank:].transpose(0, 1).contiguous()  # (n, n - rank)


def project_to_null_space(delta: Tensor, basis: Tensor) -> Tensor:
    """Orthogonal projection Gamma Gamma^T delta onto N(A), for delta (..., n) and an
    orthonormal basis (n, k) from :func:`null_space_basis`; returns (..., n)."""
    if delta.shape[-1] != basis.shape[0]:
        raise ValueError(f"project_to_null_space: delta has {delta.shape[-1]} entries, the "
                         f"basis spans vectors of {basis.shape[0]}")
    return (delta @ basis) @ basis.transpose(0, 1)


# ----------------------------------------------------------------------------------------
# The trainer side: per-pair auxiliary rewards and the batchwise soft null-space penalty


def head_gradient_penalty(hidden: Tensor, labels: Tensor, token_delta: Tensor, head0) -> Tensor:
    """||A_B delta_B||^2 for a trained output head, exactly, without forming A.

    For the head W (V, D) (bias b, softcap c) at its reference value W0, the gradient of a
    response's log-prob is d/dW log pi(y) = sum_t g_t h_t^T with g_t = (e_{y_t} - p_t) * s_t,
    p_t = softmax(z_t), z_t the capped logits and s_t = 1 - tanh^2(z_t / c) (1 without a cap).
    So A delta = sum_t delta_{seq(t)} g_t h_t^T (plus sum_t delta_{seq(t)} g_t for the bias)
    and the penalty is its squared Frobenius norm. hidden (N, D), labels (N,), token_delta (N,)
    the delta of each token's sequence (differentiable). g_t are constants (at W0), so the
    penalty is an exact quadratic form in delta. Chunked over tokens: memory O(chunk x V).
    """
    V, D = head0.weight.shape
    v = hidden.new_zeros(V, D, dtype=torch.float32)
    vb = hidden.new_zeros(V, dtype=torch.float32)
    for s in range(0, hidden.shape[0], 512):
        h = hidden[s:s + 512].float()
        with torch.no_grad():
            z = torch.nn.functional.linear(h, head0.weight.float(),
                                           None if head0.bias is None else head0.bias.float())
            scale = None
            if head0.softcap is not None:
                t = torch.tanh(z / head0.softcap)
                z, scale = head0.softcap * t, 1.0 - t * t
            g = -torch.softmax(z, dim=1)
            g[torch.arange(g.shape[0]), labels[s:s + 512]] += 1.0
            if scale is not None:
                g = g * scale  # (n, V)
        gd = g * token_delta[s:s + 512, None].float()  # (n, V), linear in delta
        v = v + gd.transpose(0, 1) @ h
        if head0.bias is not None:
            vb = vb + gd.sum(0)
    return v.pow(2).sum() + vb.pow(2).sum()


class AuxRewards:
    """AuxDPO's per-pair auxiliary rewards (delta_c, delta_r), trained with their own
    learning rate and dropped after training.

    Loss added to the preference terms (seed: arXiv 2510.20413, Sec. 4.2), per step on the
    batch B:  lambda_null * ||A_{theta0,B} delta_B||^2 + lambda_amp * ||delta_B||^2, scaled like
    the preference loss by |B| / n_global so accumulation and data parallelism see the same
    objective. A's columns are the gradients of the reference log-probs of the batch's
    responses w.r.t. the trained parameters; for the `last_layer` scope they are computed
    exactly from the cached body states (:func:`head_gradient_penalty`).
    """

    def __init__(self, n: int, *, device, null_weight: float, amp_weight: float, cache, head0):
        self.delta = torch.nn.Parameter(torch.zeros(n, 2, device=device))  # (n, [chosen, rejected])
        self.null_weight, self.amp_weight = null_weight, amp_weight
        self.cache, self.head0 = cache, head0

    @classmethod
    def maybe(cls, objective, session, lc) -> "AuxRewards | None":
        from dpolab.cli import UserError
        from dpolab.policy import CachedHeadForward

        if not objective.needs_delta:
            return None
        if not isinstance(session.scope_forward, CachedHeadForward):
            raise UserError("loss auxdpo: the null-space penalty is computed exactly for the "
                            "output head, so it needs train.scope=last_layer "
                            f"(got {session.cfg.train.scope})")
        return cls(len(session.train), device=session.dist.device, null_weight=lc.aux_null_weight,
                   amp_weight=lc.aux_amp_weight, cache=session.scope_forward.cache,
                   head0=session.scope_forward.head0)

    def batch(self, idx) -> tuple[Tensor, Tensor]:
        d = self.delta[torch.as_tensor(list(idx), dtype=torch.long, device=self.delta.device)]
        return d[:, 0], d[:, 1]

    def penalty(self, idx, examples, *, n_global: int) -> Tensor:
        dc, dr = self.batch(idx)
        entries = [self.cache[("train", ex.index)] for ex in examples]
        hs = [e[0] for e in entries] + [e[2] for e in entries]
        ys = [e[1] for e in entries] + [e[3] for e in entries]
        per_seq = torch.cat([dc, dr])  # (2B,)
        token_delta = torch.cat([per_seq[j].expand(h.shape[0]) for j, h in enumerate(hs)])
        null = head_gradient_penalty(torch.cat(hs), torch.cat(ys), token_delta, self.head0)
        amp = per_seq.pow(2).sum()
        return (self.null_weight * null + self.amp_weight * amp) * (len(idx) / n_global)

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

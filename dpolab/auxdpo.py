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

import dataclasses

import torch

from dpolab.losses.core import amplitude_penalty, authors_amplitude_term, capped_aux_reward
from dpolab.logps import head_logits

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


# ----------------------------------------------------------------------------------------
# The trainer side: per-pair auxiliary rewards and the batchwise soft null-space penalty


def head_gradient_penalty(hidden: Tensor, labels: Tensor, token_delta: Tensor, head0,
                          rows: Tensor | None = None) -> Tensor:
    """||A_B delta_B||^2 for a trained output head, exactly, without forming A.

    For the head W (V, D) (bias b, softcap c, scale a) at its reference value W0, the gradient
    of a response's log-prob is d/dW log pi(y) = sum_t g_t h_t^T with g_t = (e_{y_t} - p_t) * s_t,
    p_t = softmax(z_t), z_t the scaled, capped logits and s_t = a (1 - tanh^2(a u_t / c)) the
    slope of z_t in u_t = W h_t + b (a without a cap; dpolab.logps.head_logits).
    So A delta = sum_t delta_{seq(t)} g_t h_t^T (plus sum_t delta_{seq(t)} g_t for the bias)
    and the penalty is its squared Frobenius norm. hidden (N, D), labels (N,), token_delta (N,)
    the delta of each token's sequence (differentiable). g_t are constants (at W0), so the
    penalty is an exact quadratic form in delta. Chunked over tokens: memory O(chunk x V).
    rows (U,) long: only these rows of the head train (the token_rows scope), so A has only
    their entries (g restricted to those U columns); None: every row.
    """
    V, D = head0.weight.shape
    U = V if rows is None else rows.numel()
    v = hidden.new_zeros(U, D, dtype=torch.float32)
    vb = hidden.new_zeros(U, dtype=torch.float32)
    for s in range(0, hidden.shape[0], 512):
        h = hidden[s:s + 512].float()
        with torch.no_grad():
            g = _head_token_grads(h, labels[s:s + 512], head0)  # (n, V)
            g = g if rows is None else g[:, rows]  # (n, U)
        gd = g * token_delta[s:s + 512, None].float()  # (n, V), linear in delta
        v = v + gd.transpose(0, 1) @ h
        if head0.bias is not None:
            vb = vb + gd.sum(0)
    return v.pow(2).sum() + vb.pow(2).sum()


def gram_penalty(delta: Tensor, gram: Tensor, responses: Tensor) -> Tensor:
    """||A_B delta||^2 = delta^T G_BB delta for the responses B of a batch, from the Gram
    matrix G = A^T A (m, m) of all m responses. delta (|B|,) is the auxiliary reward of each
    response in `responses` (|B|,) long indices into G's rows, in that order."""
    return delta @ gram[responses][:, responses] @ delta


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def _head_token_grads(hidden: Tensor, labels: Tensor, head0) -> Tensor:
    """g_t = (e_{y_t} - p_t) * s_t (N, V) float32 at the reference head (see
    :func:`head_gradient_penalty`), chunked over tokens."""
    out = torch.empty(hidden.shape[0], head0.weight.shape[0], dtype=torch.float32,
                      device=hidden.device)
    for s in range(0, hidden.shape[0], 512):
        z, slope = head_logits(hidden[s:s + 512].float(), head0)
        g = -torch.softmax(z, dim=1)
        g[torch.arange(g.shape[0]), labels[s:s + 512]] += 1.0
        out[s:s + 512] = g * slope
    return out


@torch.no_grad()
def head_gradient_gram(responses, head0, *, max_bytes: float, rows: Tensor | None = None
                       ) -> Tensor:
    """G = A^T A (m, m) float64 for a trained output head, without forming A (P = V x D).

    responses: m pairs (hidden (T_a, D), labels (T_a,)), the completion tokens of response a.
    With g_t as in :func:`head_gradient_penalty`, response a's gradient is
    sum_{t in a} g_t h_t^T (and sum_{t in a} g_t for a bias), so
        G_ab = sum_{t in a, s in b} (g_t . g_s) (h_t . h_s + [bias]),
    a sum of the token kernel (g g^T) * (h h^T + [bias]) over response blocks. Holds g (N, V)
    float32 and the (N, N) kernel for all N completion tokens; raises ValueError with the
    sizes when that exceeds max_bytes. rows: only these head rows train (g restricted to
    them), as in :func:`head_gradient_penalty`.
    """
    m = len(responses)
    hidden = torch.cat([h for h, _ in responses])
    labels = torch.cat([y for _, y in responses])
    N, V = hidden.shape[0], head0.weight.shape[0]
    need = N * V * 4 + 2 * N * N * 8
    if need > max_bytes:
        raise ValueError(f"the head's token gradients for {N:,} completion tokens over a "
                         f"vocabulary of {V:,} need {_size(need)}, above the "
                         f"{_size(max_bytes)} allowed (loss.aux_max_gib)")
    g = _head_token_grads(hidden, labels, head0)
    g = g if rows is None else g[:, rows]
    h = hidden.float()
    kernel = (g @ g.T).double() * ((h @ h.T).double() + (1.0 if head0.bias is not None else 0.0))
    del g
    owner = torch.repeat_interleave(torch.arange(m, device=hidden.device),
                                    torch.tensor([y.shape[0] for _, y in responses],
                                                 device=hidden.device))
    rows = torch.zeros(m, N, dtype=torch.float64, device=hidden.device).index_add_(0, owner, kernel)
    return torch.zeros(m, m, dtype=torch.float64, device=hidden.device).index_add_(
        1, owner, rows).cpu()


def response_gradient_gram(forward, examples, params, *, max_bytes: float,
                           progress=None) -> Tensor:
    """G = A^T A (2n, 2n) float64 with A's columns d/dtheta log pi_theta0(y) for every
    response (chosen of pair i at i, rejected at n + i), at the current parameters (call it
    before training, so theta = theta0). `forward(examples) -> FlatLogps` is the scope's.

    The per-response gradients are held as rows (2n, P) in float32; when that exceeds
    `max_bytes` this raises ValueError with the sizes, and nothing is computed.
    """
    n, P = len(examples), sum(p.numel() for p in params)
    need = 2 * n * P * 4
    if need > max_bytes:
        raise ValueError(f"the per-response gradients of {P:,} trained parameters for {2 * n} "
                         f"responses need {_size(need)}, above the "
                         f"{_size(max_bytes)} allowed (loss.aux_max_gib)")
    rows = torch.empty(2 * n, P, dtype=torch.float32)
    for i, ex in enumerate(examples):
        pc, pr = forward([ex]).sums()
        for j, lp in ((i, pc[0]), (n + i, pr[0])):
            grads = torch.autograd.grad(lp, params, retain_graph=j == i, allow_unused=True)
            rows[j] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float().cpu()
                                 for g, p in zip(grads, params)])
        if progress:
            progress(i + 1)
    return (rows.double() @ rows.double().T)


def _eig_null(G: Tensor, *, rtol: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(eigenvalues, eigenvectors, null) of G = A^T A (m, m) in float64; null (m,) bool marks
    the eigenvalues below rtol * max |eigenvalue| (default rtol: m * eps(float32), since A was
    accumulated in float32): their eigenvectors span N(A) = N(G)."""
    evals, evecs = torch.linalg.eigh(G.double())
    if rtol is None:
        rtol = G.shape[0] * torch.finfo(torch.float32).eps
    top = evals.abs().max() if evals.numel() else evals.new_zeros(())
    return evals, evecs, evals <= rtol * top.clamp_min(1e-300)


def _spectrum(evals: Tensor, null: Tensor, *, null_weight: float) -> dict:
    m, null_dim = evals.numel(), int(null.sum())
    top = float(evals.abs().max()) if m else 0.0
    eig_min = float(evals.min().clamp_min(0)) if m else 0.0
    return {"responses": m, "rank": m - null_dim, "null_dim": null_dim, "eig_max": top,
            "eig_min": eig_min, "soft_floor": null_weight * eig_min}


class NoAuxRewards:
    """A run without the auxdpo term: no auxiliary rewards, the loop's calls change nothing
    (the null object :meth:`AuxRewards.maybe` gives, so the loop never asks)."""

    def param_groups(self, lr: float) -> list[dict]:
        return []

    def named(self) -> dict[str, Tensor]:
        return {}

    def with_delta(self, pairs, idx):
        return pairs

    def penalty(self, idx, *, n_global: int) -> float:
        return 0.0

    def sync(self, dist) -> None:
        pass


class AuxRewards:
    """AuxDPO's per-pair auxiliary rewards (delta_c, delta_r), trained with their own
    learning rate and dropped after training.

    Loss added to the preference terms (seed: arXiv 2510.20413, Sec. 4.2), per step on the
    batch B:  lambda_null * ||A_{theta0,B} delta_B||^2 + lambda_amp * ||delta_B||^2, scaled like
    the preference loss by |B| / n_global so accumulation and data parallelism see the same
    objective. loss.aux_form=authors (their AuxDPOTrainer): delta = aux_cap * tanh(raw) with
    raw the trained parameter, and the amplitude term -lambda_amp / 2 (mean_B delta_c^2 +
    mean_B delta_r^2) (both side by side in :mod:`dpolab.losses.core`). A's columns are the gradients of the reference log-probs of the batch's
    responses w.r.t. the trained parameters, at the start of training.

    Modes (loss.aux_mode):
        soft   the batchwise penalty above. With the Gram matrix G = A^T A of all responses
               (computed once before training when the per-response gradients fit in
               loss.aux_max_gib) it is delta_B^T G_BB delta_B; for the last_layer scope when
               they do not fit, :func:`head_gradient_penalty` gives it in closed form.
        exact  delta = Gamma c with Gamma an orthonormal basis of N(A) over the whole data
               set (from G), c trainable: delta never leaves the null space. Needs G.
    """

    def __init__(self, n: int, *, device, null_weight: float, amp_weight: float,
                 gram: Tensor | None = None, basis: Tensor | None = None, states=None,
                 examples=None, head0=None, form: str = "seed", cap: float = 1.0,
                 rows: Tensor | None = None):
        """One of: gram (soft, G of all responses), basis (exact), or states with examples and
        head0 (soft, closed form: the last_layer scope's cached body states of the `examples`
        trained on and its head at theta0)."""
        self.n, self.device = n, device
        self.null_weight, self.amp_weight = null_weight, amp_weight
        self.gram, self.basis = gram, basis
        self.states, self.examples, self.head0 = states, examples, head0
        self.form, self.cap, self.rows = form, cap, rows
        k = basis.shape[1] if basis is not None else 2 * n
        # soft: delta itself (authors' form: raw), (2n,) = [chosen..., rejected...]; exact: c
        self.delta = torch.nn.Parameter(torch.zeros(k, device=device))

    @classmethod
    def maybe(cls, objective, session, lc) -> "AuxRewards | NoAuxRewards":
        """The auxiliary rewards of `session`'s training pairs when the objective has the
        auxdpo term, else a :class:`NoAuxRewards`; records the Gram spectrum in the run
        directory."""
        from dpolab import rundir
        from dpolab.errors import UserError
        from dpolab.progress import Progress

        if not objective.needs_delta:
            return NoAuxRewards()
        n, tc, scope = len(session.train), session.cfg.train, session.scope
        rows = scope.trained_rows  # token_rows: A has only these rows of the head
        kw = dict(device=session.dist.device, null_weight=lc.aux_null_weight,
                  amp_weight=lc.aux_amp_weight, form=lc.aux_form, cap=lc.aux_cap, rows=rows)
        max_bytes = lc.aux_max_gib * 2**30
        gram, err = None, None
        bar = Progress(n, "auxdpo: per-response gradients", enabled=tc.progress and session.dist.is_main)
        try:
            gram = response_gradient_gram(lambda ex: scope.forward(ex, split="train"),
                                          session.train, session.params,
                                          max_bytes=max_bytes, progress=bar.update)
            source = "per-response gradients"
        except ValueError as too_big:
            err = too_big
        bar.close()
        closed_form = scope.head_states is not None  # the head's A has a closed form
        if gram is None and closed_form:  # the head's Gram in closed form, from the cached states
            hs, ys = scope.head_states.responses(session.train, split="train")
            try:
                gram = head_gradient_gram(list(zip(hs, ys)), scope.reference_head,
                                          max_bytes=max_bytes, rows=rows)
                source = "head closed form"
            except ValueError as too_big:
                err = too_big
        if gram is None:
            if closed_form and lc.aux_mode == "soft":  # the closed-form penalty needs no Gram
                return cls(n, states=scope.head_states, examples=session.train,
                           head0=scope.reference_head, **kw)
            raise UserError(f"loss auxdpo ({lc.aux_mode} mode, scope {tc.scope}): {err}. "
                            + ("Use loss.aux_mode=soft, which for the last_layer scope needs "
                               "no per-response gradients." if closed_form else
                               "Use train.scope=last_layer or lora, or raise "
                               "loss.aux_max_gib."))
        evals, evecs, null = _eig_null(gram)
        if session.dist.is_main:  # how much room N(A) leaves delta, for whoever reads the run
            spectrum = _spectrum(evals, null, null_weight=lc.aux_null_weight)
            rundir.write_auxdpo_record(session.run_dir, {
                "mode": lc.aux_mode, "form": lc.aux_form, "scope": tc.scope, "gram": source,
                "trained_parameters": (sum(p.numel() for p in session.params) if rows is None
                                       else rows.numel() * scope.params[0].shape[1]),
                **spectrum})
        if lc.aux_mode == "exact":
            basis = evecs[:, null].float().to(session.dist.device)
            if session.dist.is_main:
                print(f"auxdpo exact mode: the null space of A has dimension {basis.shape[1]} "
                      f"of {2 * n}" + (" - delta is 0 and AuxDPO equals DPO here"
                                       if basis.shape[1] == 0 else ""))
            return cls(n, basis=basis, **kw)
        return cls(n, gram=gram.float().to(session.dist.device), **kw)

    def param_groups(self, lr: float) -> list[dict]:
        """The optimizer's group of the auxiliary rewards: their own learning rate, no decay."""
        return [{"params": [self.delta], "lr": lr, "weight_decay": 0.0}]

    def named(self) -> dict[str, Tensor]:
        """The trained tensor by the name checkpoints keep it under."""
        return {"auxdpo.delta": self.delta}

    def sync(self, dist) -> None:
        """Sum delta's gradient over the ranks: it lives outside the engine's module."""
        dist.sum_grad(self.delta)

    def full_delta(self) -> Tensor:
        """(2n,) auxiliary rewards [chosen..., rejected...]."""
        d = self.basis @ self.delta if self.basis is not None else self.delta
        return capped_aux_reward(d, cap=self.cap) if self.form == "authors" else d

    def batch(self, idx) -> tuple[Tensor, Tensor]:
        i = torch.as_tensor(list(idx), dtype=torch.long, device=self.delta.device)
        d = self.full_delta()
        return d[i], d[self.n + i]

    def with_delta(self, pairs, idx):
        """`pairs` (a losses.PairLogps of the training pairs at positions idx) carrying their
        auxiliary rewards."""
        dc, dr = self.batch(idx)
        return dataclasses.replace(pairs, delta_chosen=dc, delta_rejected=dr)

    def penalty(self, idx, *, n_global: int) -> Tensor:
        """lambda_null ||A_B delta_B||^2 + the amplitude term (seed: lambda_amp ||delta_B||^2;
        authors: -lambda_amp / 2 (mean delta_c^2 + mean delta_r^2)) on the training pairs at
        positions idx, scaled by |B| / n_global (1 when a step is one micro-batch, as in the
        authors' trainer)."""
        dc, dr = self.batch(idx)
        per_seq = torch.cat([dc, dr])  # (2B,)
        scale = len(idx) / n_global
        amp = self.amp_weight * scale * (authors_amplitude_term(dc, dr) if self.form == "authors"
                                         else amplitude_penalty(per_seq))
        if self.basis is not None:  # exact mode: A delta = 0 by construction
            return amp
        if self.gram is not None:
            i = torch.as_tensor(list(idx), dtype=torch.long, device=self.delta.device)
            null = gram_penalty(per_seq, self.gram, torch.cat([i, self.n + i]))
        else:
            hs, ys = self.states.responses([self.examples[j] for j in idx], split="train")
            token_delta = torch.cat([per_seq[j].expand(h.shape[0]) for j, h in enumerate(hs)])
            null = head_gradient_penalty(torch.cat(hs), torch.cat(ys), token_delta, self.head0,
                                         rows=self.rows)
        return self.null_weight * null * scale + amp

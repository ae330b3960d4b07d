"""The diverse-values experiment of Im & Li (arXiv 2408.03459, Sec. 5) on a real model:
persona statements of K value groups, only the unembedding rows of " Yes" and " No" trained.

Format (the paper's). Statement i of a value group is shown as
    Is the following statement something you would say?\\n"<statement>"
and the responses are the single tokens y = " Yes" / " No"; the chosen one is the answer of the
group's persona (:mod:`dpolab.theory.persona_data`). x_i (D,) is the final hidden state at the
last prompt token: the body runs once per statement and its states are cached.

Why two rows are the whole head. log pi(y | x) = W[y] . x - logsumexp(W x); chosen and
rejected share x, so the log-partition cancels in the log-ratio margin

    h_i = s_i (u - u0) . x_i,   u = W[Yes] - W[No],  s_i = +1 (chosen Yes) / -1 (chosen No),

and the DPO loss -log sigma(beta h_i) has zero gradient on every other row of W. Training the
two rows (2, D) from the reference W0 is exactly last-layer DPO on the untied (V, D) head.

Optimisers (two columns, everything else shared): full-batch Adam (torch.optim.Adam, betas
(0.9, 0.999), eps 1e-8) and full-batch gradient descent W <- W - lr grad, the forward-Euler step
of the paper's gradient flow (Lemma 4.1). Float64 throughout.

The recipe is fixed before the K sweep, by a criterion on the *training* error at K = 1 only
(:func:`choose_lr`), and the groups by a pre-registered filter on the K = 1 *held-out* error
(:func:`filter_groups`); both thresholds are the constants below.

Notation: N statements in a run, D hidden size, R runs trained side by side (independent:
Adam and GD act elementwise and each run's loss touches only its own rows).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dpolab import atomic
from dpolab.theory import persona_data as PD
from dpolab.threads import single_thread
from dpolab.theory.values import fit_line

Tensor = torch.Tensor
STATES_VERSION = "persona-v1"  # part of the cache key: bump when the stored fields change
STORE_KIND = f"persona-states-{STATES_VERSION}"  # the kind of its cache file (atomic.save_tensors)

# ---- pre-registered marks (written before any sweep result was seen) -------------------
FILTER_MAX_HELD_ERROR = 0.15  # a group is kept iff alone (K = 1) its held-out error <= this
FIT_MAX_TRAIN_ERROR = 0.05  # the recipe fits when the mean K = 1 training error <= this
PASS_K1_MAX_ERROR = 0.15  # reproduced needs: mean held-out error at K = 1 <= this,
PASS_MIN_R2 = 0.9  # held-out error linear in K with slope > 0 and R^2 >= this (means),
PASS_GROWTH_SLOPE = (-1.2, -0.8)  # and log growth rate vs log K with a slope in this range
OPTIMIZERS = ("adam", "gd")
# Learning rates the K = 1 training criterion chooses from, smallest first. Adam's is the
# given recipe (1e-2 for 300 steps; the paper's 1e-3 for 100 steps does not move SmolLM2's
# head): the criterion is verified and reported, not searched. Gradient descent has no given
# value: half decades.
LR_GRID = {"adam": (1e-2,),
           "gd": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0,
                  1000.0)}


@dataclass(frozen=True)
class PersonaConfig:
    """One run of `dpolab reproduce values --real` (recorded in results.json)."""

    model: str = "smollm2-135m-instruct"  # model name, folder or .gguf (dpolab.models)
    groups: tuple[str, ...] | None = None  # candidate groups (None: all, in their fixed order)
    q: int = 80  # training statements per group (the paper's Q), half Yes / half No
    held: int = 40  # held-out statements per group, half Yes / half No
    seed: int = 0  # statement sampling and the draws of groups
    beta: float = 0.01  # DPO beta (the paper's)
    steps: int = 300  # full-batch steps per run
    ks: tuple[int, ...] = (1, 2, 4, 8, 16)  # values per run
    draws: int = 8  # random draws of K groups per K
    early: int = 30  # growth rate: slope of the mean training margin over steps 0..early
    batch_tokens: int = 4096  # padded tokens per body forward when computing states


# ----------------------------------------------------------------------------------------
# States: one body forward per statement, cached on disk


@dataclass(frozen=True)
class PersonaStates:
    """Cached final states of every sampled statement of the candidate groups."""

    x: Tensor  # (N, D) float32, final hidden state at the last prompt token
    yes: Tensor  # (N,) bool, chosen response " Yes" (else " No")
    group: Tensor  # (N,) long, index into `groups`
    held: Tensor  # (N,) bool, held-out statement
    groups: tuple[str, ...]
    w0: Tensor  # (2, D) float32, the reference head's rows of " Yes" and " No"
    info: dict = field(default_factory=dict)  # cache key, hit, timings, counts
    logp0: Tensor | None = None  # (N, 2) float32 log p(Yes), log p(No) under the full head

    def select(self, groups: Sequence[int], *, held: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(x (n, D), s (n,) +1 for chosen Yes / -1 for No, group (n,)) of the statements of
        the given group indices in one split."""
        keep = torch.isin(self.group, torch.as_tensor(list(groups))) & (self.held == held)
        s = torch.where(self.yes[keep], 1.0, -1.0).double()
        return self.x[keep].double(), s, self.group[keep]


def response_ids(tokenizer) -> tuple[int, int]:
    """The single token ids of " Yes" and " No"; ValueError when either is several tokens."""
    ids = [tokenizer(a, add_special_tokens=False).input_ids for a in PD.ANSWERS]
    bad = [a for a, i in zip(PD.ANSWERS, ids) if len(i) != 1]
    if bad:
        raise ValueError(f"the tokenizer splits {bad} into several tokens; the persona format "
                         "needs single-token responses")
    return ids[0][0], ids[1][0]


def _prompt_ids(tokenizer, statements: Sequence[PD.Statement]) -> list[list[int]]:
    # The trainer's rule for string prompts: the tokenizer's own special tokens (BOS, if any).
    return [tokenizer(PD.PROMPT.format(statement=s.text)).input_ids for s in statements]


def last_states(body, prompts: Sequence[Sequence[int]], *, pad_id: int, batch_tokens: int,
                progress=None) -> Tensor:
    """(N, D) float32 final hidden states at each prompt's last token; no grad, batched by
    length with right padding (causal attention: padding after a token never changes it)."""
    from dpolab.theory.values_real import _length_batches, _padded_hidden

    out: list[Tensor | None] = [None] * len(prompts)
    done = 0
    with torch.no_grad():
        for idx in _length_batches([len(p) for p in prompts], batch_tokens=batch_tokens):
            hidden = _padded_hidden(body, [prompts[i] for i in idx], pad_id=pad_id)  # (B, T, D)
            for b, i in enumerate(idx):
                out[i] = hidden[b, len(prompts[i]) - 1].clone()
            done += len(idx)
            if progress:
                progress(done)
    return torch.stack(out)


def save_checked(tensors: dict[str, Tensor], path: Path) -> None:
    """Write tensors as a cache file with its kind and checksum (dpolab.atomic.save_tensors)."""
    atomic.save_tensors(tensors, path, kind=STORE_KIND)


def load_checked(path: Path) -> dict[str, Tensor] | None:
    """The tensors of a file :func:`save_checked` wrote, or None when it is missing,
    unreadable or its contents no longer match the recorded checksum (recomputed, never
    trusted; dpolab.atomic.read_tensors)."""
    return atomic.read_tensors(path, kind=STORE_KIND)


def prompt_digest(ids: Sequence[int]) -> bytes:
    """16-byte blake2b of a prompt's token ids: the key of its state in the store."""
    return hashlib.blake2b(json.dumps(list(ids)).encode(), digest_size=16).digest()


def load_store(path: Path | None) -> dict[bytes, Tensor]:
    """{prompt digest: row (D + 2,) = [state, log p(Yes), log p(No)]} of a model's store
    file (empty when missing or when its checksum fails: everything is computed again)."""
    arrays = load_checked(path) if path is not None else None
    if arrays is None or set(arrays) != {"ids", "rows"}:
        return {}
    return {bytes(k.tolist()): r for k, r in zip(arrays["ids"], arrays["rows"])}


def save_store(rows: dict[bytes, Tensor], path: Path) -> None:
    ids = torch.tensor([list(k) for k in rows], dtype=torch.uint8)
    save_checked({"ids": ids, "rows": torch.stack(list(rows.values())).contiguous()}, path)


def response_logps(x: Tensor, weight: Tensor, ids: tuple[int, int], *, chunk: int = 256
                   ) -> Tensor:
    """(N, 2) float32 log p(Yes | x), log p(No | x) under the full softmax of the head weight
    (V, D), in chunks of states (the (N, V) logits never exist at once)."""
    out = []
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            z = x[i:i + chunk].double() @ weight.double().T  # (c, V)
            out.append((z[:, list(ids)] - torch.logsumexp(z, 1, keepdim=True)).float())
    return torch.cat(out) if out else torch.zeros(0, 2)


def build_states(cfg: PersonaConfig, *, store_dir: Path | None, progress: bool = True
                 ) -> PersonaStates:
    """Sample every candidate group, tokenize, and get the states: each prompt's from the
    model's store in `store_dir` (keyed by the weights' hash, then by the prompt's token ids;
    checked on read) when it is there, else by one forward per missing prompt, then added."""
    from dpolab import reference
    from dpolab.models import body_and_head, load_model, load_tokenizer, resolve_model_path
    from dpolab.progress import Progress

    t0 = time.perf_counter()
    groups, too_small = [], {}
    statements, gidx, held = [], [], []
    for group in PD.get_groups(cfg.groups):
        try:  # a candidate with fewer than q + held statements cannot take part
            tr, ho = PD.sample_group(group, train=cfg.q, held=cfg.held, seed=cfg.seed)
        except PD.PersonaDataError as err:
            too_small[group.name] = str(err)
            continue
        for split, rows in ((False, tr), (True, ho)):
            statements += rows
            gidx += [len(groups)] * len(rows)
            held += [split] * len(rows)
        groups.append(group)
    path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(path)
    yes_id, no_id = response_ids(tokenizer)
    prompts = _prompt_ids(tokenizer, statements)
    model = load_model(path)
    model.requires_grad_(False)
    body, head = body_and_head(model)
    if head.bias is not None or head.softcap is not None:
        raise ValueError(f"{cfg.model}: a head with a bias or a logit softcap breaks the "
                         "two-row reduction (the softcap does not cancel in the margin)")
    key = f"{reference.hash_parameters(model)[:16]}-{STATES_VERSION}"
    store = store_dir / f"{key}.safetensors" if store_dir is not None else None
    known = load_store(store)
    digests = [prompt_digest(p) for p in prompts]
    missing = [i for i, d in enumerate(digests) if d not in known]
    t1 = time.perf_counter()
    if missing:
        bar = Progress(len(missing), "persona states", enabled=progress)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        new = last_states(body, [prompts[i] for i in missing], pad_id=pad,
                          batch_tokens=cfg.batch_tokens, progress=bar.update)
        bar.close()
        lp = response_logps(new, head.weight.detach(), (yes_id, no_id))
        known.update({digests[i]: torch.cat([x, l]) for i, x, l in zip(missing, new, lp)})
        if store is not None:
            save_store(known, store)
    rows = torch.stack([known[d] for d in digests])
    x, logp0 = rows[:, :-2].contiguous(), rows[:, -2:].contiguous()
    hit = not missing
    w0 = head.weight.detach()[[yes_id, no_id]].float().clone()
    info = {"model": cfg.model, "cache_key": key, "cache_hit": hit, "load_s": t1 - t0,
            "states_s": time.perf_counter() - t1, "statements": len(prompts),
            "prompt_tokens": sum(map(len, prompts)), "response_ids": [yes_id, no_id],
            "computed": len(missing), "too_small": too_small}
    return PersonaStates(x, torch.tensor([s.yes for s in statements]),
                         torch.tensor(gidx), torch.tensor(held), tuple(g.name for g in groups),
                         w0, info, logp0)


# ----------------------------------------------------------------------------------------
# Two-row DPO, many runs side by side


@dataclass(frozen=True)
class RowRuns:
    """Trajectories of R runs (reward margins r = beta h, means over each run's statements)."""

    train_margin: np.ndarray  # (R, S + 1) mean training reward margin at steps 0..S
    held_margin: np.ndarray  # (R, S + 1) mean held-out reward margin
    loss: np.ndarray  # (R, S + 1) mean training DPO loss
    train_final: list[np.ndarray]  # R arrays (n_r,) final training reward margins
    held_final: list[np.ndarray]  # R arrays (m_r,) final held-out reward margins


def _stack(parts: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """R (x (n_r, D), s (n_r,)) -> x (R, n, D), s (R, n), mask (R, n), zero-padded."""
    n = max(x.shape[0] for x, _ in parts)
    d = parts[0][0].shape[1]
    X = torch.zeros(len(parts), n, d, dtype=torch.float64)
    S = torch.zeros(len(parts), n, dtype=torch.float64)
    M = torch.zeros(len(parts), n, dtype=torch.float64)
    for r, (x, s) in enumerate(parts):
        X[r, :x.shape[0]], S[r, :x.shape[0]], M[r, :x.shape[0]] = x, s, 1.0
    return X, S, M


def _h(u: Tensor, X: Tensor, S: Tensor) -> Tensor:
    """Log-ratio margins (R, n): h = s u . x, u = delta_Yes - delta_No (R, D), delta = W - W0."""
    return S * (X * u[:, None, :]).sum(-1)


def train_rows(train: Sequence[tuple[Tensor, Tensor]], held: Sequence[tuple[Tensor, Tensor]],
               *, beta: float, lr: float, steps: int, optimizer: str,
               held_every: int = 5) -> RowRuns:
    """R independent runs of full-batch DPO on the two rows, all from W0 (delta = 0).

    Run r minimises its own L_r = mean_i -log sigma(beta h_i) over its statements train[r];
    Adam (elementwise) and GD step each run exactly as alone. The gradient is written out
    (no autograd: the loop is the whole cost of a sweep):
        dL_r/dh_i = -beta sigma(-beta h_i) / n_r,   h_i = s_i (delta_Yes - delta_No) . x_i,
        dL_r/d delta_Yes = sum_i dL_r/dh_i s_i x_i = -dL_r/d delta_No.
    The held-out margin curve is recorded every `held_every` steps (NaN between) and at the
    last step. `optimizer`: "adam" or "gd".
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    with single_thread():  # small tensors: a second thread costs more than it brings
        return _train_rows(train, held, beta=beta, lr=lr, steps=steps, optimizer=optimizer,
                           held_every=held_every)


def _train_rows(train, held, *, beta: float, lr: float, steps: int, optimizer: str,
                held_every: int) -> RowRuns:
    Xt, St, Mt = _stack(train)
    Xh, Sh, Mh = _stack(held)
    nt, nh = Mt.sum(1), Mh.sum(1)
    delta = torch.zeros(len(train), 2, Xt.shape[2], dtype=torch.float64)
    opt = torch.optim.Adam([delta], lr=lr) if optimizer == "adam" else None
    rec = {"train": [], "held": [], "loss": []}
    for step in range(steps + 1):
        h = _h(delta[:, 0] - delta[:, 1], Xt, St)  # (R, n)
        rec["loss"].append(((torch.nn.functional.softplus(-beta * h) * Mt).sum(1) / nt).numpy())
        rec["train"].append(((beta * h * Mt).sum(1) / nt).numpy())
        if step % held_every == 0 or step == steps:
            hh = _h(delta[:, 0] - delta[:, 1], Xh, Sh)
            rec["held"].append(((beta * hh * Mh).sum(1) / nh).numpy())
        else:
            rec["held"].append(np.full(len(train), np.nan))
        if step == steps:
            break
        dh = -beta * torch.sigmoid(-beta * h) * Mt / nt[:, None]  # (R, n)
        g_yes = torch.bmm((dh * St)[:, None, :], Xt)[:, 0]  # (R, D)
        grad = torch.stack([g_yes, -g_yes], 1)  # (R, 2, D)
        if opt is None:
            delta -= lr * grad
        else:
            delta.grad = grad
            opt.step()
    ht, hh = beta * _h(delta[:, 0] - delta[:, 1], Xt, St), beta * hh
    return RowRuns(np.stack(rec["train"], 1), np.stack(rec["held"], 1), np.stack(rec["loss"], 1),
                   [ht[r, :x.shape[0]].numpy() for r, (x, _) in enumerate(train)],
                   [hh[r, :x.shape[0]].numpy() for r, (x, _) in enumerate(held)])


def error(margins: np.ndarray, groups: np.ndarray) -> float:
    """Mean over the groups present of the share of their statements with reward margin < 0,
    a margin of exactly 0 counting half (the state before training)."""
    margins, groups = np.asarray(margins), np.asarray(groups)
    wrong = (margins < 0) + 0.5 * (margins == 0)
    return float(np.mean([wrong[groups == g].mean() for g in np.unique(groups)]))


def growth_rate(curve: np.ndarray, *, early: int) -> float:
    """Least-squares slope of a margin curve (indexed by step) over steps 0..early."""
    steps = np.arange(min(early, len(curve) - 1) + 1)
    return fit_line(steps, np.asarray(curve)[steps])["slope"]


# ----------------------------------------------------------------------------------------
# K = 1: the recipe criterion and the group filter


def single_group_runs(st: PersonaStates, cfg: PersonaConfig, *, optimizer: str, lr: float,
                      groups: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Every group alone (K = 1): final training and held-out error, loss and growth rate."""
    groups = list(range(len(st.groups))) if groups is None else list(groups)
    train = [st.select([g], held=False)[:2] for g in groups]
    held = [st.select([g], held=True)[:2] for g in groups]
    runs = train_rows(train, held, beta=cfg.beta, lr=lr, steps=cfg.steps, optimizer=optimizer)
    one = lambda m: error(m, np.zeros(len(m)))  # noqa: E731  one group
    return [{"group": st.groups[g], "train_error": one(runs.train_final[i]),
             "held_error": one(runs.held_final[i]),
             "train_rate": growth_rate(runs.train_margin[i], early=cfg.early),
             "loss_end": float(runs.loss[i, -1])} for i, g in enumerate(groups)]


def choose_lr(st: PersonaStates, cfg: PersonaConfig, *, optimizer: str) -> dict[str, Any]:
    """The recipe's learning rate: the smallest of LR_GRID[optimizer] at which the mean
    K = 1 *training* error over all candidate groups is <= FIT_MAX_TRAIN_ERROR after
    cfg.steps steps; when none is, the one with the lowest mean training error, and `fits`
    says so (a fitting criterion: held-out errors play no part)."""
    tried = []
    for lr in LR_GRID[optimizer]:
        runs = single_group_runs(st, cfg, optimizer=optimizer, lr=lr)
        mean = float(np.mean([r["train_error"] for r in runs]))
        tried.append({"lr": lr, "mean_train_error": mean})
        if mean <= FIT_MAX_TRAIN_ERROR:
            return {"lr": lr, "fits": True, "tried": tried}
    best = min(tried, key=lambda t: t["mean_train_error"])
    return {"lr": best["lr"], "fits": False, "tried": tried}


def filter_groups(k1: Sequence[dict[str, Any]]) -> list[str]:
    """The pre-registered filter: the groups whose K = 1 held-out error is
    <= FILTER_MAX_HELD_ERROR, in candidate order."""
    return [r["group"] for r in k1 if r["held_error"] <= FILTER_MAX_HELD_ERROR]


# ----------------------------------------------------------------------------------------
# The K sweep over the kept groups


def draw_groups(n_groups: int, *, k: int, seed: int, draw: int) -> list[int]:
    """K distinct group indices out of n_groups, from numpy.random.default_rng([seed, k, draw])
    (the same (seed, K, draw) always gives the same draw)."""
    if not 1 <= k <= n_groups:
        raise ValueError(f"draw_groups: need 1 <= k <= {n_groups}, got {k}")
    rng = np.random.default_rng([seed, k, draw])
    return sorted(int(g) for g in rng.choice(n_groups, size=k, replace=False))


def k_sweep(st: PersonaStates, kept: Sequence[int], cfg: PersonaConfig, *, optimizer: str,
            lr: float) -> dict[str, Any]:
    """For each K <= len(kept) of cfg.ks and each draw: train on the K groups' training
    statements, score their held-out ones. Returns {runs, per_k, fits, curves}."""
    ks = [k for k in cfg.ks if k <= len(kept)]
    runs, curves = [], {}
    for k in ks:
        chosen = [[kept[i] for i in draw_groups(len(kept), k=k, seed=cfg.seed, draw=d)]
                  for d in range(cfg.draws)]
        tr = [st.select(c, held=False) for c in chosen]
        ho = [st.select(c, held=True) for c in chosen]
        t0 = time.perf_counter()
        out = train_rows([t[:2] for t in tr], [h[:2] for h in ho], beta=cfg.beta, lr=lr,
                         steps=cfg.steps, optimizer=optimizer)
        for d, c in enumerate(chosen):
            runs.append({"k": k, "draw": d, "groups": [st.groups[g] for g in c],
                         "train_error": error(out.train_final[d], tr[d][2].numpy()),
                         "held_error": error(out.held_final[d], ho[d][2].numpy()),
                         "train_rate": growth_rate(out.train_margin[d], early=cfg.early),
                         "held_rate": growth_rate(out.held_margin[d], early=cfg.early),
                         "train_margin_final": float(out.train_final[d].mean()),
                         "held_margin_final": float(out.held_final[d].mean()),
                         "loss_end": float(out.loss[d, -1])})
        curves[str(k)] = {"train": out.train_margin.mean(0).tolist(),
                          "held": out.held_margin.mean(0).tolist(),
                          "seconds": time.perf_counter() - t0}
    per_k = summarize_k(runs, ks)
    return {"ks": ks, "runs": runs, "per_k": per_k, "fits": fits(per_k, runs),
            "curves": curves}


def summarize_k(runs: Sequence[dict], ks: Sequence[int]) -> list[dict[str, Any]]:
    """Per K: mean and sd over the draws of the errors, rates and final margins, and every
    draw's held-out and training error."""
    out = []
    for k in ks:
        mine = [r for r in runs if r["k"] == k]
        row: dict[str, Any] = {"k": k, "draws": len(mine)}
        for key in ("held_error", "train_error", "train_rate", "held_rate",
                    "train_margin_final", "held_margin_final"):
            vals = np.array([r[key] for r in mine])
            row[key] = float(vals.mean())
            row[f"{key}_sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        row["held_error_draws"] = [r["held_error"] for r in mine]
        row["train_error_draws"] = [r["train_error"] for r in mine]
        out.append(row)
    return out


def fits(per_k: Sequence[dict], runs: Sequence[dict]) -> dict[str, Any]:
    """Linear fits of the held-out error on K and on log K (means over draws, and every
    draw), and the log-log fits of the growth rates on K (K with a positive mean rate)."""
    ks = np.array([r["k"] for r in per_k], dtype=float)
    out: dict[str, Any] = {}
    if len(ks) < 2:
        return out
    err = [r["held_error"] for r in per_k]
    out["held_error_vs_k"] = fit_line(ks, err)
    out["held_error_vs_log_k"] = fit_line(np.log(ks), err)
    out["held_error_vs_k_every_draw"] = fit_line([r["k"] for r in runs],
                                                 [r["held_error"] for r in runs])
    out["train_error_vs_k"] = fit_line(ks, [r["train_error"] for r in per_k])
    for what in ("train_rate", "held_rate"):
        ok = [(r["k"], r[what]) for r in per_k if r[what] > 0]
        out[f"loglog_{what}_vs_k"] = (fit_line(np.log([a for a, _ in ok]),
                                               np.log([b for _, b in ok]))
                                      if len(ok) > 1 else None)
    return out


def verdict(sweep: dict[str, Any]) -> dict[str, Any]:
    """The pre-registered pass marks applied to one optimiser's sweep; each mark with its
    number, and `reproduced` when all hold."""
    per_k, f = sweep["per_k"], sweep["fits"]
    k1 = next((r["held_error"] for r in per_k if r["k"] == 1), None)
    lin, growth = f.get("held_error_vs_k"), f.get("loglog_train_rate_vs_k")
    marks = {
        "k1_error": {"value": k1, "mark": f"<= {PASS_K1_MAX_ERROR}",
                     "pass": k1 is not None and k1 <= PASS_K1_MAX_ERROR},
        "error_slope": {"value": lin and lin["slope"], "mark": "> 0",
                        "pass": bool(lin) and lin["slope"] > 0},
        "error_r2": {"value": lin and lin["r2"], "mark": f">= {PASS_MIN_R2}",
                     "pass": bool(lin) and lin["r2"] >= PASS_MIN_R2},
        "growth_loglog_slope": {"value": growth and growth["slope"],
                                "mark": f"in [{PASS_GROWTH_SLOPE[0]}, {PASS_GROWTH_SLOPE[1]}]",
                                "pass": bool(growth) and PASS_GROWTH_SLOPE[0]
                                <= growth["slope"] <= PASS_GROWTH_SLOPE[1]},
        "k_max": {"value": max(sweep["ks"]) if sweep["ks"] else 0, "mark": "16",
                  "pass": bool(sweep["ks"]) and max(sweep["ks"]) >= 16},
    }
    return {"marks": marks, "reproduced": all(m["pass"] for m in marks.values())}


# ----------------------------------------------------------------------------------------
# Everything


def run(cfg: PersonaConfig, *, store_dir: Path | None, progress: bool = True,
        log=print) -> dict[str, Any]:
    """States, recipe, filter, sweeps and verdicts: the `real_model` entry of results.json."""
    t0 = time.perf_counter()
    st = build_states(cfg, store_dir=store_dir, progress=progress)
    return analyse(st, cfg, log=log) | {"timings": {
        "load_s": st.info["load_s"], "states_s": st.info["states_s"],
        "states_cache_hit": st.info["cache_hit"], "total_s": time.perf_counter() - t0}}


def analyse(st: PersonaStates, cfg: PersonaConfig, *, log=print) -> dict[str, Any]:
    """Everything after the states (so tests can feed synthetic states)."""
    t0 = time.perf_counter()
    recipe, k1, kept_names = recipe_and_filter(st, cfg, log=log)
    kept = [st.groups.index(g) for g in kept_names]
    sweeps, verdicts = {}, {}
    for opt in OPTIMIZERS:
        sweeps[opt] = k_sweep(st, kept, cfg, optimizer=opt, lr=recipe[opt]["lr"])
        verdicts[opt] = verdict(sweeps[opt])
        fit = sweeps[opt]["fits"].get("held_error_vs_k")
        if fit:
            log(f"{opt}: held-out error = {fit['slope']:.4f} K + {fit['intercept']:.4f} "
                f"(R^2 {fit['r2']:.3f}); reproduced: {verdicts[opt]['reproduced']}")
    too_small = st.info.get("too_small", {})
    return {
        "setting": {"config": asdict(cfg), "prompt": PD.PROMPT, "responses": list(PD.ANSWERS),
                    "groups": [g.record() | {"too_small": too_small.get(g.name)}
                               for g in PD.get_groups(cfg.groups)],
                    "model_info": {k: v for k, v in st.info.items()
                                   if k not in ("load_s", "states_s")},
                    "hidden_size": int(st.x.shape[1]),
                    "shared_fraction": shared_fraction(st.x),
                    "preregistered": preregistration()},
        "recipe": recipe,
        "k1": {opt: rows for opt, rows in k1.items()},
        "kept": kept_names,
        "sweeps": sweeps,
        "verdicts": verdicts,
        "analysis_s": time.perf_counter() - t0,
    }


def recipe_and_filter(st: PersonaStates, cfg: PersonaConfig, *, log=print
                      ) -> tuple[dict[str, dict], dict[str, list[dict]], list[str]]:
    """(recipe per optimiser, every group's K = 1 runs per optimiser, the kept groups): the
    steps fixed before any sweep, shared by every experiment on these states."""
    recipe = {opt: choose_lr(st, cfg, optimizer=opt) for opt in OPTIMIZERS}
    for opt, r in recipe.items():
        err = next(t["mean_train_error"] for t in r["tried"] if t["lr"] == r["lr"])
        log(f"recipe {opt}: lr {r['lr']:g} (K = 1 mean training error {err:.3f}"
            f"{'' if r['fits'] else f', above {FIT_MAX_TRAIN_ERROR}'})")
    k1 = {opt: single_group_runs(st, cfg, optimizer=opt, lr=recipe[opt]["lr"])
          for opt in OPTIMIZERS}
    kept = filter_groups(k1["adam"])
    log(f"filter (K = 1 held-out error <= {FILTER_MAX_HELD_ERROR}, Adam): kept "
        f"{len(kept)} of {len(st.groups)}: {', '.join(kept) or '(none)'}")
    return recipe, k1, kept


def shared_fraction(x: Tensor) -> float:
    """||mean x|| / mean ||x||: 1 when every state is the same vector."""
    x = x.double()
    return float(x.mean(0).norm() / x.norm(dim=1).mean())


def preregistration() -> dict[str, Any]:
    """The marks and criteria, as fixed in this module before the sweep ran."""
    return {"filter": f"a group is kept iff alone (K = 1, Adam, the recipe's lr) its "
                      f"held-out error <= {FILTER_MAX_HELD_ERROR}",
            "recipe": f"Adam: lr 1e-2 for the run's steps (given; its K = 1 training errors "
                      f"are reported); gradient descent: the smallest lr of {LR_GRID['gd']} "
                      f"whose mean K = 1 training error over all candidate groups is <= "
                      f"{FIT_MAX_TRAIN_ERROR}, else the one with the lowest",
            "pass": {"k1_error": f"<= {PASS_K1_MAX_ERROR}",
                     "held_error_vs_k": f"slope > 0 and R^2 >= {PASS_MIN_R2} (means over "
                                        "draws)",
                     "growth_loglog_slope": f"in {list(PASS_GROWTH_SLOPE)}",
                     "k_max": "16 (at least 16 groups kept)"}}

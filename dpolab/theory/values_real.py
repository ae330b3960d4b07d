"""Diverse values on a real model: last-layer DPO on the final hidden states of a causal LM
(by default SmolLM2-135M-Instruct) over the multi-value default data, one value per group.

This is the small-scale counterpart of the paper's last-layer experiments (Im & Li,
arXiv 2408.03459, Sec. 5, Figures 3 and 5: 8B models, Anthropic persona statements).

Single-token reading (the paper's model, Sec. 3 and Lemma 4.1). Pair j is reduced to
    x_j    (D,)  the final hidden state at the first position where the chosen and rejected
                 token ids differ (the prompt's last token when their first tokens differ);
                 both completions share every token before it, so both share this state;
    y_w,j  the chosen token there;  y_l,j  the rejected token there.
With log pi(y | x) = W[y] . x - logsumexp(W x) the log-partition is the same for y_w and y_l,
so the logratio margin is linear in the head W (V, D):

    h_j = (W - W0)[y_w,j] . x_j - (W - W0)[y_l,j] . x_j,     reward margin r_j = beta h_j,

and the gradient of the DPO loss reaches only the rows of tokens that occur as some y_w or y_l.
Training the submatrix W[U] of those U tokens is therefore *exactly* training the whole
(untied) 49152 x 576 head, at a cost of N x |U| x D per step instead of N x V x D. The
full-sequence objective (every completion token through the full softmax) costs about
170 MFLOP per token per step, tens of seconds per step for K = 7 on two CPU cores, and is not
what the theory describes; :func:`full_sequence_step_cost` measures it for the record.

Notation: N pairs, D hidden size, V vocabulary, G groups (values), K values in one run,
Q training pairs per value.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dpolab import atomic
from dpolab.logps import Head, label_logps
from dpolab.losses import dpo_loss

Tensor = torch.Tensor
STATES_VERSION = "divergence-v1"  # part of the cache key: bump when the stored fields change


# ----------------------------------------------------------------------------------------
# Final hidden states, one forward per pair, cached on disk


@dataclass(frozen=True)
class PairStates:
    """Cached states and tokens of N pairs (one split)."""

    x: Tensor  # (N, D) float32, state at the first differing position (shared by y_w and y_l)
    prompt_last: Tensor  # (N, D) float32, state at the prompt's last token
    prompt_mean: Tensor  # (N, D) float32, mean state over the prompt's tokens
    chosen: Tensor  # (N,) long, y_w
    rejected: Tensor  # (N,) long, y_l
    group: Tensor  # (N,) long, index into the group list

    @property
    def n(self) -> int:
        return int(self.chosen.shape[0])

    def subset(self, idx) -> "PairStates":
        i = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return PairStates(*(t[i] for t in (self.x, self.prompt_last, self.prompt_mean,
                                           self.chosen, self.rejected, self.group)))


@dataclass
class RealData:
    train: PairStates
    held_out: PairStates
    groups: list[str]
    w0: Tensor  # (V, D) the reference head (SmolLM2 ties it to the input embedding)
    info: dict[str, Any] = field(default_factory=dict)  # counts, cache key, timings


def divergence(chosen_ids: Sequence[int], rejected_ids: Sequence[int]) -> int | None:
    """Length c of the common prefix: chosen_ids[c] != rejected_ids[c] is the first
    difference. None when one sequence is a prefix of the other (no token pair to compare)."""
    for c, (a, b) in enumerate(zip(chosen_ids, rejected_ids)):
        if a != b:
            return c
    return None


def compute_states(body, examples: Sequence, *, pad_id: int, batch_tokens: int,
                   progress=None) -> dict[str, Tensor]:
    """One no-grad forward of prompt + common prefix per pair (the pair's only shared part).

    Returns {"x", "prompt_last", "prompt_mean"}, each (N, D) float32 in example order.
    Sequences are batched by length, up to `batch_tokens` padded tokens a batch (right
    padding, attention mask): many short prompts go in one forward, whose per-layer overhead
    dominates on a CPU otherwise. Causal attention makes each state independent of the
    padding after it.
    """
    seqs, plen = [], []
    for ex in examples:
        c = divergence(ex.chosen_ids, ex.rejected_ids)
        seqs.append(list(ex.prompt_ids) + list(ex.chosen_ids[:c]))
        plen.append(len(ex.prompt_ids))
    out: dict[str, list] = {"x": [None] * len(seqs), "prompt_last": [None] * len(seqs),
                            "prompt_mean": [None] * len(seqs)}
    done = 0
    with torch.no_grad():
        for idx in _length_batches([len(q) for q in seqs], batch_tokens=batch_tokens):
            hidden = _padded_hidden(body, [seqs[i] for i in idx], pad_id=pad_id)  # (B, T, D)
            for b, i in enumerate(idx):
                out["x"][i] = hidden[b, len(seqs[i]) - 1]
                out["prompt_last"][i] = hidden[b, plen[i] - 1]
                out["prompt_mean"][i] = hidden[b, :plen[i]].mean(0)
            done += len(idx)
            if progress:
                progress(done)
    return {k: torch.stack(v).contiguous() for k, v in out.items()}


def _padded_hidden(body, seqs: list[list[int]], *, pad_id: int) -> Tensor:
    """The token sequences `seqs` right-padded into one batch through `body` (with its
    attention mask): (B, T, D) float32 final hidden states, T the longest sequence."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
        mask[b, :len(s)] = 1
    return body(ids, attention_mask=mask).float()


def _length_batches(lengths: Sequence[int], *, batch_tokens: int) -> list[list[int]]:
    """Indices sorted by length, cut into batches of at most `batch_tokens` padded tokens
    (a longer single sequence gets a batch of its own)."""
    batches, cur = [], []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if cur and (len(cur) + 1) * lengths[i] > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    return batches + ([cur] if cur else [])


def _states(examples: Sequence, arrays: dict[str, Tensor], lo: int, hi: int,
            gindex: dict[str, int]) -> PairStates:
    ex = examples[lo:hi]
    c = [divergence(e.chosen_ids, e.rejected_ids) for e in ex]
    return PairStates(
        x=arrays["x"][lo:hi], prompt_last=arrays["prompt_last"][lo:hi],
        prompt_mean=arrays["prompt_mean"][lo:hi],
        chosen=torch.tensor([e.chosen_ids[k] for e, k in zip(ex, c)], dtype=torch.long),
        rejected=torch.tensor([e.rejected_ids[k] for e, k in zip(ex, c)], dtype=torch.long),
        group=torch.tensor([gindex[e.group] for e in ex], dtype=torch.long))


def build_states(model_name: str, train_rows: Sequence, held_rows: Sequence, *,
                 max_length: int, max_prompt_length: int, batch_tokens: int = 2048,
                 store_dir: Path | None = None, progress: bool = True) -> RealData:
    """Tokenize rows (chat template, the trainer's truncation), drop pairs with no differing
    token, and get every pair's states: from `store_dir` when a file for (weights, token
    ids) is there, else by one forward pass, then stored there (safetensors)."""
    from dpolab import reference
    from dpolab.models import body_and_head, load_model, load_tokenizer, resolve_model_path
    from dpolab.progress import Progress
    from dpolab.tokenize import tokenize_rows

    t0 = time.perf_counter()
    path = resolve_model_path(model_name)
    tokenizer = load_tokenizer(path)
    model = load_model(path)
    model.requires_grad_(False)
    body, head = body_and_head(model)
    split_ex, dropped = [], {}
    for split, rows in (("train", train_rows), ("held_out", held_rows)):
        tok = tokenize_rows(rows, tokenizer, max_length=max_length,
                            max_prompt_length=max_prompt_length)
        kept = [e for e in tok.examples if divergence(e.chosen_ids, e.rejected_ids) is not None]
        dropped[split] = tok.dropped_identical + len(tok.examples) - len(kept)
        split_ex.append(kept)
    examples = split_ex[0] + split_ex[1]
    key = (f"{reference.hash_parameters(model)[:16]}-{reference.hash_examples(examples)[:16]}"
           f"-{STATES_VERSION}")
    store = store_dir / f"{key}.safetensors" if store_dir is not None else None
    arrays = _load(store, len(examples))
    hit = arrays is not None
    t1 = time.perf_counter()
    if arrays is None:
        bar = Progress(len(examples), "final hidden states", enabled=progress)
        arrays = compute_states(body, examples, pad_id=tokenizer.pad_token_id,
                                batch_tokens=batch_tokens, progress=bar.update)
        bar.close()
        if store is not None:
            atomic.save_tensors(arrays, store, kind=STATES_VERSION)
    groups = sorted({e.group for e in examples})
    gindex = {g: i for i, g in enumerate(groups)}
    n_tr = len(split_ex[0])
    data = RealData(train=_states(examples, arrays, 0, n_tr, gindex),
                    held_out=_states(examples, arrays, n_tr, len(examples), gindex),
                    groups=groups, w0=head.weight.detach().clone())
    data.info = {"model": model_name, "cache_key": key, "cache_hit": hit,
                 "states_s": time.perf_counter() - t1, "load_s": t1 - t0,
                 "dropped_no_difference": dropped,
                 "prompt_tokens": sum(len(e.prompt_ids) for e in examples),
                 "forward_tokens": sum(len(e.prompt_ids) + divergence(e.chosen_ids,
                                                                      e.rejected_ids)
                                       for e in examples),
                 "shared_prefix_pairs": sum(divergence(e.chosen_ids, e.rejected_ids) > 0
                                            for e in examples)}
    return data


def _load(store: Path | None, n: int) -> dict[str, Tensor] | None:
    arrays = atomic.read_tensors(store, kind=STATES_VERSION)
    if arrays is None:
        return None
    ok = set(arrays) == {"x", "prompt_last", "prompt_mean"} and all(
        v.shape[0] == n for v in arrays.values())
    return arrays if ok else None


# ----------------------------------------------------------------------------------------
# Value subsets and last-layer DPO on the cached states


def select_pairs(group: np.ndarray, n_groups: int, *, k: int, q: int, seed: int,
                 rep: int) -> tuple[list[int], np.ndarray]:
    """K distinct values and Q training pairs of each, drawn by
    numpy.random.default_rng([seed, k, rep]): the same (seed, K, rep) always gives the same
    subset, and different reps give different draws. Returns (sorted value ids, (K Q,) pair
    indices into `group`, value by value)."""
    if not 1 <= k <= n_groups:
        raise ValueError(f"select_pairs: need 1 <= k <= {n_groups}, got {k}")
    group = np.asarray(group)
    counts = np.bincount(group, minlength=n_groups)
    if q < 1 or q > counts.min():
        raise ValueError(f"select_pairs: q={q} must be in [1, {counts.min()}] (the smallest "
                         f"group's pair count)")
    rng = np.random.default_rng([seed, k, rep])
    values = sorted(int(v) for v in rng.choice(n_groups, size=k, replace=False))
    idx = [np.sort(rng.choice(np.flatnonzero(group == v), size=q, replace=False))
           for v in values]
    return values, np.concatenate(idx)


@dataclass(frozen=True)
class HeadRun:
    """Recorded trajectory of one last-layer DPO run (reward margins r = beta h)."""

    steps: np.ndarray  # (S',) recorded step numbers, 0 and the last step included
    loss: np.ndarray  # (S',) mean training DPO loss
    train_margin: np.ndarray  # (S',) mean training reward margin
    held_margin: np.ndarray  # (S',) mean held-out reward margin
    train_final: np.ndarray  # (N,) final training reward margins
    held_final: np.ndarray  # (M,) final held-out reward margins


def _margins(x: Tensor, yw: Tensor, yl: Tensor, ref: tuple[Tensor, Tensor], w: Tensor):
    """Summed log-probs of y_w and y_l under head rows w via the shared label_logps (the
    restricted softmax's log-partition cancels in the margin exactly as the full one does)."""
    head = Head(w)
    return label_logps(x, head, yw), label_logps(x, head, yl), ref[0], ref[1]


def train_head(train: PairStates, held: PairStates, w0: Tensor, *, beta: float, lr: float,
               steps: int, record_every: int = 1) -> HeadRun:
    """Full-batch gradient descent W <- W - lr grad L, L = mean_j -log sigma(beta h_j)
    (DPO, Eq. 7 of Rafailov et al.), on the head rows of the tokens that occur; W starts at
    the reference W0. Plain GD is the forward-Euler step of the paper's gradient flow
    (tau = 1 / lr per step), so margins and growth rates read directly against Lemma 4.1.
    Runs in float64: margins start at exactly 0 and the first steps move them little."""
    tokens = torch.unique(torch.cat([train.chosen, train.rejected, held.chosen, held.rejected]))
    sub = lambda y: torch.searchsorted(tokens, y)  # noqa: E731  vocabulary id -> row of w
    w_ref = w0[tokens].double()  # (U, D)
    w = w_ref.clone().requires_grad_(True)
    splits = []
    for s in (train, held):
        x, yw, yl = s.x.double(), sub(s.chosen), sub(s.rejected)
        with torch.no_grad():
            ref = (label_logps(x, Head(w_ref), yw), label_logps(x, Head(w_ref), yl))
        splits.append((x, yw, yl, ref))
    rec: dict[str, list] = {"steps": [], "loss": [], "train": [], "held": []}
    for step in range(steps + 1):
        loss = dpo_loss(*_margins(*splits[0], w), beta=beta).mean()
        if step % record_every == 0 or step == steps:
            with torch.no_grad():
                rec["steps"].append(step)
                rec["loss"].append(float(loss))
                rec["train"].append(float(_reward_margins(splits[0], w, beta).mean()))
                rec["held"].append(float(_reward_margins(splits[1], w, beta).mean()))
        if step == steps:
            break
        (grad,) = torch.autograd.grad(loss, w)
        with torch.no_grad():
            w -= lr * grad
    with torch.no_grad():
        finals = [_reward_margins(s, w, beta).numpy() for s in splits]
    return HeadRun(np.array(rec["steps"]), np.array(rec["loss"]), np.array(rec["train"]),
                   np.array(rec["held"]), finals[0], finals[1])


def _reward_margins(split, w: Tensor, beta: float) -> Tensor:
    pc, pr, rc, rr = _margins(*split, w)
    return beta * ((pc - rc) - (pr - rr))


def heldout_error(margins: np.ndarray, group: np.ndarray) -> float:
    """Fraction of pairs with margin <= 0, ties (margin == 0) counted half, averaged over the
    values present with equal weight (groups have unequal held-out counts)."""
    margins, group = np.asarray(margins), np.asarray(group)
    wrong = (margins < 0) + 0.5 * (margins == 0)
    return float(np.mean([wrong[group == g].mean() for g in np.unique(group)]))


def growth_rate(steps: np.ndarray, margins: np.ndarray, *, early: int) -> float:
    """Slope of the mean margin vs step over steps <= early (least squares)."""
    from dpolab.theory.values import fit_line

    keep = np.asarray(steps) <= early
    return fit_line(np.asarray(steps)[keep], np.asarray(margins)[keep])["slope"]


# ----------------------------------------------------------------------------------------
# Value directions (the paper's Figure 3)


def cosine_matrix(v: np.ndarray) -> np.ndarray:
    """(G, D) -> (G, G) cosine similarities of the rows."""
    v = np.asarray(v, dtype=np.float64)
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    return u @ u.T


def value_structure(emb: np.ndarray, group: np.ndarray, n_groups: int) -> dict[str, Any]:
    """Per-value mean embeddings mu_i, their cosines before and after removing the shared
    mean m = (1/G) sum_i mu_i (the paper's shared component b).

    Reference point: exactly orthonormal directions e_i centred this way have cosines
    (e_i - m).(e_j - m) / |e_i - m|^2 = (-1/G) / (1 - 1/G) = -1/(G - 1), not 0.
    """
    emb, group = np.asarray(emb, dtype=np.float64), np.asarray(group)
    mu = np.stack([emb[group == g].mean(0) for g in range(n_groups)])  # (G, D)
    shared = mu.mean(0)
    before, after = cosine_matrix(mu), cosine_matrix(mu - shared)
    off = ~np.eye(n_groups, dtype=bool)
    return {"cos_before": before.tolist(), "cos_after": after.tolist(),
            "offdiag_mean_before": float(before[off].mean()),
            "offdiag_mean_after": float(after[off].mean()),
            "offdiag_max_abs_after": float(np.abs(after[off]).max()),
            "orthogonal_reference_after": -1.0 / (n_groups - 1) if n_groups > 1 else 0.0,
            "shared_norm_fraction": float(shared @ shared / (mu * mu).sum(1).mean())}


# ----------------------------------------------------------------------------------------
# The K sweep


@dataclass(frozen=True)
class RealConfig:
    """Settings of the real-model sweep (recorded in results.json)."""

    q: int = 30  # training pairs per value (the reasoning group has 32)
    reps: int = 3  # value subsets / pair draws per K
    steps: int = 300  # full-batch gradient steps per run
    beta: float = 0.1  # DPO beta (see run_real for why)
    # Gradient-descent step on the head rows. Final states have |x| ~ 52, so 0.002 lets a
    # K = 1 run's mean training reward margin pass log 3 (Theorem 4.2's ceiling) within 300
    # steps while its first 30 steps stay near-linear for the growth-rate fit.
    lr: float = 0.002
    early: int = 30  # growth rate: margin slope over steps <= early
    record_every: int = 5  # trajectory points kept per run
    seed: int = 0  # data split and subset draws
    model: str = "smollm2-135m-instruct"


def run_k_sweep(data: RealData, cfg: RealConfig, *, ks: Sequence[int] | None = None,
                progress: bool = True) -> dict[str, Any]:
    """For K = 1..G and reps draws each: select K values and Q pairs of each, train the head,
    record margins (train and the held-out pairs of the K values), growth rates, errors."""
    from dpolab.theory.values import fit_line

    G = len(data.groups)
    ks = list(ks) if ks is not None else list(range(1, G + 1))
    tr_group, ho_group = data.train.group.numpy(), data.held_out.group.numpy()
    runs, curves = [], {}
    for k in ks:
        tr_curves, ho_curves = [], []
        for rep in range(cfg.reps):
            t0 = time.perf_counter()
            values, idx = select_pairs(tr_group, G, k=k, q=cfg.q, seed=cfg.seed, rep=rep)
            held_idx = np.flatnonzero(np.isin(ho_group, values))
            held = data.held_out.subset(held_idx)
            run = train_head(data.train.subset(idx), held, data.w0, beta=cfg.beta, lr=cfg.lr,
                             steps=cfg.steps, record_every=cfg.record_every)
            runs.append({
                "k": k, "rep": rep, "values": [data.groups[v] for v in values],
                "held_out_pairs": int(held_idx.size),
                "train_rate": growth_rate(run.steps, run.train_margin, early=cfg.early),
                "held_rate": growth_rate(run.steps, run.held_margin, early=cfg.early),
                "train_margin_final": float(run.train_final.mean()),
                "held_margin_final": float(run.held_final.mean()),
                "train_error": heldout_error(run.train_final, tr_group[idx]),
                "held_error": heldout_error(run.held_final, ho_group[held_idx]),
                "loss_start": float(run.loss[0]), "loss_end": float(run.loss[-1]),
                "seconds": time.perf_counter() - t0})
            tr_curves.append(run.train_margin)
            ho_curves.append(run.held_margin)
            if progress:
                r = runs[-1]
                print(f"K={k} rep={rep}: held error {r['held_error']:.3f}, train rate "
                      f"{r['train_rate']:.3g}, {r['seconds']:.1f}s", flush=True)
        curves[k] = {"steps": run.steps.tolist(), "train": np.mean(tr_curves, 0).tolist(),
                     "held": np.mean(ho_curves, 0).tolist()}
    per_k = _per_k(runs, ks)
    mean_err = [r["held_error"] for r in per_k]
    fits = {"held_error_vs_k_means": fit_line(ks, mean_err) if len(ks) > 1 else None,
            "held_error_vs_k_all_runs": fit_line([r["k"] for r in runs],
                                                 [r["held_error"] for r in runs])
            if len(ks) > 1 else None}
    for what in ("train_rate", "held_rate"):
        ok = [(r["k"], r[what]) for r in per_k if r[what] > 0]
        fits[f"loglog_{what}_vs_k"] = (fit_line(np.log([a for a, _ in ok]),
                                                np.log([b for _, b in ok]))
                                       if len(ok) > 1 else None)
    return {"runs": runs, "per_k": per_k, "fits": fits, "curves": curves}


def _per_k(runs: list[dict], ks: Sequence[int]) -> list[dict[str, Any]]:
    keys = ("train_rate", "held_rate", "train_margin_final", "held_margin_final",
            "train_error", "held_error")
    out = []
    for k in ks:
        mine = [r for r in runs if r["k"] == k]
        row: dict[str, Any] = {"k": k}
        for key in keys:
            row[key] = float(np.mean([r[key] for r in mine]))
        row["held_error_sd"] = float(np.std([r["held_error"] for r in mine]))
        out.append(row)
    return out


def full_sequence_step_cost(d: int, v: int, *, n_tokens: int = 256, repeat: int = 2) -> float:
    """Measured seconds of one full-softmax head forward + backward per completion token
    (D x V head in float32), the cost that whole-sequence last-layer DPO pays per token and
    step; the single-token reduction above avoids it."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n_tokens, d, generator=gen)
    w = (0.02 * torch.randn(v, d, generator=gen)).requires_grad_(True)
    y = torch.randint(0, v, (n_tokens,), generator=gen)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        label_logps(h, Head(w), y, chunk_size=n_tokens).sum().backward()
        best = min(best, time.perf_counter() - t0)
    return best / n_tokens


# ----------------------------------------------------------------------------------------
# The whole real-model part: data, sweep, structure, timings


def run_real(cfg: RealConfig, *, progress: bool = True) -> dict[str, Any]:
    """results.json's "real_model" entry.

    Data: every usable pair of the default data (rho_data.default_rows with no per-group
    caps), split by cfg.seed; tokenized as the trainer does (max_length 512, prompt 256).
    beta: 0.1 (the trainer's default is 0.5). Under gradient descent in the single-token model the
    early logratio dynamics depend on beta and lr only through beta * lr (and reward margins
    through beta^2 * lr), so the paper's 0.01 with a 100x larger lr starts out the same; beta
    only decides how soon sigma(-r) saturates.
    """
    from dpolab.config import DataConfig
    from dpolab.rho_data import default_rows
    from dpolab.models import dpolab_cache_dir as cache_dir

    t0 = time.perf_counter()
    dc = DataConfig()
    train_rows, held_rows = default_rows(seed=cfg.seed, per_group=None, held_out_per_group=None)
    data = build_states(cfg.model, train_rows, held_rows, max_length=dc.max_length,
                        max_prompt_length=dc.max_prompt_length,
                        store_dir=cache_dir() / "values_real", progress=progress)
    res = real_results(data, cfg, progress=progress)
    res["timings"]["total_s"] = time.perf_counter() - t0
    return res


def real_results(data: RealData, cfg: RealConfig, *, progress: bool = True) -> dict[str, Any]:
    """The K sweep, the value structure, settings and timings of already-built states."""
    t1 = time.perf_counter()
    sweep = run_k_sweep(data, cfg, progress=progress)
    t2 = time.perf_counter()
    G = len(data.groups)
    everything = {k: torch.cat([getattr(data.train, k), getattr(data.held_out, k)]).numpy()
                  for k in ("prompt_last", "prompt_mean", "group")}
    structure = {name: value_structure(everything[name], everything["group"], G)
                 for name in ("prompt_last", "prompt_mean")}
    counts = {split: {g: int((s.group == i).sum()) for i, g in enumerate(data.groups)}
              for split, s in (("train", data.train), ("held_out", data.held_out))}
    x_norm = data.train.x.norm(dim=1)
    return {
        "setting": {
            "model": cfg.model, "config": cfg.__dict__, "groups": data.groups,
            "pairs": counts, "hidden_size": int(data.w0.shape[1]),
            "vocab_size": int(data.w0.shape[0]),
            "reduction": "single token: x = final hidden state at the first position where "
                         "chosen and rejected differ, y_w / y_l the tokens there; the "
                         "log-partition cancels, so training the rows of occurring tokens "
                         "is exactly training the untied head",
            "optimizer": "full-batch gradient descent (no momentum, no weight decay) on the "
                         "mean DPO loss, head initialised at the reference (tied embedding)",
            "held_out_error": "per value: fraction of its held-out pairs with reward margin "
                              "<= 0, ties half; averaged over the K values",
            "growth_rate": f"least-squares slope of the mean reward margin over steps "
                           f"0..{cfg.early}",
            "embeddings": {"prompt_last": "final hidden state at the prompt's last token "
                                          "(the state predicting the first completion token)",
                           "prompt_mean": "mean final hidden state over the prompt tokens"},
            "x_norm_mean": float(x_norm.mean()), "x_norm_sd": float(x_norm.std()),
            **{k: v for k, v in data.info.items() if k not in ("states_s", "load_s")}},
        "k_sweep": sweep,
        "structure": structure,
        "timings": {"load_s": data.info["load_s"], "states_s": data.info["states_s"],
                    "states_cache_hit": data.info["cache_hit"], "sweep_s": t2 - t1,
                    "full_sequence_head_s_per_token_step": full_sequence_step_cost(
                        int(data.w0.shape[1]), int(data.w0.shape[0]))},
    }


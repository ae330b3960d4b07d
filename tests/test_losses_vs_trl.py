"""Every TRL loss type, and TRL's modifiers, agree with TRL's own DPOTrainer loss code.

TRL's loss lives inside `DPOTrainer._compute_loss`, which reads per-token log-probs from a
model call. Here that method runs on a stand-in trainer whose "model" returns fixed random
per-token log-probs (zero outside the completion, as TRL's fused head gives for label -100),
so TRL's arithmetic and dpolab's registry see identical numbers; losses and their gradients
with respect to the per-token log-probs must agree.
"""

import types
from collections import defaultdict

import pytest
import torch

from dpolab import losses as L
from dpolab.config import LossConfig

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")

B, T = 4, 9


def _batch(seed: int, *, dtype=torch.float64, equal_chosen: bool = False):
    """Rows 0..B-1 chosen, B..2B-1 rejected; column 0 is prompt, completions of 1..T-1 tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T, (2 * B,), generator=g)
    if equal_chosen:
        lengths[:B] = T - 2
    completion = torch.zeros(2 * B, T, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        completion[i, 1:1 + n] = 1
    mask = completion[:, 1:].to(dtype)  # (2B, T-1): mask of the shifted labels
    draw = lambda: -3.0 * torch.rand(2 * B, T - 1, generator=g, dtype=dtype) * mask  # noqa: E731
    policy, ref = draw(), draw()
    log_sum_sq = -torch.rand(2 * B, T - 1, generator=g, dtype=dtype)  # log sum_v p_v^2 <= 0
    return dict(completion=completion, mask=mask, policy=policy.requires_grad_(), ref=ref,
                log_sum_sq=log_sum_sq)


def _trl_loss(b, loss_types, weights=None, *, beta, label_smoothing=0.0, ld_alpha=None,
              f_divergence="reverse_kl", f_alpha=0.5, tau=0.05):
    def outputs(lp):
        return types.SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp),
                                     mean_logits=torch.zeros_like(lp),
                                     is_top1=torch.zeros_like(lp, dtype=torch.bool),
                                     log_sum_sq_probs=b["log_sum_sq"])

    model = torch.nn.Module()  # TRL asks it whether it is a PEFT model and is training
    model.is_gradient_checkpointing = False
    accel = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x,
                                  gather=lambda x: x)
    trainer = types.SimpleNamespace(
        model=model, ref_model=lambda **kw: outputs(b["ref"]), accelerator=accel,
        aux_loss_enabled=False, precompute_ref_logps=False, ld_alpha=ld_alpha,
        f_divergence_type=f_divergence, f_alpha_divergence_coef=f_alpha, loss_types=loss_types,
        loss_weights=weights or [1.0] * len(loss_types), beta=beta,
        label_smoothing=label_smoothing, use_weighting=False,
        args=types.SimpleNamespace(discopop_tau=tau, gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    inputs = dict(input_ids=torch.zeros_like(b["completion"]),
                  attention_mask=torch.ones_like(b["completion"]), completion_mask=b["completion"])
    return trl_dpo.DPOTrainer._compute_loss(trainer, lambda **kw: outputs(b["policy"]), inputs, False)


def _dpolab_loss(b, weights, hyper: LossConfig):
    m = b["mask"]
    if hyper.ld_alpha != 1.0:
        pc, pr = L.ld_sequence_logps(b["policy"][:B], m[:B], b["policy"][B:], m[B:], alpha=hyper.ld_alpha)
        rc, rr = L.ld_sequence_logps(b["ref"][:B], m[:B], b["ref"][B:], m[B:], alpha=hyper.ld_alpha)
    else:
        pc, pr = (b["policy"] * m).sum(1).chunk(2)
        rc, rr = (b["ref"] * m).sum(1).chunk(2)
    nc, nr = m.sum(1).chunk(2)
    p = L.PairLogps(pc, pr, rc, rr, nc, nr)
    return L.Objective(weights, hyper)(p)[0].mean()


def _agree(b, trl, ours, tol):
    # TRL sums every position (its head gives 0 at label -100), so its gradient is nonzero
    # outside the completion, where the log-probs are 0 anyway: compare on completion tokens.
    (g_trl,) = torch.autograd.grad(trl, b["policy"])
    (g_ours,) = torch.autograd.grad(ours, b["policy"])
    g_trl, g_ours = g_trl * b["mask"], g_ours * b["mask"]
    assert ours.item() == pytest.approx(trl.item(), rel=tol, abs=tol)
    torch.testing.assert_close(g_ours, g_trl, rtol=tol, atol=tol)


# TRL name -> (dpolab registry name, hyperparameters). TRL's "ipo" divides by the length:
# dpolab's "ipo_norm". TRL's "sft" averages over the batch's tokens, dpolab's per example:
# equal when the chosen lengths are equal, which that case's batch has.
CASES = {
    "sigmoid": ("sigmoid", {}),
    "hinge": ("hinge", {}),
    "ipo": ("ipo_norm", {}),
    "exo_pair": ("exo_pair", {"label_smoothing": 1e-3}),
    "nca_pair": ("nca_pair", {}),
    "robust": ("robust", {"label_smoothing": 0.2}),
    "bco_pair": ("bco_pair", {}),
    "sppo_hard": ("sppo_hard", {}),
    "aot": ("aot", {"label_smoothing": 0.1}),
    "aot_unpaired": ("aot_unpaired", {"label_smoothing": 0.1}),
    "apo_zero": ("apo_zero", {}),
    "apo_down": ("apo_down", {}),
    "discopop": ("discopop", {"discopop_tau": 0.3}),
    "sft": ("sft", {}),
    "sigmoid_norm": ("sigmoid_norm", {}),
}


@pytest.mark.parametrize("trl_name", sorted(CASES))
def test_every_trl_loss_type_agrees_with_trl(trl_name):
    """Each of TRL 1.16's loss types: dpolab's registry term gives TRL's batch loss and the
    same gradient with respect to every per-token log-prob (float64, two batches, two betas)."""
    ours_name, extra = CASES[trl_name]
    tau = extra.get("discopop_tau", 0.05)
    for seed, beta in ((0, 0.1), (1, 0.7)):
        b = _batch(seed, equal_chosen=trl_name == "sft")
        trl = _trl_loss(b, [trl_name], beta=beta, tau=tau,
                        label_smoothing=extra.get("label_smoothing", 0.0))
        ours = _dpolab_loss(b, {ours_name: 1.0}, LossConfig(beta=beta, **extra))
        # exo_pair: TRL builds eps as a float32 tensor, so log(eps) carries float32 rounding
        _agree(b, trl, ours, 1e-6 if trl_name == "exo_pair" else 1e-10)


@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergences_agree_with_trl(divergence):
    """loss.f_divergence on sigmoid equals TRL's f_divergence_type (alpha 0.3). TRL's alpha
    branch only knows 16/32-bit floats, so that one is compared in float32."""
    dtype = torch.float32 if divergence == "alpha_divergence" else torch.float64
    b = _batch(2, dtype=dtype)
    trl = _trl_loss(b, ["sigmoid"], beta=0.4, f_divergence=divergence, f_alpha=0.3)
    ours = _dpolab_loss(b, {"sigmoid": 1.0},
                        LossConfig(beta=0.4, f_divergence=divergence, f_alpha=0.3))
    _agree(b, trl, ours, 1e-5 if dtype == torch.float32 else 1e-10)


def test_ld_alpha_agrees_with_trl():
    """LD-DPO (ld_alpha = 0.4) applied to policy and reference sums gives TRL's loss."""
    b = _batch(3)
    trl = _trl_loss(b, ["sigmoid"], beta=0.5, ld_alpha=0.4)
    ours = _dpolab_loss(b, {"sigmoid": 1.0}, LossConfig(beta=0.5, ld_alpha=0.4))
    _agree(b, trl, ours, 1e-10)


def test_weighted_combination_agrees_with_trl():
    """MPO's loss_type=[sigmoid, bco_pair, sft], loss_weights=[0.8, 0.2, 1.0] equals
    loss.weights={sigmoid: 0.8, bco_pair: 0.2, sft: 1.0}."""
    b = _batch(4, equal_chosen=True)
    trl = _trl_loss(b, ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], beta=0.3)
    ours = _dpolab_loss(b, {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0}, LossConfig(beta=0.3))
    _agree(b, trl, ours, 1e-10)



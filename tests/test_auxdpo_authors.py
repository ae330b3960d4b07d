"""AuxDPO in the authors' form (loss.aux_form=authors): the capped auxiliary rewards, the
negative amplitude term, and the training penalty, against hand-computed values."""

import math

import pytest
import torch

from dpolab import config as C
from dpolab.errors import UserError
from dpolab.losses import auxdpo_loss, authors_amplitude_term, capped_aux_reward


def test_capped_reward_hand_values():
    """delta = cap tanh(raw): raw 0 -> 0; raw atanh(1/2) -> cap / 2; cap 2, raw 1 ->
    2 tanh(1) = 2 * 0.7615942 = 1.5231884; |delta| < cap for any raw."""
    raw = torch.tensor([0.0, math.atanh(0.5), 40.0, -40.0], dtype=torch.float64)
    torch.testing.assert_close(capped_aux_reward(raw, cap=1.0),
                               torch.tensor([0.0, 0.5, 1.0, -1.0], dtype=torch.float64))
    assert capped_aux_reward(torch.tensor(1.0), cap=2.0).item() == pytest.approx(1.5231884, abs=1e-6)
    with pytest.raises(ValueError, match="cap must be > 0"):
        capped_aux_reward(raw, cap=0.0)


def test_authors_amplitude_term_hand_values():
    """delta_c = [1, 3], delta_r = [2, 0]: -(mean(1, 9) + mean(4, 0)) / 2 = -(5 + 2) / 2 =
    -3.5; it is 0 at delta = 0 and falls as |delta| grows (an incentive, not a cost)."""
    dc, dr = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 0.0])
    assert authors_amplitude_term(dc, dr).item() == pytest.approx(-3.5)
    assert authors_amplitude_term(torch.zeros(2), torch.zeros(2)).item() == 0.0
    assert authors_amplitude_term(2 * dc, dr).item() < authors_amplitude_term(dc, dr).item()


def test_authors_loss_and_penalty_hand_values():
    """One pair, beta 0.5, h = 1, raw = (atanh(1/2), 0) so delta = (1/2, 0), lambda_null 1e-4,
    lambda_amp 1, Gram G = [[2, 1], [1, 3]] of (chosen, rejected):
        preference  -log sigma(0.5 (1 + 0.5 - 0)) = log(1 + e^-0.75) = 0.3868710
        null        1e-4 * delta^T G delta = 1e-4 * (0.25 * 2) = 5e-5
        amplitude   1 * -(0.5^2 + 0^2) / 2 = -0.125
    AuxRewards.penalty with the whole batch (|B| = n_global = 1) is 5e-5 - 0.125."""
    from dpolab.auxdpo import AuxRewards

    aux = AuxRewards(1, device="cpu", null_weight=1e-4, amp_weight=1.0,
                     gram=torch.tensor([[2.0, 1.0], [1.0, 3.0]]), form="authors", cap=1.0)
    with torch.no_grad():
        aux.delta.copy_(torch.tensor([math.atanh(0.5), 0.0]))
    dc, dr = aux.batch([0])
    assert (dc.item(), dr.item()) == pytest.approx((0.5, 0.0), abs=1e-7)
    zero = torch.zeros(1)
    pref = auxdpo_loss(torch.ones(1), zero, zero, zero, delta_chosen=dc, delta_rejected=dr,
                       beta=0.5)
    assert pref.item() == pytest.approx(math.log1p(math.exp(-0.75)), abs=1e-6)
    assert pref.item() == pytest.approx(0.3868710, abs=1e-6)
    assert aux.penalty([0], n_global=1).item() == pytest.approx(5e-5 - 0.125, abs=1e-7)
    seed = AuxRewards(1, device="cpu", null_weight=1e-4, amp_weight=1.0,
                      gram=torch.tensor([[2.0, 1.0], [1.0, 3.0]]))
    with torch.no_grad():  # the seed's form: delta itself, + lambda_amp ||delta||^2
        seed.delta.copy_(torch.tensor([0.5, 0.0]))
    assert seed.penalty([0], n_global=1).item() == pytest.approx(5e-5 + 0.25, abs=1e-7)


@pytest.mark.parametrize("overrides, match", [
    (["loss.aux_form=bogus"], "aux_form must be one of seed, authors"),
    (["loss.aux_form=authors", "loss.aux_mode=exact"], "needs loss.aux_mode=soft"),
    (["loss.aux_cap=0"], "aux_cap"),
    (["train.scope=token_rows", "train.weight_decay=0.1"], "weight_decay=0"),
    (["train.scope=rows"], "token_rows"),
])
def test_config_refuses_bad_auxdpo_and_scope_settings(overrides, match):
    """Settings the authors' form or the token_rows scope cannot honour stop at the config."""
    with pytest.raises(UserError, match=match):
        C.build_config(C.apply_overrides({}, overrides))


def test_config_defaults_keep_the_seed_form():
    """The defaults are the seed's form with cap 1, so existing configs train as before."""
    cfg = C.build_config({})
    assert (cfg.loss.aux_form, cfg.loss.aux_cap) == ("seed", 1.0)

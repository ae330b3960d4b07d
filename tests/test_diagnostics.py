"""diagnostics.summarize's numbers by hand, and one tie rule for training steps and evaluation."""

import math

import numpy as np
import pytest
import torch

from dpolab.diagnostics import PairStats, summarize

# Four pairs, beta = 0.5:
#   logratio chosen   lc = pc - rc = [-1+2, -2+2, -4+2, -1+1.5] = [1, 0, -2, 0.5]
#   logratio rejected lr = pr - rr = [-3+2, -2+2, -1+2.5, -2+1.5] = [-1, 0, 1.5, -0.5]
#   h = lc - lr = [2, 0, -3.5, 1];  margins = beta h = [1, 0, -1.75, 0.5]
STATS = PairStats(policy_chosen=np.array([-1.0, -2.0, -4.0, -1.0]),
                  policy_rejected=np.array([-3.0, -2.0, -1.0, -2.0]),
                  ref_chosen=np.array([-2.0, -2.0, -2.0, -1.5]),
                  ref_rejected=np.array([-2.0, -2.0, -2.5, -1.5]),
                  n_chosen=np.array([2, 4, 1, 5]), n_rejected=np.array([1, 2, 4, 5]), beta=0.5)


def test_summarize_hand_values():
    """Every metric of summarize on the four pairs above, computed by hand."""
    got = summarize(STATS)
    expected = {
        "rewards/chosen": 0.5 * (1 + 0 - 2 + 0.5) / 4,  # -0.0625
        "rewards/rejected": 0.5 * (-1 + 0 + 1.5 - 0.5) / 4,  # 0
        "rewards/margins": (1 + 0 - 1.75 + 0.5) / 4,  # -0.0625
        "rewards/accuracies": (1 + 0.5 + 0 + 1) / 4,  # h = 0 is a tie: half
        "logps/chosen": (-1 - 2 - 4 - 1) / 4,  # -2
        "logps/rejected": (-3 - 2 - 1 - 2) / 4,  # -2
        # sorted margins [-1.75, 0, 0.5, 1], linear interpolation at (N - 1) q = 3q:
        "margins/p10": -1.75 + 0.3 * 1.75,  # -1.225
        "margins/p50": 0.25,  # halfway between 0 and 0.5
        "margins/p90": 0.5 + 0.7 * 0.5,  # 0.85
        "margins/negative_fraction": 1 / 4,  # h = -3.5 only
        "displacement/chosen": (1 + 0 - 2 + 0.5) / 4,  # -0.125
        "displacement/rejected": 0.0,
        "displacement/chosen_per_token": (1 / 2 + 0 / 4 - 2 / 1 + 0.5 / 5) / 4,  # -0.35
        "displacement/rejected_per_token": (-1 / 1 + 0 / 2 + 1.5 / 4 - 0.5 / 5) / 4,  # -0.18125
        "displacement/chosen_fell_fraction": 1 / 4,  # lc = -2 only
        # pc - pr = [2, 0, -3, 1]: the model itself prefers chosen in 2, ties 1
        "preference/model": (1 + 0.5 + 0 + 1) / 4,
        # sigma(-m) = 1 / (1 + e^m): 0.2689414, 0.5, 0.8519528, 0.3775407
        "gradient_weight/mean": (1 / (1 + math.e) + 0.5 + 1 / (1 + math.exp(-1.75))
                                 + 1 / (1 + math.exp(0.5))) / 4,  # 0.4996087
    }
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["gradient_weight/mean"] == pytest.approx(0.4996087, abs=1e-7)
    assert summarize(STATS.subset(np.array([], dtype=int))) == {}


def test_training_steps_and_evaluation_share_one_tie_rule():
    """A pair whose |h| is within 1e-6 nats counts half and one just outside counts 0 or 1,
    in the training step's metrics (StepStats) exactly as in evaluation (summarize): the
    rewards/ and logps/ keys of both agree on the same pairs."""
    from dpolab.distributed import Distributed
    from dpolab.losses import PairLogps
    from dpolab.train import StepStats

    pc = torch.tensor([-1.0, -1.0, -1.0, -1.0, -2.0], dtype=torch.float64)
    pr = torch.tensor([-1.0 + 3e-7, -1.0 + 5e-7, -1.0 - 2e-6, -1.0 + 2e-6, -1.0],
                      dtype=torch.float64)
    ref = torch.full((5,), -1.0, dtype=torch.float64)
    n = torch.ones(5, dtype=torch.long)
    stats = StepStats()
    for idx in ([0, 1, 2], [3, 4]):  # two micro-batches
        i = torch.tensor(idx)
        pairs = PairLogps(pc[i], pr[i], ref[i], ref[i], n[i], n[i])
        stats.add(pairs, {}, torch.zeros(len(idx)), torch.ones(len(idx)), beta=0.1)
    step = stats.summary(Distributed(), n_global=5)
    evaluation = summarize(PairStats(pc.numpy(), pr.numpy(), ref.numpy(), ref.numpy(),
                                     n.numpy(), n.numpy(), beta=0.1))
    # h = [-3e-7, -5e-7, 2e-6, -2e-6, -1]: two ties (a strict h > 0 would count them 0),
    # one win, two losses
    assert step["rewards/accuracies"] == evaluation["rewards/accuracies"] == (0.5 + 0.5 + 1) / 5
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        assert step[key] == pytest.approx(evaluation[key], abs=1e-15), key


def test_unflippable_threshold_by_hand():
    """beta = 0.5: log(3) / 0.5 = 2 * 1.0986 = 2.1972 nats. A reference that prefers the
    rejected response by 2.20 nats is past it, by 2.19 not; beta = 0 moves nothing, so no
    threshold and no pair flagged."""
    from dpolab.diagnostics import unflippable, unflippable_threshold

    assert unflippable_threshold(0.5) == pytest.approx(2.1972246, abs=1e-6)
    rc, rr = np.array([0.0, 0.0, 1.0]), np.array([2.20, 2.19, 0.0])
    assert unflippable(rc, rr, beta=0.5).tolist() == [True, False, False]
    assert unflippable_threshold(0.0) is None
    assert not unflippable(rc, rr, beta=0.0).any()


def test_group_chosen_displacement_is_the_groups_mean_log_ratio():
    """groups/<g>/displacement/chosen is the mean of log pi(y_w) - log pi_ref(y_w) over the
    group's pairs: a = ((-1) - (-1.5) + (-2) - (-2)) / 2 = 0.25,
    b = ((-3) - (-2) + (-4) - (-4.5)) / 2 = (-1 + 0.5) / 2 = -0.25."""
    from dpolab.diagnostics import group_summaries

    s = PairStats(np.array([-1.0, -2, -3, -4]), np.zeros(4), np.array([-1.5, -2, -2, -4.5]),
                  np.zeros(4), np.ones(4), np.ones(4), beta=0.1)
    out = group_summaries(s, np.array([0, 0, 1, 1]), ["a", "b"])
    assert out["groups/a/displacement/chosen"] == pytest.approx(0.25, abs=1e-15)
    assert out["groups/b/displacement/chosen"] == pytest.approx(-0.25, abs=1e-15)

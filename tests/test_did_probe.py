"""The DID probe's entropy estimates: the policy's by plain Monte Carlo, the reference's by
self-normalised importance weights from the policy's samples."""

import math

import pytest
import torch

from dpolab.did_probe import did_summary


def test_entropy_estimates_hand_values():
    """Two samples with log pi = (-1, -2), log pi_ref = (-1.5, -1): policy entropy
    (1 + 2) / 2 = 1.5; weights pi_ref / pi = (e^-0.5, e^1) normalise to (0.18243, 0.81757),
    so the reference entropy is 0.18243 * 1.5 + 0.81757 * 1 = 1.09121; the change is their
    difference."""
    out = did_summary(torch.tensor([[-1.0, -2.0]], dtype=torch.float64),
                      torch.tensor([[-1.5, -1.0]], dtype=torch.float64))
    w = math.exp(-0.5) / (math.exp(-0.5) + math.exp(1.0))
    assert out["did/policy_entropy"] == pytest.approx(1.5)
    assert out["did/ref_entropy"] == pytest.approx(w * 1.5 + (1 - w) * 1.0)
    assert out["did/ref_entropy"] == pytest.approx(1.09121, abs=1e-5)
    assert out["did/entropy_change"] == pytest.approx(1.5 - out["did/ref_entropy"])


def test_entropy_estimates_converge_to_the_exact_entropies():
    """Categorical policy and reference over 6 outcomes, 200000 samples from the policy
    (seeded): both estimates are within 0.02 of the exact H(pi) and H(pi_ref)."""
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    logr = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    y = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=g)
    out = did_summary(logp[y][None], logr[y][None])
    assert out["did/policy_entropy"] == pytest.approx(float(-(logp.exp() * logp).sum()), abs=0.02)
    assert out["did/ref_entropy"] == pytest.approx(float(-(logr.exp() * logr).sum()), abs=0.02)

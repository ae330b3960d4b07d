"""The DID probe's entropy estimates: the policy's by plain Monte Carlo, the reference's by
self-normalised importance weights from the policy's samples."""

import math

import pytest
import torch

from dpolab.did_probe import did_summary
from dpolab.distributed import Distributed


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


@pytest.mark.parametrize("scope", ["last_layer", "token_rows"])
def test_head_scope_probe_reads_one_body_pass_and_keeps_its_numbers(scope, tiny_dir, tmp_path,
                                                                     cache, monkeypatch):
    """In the head scopes the probe scores its samples under the reference head from the
    states of the policy's body pass: the body runs once per prompt's batch of samples
    (2 prompts: 2 passes, where scoring the reference through the body again takes 4), and
    every eval/did number equals, bit for bit, the same probe (same seed, same samples) with
    the reference scored by that second body pass. The head is moved off theta0 first (seeded
    noise on its trained rows), so the policy's and the reference's log-probs differ."""
    import dataclasses

    from dpolab import policy, session as S
    from tests.test_train import cfg_for, write_pairs

    cfg = cfg_for(tiny_dir, write_pairs(tmp_path / "pairs.jsonl"), tmp_path / "run",
                  f"train.scope={scope}", "train.did_samples=5", "train.did_prompts=2",
                  "train.did_max_new_tokens=6")
    (tmp_path / "run").mkdir()
    s = S.build(cfg, tmp_path / "run", Distributed())
    assert len({tuple(ex.prompt_ids) for ex in s.held_out}) >= 2
    head = s.scope.params[0]
    rows = s.scope.trained_rows if s.scope.trained_rows is not None else slice(None)
    with torch.no_grad():
        noise = torch.randn(head.shape, generator=torch.Generator().manual_seed(0))
        head[rows] += 0.5 * noise[rows]
    passes, layout = [], policy.FORWARDS[s.scope.forward_name].make  # the body's layout
    run = layout._run
    monkeypatch.setattr(layout, "_run", lambda self, *a: passes.append(1) or run(self, *a))
    one_pass = s.export_and_probe(tmp_path / "one")
    assert len(passes) == 2
    s.scope = dataclasses.replace(s.scope, reference_head=None)  # the reference's own pass
    two_passes = s.export_and_probe(tmp_path / "two")
    assert len(passes) == 2 + 4
    assert one_pass["eval/did/kl"] != 0.0  # the two heads differ on the samples
    assert one_pass == two_passes

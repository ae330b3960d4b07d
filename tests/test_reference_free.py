"""Reference-free runs (no reference pass, no store, the policy's own preference as metric),
LD-DPO's sums in the trainer, and WPO refused with its reason."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dpolab import rundir, scopes, session, splits
from dpolab.config import apply_overrides, build_config
from dpolab.distributed import Distributed
from dpolab.errors import UserError
from dpolab.losses import PairLogps
from dpolab.train import StepStats, train
from tests.test_train import cfg_for, write_pairs


def _count_reference_calls(monkeypatch) -> dict[str, int]:
    """Wrap every Scope's reference forwards (stored pairs and new text) to count calls."""
    calls = {"reference": 0, "text_reference": 0}
    apply = scopes.apply

    def counting_apply(*a, **kw):
        scope = apply(*a, **kw)

        def reference(examples, *, split=None):
            calls["reference"] += 1
            return scope.reference(examples, split=split)

        def text_reference(kw_):
            calls["text_reference"] += 1
            return scope.text_reference(kw_)
        return dataclasses.replace(scope, reference=reference, text_reference=text_reference)

    monkeypatch.setattr(scopes, "apply", counting_apply)
    return calls


@pytest.mark.parametrize("scope", ["last_layer", "full"])
def test_reference_free_run_has_no_reference(scope, tiny_dir, tmp_path, cache, monkeypatch):
    """SimPO trains with no call of the reference forward and no file in the reference store;
    a DPO run on the same setup calls it and stores two files (so the counts can fail).
    The evaluation lines keep rewards/accuracies (the policy's own preference) and leave the
    reference metrics out; the report renders and names the substitute."""
    data = write_pairs(tmp_path / "pairs.jsonl", n=12)
    calls = _count_reference_calls(monkeypatch)
    run = train(cfg_for(tiny_dir, data, tmp_path / "simpo", "loss.name=simpo",
                        f"train.scope={scope}", "train.max_steps=2", "train.report=true",
                        "train.did_samples=2", "train.did_prompts=2"))
    assert calls == {"reference": 0, "text_reference": 0}
    assert not list(cache.glob("reference/*"))
    assert not (run / "unflippable.json").exists()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    last = rows[-1]
    assert 0.0 <= last["eval/rewards/accuracies"] <= 1.0
    assert not [k for k in last if "displacement" in k or "unflippable" in k or "/did/" in k]
    assert "policy&#x27;s own preference" in (run / "report.html").read_text()

    run = train(cfg_for(tiny_dir, data, tmp_path / "dpo", f"train.scope={scope}",
                        "train.max_steps=1"))
    assert calls["reference"] > 0
    assert len(list((cache / "reference").glob("*.safetensors"))) == 2


def test_reference_free_step_stats_by_hand():
    """Without reference log-probs a step's rewards are beta * log pi(y) itself, per-token
    means when averaged. One pair, log pi(y_w) = -4 over 2 tokens, log pi(y_l) = -9 over 3,
    beta = 2:
      averaged: rewards/chosen = 2 * (-4/2) = -4, rejected = 2 * (-9/3) = -6, margin 2;
      summed:   chosen = 2 * -4 = -8, rejected = 2 * -9 = -18, margin 10;
    accuracy 1 (the policy prefers y_w) either way."""
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    pairs = PairLogps(t(-4.0), t(-9.0), None, None, torch.tensor([2]), torch.tensor([3]))
    for average, want in ((True, (-4.0, -6.0, 2.0)), (False, (-8.0, -18.0, 10.0))):
        stats = StepStats()
        stats.add(pairs, {}, t(0.5), t(1.0), beta=2.0, average=average)
        row = stats.summary(Distributed.from_env("cpu"), n_global=1)
        got = (row["rewards/chosen"], row["rewards/rejected"], row["rewards/margins"])
        assert got == pytest.approx(want)
        assert row["rewards/accuracies"] == 1.0


def test_reward_reduction_follows_the_terms(tiny_dir, tmp_path):
    """SimPO, ORPO and SFT read per-token means, CPO sums; DPO needs a reference."""
    cfg = lambda *o: cfg_for(tiny_dir, tmp_path / "x.jsonl", tmp_path / "o", *o)  # noqa: E731
    assert session.reward_average(cfg("loss.name=simpo"))
    assert session.reward_average(cfg("loss.name=orpo"))
    assert not session.reward_average(cfg("loss.name=cpo"))
    assert session.reward_average(cfg("loss.weights={cpo: 1.0, sft: 0.1}"))
    assert not session.needs_reference(cfg("loss.weights={cpo: 1.0, simpo: 0.5}"))
    assert session.needs_reference(cfg("loss.weights={dpo: 1.0, sft: 0.1}"))


def test_ld_flat_logps_by_hand():
    """LD-DPO on the flat layout, tokens of four sequences interleaved (B = 2; sequence j < 2
    chosen, 2 + j rejected), alpha = 0.5:
      pair 0: chosen (-1, -2, -3), rejected (-10, -20): shared length 2,
              chosen -1 - 2 + 0.5 * -3 = -4.5, rejected -30;
      pair 1: chosen (-4), rejected (-5, -6, -7): shared length 1,
              chosen -4, rejected -5 + 0.5 * (-6 - 7) = -11.5."""
    from dpolab.losses import ld_flat_logps

    tokens = torch.tensor([-1.0, -10.0, -5.0, -2.0, -4.0, -20.0, -6.0, -3.0, -7.0],
                          dtype=torch.float64)
    seg = torch.tensor([0, 2, 3, 0, 1, 2, 3, 0, 3])
    chosen, rejected = ld_flat_logps(tokens, seg, 2, alpha=0.5)
    assert chosen.tolist() == [-4.5, -4.0] and rejected.tolist() == [-30.0, -11.5]
    assert ld_flat_logps(tokens, seg, 2, alpha=1.0)[1].tolist() == [-30.0, -18.0]  # plain sums


def _naive_token_logps(model, ex) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log pi of chosen and rejected completions from the model's full logits."""
    out = []
    for completion in (ex.chosen_ids, ex.rejected_ids):
        ids = torch.tensor([ex.prompt_ids + completion])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits.double(), dim=-1)[0]
        P = len(ex.prompt_ids)
        out.append(torch.stack([lp[P - 1 + k, t] for k, t in enumerate(completion)]))
    return out[0], out[1]


def _ld(tokens: torch.Tensor, shared: int, alpha: float) -> float:
    return float(tokens[:shared].sum() + alpha * tokens[shared:].sum())


def test_ld_dpo_step1_loss_by_hand(tiny_dir, tmp_path, cache):
    """LD-DPO (ld_alpha = 0.5) with CPO, whose step-1 loss depends on the sums themselves:
    per pair, l_p = min(|y_w|, |y_l|), LD(y) = sum_{t <= l_p} log pi + 0.5 sum_{t > l_p} log pi,
    loss = -log sigma(beta (LD(y_w) - LD(y_l))) + LD(y_w) * (-1/|y_w|), averaged over the
    batch (all 4 pairs), from the model's own full logits. With ld_alpha = 1 the same
    formula on plain sums differs (so the check can fail)."""
    from dpolab.models import load_model, load_tokenizer
    from dpolab.tokenize import tokenize_rows

    data = write_pairs(tmp_path / "pairs.jsonl", n=5)  # 4 train pairs, 1 held out
    cfg = cfg_for(tiny_dir, data, tmp_path / "ld", "loss.name=cpo", "loss.ld_alpha=0.5",
                  "loss.beta=0.5", "train.max_steps=1", "train.max_grad_norm=0")
    train_rows, _ = splits.load_split_rows(cfg)
    tok = tokenize_rows(train_rows, load_tokenizer(str(tiny_dir)), max_length=48,
                        max_prompt_length=16, truncation=cfg.data.truncation)
    model = load_model(str(tiny_dir)).eval()
    by_alpha = {}
    for alpha in (0.5, 1.0):
        losses = []
        for ex in tok.examples:
            c, r = _naive_token_logps(model, ex)
            shared = min(len(c), len(r))
            lc, lr = _ld(c, shared, alpha), _ld(r, shared, alpha)
            pref = -F.logsigmoid(torch.tensor(0.5 * (lc - lr), dtype=torch.float64))
            losses.append(float(pref) + 1.0 * (-lc / len(c)))
        by_alpha[alpha] = float(np.mean(losses))
    run = train(cfg)
    first = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][1]
    assert len(tok.examples) == 4
    assert first["loss"] == pytest.approx(by_alpha[0.5], rel=1e-5)
    assert abs(by_alpha[1.0] - by_alpha[0.5]) > 1e-3


def test_ld_dpo_reference_sums_by_hand(tiny_dir, tmp_path, cache):
    """With ld_alpha = 0.3 and DPO, pair_logps' reference sums are LD sums of the stored
    per-token reference log-probs, equal to the same sums of the model's own full-logit
    log-probs; at step 0 the policy's LD sums equal them (the step-0 check passes)."""
    from dpolab.models import load_model

    data = write_pairs(tmp_path / "pairs.jsonl", n=6)
    cfg = cfg_for(tiny_dir, data, tmp_path / "ld", "loss.ld_alpha=0.3", "train.scope=full")
    run_dir = rundir.prepare_run_dir(cfg, resume=False, is_main=True)
    s = session.build(cfg, run_dir, Distributed.from_env("cpu"))
    model = load_model(str(tiny_dir)).eval()
    idx = list(range(len(s.train)))
    with torch.no_grad():
        p = s.pair_logps("train", idx)
    for k, i in enumerate(idx):
        c, r = _naive_token_logps(model, s.train[i])
        shared = min(len(c), len(r))
        assert float(p.ref_chosen[k]) == pytest.approx(_ld(c, shared, 0.3), abs=1e-4)
        assert float(p.ref_rejected[k]) == pytest.approx(_ld(r, shared, 0.3), abs=1e-4)
    assert torch.allclose(p.policy_chosen, p.ref_chosen, atol=1e-4)
    assert torch.allclose(p.policy_rejected, p.ref_rejected, atol=1e-4)
    assert (p.n_chosen != p.n_rejected).any()  # the tail matters on this data


def test_wpo_is_refused_with_its_reason():
    """loss.use_weighting=true stops with one line naming what WPO needs and what to do; the
    retired key's only value, false, still loads (an older run's config.yaml)."""
    with pytest.raises(UserError, match="per-token log sum_v pi.v.\\^2.*remove loss.use_weighting"):
        build_config(apply_overrides({}, ["loss.use_weighting=true"]))
    assert build_config({"loss": {"use_weighting": False}}) == build_config({})

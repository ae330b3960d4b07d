"""CHES (Razin et al., ICLR 2025, Definition 2): a hand computation, the model's own hidden
states, and every scope's route to them giving the same scores."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dpolab import ches, scopes
from dpolab import config as C
from dpolab.distributed import Distributed
from dpolab.tokenize import PairExample


def test_ches_by_hand():
    """Two pairs of 2-d states. Pair 0: chosen states (1,0), (0,1) -> S+ = (1,1), |y+| = 2;
    rejected (1,1), (1,1), (0,0) -> S- = (2,2), |y-| = 3.
        CHES    = <S+,S-> - |S+|^2 = 4 - 2 = 2
        LN-CHES = 4 / (2 * 3) - 2 / 2^2 = 2/3 - 1/2 = 1/6
    Pair 1: chosen (3,0) -> S+ = (3,0); rejected (0,2) -> S- = (0,2), one state each:
        CHES = 0 - 9 = -9, LN-CHES = 0 / 1 - 9 / 1 = -9.
    The states reach pair_ches as a pair forward gives them: flat, sequence ids chosen 0..B-1,
    rejected B..2B-1."""
    h = torch.tensor([[1., 0], [0, 1], [3, 0],          # chosen of pair 0 (seg 0), pair 1 (seg 1)
                      [1, 1], [1, 1], [0, 0], [0, 2]])  # rejected of pair 0 (seg 2), pair 1 (seg 3)
    seg = torch.tensor([0, 0, 1, 2, 2, 2, 3])

    def states(batch):
        return h, None, seg, 0

    c, ln = ches.pair_ches(states, [None, None], batch_size=2)
    np.testing.assert_allclose(c, [2.0, -9.0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ln, [1 / 6, -9.0], rtol=0, atol=1e-12)


def test_ches_of_identical_responses_is_zero():
    """Limiting case: y+ = y- gives S+ = S-, so CHES = |S+|^2 - |S+|^2 = 0 (and LN-CHES too)."""
    s = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    n = torch.tensor([2, 3, 4])
    c, ln = ches.ches(s, s, n, n)
    assert torch.allclose(c, torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(ln, torch.zeros(3, dtype=torch.float64), atol=1e-12)


def test_spearman_by_hand():
    """x = 1, 2, 3, 10 (ranks 1..4), y = 1, 3, 2, 4: rank differences 0, -1, 1, 0, so
    rho = 1 - 6 * 2 / (4 * (16 - 1)) = 0.8 (Pearson's r of the values would be 0.82); a
    constant input has no correlation (NaN)."""
    assert ches.spearman(np.array([1, 2, 3, 10]), np.array([1, 3, 2, 4])) == pytest.approx(0.8)
    assert math.isnan(ches.spearman(np.ones(4), np.arange(4.0)))


def _pairs(n: int, seed: int) -> list[PairExample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(10, 500, (3 + i % 3,), generator=g).tolist()
        chosen = torch.randint(10, 500, (2 + i % 4,), generator=g).tolist()
        rejected = torch.randint(10, 500, (3 + i % 2,), generator=g).tolist()
        out.append(PairExample(prompt, chosen, rejected, None, i, i + 1, "mem"))
    return out


def _paper_ches(model, examples) -> tuple[np.ndarray, np.ndarray]:
    """The paper's code, restated: the model's own `hidden_states[-1]` of x + y, one sequence
    at a time, the states at positions |x| - 1 .. |x| + |y| - 2 (those predicting y) summed."""
    out_c, out_ln = [], []
    with torch.no_grad():
        for e in examples:
            sums = []
            for y in (e.chosen_ids, e.rejected_ids):
                ids = torch.tensor([e.prompt_ids + y])
                hs = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
                p = len(e.prompt_ids)
                sums.append(hs[p - 1:p + len(y) - 1].double().sum(0))
            sp, sn = sums
            lp, ln_ = len(e.chosen_ids), len(e.rejected_ids)
            out_c.append(float(sp @ sn - sp @ sp))
            out_ln.append(float(sp @ sn / (lp * ln_) - sp @ sp / lp ** 2))
    return np.array(out_c), np.array(out_ln)


@pytest.mark.parametrize("scope", ["last_layer", "full"])
def test_ches_at_reference_equals_the_papers_computation(tiny_dir, scope):
    """On a tiny model, the run's CHES (at_reference: the cached body states under
    last_layer, the scope's own forward under full) equals the paper's computation from the
    model's `output_hidden_states` (float32 states, so to 1e-4 relative)."""
    from dpolab.models import load_model

    model = load_model(str(tiny_dir))
    examples = _pairs(7, seed=1)
    want_c, want_ln = _paper_ches(model, examples)
    cfg = C.build_config({"train": {"scope": scope, "progress": False}})
    tok = {"train": SimpleNamespace(examples=examples),
           "held_out": SimpleNamespace(examples=examples[:2])}
    dist = Distributed.from_env("cpu")
    sc = scopes.apply(cfg, model, tok, pad_id=0, device=torch.device("cpu"), autocast=False,
                      dist=dist)
    c, ln = ches.at_reference(sc, examples, "train", batch_size=3, dist=dist)
    np.testing.assert_allclose(c, want_c, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(ln, want_ln, rtol=1e-4, atol=1e-5)

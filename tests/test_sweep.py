"""dpolab.sweeps, dpolab.stacked_heads, dpolab.sweep_report: grids of runs on a tiny model."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

import dpolab
from dpolab import config as C
from dpolab import sweeps
from dpolab.errors import UserError
from dpolab.rundir import read_metrics
from dpolab.train import train
from tests.test_report import chromium_dom
from tests.test_train import write_pairs

TIMING = {"tokens_per_s", "elapsed_s"}  # wall-clock numbers: the only keys allowed to differ


def tiny_overrides(tiny_dir, data) -> dict:
    return {"model.name": str(tiny_dir), "data.path": str(data), "train.batch_size": 4,
            "train.grad_accum": 2, "train.max_steps": 4, "train.lr": 0.01,
            "train.warmup_steps": 1, "train.progress": False, "train.eval_batch_size": 8,
            "data.max_length": 48, "data.max_prompt_length": 16, "train.did_samples": 0,
            "train.report": False, "train.eval_every": 2, "train.save_every": 3}


def solo(point_dir: Path, out: Path) -> Path:
    """The grid point's own config.yaml trained alone into `out`."""
    raw = C.load_yaml(point_dir / "config.yaml")
    raw["out"] = str(out)
    return train(C.build_config(raw))


def assert_same_run(a: Path, b: Path) -> None:
    rows_a, rows_b = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert len(rows_a) == len(rows_b)
    for ra, rb in zip(rows_a, rows_b):
        assert set(ra) == set(rb)
        keys = sorted(set(ra) - TIMING)
        np.testing.assert_allclose([ra[k] for k in keys], [rb[k] for k in keys],
                                   rtol=1e-6, atol=1e-7, err_msg=str(a))
    head_a = load_file(str(a / "model" / "model.safetensors"))["lm_head.weight"]
    head_b = load_file(str(b / "model" / "model.safetensors"))["lm_head.weight"]
    np.testing.assert_allclose(head_a.numpy(), head_b.numpy(), rtol=1e-6, atol=1e-7)
    assert json.loads((a / "data.json").read_text()) == json.loads((b / "data.json").read_text())
    assert (a / "unflippable.json").exists() == (b / "unflippable.json").exists()


def test_grid_points_equal_solo_runs(tiny_dir, tmp_path, cache, capsys):
    """Heads trained together (2 losses x 2 betas, one of them reference-free) write, point
    by point, the metrics, exported head, data and unflippable records of the same config
    trained alone: each head has its own weights and AdamW state (shared state would make
    the later points differ), and a reference-free point gets no reference."""
    data = write_pairs(tmp_path / "pairs.jsonl")
    out = dpolab.sweep(grid={"loss.beta": [0.1, 0.5], "loss.name": ["dpo", "simpo"]},
                       overrides=tiny_overrides(tiny_dir, data), out=tmp_path / "sw")
    assert "heads train together" in capsys.readouterr().out
    names = [p["name"] for p in sweeps.read_record(out)["points"]]
    assert names == ["beta0.1-dpo", "beta0.1-simpo", "beta0.5-dpo", "beta0.5-simpo"]
    for name in ("beta0.1-simpo", "beta0.5-dpo"):  # the second and third heads trained
        assert_same_run(out / name, solo(out / name, tmp_path / "solo" / name))
    # the two DPO points learnt different heads: each point trained its own
    h1, h2 = (load_file(str(out / n / "model" / "model.safetensors"))["lm_head.weight"]
              for n in ("beta0.1-dpo", "beta0.5-dpo"))
    assert not np.allclose(h1.numpy(), h2.numpy())
    summary = json.loads((out / "summary.json").read_text())
    by_name = {p["name"]: p for p in summary["points"]}
    after = json.loads((out / "beta0.5-dpo" / "summary.json").read_text())["after"]
    assert by_name["beta0.5-dpo"]["accuracy"] == after["eval/rewards/accuracies"]
    assert by_name["beta0.5-dpo"]["groups"]["a"]["chosen_displacement"] == \
        after["eval/groups/a/displacement/chosen"]
    assert by_name["beta0.1-simpo"]["chosen_displacement"] is None  # no reference
    assert (out / "report.html").is_file()


def test_other_axes_run_one_after_another_and_resume(tiny_dir, tmp_path, cache, capsys):
    """An axis that changes the batches (train.max_steps) makes the points run one after
    another, said in one line; they share one reference store and one file of cached states
    per split; `dpolab sweep --resume` finishes a point whose run was cut short, from its
    checkpoint, to the numbers it had."""
    data = write_pairs(tmp_path / "pairs.jsonl", n=12)
    over = tiny_overrides(tiny_dir, data) | {"train.grad_accum": 1}
    out = dpolab.sweep(grid={"train.max_steps": [2, 3]}, overrides=over, out=tmp_path / "sw")
    said = capsys.readouterr().out
    assert "one after another (axis train.max_steps changes what the points share" in said
    assert sorted(p.name for p in (cache / "states").iterdir()) and len(
        list((cache / "states").glob("*.safetensors"))) == 2  # train, held_out: computed once
    assert len(list((cache / "reference").glob("*.safetensors"))) == 2
    point = out / "max_steps3"
    before = read_metrics(point / "metrics.jsonl")
    (point / "summary.json").unlink()  # cut short after its last checkpoint
    lines = (point / "metrics.jsonl").read_text().splitlines()
    (point / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    from dpolab import cli

    assert cli.main(["sweep", "--resume", str(out)]) == 0
    said = capsys.readouterr().out
    assert "1 of 2 points finished; 1 to run" in said
    after = read_metrics(point / "metrics.jsonl")
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in after] == \
        [{k: v for k, v in r.items() if k not in TIMING} for r in before]


def test_items_axes_and_point_names():
    """A comma outside brackets makes an axis, values are YAML; names read beta0.1-ipo, and
    keep their field where two string axes could collide."""
    axes, fixed = sweeps.split_items(["loss.beta=0.05,0.1", "loss.name=dpo,ipo",
                                      "train.lora_targets=[q_proj,v_proj]", "train.max_steps=3"])
    assert axes == {"loss.beta": [0.05, 0.1], "loss.name": ["dpo", "ipo"]}
    assert fixed == {"train.lora_targets": ["q_proj", "v_proj"], "train.max_steps": 3}
    assert sweeps.point_name({"loss.beta": 0.1, "loss.name": "ipo"}, axes) == "beta0.1-ipo"
    two = {"loss.name": ["dpo"], "train.schedule": ["cosine"]}
    assert sweeps.point_name({"loss.name": "dpo", "train.schedule": "cosine"}, two) == \
        "namedpo-schedulecosine"
    with pytest.raises(UserError, match="repeated"):
        sweeps.split_items(["loss.beta=0.1,0.1"])


def test_shared_pass_only_for_head_axes():
    """The heads train together only under last_layer with axes of the loss and the head's
    optimizer, in one process, and with references that stay put (no loss.ref_sync)."""
    def grid(axes, **fixed):
        return sweeps.make_grid({}, axes, fixed, out="unused")
    assert sweeps.shared_pass_reason(grid({"loss.beta": [0.1, 0.5], "train.lr": [1e-3, 1e-2]})) is None
    assert "data.max_length" in sweeps.shared_pass_reason(grid({"data.max_length": [300, 400]}))
    assert "lora" in sweeps.shared_pass_reason(grid({"loss.beta": [0.1, 0.5]},
                                                    **{"train.scope": "lora"}))
    assert "torchrun" in sweeps.shared_pass_reason(grid({"loss.beta": [0.1, 0.5]}), world=2)
    assert "AuxDPO" in sweeps.shared_pass_reason(grid({"loss.name": ["dpo", "auxdpo"]}))
    assert "loss.ref_sync moves each point's reference" in sweeps.shared_pass_reason(
        grid({"loss.beta": [0.1, 0.5]}, **{"loss.ref_sync": {"every": 2, "alpha": 1}}))


def test_bad_point_is_one_line_before_anything_runs(tmp_path):
    """One invalid value in the grid: exit 2, one line naming the point and the field, and
    no folder written."""
    out = tmp_path / "sw"
    proc = subprocess.run([sys.executable, "-m", "dpolab", "sweep", "--out", str(out),
                           "loss.beta=0.1,0.5", "loss.name=dpo,nosuchloss"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr
    assert re.search(r"sweep point beta0\.1-nosuchloss: .*unknown loss 'nosuchloss'", err[0])
    assert not out.exists()


# ---------------------------------------------------------------------------------------
# The sweep's report, from synthetic run directories


@pytest.fixture(scope="module")
def synthetic_sweep(tmp_path_factory):
    from tests.test_report import make_run

    out = tmp_path_factory.mktemp("s") / "sw"
    axes = {"loss.beta": [0.1, 0.5], "loss.name": ["dpo", "ipo", "simpo"]}
    points = []
    for i, (beta, name) in enumerate([(b, n) for b in axes["loss.beta"] for n in axes["loss.name"]]):
        point = sweeps.point_name({"loss.beta": beta, "loss.name": name}, axes)
        make_run(out / point, loss={"name": name, "weights": {}, "beta": beta},
                 chosen_rate=-1.0 + 0.4 * i)
        points.append({"name": point, "values": {"loss.beta": beta, "loss.name": name}})
    (out / "sweep.json").write_text(json.dumps({"axes": axes, "fixed": {}, "points": points}))
    from dpolab.sweep_report import write_sweep_report

    return out, write_sweep_report(out)


def test_sweep_summary_is_each_points_last_evaluation(synthetic_sweep):
    """summary.json holds, per point, its run's final held-out accuracy, margin and chosen
    displacement overall and per group; a reference-free point has no displacement."""
    out, page = synthetic_sweep
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["points"]) == 6
    for p in summary["points"]:
        after = json.loads((out / p["name"] / "summary.json").read_text())["after"]
        assert p["accuracy"] == after["eval/rewards/accuracies"]
        assert p["margin"] == after["eval/rewards/margins"]
        assert p["chosen_displacement"] == after["eval/displacement/chosen"]
        assert p["groups"]["cats"]["chosen_displacement"] == \
            after["eval/groups/cats/displacement/chosen"]
        assert p["reference_free"] == (p["values"]["loss.name"] == "simpo")
    html = page.read_text()
    assert html.count("<img") == 1 and (out / "report" / "sweep_heat_maps.png").is_file()
    assert "beta0.5-simpo *" in html  # reference-free points are marked


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not on PATH")
def test_sweep_report_opens_in_a_browser(synthetic_sweep, tmp_path):
    """Headless Chromium decodes the heat map: the page's load handler counts the images
    with naturalWidth > 0."""
    _, page = synthetic_sweep
    proc = chromium_dom(page, tmp_path)
    assert re.findall(r'data-images-loaded="([^"]*)"', proc.stdout) == ["1/1"], proc.stderr[-2000:]


def test_torchrun_is_refused_in_one_line(monkeypatch, tmp_path):
    """Under torchrun (WORLD_SIZE > 1) a sweep is refused before anything is written."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    grid = sweeps.make_grid({}, {"loss.beta": [0.1, 0.5]}, {}, out=tmp_path / "sw")
    with pytest.raises(UserError, match="not under torchrun"):
        sweeps.run_grid(grid)
    assert not (tmp_path / "sw").exists()

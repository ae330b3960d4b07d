"""train.report_to: each tracker gets metrics.jsonl's rows under the same names, only the main
process logs, and a tracker that is not installed is a clear error naming the extra. Tracker
tests skip when the tracker's package is missing (CI installs only `.[dev]`)."""

import json
import math
from pathlib import Path

import pytest

from dpolab import trackers
from dpolab.errors import UserError
from dpolab.rundir import MetricsLog

FAST = {"train.batch_size": 4, "train.max_steps": 3, "train.lr": 0.01, "train.progress": False,
        "train.did_samples": 0, "train.report": False, "data.max_length": 48,
        "data.max_prompt_length": 16, "train.eval_every": 2}


def pairs(n: int = 12) -> list[dict]:
    words = ["red", "blue", "green", "cat", "dog", "sun"]
    return [{"prompt": f"Say {words[i % 6]} {i}:", "chosen": f" {words[i % 6]}.",
             "rejected": f" {words[(i + 1) % 6]} again."} for i in range(n)]


def run_with(tracker: str, tiny_dir, out):
    import dpolab

    run = dpolab.Trainer(str(tiny_dir), pairs(), out=str(out),
                         **{**FAST, "train.report_to": [tracker]}).train()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return run, rows


def history(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as a tracker should have it: name -> [(step, value)]."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        step, values = trackers.scalars(r)
        for k, v in values.items():
            out.setdefault(k, []).append((step, v))
    return out


class Recorder:
    """A tracker that keeps what it is given."""

    def __init__(self):
        self.rows, self.closed = [], False

    def log(self, row):
        self.rows.append(dict(row))

    def close(self):
        self.closed = True


def test_metrics_log_sends_its_rows_on_the_main_process_only(tmp_path):
    """The main process's MetricsLog hands every row it writes to the tracker; another
    process's writes nothing and calls no tracker."""
    rows = [{"step": 0, "eval/rewards/accuracies": 0.5}, {"step": 1, "loss": 0.69}, {}]
    main, other = Recorder(), Recorder()
    log = MetricsLog(tmp_path / "m.jsonl", enabled=True, tracker=main)
    quiet = MetricsLog(tmp_path / "o.jsonl", enabled=False, tracker=other)
    for r in rows:
        log.write(r)
        quiet.write(r)
    log.close()
    quiet.close()
    assert main.rows == rows[:2] and main.closed
    assert other.rows == [] and not (tmp_path / "o.jsonl").exists()


def test_scalars_keep_finite_numbers_only():
    """What a tracker plots: numbers but the step; bools, strings, NaN and inf left out."""
    step, values = trackers.scalars({"step": 3, "loss": 0.5, "n": 2, "ok": True, "name": "x",
                                     "bad": math.nan, "big": math.inf})
    assert step == 3 and values == {"loss": 0.5, "n": 2.0}


def test_unknown_or_missing_tracker_is_a_clear_error(monkeypatch):
    """An unknown name lists the valid ones; a tracker whose package is missing names the
    extra to install (a module that does not exist stands in for a missing package)."""
    with pytest.raises(UserError, match="unknown tracker 'neptune'; valid: tensorboard, wandb"):
        trackers.check(("neptune",))
    monkeypatch.setitem(trackers.TRACKERS, "wandb",
                        ("dpolab_no_such_module", "wandb", trackers.WandB))
    with pytest.raises(UserError, match=r"pip install 'dpolab\[wandb\]'"):
        trackers.check(("wandb",))
    assert isinstance(trackers.open_trackers((), None, project="p", config={}, is_main=True),
                      trackers.NullTracker)
    assert isinstance(trackers.open_trackers(("wandb",), None, project="p", config={},
                                             is_main=False), trackers.NullTracker)


def test_tensorboard_gets_every_metric(tiny_dir, tmp_path, cache):
    """TensorBoard's event files hold every metrics.jsonl number under its name and step."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, rows = run_with("tensorboard", tiny_dir, tmp_path / "run")
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    got = {k: [(e.step, e.value) for e in acc.Scalars(k)] for k in acc.Tags()["scalars"]}
    want = history(rows)
    assert set(got) == set(want)
    for k, pts in want.items():  # event files store float32
        assert [s for s, _ in got[k]] == [s for s, _ in pts]
        assert [v for _, v in got[k]] == pytest.approx([v for _, v in pts], rel=1e-6, abs=1e-6)


def test_wandb_offline_gets_every_metric(tiny_dir, tmp_path, cache, monkeypatch):
    """wandb in offline mode (no network) writes a run in RUN/wandb whose history holds, per
    step, every metrics.jsonl number of that step under the same name (rows of one step, a
    training line and an evaluation, merge into one history row)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    run, rows = run_with("wandb", tiny_dir, tmp_path / "run")
    [log] = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    got = {h["_step"]: {k: v for k, v in h.items() if not k.startswith("_")}
           for h in wandb_history(log)}
    want: dict[int, dict[str, float]] = {}
    for r in rows:
        step, values = trackers.scalars(r)
        want.setdefault(step, {}).update(values)
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step])


def wandb_history(path) -> list[dict]:
    """The history records of a .wandb file: a LevelDB-style log (a 7-byte file header, then
    32 KiB blocks of records: checksum u32, length u16, type u8 (1 full, 2 first, 3 middle,
    4 last), data) of wandb's Record protobufs."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, out, parts = Path(path).read_bytes(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(parts)
            parts = b""
            if rec.WhichOneof("record_type") == "history":
                out.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                            for i in rec.history.item})
    return out


def test_mlflow_file_store_gets_every_metric(tiny_dir, tmp_path, cache, monkeypatch):
    """mlflow's local file store in RUN/mlruns holds every metrics.jsonl number under its name
    and step."""
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run, rows = run_with("mlflow", tiny_dir, tmp_path / "run")
    client = MlflowClient((run / "mlruns").resolve().as_uri())
    [found] = client.search_runs([client.get_experiment_by_name("dpolab").experiment_id])
    assert found.info.run_name == "run" and found.info.status == "FINISHED"
    assert found.data.params["loss.beta"] == "0.5"
    want = history(rows)
    for k, pts in want.items():
        name = trackers.file_store_name(k, set(want))
        got = sorted((m.step, m.value) for m in client.get_metric_history(found.info.run_id, name))
        assert [s for s, _ in got] == [s for s, _ in sorted(pts)]
        assert [v for _, v in got] == pytest.approx([v for _, v in sorted(pts)])


def test_file_store_names_only_change_below_another_metric():
    """`loss` and `loss/dpo` cannot both be files: the term becomes `loss.dpo`; names with no
    metric above them (`rewards/margins`, `eval/groups/a/accuracy`) stay."""
    names = {"loss", "loss/dpo", "rewards/margins", "eval/groups/a/accuracy"}
    assert {n: trackers.file_store_name(n, names) for n in sorted(names)} == {
        "eval/groups/a/accuracy": "eval/groups/a/accuracy", "loss": "loss",
        "loss/dpo": "loss.dpo", "rewards/margins": "rewards/margins"}


def test_trackio_run_completes(tiny_dir, tmp_path, cache, monkeypatch):
    """trackio logs a run to a local project store without a network."""
    pytest.importorskip("trackio")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    run, rows = run_with("trackio", tiny_dir, tmp_path / "run")
    assert rows and (run / "summary.json").exists()

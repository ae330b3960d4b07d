"""benchmarks/vs_trl.py on a bare GPU machine: TRL's dataset is built without fingerprint
hashing, the checkpointing keyword is one the installed config has, and a child that runs out
of memory becomes a row (no ratios), with MFU computed from the processed tokens."""

import json

import pytest

from tests.test_bench_smoke import child, vs_trl


def test_dataset_skips_fingerprint_hashing(tmp_path, monkeypatch):
    """The rows come back in order, the fingerprint is the file's digest, and the table is
    never hashed (hashing pickles it with dill, which fails on Python 3.12 for Arrow types)."""
    import datasets.arrow_dataset as ad

    def refuse(*a, **k):
        raise AssertionError("the dataset was fingerprinted by hashing")

    monkeypatch.setattr(ad, "generate_fingerprint", refuse)
    rows = [{"prompt": "a b", "chosen": " c", "rejected": " d"},
            {"prompt": "e", "chosen": " f g", "rejected": " h"}]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = child.dataset_of(path)
    assert [ds[i] for i in range(len(ds))] == rows
    assert ds._fingerprint.startswith("vs-trl-")


def test_checkpointing_field_exists_in_the_installed_config():
    """The keyword passed to DPOConfig is one of its dataclass fields."""
    import dataclasses

    trl = pytest.importorskip("trl")
    name = child.checkpointing_field(trl.DPOConfig)
    assert name in {f.name for f in dataclasses.fields(trl.DPOConfig)}
    assert name in ("activation_checkpointing", "gradient_checkpointing")


def test_oom_row_and_mfu():
    """A system out of memory is a row without ratios; dpolab's MFU on CUDA is
    6 x 1e8 parameters x (600 processed tokens / 2 s) / 8e14 = 1.8e11 / 8e14 = 2.25e-4."""
    ok = {"step_seconds": [9.0, 2.0], "n_timed": 1, "steps_cuda_peak_mib": 10.0,
          "cuda_peak_mib": 12.0, "losses": [0.69], "logps_chosen": [-1.0], "threads": 1,
          "child_wall_s": 1.0}
    oom = {"oom": True, "error": "OutOfMemoryError: CUDA out of memory", "cuda_peak_mib": 8e4,
           "child_wall_s": 2.0}
    kw = dict(tokens_per_step=800, n_params=10**8, cuda=True)
    rows = {"dpolab": vs_trl.summarize(ok, processed_per_step=600, **kw),
            "trl-precompute": vs_trl.summarize(oom, processed_per_step=800, **kw)}
    assert rows["dpolab"]["mfu"] == pytest.approx(2.25e-4)
    assert rows["dpolab"]["tokens_per_s"] == pytest.approx(400.0)
    assert rows["trl-precompute"]["oom"] and "s_per_step" not in rows["trl-precompute"]
    assert vs_trl.ratios(rows) == {}

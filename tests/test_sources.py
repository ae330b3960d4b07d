"""Inputs refused whole, with one line naming what was found and what to do (dpolab.sources):
image or video columns (the trained models read text only) and several splits given as one
data set.  From the command line: exit code 2, no traceback; from Python: the UserError."""

import json

import pytest

import dpolab
from dpolab.cli import main
from dpolab.errors import UserError

ROWS = [{"prompt": f"Say {w}.", "chosen": f" {w}.", "rejected": " no."}
        for w in ("cat", "dog", "sun", "tree")]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cli(capsys, *argv) -> str:
    """Run `dpolab ARGV`; it must exit 2 without a traceback; returns stderr."""
    assert main([*map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip()


# ------------------------------------------------------------------------------- vision
@pytest.mark.parametrize("column", ["images", "image", "videos"])
def test_vision_column_in_a_file_is_refused(tiny_dir, tmp_path, capsys, column):
    """A JSONL file whose second row has an image column: `dpolab train` and `dpolab inspect`
    stop with FILE:ROW, the column, and that vision models are not supported; --skip-invalid
    does not drop it row by row (the column concerns the data set, not one row)."""
    rows = [ROWS[0], dict(ROWS[1], **{column: ["cat.png"]}), *ROWS[2:]]
    data = _write(tmp_path / "v.jsonl", rows)
    message = (f"{data}:2: column '{column}' holds images or videos, but vision models are not "
               f"supported: dpolab trains causal language models on text; remove the column to "
               f"train on the text alone")
    err = _cli(capsys, "train", "--model", tiny_dir, "--data", data, "--out", tmp_path / "run",
               "--skip-invalid", "train.progress=false")
    assert err == f"dpolab train: error: {message}"       # one line, before any model loads
    assert _cli(capsys, "inspect", data, "--tokenizer", "none") == f"dpolab inspect: error: {message}"


def test_vision_column_in_memory_is_refused(tiny_dir):
    """A datasets.Dataset with an images column (null in some rows) given to dpolab.Trainer:
    the UserError names the argument and the column, before any row is read."""
    from datasets import Dataset

    table = Dataset.from_list([dict(r, images=None) for r in ROWS])
    with pytest.raises(UserError) as err:
        dpolab.Trainer(str(tiny_dir), table)
    assert str(err.value) == ("train_dataset: column 'images' holds images or videos, but vision "
                              "models are not supported: dpolab trains causal language models "
                              "on text; remove the column to train on the text alone")


# ------------------------------------------------------------------------------- splits
def test_dataset_dict_is_refused_naming_its_splits(tiny_dir):
    """A DatasetDict or a plain dict of splits as train_dataset: which split goes to which
    argument."""
    from datasets import Dataset, DatasetDict

    dd = DatasetDict(train=Dataset.from_list(ROWS), test=Dataset.from_list(ROWS[:2]))
    with pytest.raises(UserError) as err:
        dpolab.Trainer(str(tiny_dir), dd)
    assert str(err.value) == ("train_dataset: a DatasetDict of 2 splits ('train', 'test'); pass "
                              "dataset['train'] as train_dataset and dataset['test'] as "
                              "eval_dataset")
    # as eval_dataset, a dict of splits is a set of named eval sets (tests/test_evaluate.py)
    named = dpolab.Trainer(str(tiny_dir), ROWS, eval_dataset={"validation": ROWS[:2],
                                                              "train": ROWS})
    assert named.config.data.eval == {"validation": "<in-memory eval_dataset[validation]>",
                                      "train": "<in-memory eval_dataset[train]>"}
    with pytest.raises(UserError, match=r"^train_dataset: a dict of 1 splits \('dev'\); pass "
                                        r"dataset\['dev'\] as train_dataset$"):
        dpolab.Trainer(str(tiny_dir), {"dev": ROWS})


def test_file_of_splits_is_refused_naming_its_splits(tiny_dir, tmp_path, capsys):
    """A JSON file holding {"train": [...], "test": [...]} and a folder saved by
    DatasetDict.save_to_disk, given as data: exit 2, the splits and which setting takes which."""
    from datasets import Dataset, DatasetDict

    data = tmp_path / "splits.json"
    data.write_text(json.dumps({"train": ROWS, "test": ROWS[:2]}))
    err = _cli(capsys, "train", "--model", tiny_dir, "--data", data, "--out", tmp_path / "r1",
               "train.progress=false")
    assert err == (f"dpolab train: error: {data}: a JSON object of 2 splits ('train', "
                   f"'test'), not one split; give the 'train' split as data.path (--data) and "
                   f"the 'test' split as data.eval_path (--eval-data), each as a JSONL, JSON or "
                   f"Parquet file")
    saved = tmp_path / "saved"
    DatasetDict(train=Dataset.from_list(ROWS), validation=Dataset.from_list(ROWS)).save_to_disk(
        str(saved))
    capsys.readouterr()                     # the saving progress bar
    err = _cli(capsys, "inspect", saved, "--tokenizer", "none")
    assert err == (f"dpolab inspect: error: {saved}: a folder saved by "
                   f"DatasetDict.save_to_disk of 2 splits ('train', 'validation'), not one split; "
                   f"give the 'train' split as data.path (--data) and the 'validation' split as "
                   f"data.eval_path (--eval-data), each as a JSONL, JSON or Parquet file")

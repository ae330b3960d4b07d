"""Folders written whole or not at all (dpolab.atomic.write_dir)."""

import os

import pytest

from dpolab import atomic


def test_write_dir_replaces_whole_and_leaves_no_temporary(tmp_path):
    """A second write replaces the folder's contents; nothing but the folder remains beside it."""
    d = tmp_path / "ckpt"
    with atomic.write_dir(d) as t:
        (t / "a").write_text("1")
        (t / "b").write_text("old")
    with atomic.write_dir(d) as t:
        (t / "a").write_text("2")
    assert (d / "a").read_text() == "2" and not (d / "b").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_write_dir_error_keeps_old_contents(tmp_path):
    """An error inside the block leaves the old folder as it was and removes the temporary."""
    d = tmp_path / "ckpt"
    with atomic.write_dir(d) as t:
        (t / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.write_dir(d) as t:
            (t / "a").write_text("new")
            raise RuntimeError("killed")
    assert (d / "a").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_write_dir_keep_existing(tmp_path):
    """keep_existing: a folder another writer finished first is kept, ours dropped."""
    d = tmp_path / "model"
    with atomic.write_dir(d) as t:
        (t / "w").write_text("first")
    with atomic.write_dir(d, keep_existing=True) as t:
        (t / "w").write_text("second")
    assert (d / "w").read_text() == "first"


def test_recover_dir_after_kill_between_renames(tmp_path):
    """Where no atomic exchange exists the old folder is set aside first; a kill before the
    new one is renamed in leaves `dest` missing, and the next access puts the old one back."""
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "a").write_text("old")
    os.replace(d, atomic._aside(d))  # the state right after the first of the two renames
    atomic.recover_dir(d)
    assert (d / "a").read_text() == "old" and not atomic._aside(d).exists()


def test_digest_of_a_one_element_tensor_under_any_stride():
    """numpy and torch count a one-element array as contiguous whatever its stride (the
    transpose of a (1, 2) array: stride 2); its digest is that of the same value laid out
    plainly, not an error from viewing its bytes."""
    import numpy as np
    import torch

    from dpolab.atomic import digest

    strided = torch.as_tensor(np.ascontiguousarray(np.array([[1.5, 2.0]]).T[0]))
    assert strided.stride() == (2,)
    assert digest({"x": strided}) == digest({"x": torch.tensor([1.5], dtype=torch.float64)})

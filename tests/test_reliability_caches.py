"""No cache and no disk trusted: every cache file is read back verified (checksum, kind,
layout, values) or computed again, the step-0 evaluation checks every pair of both splits
against the store and names the file at fault, a cache that cannot take a file stops the run
before any pass, a failed write is one line naming the file, and what killed writers left
is removed at the next start (never what a live process is writing)."""

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dpolab import atomic, cachedir, checkpoint
from dpolab.cli import main
from dpolab.distributed import Distributed
from dpolab.policy import FORWARDS
from tests.test_reliability import TINY_ARGS, pair_rows, strip, write_jsonl

ARGS = [*TINY_ARGS, "data.eval_fraction=0.25", "train.max_steps=4", "train.save_every=2"]
N_TRAIN, N_HELD = 12, 4  # 16 pairs, a quarter held out
ENOSPC_TEXT = os.strerror(errno.ENOSPC)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model, 16 pairs, and a clean run whose cache (`cache0`) the tests copy."""
    from dpolab.tiny import save_tiny

    root = tmp_path_factory.mktemp("caches")
    env = {"root": root, "tiny": save_tiny(root / "tiny", vocab_size=512, seed=0),
           "data": write_jsonl(root / "pairs.jsonl", pair_rows()), "cache0": root / "cache0"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPOLAB_CACHE", str(env["cache0"]))
        assert main(args(env, root / "base")) == 0
    env["base"] = root / "base"
    return env


def args(env, out, *extra):
    return ["train", "--model", str(env["tiny"]), "--data", str(env["data"]), "--out", str(out),
            *ARGS, *extra]


@pytest.fixture()
def warm(env, tmp_path, monkeypatch):
    """A copy of the clean run's cache as this test's $DPOLAB_CACHE."""
    shutil.copytree(env["cache0"], tmp_path / "cache")
    monkeypatch.setenv("DPOLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def stored(cache: Path, kind: str, split: str) -> Path:
    """The file of `kind` (reference, states) holding `split`, told by its number of pairs."""
    want = N_HELD if split == "held_out" else N_TRAIN
    for path in (cache / kind).glob("*.safetensors"):
        if (load_file(str(path))["offsets"].numel() - 1) // 2 == want:
            return path
    raise AssertionError(f"no {kind} file of {want} pairs in {cache}")


def entry(split: str) -> int:
    """A held-out pair, or a training pair outside the first micro-batch (batch_size 4)."""
    from dpolab.train import epoch_order

    if split == "held_out":
        return N_HELD - 1
    first = set(epoch_order(N_TRAIN, seed=0, epoch=0)[:4])
    return max(set(range(N_TRAIN)) - first)


def flip_bytes(path: Path, kind: str, i: int) -> None:
    """Flip 8 bytes of pair i's chosen entry, in place, as a damaged disk would."""
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    name = "tokens" if kind == "reference" else "hidden"
    per_token = 4 * (header[name]["shape"][1] if kind == "states" else 1)
    offsets = load_file(str(path))["offsets"]
    at = 8 + n + header[name]["data_offsets"][0] + int(offsets[i]) * per_token
    for j in range(at, at + 8):
        data[j] ^= 0x5A
    path.write_bytes(bytes(data))


def wrong_values(path: Path, kind: str, i: int) -> None:
    """Pair i's chosen entry moved and the file saved with a matching checksum: what no disk
    damage gives, but a wrong write would; only the step-0 check can see it."""
    t = load_file(str(path))
    name = "tokens" if kind == "reference" else "hidden"
    off = t["offsets"]
    t[name][int(off[i]):int(off[i + 1])] += 0.5 if kind == "reference" else 3.0
    atomic.save_tensors(t, path, kind=kind)


# ------------------------------------------------------------- 1: cache contents trusted
@pytest.mark.parametrize("kind", ["reference", "states"])
@pytest.mark.parametrize("split", ["held_out", "train"])
def test_a_damaged_cache_entry_is_computed_again(env, warm, kind, split, capsys):
    """Bytes flipped in one entry (a held-out pair, or a training pair outside the first
    micro-batch) of the reference store or the state cache: the checksum tells, the run says
    so in one line naming the file, computes it again and ends as the clean run, bitwise."""
    path = stored(warm, kind, split)
    flip_bytes(path, kind, entry(split))
    out = env["root"] / f"flip-{kind}-{split}-{os.getpid()}-{time.monotonic_ns()}"
    assert main(args(env, out)) == 0
    err = capsys.readouterr().err
    assert (f"dpolab: {path}: its tensors do not match their recorded checksum (damaged); "
            f"computing it again") in err
    assert strip(out / "metrics.jsonl") == strip(env["base"] / "metrics.jsonl")
    assert atomic.read_tensors(path, kind=kind) is not None  # written again, whole


@pytest.mark.parametrize("kind", ["reference", "states"])
@pytest.mark.parametrize("split", ["held_out", "train"])
def test_wrong_values_with_a_valid_checksum_stop_at_step_0(env, warm, kind, split, capsys):
    """One entry wrong in a file whose checksum matches: the step-0 evaluation of every pair
    stops the run (exit 2) naming that pair's split and the file at fault, the states and
    not the store when the states are wrong (the pairs scored through the body again agree
    with the store); deleting the file named, the next run computes it and trains as the
    clean run did."""
    path = stored(warm, kind, split)
    wrong_values(path, kind, entry(split))
    n = N_HELD if split == "held_out" else N_TRAIN
    what = "the stored reference log-probs" if kind == "reference" else "the cached body states"
    tag = f"{kind}-{split}-{os.getpid()}-{time.monotonic_ns()}"
    assert main(args(env, env["root"] / f"wrong-{tag}")) == 2
    err = capsys.readouterr().err
    assert f"step-0 check failed: 1 of {n} {split} pairs score differently" in err, err
    assert f"{what} ({path}) are not what this model computes; delete that file" in err, err
    assert "Traceback" not in err and not (env["root"] / f"wrong-{tag}" / "checkpoints").exists()
    path.unlink()
    assert main(args(env, env["root"] / f"again-{tag}")) == 0
    assert strip(env["root"] / f"again-{tag}" / "metrics.jsonl") == strip(
        env["base"] / "metrics.jsonl")


def test_a_damaged_store_is_caught_on_resume(env, warm, capsys):
    """A resumed run has no step-0 evaluation; the held-out store's checksum still tells it
    is damaged: computed again, said, and the resumed run ends as the uninterrupted one."""
    run = env["root"] / f"resume-{time.monotonic_ns()}"
    shutil.copytree(env["base"], run)
    shutil.rmtree(run / "checkpoints" / "step-000004")
    path = stored(warm, "reference", "held_out")
    flip_bytes(path, "reference", entry("held_out"))
    assert main(["train", "--resume", str(run)]) == 0
    assert f"dpolab: {path}: its tensors do not match" in capsys.readouterr().err
    assert strip(run / "metrics.jsonl") == strip(env["base"] / "metrics.jsonl")


# --------------------------------------------------- 5: foreign files and cache locations
def _foreign(kind: str, path: Path, warm: Path) -> str:
    """Put a foreign file at `path`; returns what the miss message must say."""
    if kind == "other kind":  # the held-out states where the held-out store belongs
        shutil.copy(stored(warm, "states", "held_out"), path)
        return "holds 'states', not 'reference'"
    t = load_file(str(path))
    if kind == "offsets out of range":
        t["offsets"] = t["offsets"].clone()
        t["offsets"][-1] += 1000
        atomic.save_tensors(t, path, kind="reference")
        return "its offsets run from 0 to"
    if kind == "no checksum":  # as an earlier dpolab wrote it
        save_file(t, str(path))
        return "has no checksum"
    path.write_bytes(b"not a safetensors file")
    return "cannot be read"


@pytest.mark.parametrize("kind", ["other kind", "offsets out of range", "no checksum",
                                  "not safetensors"])
def test_a_foreign_cache_file_is_computed_again(env, warm, kind, capsys):
    """A file of the other kind, one whose offsets run past its values, one without a
    checksum, or no safetensors at all, where the held-out store belongs: one line naming the
    file and what is wrong, computed again, no traceback, and the clean run's metrics."""
    path = stored(warm, "reference", "held_out")
    says = _foreign(kind, path, warm)
    out = env["root"] / f"foreign-{kind.replace(' ', '-')}-{time.monotonic_ns()}"
    assert main(args(env, out)) == 0
    err = capsys.readouterr().err
    assert f"dpolab: {path}: {says}" in err and "computing it again" in err, err
    assert strip(out / "metrics.jsonl") == strip(env["base"] / "metrics.jsonl")


def test_a_states_file_where_a_store_is_expected_and_back(env, warm, capsys):
    """The other direction: the held-out store in the state cache's place is a miss too."""
    path = stored(warm, "states", "held_out")
    shutil.copy(stored(warm, "reference", "held_out"), path)
    assert main(args(env, env["root"] / f"swapped-{time.monotonic_ns()}")) == 0
    assert f"dpolab: {path}: holds 'reference', not 'states'" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["a file", "below a file", "read-only", "full"])
def test_a_cache_that_cannot_take_the_files_stops_before_any_pass(env, tmp_path, monkeypatch,
                                                                  where, capsys):
    """Exit 2 with one line naming $DPOLAB_CACHE and what is wrong, before the body or the
    reference pass runs (no batch mapped) and with nothing stored."""
    cache = tmp_path / "cache"
    (tmp_path / "afile").write_text("x")
    if where == "a file":
        cache = tmp_path / "afile"
    elif where == "below a file":
        cache = tmp_path / "afile" / "cache"
    elif where == "read-only":  # injected: root writes anywhere, and CI may not mount
        def probe(folder):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder))
        monkeypatch.setattr(cachedir, "_probe", probe)
    else:
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(cachedir.shutil, "disk_usage",
                            lambda p: usage._replace(free=10 * 1024))
    monkeypatch.setenv("DPOLAB_CACHE", str(cache))
    passes = []
    monkeypatch.setattr(Distributed, "map_batches", lambda *a, **k: passes.append(1))
    assert main(args(env, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    expected = {"a file": "is not a folder",
                "below a file": "a part of the path is a file, not a folder",
                "read-only": "read-only file system",
                "full": "(and 1024 KiB kept spare), but its disk has 10 KiB free"}[where]
    assert err.startswith(f"dpolab train: error: $DPOLAB_CACHE={cache}") and expected in err
    assert passes == [] and not list(tmp_path.rglob("*.safetensors"))


def test_a_warm_cache_is_only_read(env, warm, monkeypatch):
    """Everything the run reads is present and verified: nothing is written to the cache and
    no place is checked, so a read-only cache serves (both are made to fail if asked; the run
    directory's own tensor files, RUN/pairs/, are written as usual)."""
    def refuse(*a, **k):
        raise AssertionError("a warm cache was written to or checked for room")
    save = atomic.save_tensors

    def save_outside(tensors, path, **kw):
        if Path(path).resolve().is_relative_to(warm.resolve()):
            refuse()
        return save(tensors, path, **kw)
    monkeypatch.setattr(atomic, "save_tensors", save_outside)
    monkeypatch.setattr(cachedir, "require", refuse)
    before = {p: p.stat().st_mtime_ns for p in warm.rglob("*")}
    assert main(args(env, env["root"] / f"warm-{time.monotonic_ns()}")) == 0
    assert {p: p.stat().st_mtime_ns for p in warm.rglob("*")} == before


# ------------------------------------------------------------------ 6: write failures
def _full_disk_save(obj, f):
    """torch.save as a full disk makes it fail: some bytes written, then RuntimeError
    'unexpected pos' raised while handling the OSError of the file's write."""
    f.write(b"\0" * 1000)
    try:
        raise OSError(errno.ENOSPC, ENOSPC_TEXT)
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 "  # noqa: B904 - torch chains implicitly
                           "vs 534")


def test_no_space_for_a_checkpoint_is_one_line_and_loses_nothing(env, warm, monkeypatch,
                                                               capsys):
    """No space left while torch.save writes the second checkpoint: exit 2 with one line
    naming the file, 'no space left on device' and the checkpoint to go on from; no
    temporary folder left; the resume ends as the uninterrupted run."""
    real, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(1)
        return _full_disk_save(obj, f) if len(calls) == 2 else real(obj, f, *a, **k)
    monkeypatch.setattr(checkpoint.torch, "save", save)
    run = env["root"] / f"nospace-{time.monotonic_ns()}"
    assert main(args(env, run)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    ck = run / "checkpoints"
    assert err[-1] == (f"dpolab train: error: {ck / 'step-000004' / 'optimizer.pt'}: cannot "
                       f"write: no space left on device. The last checkpoint is "
                       f"{ck / 'step-000002'} (step 2); once it can be written, continue "
                       f"with: dpolab train --resume {run}")
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step-000002"]
    assert checkpoint.verify(ck / "step-000002")[0]["step"] == 2
    monkeypatch.setattr(checkpoint.torch, "save", real)
    assert main(["train", "--resume", str(run)]) == 0
    assert strip(run / "metrics.jsonl") == strip(env["base"] / "metrics.jsonl")


def test_a_file_size_limit_is_one_line(env, warm):
    """RLIMIT_FSIZE below the optimizer state's size in a child process (SIGXFSZ ignored, so
    the write fails with EFBIG, as under `ulimit -f`): exit 2, one line naming optimizer.pt,
    the limit, and that no checkpoint was saved; no traceback."""
    run = env["root"] / f"fsize-{time.monotonic_ns()}"
    limit = 200_000  # optimizer.pt ~260 kB; states, trainable tensors, metrics below
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
            "from dpolab.cli import main\n"
            f"sys.exit(main({args(env, run)!r}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "DPOLAB_CACHE": str(warm)})
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last == (f"dpolab train: error: {run / 'checkpoints' / 'step-000002' / 'optimizer.pt'}"
                    f": cannot write: file too large: the file-size limit of this process is "
                    f"{limit} bytes (ulimit -f). No checkpoint has been saved in {run} yet; once "
                    f"it can be written, continue with: dpolab train --resume {run}")
    assert "Traceback" not in done.stderr and list((run / "checkpoints").iterdir()) == []


def _fail_write(monkeypatch, target: str, run: Path) -> str:
    """Make one writer fail as a full disk does; returns the file the message must name."""
    if target == "metrics":
        real = Path.open

        def open_(self, mode="r", *a, **k):
            if self.name == "metrics.jsonl" and mode == "a":
                raise OSError(errno.ENOSPC, ENOSPC_TEXT, str(self))
            return real(self, mode, *a, **k)
        monkeypatch.setattr(Path, "open", open_)
        return str(run / "metrics.jsonl")
    if target == "report":
        from matplotlib.figure import Figure

        def savefig(self, path, *a, **k):
            raise OSError(errno.ENOSPC, ENOSPC_TEXT, str(path))
        monkeypatch.setattr(Figure, "savefig", savefig)
        return str(run / "report" / "")
    import safetensors.torch

    def save_file(*a, **k):  # safetensors' own words for it
        raise RuntimeError("Error while serializing: I/O error: No space left on device "
                           "(os error 28)")
    if target == "export":
        from transformers import PreTrainedModel

        monkeypatch.setattr(PreTrainedModel, "save_pretrained", lambda self, *a, **k: save_file())
        return str(run / "model")
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)  # a cache file
    return str(Path(os.environ["DPOLAB_CACHE"]) / "states" / "")


@pytest.mark.parametrize("target", ["metrics", "export", "cache", "report"])
def test_write_failures_anywhere_are_one_line(env, tmp_path, monkeypatch, target, capsys):
    """No space left while writing metrics.jsonl, the exported model, a cache file or the
    report's figures: exit 2 with one line naming the file and 'no space left on device'."""
    monkeypatch.setenv("DPOLAB_CACHE", str(tmp_path / "cache"))  # cold: the cache is written
    run = tmp_path / "run"
    names = _fail_write(monkeypatch, target, run)
    assert main(args(env, run, *(["train.report=true"] if target == "report" else []))) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"dpolab train: error: {names}"), last
    assert ": cannot write: no space left on device." in last and "Traceback" not in err


# ------------------------------------------------------------- 9: killed writers' leftovers
WRITER = """
import sys, time
from pathlib import Path
from dpolab import atomic
run, cache_file = Path(sys.argv[1]), Path(sys.argv[2])
with atomic.write_dir(run / "checkpoints" / "step-000009") as tmp:
    (tmp / "optimizer.pt").write_bytes(b"x" * 4096)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    atomic.tmp_sibling(cache_file).write_bytes(b"y" * 4096)
    atomic.tmp_sibling(run / "metrics.jsonl").write_text("{}")
    print("writing", flush=True)
    time.sleep(300)
"""


def test_leftovers_of_killed_writers_are_removed_at_the_next_start(env, warm, capsys):
    """Two writers stop inside a checkpoint-folder write with a cache file and a metrics file
    half written: one killed with SIGKILL, one still running (another run sharing the cache).
    The next run's start removes the killed one's temporary siblings (and another host's
    untouched for two days) and says so, and leaves the live one's and another host's recent
    one alone."""
    run = env["root"] / f"orphans-{time.monotonic_ns()}"
    shutil.copytree(env["base"], run)
    shutil.rmtree(run / "checkpoints" / "step-000004")
    cache_file = warm / "states" / "x.safetensors"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(run), str(cache_file)],
                                stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for w in writers:
            assert w.stdout.readline().strip() == "writing"
        killed, live = writers
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        foreign_new = warm / "reference" / "y.safetensors.123@another-host.tmp"
        foreign_old = warm / "reference" / "z.safetensors.123@another-host.tmp"
        for p in (foreign_new, foreign_old):
            p.write_bytes(b"z")
        os.utime(foreign_old, (time.time() - 2 * 86400,) * 2)

        def temps(pid):
            return sorted(p.name for p in [*run.iterdir(), *(run / "checkpoints").iterdir(),
                                           *(warm / "states").iterdir()]
                          if f".{pid}@" in p.name)
        assert len(temps(killed.pid)) == len(temps(live.pid)) == 3
        assert main(["train", "--resume", str(run)]) == 0
        assert "dpolab: removed 4 temporary file(s) or folder(s)" in capsys.readouterr().err
        assert temps(killed.pid) == [] and len(temps(live.pid)) == 3
        assert foreign_new.exists() and not foreign_old.exists()
        assert strip(run / "metrics.jsonl") == strip(env["base"] / "metrics.jsonl")
    finally:
        for w in writers:
            w.kill()
            w.wait()


# ------------------------------------------------------------- converted model folders
def test_a_changed_file_of_a_converted_model_folder_is_converted_again(env, tmp_path, capsys):
    """A converted folder records the sha256 of its files; one byte changed in its weights,
    or a folder without the record (an earlier dpolab), is not taken as converted (said
    naming the file), so the caller converts it again."""
    from dpolab import gguf_models

    dest = shutil.copytree(env["tiny"], tmp_path / "models" / "tiny")
    assert not gguf_models._is_converted(dest)  # no record: an earlier dpolab's
    assert f"dpolab: {dest}: has no {cachedir.RECORD}" in capsys.readouterr().err
    cachedir.record_folder(dest)  # what save_converted writes before the rename
    assert gguf_models._is_converted(dest)
    weights = dest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 1
    weights.write_bytes(bytes(data))
    assert not gguf_models._is_converted(dest)
    assert f"dpolab: {weights}: is missing or does not match its sha256" in capsys.readouterr().err


def test_write_problem_reads_the_errno_wherever_the_writer_put_it(tmp_path):
    """The errno on the error, on the error it was raised from (torch.save into a Python
    file), or in its text (safetensors); another error is no write failure."""
    try:
        try:
            raise OSError(errno.EFBIG, "File too large")
        except OSError:
            raise RuntimeError("unexpected pos 704 vs 598")  # noqa: B904 - as torch raises it
    except RuntimeError as err:
        chained = err
    assert atomic.write_problem(chained, tmp_path).startswith("file too large")
    assert atomic.write_problem(OSError(errno.EROFS, "x"), tmp_path) == "read-only file system"
    assert atomic.write_problem(RuntimeError("I/O error: No space left on device (os error 28)"),
                                tmp_path) == "no space left on device"
    assert atomic.write_problem(ValueError("bad value"), tmp_path) is None
    assert atomic.write_problem(OSError(errno.ENOENT, "gone"), tmp_path) is None


@pytest.mark.parametrize("pair_forward", sorted(FORWARDS))
def test_the_states_a_run_stores_are_read_back_by_the_next(tiny_dir, tmp_path, pair_forward,
                                                           capsys):
    """The labels and lengths a state file is checked against (the scored tokens of the
    token ids) are those the forward stored, masked multi-turn completions included, under
    either pair forward: a second fill reads the file (no miss) and holds the same states."""
    from transformers import AutoModelForCausalLM

    from dpolab.models import body_and_head
    from dpolab.head_cache import CachedHeadForward
    from dpolab.policy import make_forward
    from dpolab.tokenize import PairExample

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    body, head = body_and_head(model)
    states = make_forward(pair_forward, body, head, pad_id=0, chunk_size=64,
                          device=torch.device("cpu"), autocast=False, dtype=model.dtype).hidden
    examples = [PairExample([5, 6], [7, 8, 9, 10], [11], None, 0, 1, "s",
                            chosen_mask=(True, False, False, True)),
                PairExample([5, 9, 12], [13, 14], [15, 16, 17], None, 1, 2, "s",
                            rejected_mask=(False, True, True))]
    store = tmp_path / "states" / "x.safetensors"
    first, second = (CachedHeadForward(lambda: head, chunk_size=64, device=torch.device("cpu"))
                     for _ in range(2))
    first.fill(states, examples, split="train", batch_size=2, store=store)
    second.fill(lambda batch: pytest.fail("the stored states were computed again"), examples,
                split="train", batch_size=2, store=store)
    assert "computing it again" not in capsys.readouterr().err
    for key, entry in first.cache.items():
        assert all(torch.equal(a, b) for a, b in zip(entry, second.cache[key]))
    assert [e[1].tolist() for e in first.cache.values()] == [[7, 10], [13, 14]]

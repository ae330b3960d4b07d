"""Atomic, verified, resumable checkpoints of the trainable state.

A checkpoint is a folder `checkpoints/step-NNNNNN/` holding the trainable tensors
(`trainable.safetensors`), the optimizer state keyed by parameter name (`optimizer.pt`,
torch.distributed.checkpoint.state_dict's full form, read back with
`torch.load(weights_only=True)`), the lines of metrics.jsonl written so far (`metrics.jsonl`)
and `state.json` (step, metrics lines written, the run's identity (dpolab.identity), and the
sha256 of each of the other files). It is written under a temporary name and renamed
into place (dpolab.atomic.write_dir); `checkpoints/latest` names the newest complete one and
is itself replaced atomically, so a run killed at any instant (kill -9 included) leaves the
previous checkpoints intact and readable. The newest `keep` checkpoints are kept.

On resume every checkpoint is checked, newest first, against its recorded checksums; a
damaged one is skipped with a message saying why, and the newest intact one is loaded. A run
that has checkpoints but no intact one stops with a UserError; it never restarts from step 0
silently. A resume continues the same run or refuses (`check_identity`), and its
metrics.jsonl restarts from the checkpoint's own copy of the lines, so a cut or deleted
metrics.jsonl is repaired, not continued short.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dpolab import atomic
from dpolab.atomic import sha256
from dpolab.errors import UserError

FILES = ("trainable.safetensors", "optimizer.pt")  # checksummed in state.json
METRICS = "metrics.jsonl"  # the run's metrics lines up to the checkpoint, checksummed too
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def save(run_dir: Path, step: int, named: dict[str, torch.Tensor],
         optimizer: torch.optim.Optimizer, *, metrics: str, identity: dict | None = None,
         is_main: bool = True, keep: int = 2, reference: dict | None = None) -> Path:
    """Collective under FSDP2: every rank calls it (sharded tensors are gathered), rank 0
    writes. `metrics`: metrics.jsonl's text so far; `identity`: RunIdentity.record();
    `reference`: a moving reference's record (dpolab.ref_sync), its tensors among `named`.
    Keeps the newest `keep` checkpoints (at least one: the one just written)."""
    from dpolab import sharding

    tensors, opt_state = sharding.gather_state(named, optimizer)  # keyed by parameter name
    root = run_dir / "checkpoints"
    final = root / f"step-{step:06d}"
    if not is_main:
        return final
    with atomic.write_dir(final) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  str(tmp / "trainable.safetensors"))
        with open(tmp / "optimizer.pt", "wb") as f:  # a Python file: a failed write keeps
            torch.save(opt_state, f)                  # its errno (dpolab.atomic.writing)
        (tmp / METRICS).write_text(metrics, encoding="utf-8")
        state = {"step": step, "metrics_lines": metrics.count("\n"), "identity": identity,
                 "sha256": {name: sha256(tmp / name) for name in (*FILES, METRICS)},
                 **({"reference": reference} if reference is not None else {})}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    atomic.write_text(root / "latest", final.name)
    # Folders of later steps are what a resume skipped as damaged (this run redoes those
    # steps): they go first, so that `keep` counts the checkpoints of this history only.
    newer = [p for p in step_dirs(root) if _step_of(p) > step]
    for old in newer + step_dirs(root)[len(newer) + max(1, keep):]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def step_dirs(root: Path) -> list[Path]:
    """Checkpoint folders under `root`, newest (highest step) first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=_step_of, reverse=True)


def verify(path: Path) -> tuple[dict | None, str]:
    """(state, "") for an intact checkpoint folder, (None, why) for a damaged one: state.json
    missing or unreadable, a file missing, or a file whose sha256 is not the recorded one.
    (state, note) for one written before checksums were recorded."""
    state_file = path / "state.json"
    if not state_file.is_file():
        return None, "no state.json"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        step, lines = int(state["step"]), int(state["metrics_lines"])
        sums = state.get("sha256")
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        return None, f"state.json is damaged ({type(err).__name__}: {err})"
    if step < 1 or lines < 0 or path.name != f"step-{step:06d}":
        return None, f"state.json records step {step}, which is not this folder's"
    for name in FILES:
        if not (path / name).is_file():
            return None, f"{name} is missing"
    if sums is None:  # written before checkpoints recorded checksums: usable, said so
        return state, "written without checksums, so its files are not verified"
    record = (METRICS,) if isinstance(sums, dict) and METRICS in sums else ()
    for name in (*FILES, *record):
        if not (path / name).is_file():
            return None, f"{name} is missing"
        if not isinstance(sums, dict) or sums.get(name) != sha256(path / name):
            return None, f"{name} does not match its recorded sha256 (damaged or changed)"
    return state, ""


def _say(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # once per torchrun job, not once per rank
        print(msg, file=sys.stderr, flush=True)


def find_intact(run_dir: Path, *, say=None) -> tuple[Path, dict] | None:
    """(folder, state) of the newest intact checkpoint, or None when the run has none at all.

    Every damaged folder newer than it is named with the reason through `say` (default:
    stderr). A run that has checkpoints (or a `latest` pointer) but no intact one raises
    UserError, so a resume never falls back to step 0 without a word."""
    say = say or _say
    root = run_dir / "checkpoints"
    pointer = root / "latest"
    named = pointer.read_text(errors="replace").strip() if pointer.is_file() else None
    dirs = step_dirs(root)
    pointer_broken = bool(named) and not (root / named).is_dir()
    if pointer_broken:
        say(f"{root / named}: the checkpoint that {pointer} names is missing")
    skipped = []
    for path in dirs:
        state, why = verify(path)
        if state is not None:
            if why:
                say(f"{path}: {why}")
            if skipped or pointer_broken:
                say(f"resuming from {path} (step {state['step']}) instead")
            return path, state
        skipped.append(f"{path}: {why}")
        say(f"{path}: skipped, {why}")
    if dirs or named:
        detail = "; ".join(skipped) if skipped else f"{pointer} names {named!r}, which is missing"
        raise UserError(f"{run_dir}: cannot resume: no intact checkpoint ({detail}). Start a "
                        f"new run with --out, or delete {root} to train this one from step 0")
    return None


def resume_point(run_dir: Path) -> tuple[Path, dict] | None:
    """(folder, state) of the checkpoint a resume continues from (see `find_intact`), or
    None, said, when the run stopped before its first checkpoint (it then starts again)."""
    found = find_intact(run_dir)
    if found is None:
        _say(f"{run_dir}: no checkpoint was saved before the run stopped; training it again "
             f"from step 0")
    return found


def check_identity(found: tuple[Path, dict], identity) -> None:
    """Refuse, in one line, to resume from checkpoint `found` a run that is not the one it
    saved (a dpolab.identity.RunIdentity: other starting weights, data or global batch)."""
    path, state = found
    recorded = state.get("identity")
    if not isinstance(recorded, dict):  # written before checkpoints recorded it
        _say(f"{path}: records no run identity (an older checkpoint): the model, data and "
             f"batch are not checked against it")
        return
    changes = identity.changes(recorded)
    if changes:
        raise UserError(f"{path.parent.parent}: cannot resume: this is not the run that was "
                        f"checkpointed: {'; '.join(changes)}. Resume with the run's own model, "
                        f"data and processes, or start a new run with --out")


def restore(found: tuple[Path, dict], named: dict[str, torch.Tensor],
            optimizer: torch.optim.Optimizer, metrics_path: Path) -> tuple[int, str]:
    """Load checkpoint `found` (from `resume_point`) into `named` tensors (in place) and the
    optimizer; returns (its step, the text of metrics.jsonl up to it: the checkpoint's own
    copy, or for an older checkpoint without one the first lines of `metrics_path`)."""
    from dpolab import sharding

    path, state = found
    tensors = _trainable(path, named)
    opt_state = _read(path, lambda: torch.load(path / "optimizer.pt", weights_only=True))
    opt_state = _keyed_by_name(path, opt_state, optimizer, named)
    try:
        sharding.load_state(named, optimizer, tensors, opt_state)
    except (ValueError, KeyError, RuntimeError, TypeError) as err:
        raise UserError(f"{path}: the optimizer state does not fit this run "
                        f"({type(err).__name__}: {err})") from None
    return int(state["step"]), _metrics_record(path, int(state["metrics_lines"]), metrics_path)


def load_weights(path: Path, named: dict[str, torch.Tensor]) -> None:
    """The trainable tensors of checkpoint folder `path` copied into `named` (in place), no
    optimizer; tensors the checkpoint holds beyond `named` (AuxDPO's delta) are left out."""
    from dpolab import sharding

    tensors = _trainable(path, named)
    with torch.no_grad():
        for k, t in named.items():
            t.copy_(sharding.like(tensors[k], t))


def _read(path: Path, load):
    """load() of a checkpoint file whose checksum matched; a file that still does not load
    was written so: one line naming the checkpoint."""
    try:
        return load()
    except Exception as err:
        raise UserError(f"{path}: checkpoint files cannot be read ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None


def _trainable(path: Path, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors of every name in `named`, each of that tensor's shape, or one
    line saying what the checkpoint lacks or holds otherwise."""
    tensors = _read(path, lambda: load_file(str(path / "trainable.safetensors")))
    missing = sorted(set(named) - set(tensors))
    if missing:
        raise UserError(f"{path}: checkpoint lacks {len(missing)} trainable tensor(s), e.g. "
                        f"{missing[0]!r}; was the config changed since the run started?")
    for k, t in named.items():
        if tensors[k].shape != t.shape:
            raise UserError(f"{path}: tensor {k!r} has shape {tuple(tensors[k].shape)}, the "
                            f"model's is {tuple(t.shape)}; was the config changed?")
    return {k: tensors[k] for k in named}


def _keyed_by_name(path: Path, saved: dict, optimizer: torch.optim.Optimizer,
                   named: dict[str, torch.Tensor]) -> dict:
    """The saved optimizer state keyed by parameter name, its names all trained by this run.
    A checkpoint written before the state was keyed by name numbers the parameters by their
    position in the optimizer: those are read as this optimizer's positions (the order the
    same code creates), said, and refused in one line where a state's shape is not that
    parameter's."""
    try:
        groups = saved["param_groups"]
        keys = [k for g in groups for k in g["params"]]
        state = saved["state"]
    except (KeyError, TypeError) as err:
        raise UserError(f"{path}: optimizer.pt is not an optimizer state ({err!r})") from None
    if all(isinstance(k, int) for k in keys):
        name_of = {id(p): n for n, p in named.items()}
        names = [name_of.get(id(p), "?") for g in optimizer.param_groups for p in g["params"]]
        if sorted(keys) != list(range(len(names))):
            raise UserError(f"{path}: optimizer.pt numbers {len(keys)} parameters by position "
                            f"(an older checkpoint); this run trains {len(names)}")
        for i, values in state.items():
            for k, v in values.items():
                if isinstance(v, torch.Tensor) and v.dim() and v.shape != named[names[i]].shape:
                    raise UserError(
                        f"{path}: optimizer.pt numbers parameters by position (an older "
                        f"checkpoint) and its {k} at position {i} has shape {tuple(v.shape)}, "
                        f"not that of {names[i]} {tuple(named[names[i]].shape)}: the parameters "
                        f"are created in another order now; resume with the dpolab that wrote it")
        _say(f"{path}: optimizer state saved by position (an older checkpoint), read in this "
             f"run's parameter order")
        state = {names[i]: values for i, values in state.items()}
        groups = [{**g, "params": [names[i] for i in g["params"]]} for g in groups]
        keys = [names[i] for i in keys]
    unknown = sorted(set(keys) - set(named))
    if unknown:
        raise UserError(f"{path}: the optimizer state names {len(unknown)} parameter(s) this run "
                        f"does not train, e.g. {unknown[0]!r}; was the config changed?")
    return {"state": state, "param_groups": groups}


def _metrics_record(path: Path, lines: int, metrics_path: Path) -> str:
    """The first `lines` lines of metrics.jsonl as checkpoint `path` saw them."""
    if (path / METRICS).is_file():  # verified with the checkpoint's other files
        return (path / METRICS).read_text(encoding="utf-8")
    old = (metrics_path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
           if metrics_path.is_file() else [])
    if len(old) < lines:
        _say(f"{metrics_path}: has {len(old)} of the {lines} lines {path} recorded, and that "
             f"older checkpoint keeps no copy: the lines missing stay missing")
    return "".join(old[:lines])


def describe_latest(run_dir: Path) -> str:
    """A truthful sentence on what a stopped run can resume from."""
    dirs = [p for p in step_dirs(run_dir / "checkpoints") if verify(p)[0] is not None]
    if not dirs:
        return f"no checkpoint has been saved in {run_dir} yet"
    return f"the last checkpoint is {dirs[0]} (step {_step_of(dirs[0])})"


def export_model(model, tokenizer, out: Path, *, merge_lora: bool = True) -> Path:
    """A folder that `AutoModelForCausalLM.from_pretrained` loads: LoRA merged into the base
    weights (or, with merge_lora=False, the adapter alone), safetensors, the tokenizer beside.
    Written under a temporary name and renamed into place."""
    from dpolab.scopes import is_peft

    if is_peft(model) and merge_lora:
        model = model.merge_and_unload()
    with atomic.write_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    return Path(out)


def export_sharded_model(wrapped, model, tokenizer, out: Path, *, write: bool) -> None:
    """:func:`export_model` of an FSDP2-sharded model: collective (every rank gathers its
    shards), the rank with `write` saves the whole model. `wrapped`: the engine's sharded
    module, `model` the causal LM inside it."""
    from dpolab import sharding

    for m in wrapped.modules():  # the sharded layout: state_dict gathers it
        if hasattr(m, "reshard"):
            m.reshard()
    state = sharding.full_model_state(model)  # whole on rank 0 only
    if write:
        sharding.save_full_state(state, model.config, tokenizer, out)


def after_write_error(run_dir: Path, err: atomic.WriteError) -> atomic.WriteError:
    """A write that failed during a run (a checkpoint, the export, metrics, a cache file),
    with what the run can go on from: every checkpoint written before it is intact."""
    return atomic.WriteError(err.path, f"{err.what}. {_capital(describe_latest(run_dir))}; "
                                       f"once it can be written, continue with: dpolab train "
                                       f"--resume {run_dir}")


def nonfinite_error(run_dir: Path, step: int, what: str, value: float) -> UserError:
    """The error that stops a run at a non-finite loss or gradient norm, raised before the
    step is applied; `step` counts from 1, as metrics.jsonl does."""
    return UserError(f"step {step}: the {what} is {value} (not finite); stopped before "
                     f"applying this step. {_capital(describe_latest(Path(run_dir)))}. A "
                     f"lower train.lr or gradient clipping (train.max_grad_norm > 0) may help")


def _capital(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]  # str.capitalize would lower the paths

"""The Python API: `Trainer(model, train_dataset, ...).train()`, on objects users already have.

    import dpolab
    run_dir = dpolab.Trainer(model, dataset, tokenizer=tok, **{"loss.beta": 0.1}).train()

The command line (`dpolab train`) builds a `RunConfig` and goes through the same `Trainer`, so a
run from Python and a run from the shell differ only in where their inputs come from: what is
named by a string (a model name or folder, a data file) is recorded in the config and loaded by
`session.build`; what is an object (a loaded model, a `datasets.Dataset`, a list of dicts) is
carried there in memory (`dpolab.inputs.Inputs`) and recorded in config.yaml as `<in-memory ...>`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from dpolab import config as C
from dpolab.errors import UserError
from dpolab.inputs import Inputs, check_fit, check_model, check_peft, check_tokenizer
from dpolab.scopes import is_peft
from dpolab.trackers import check as check_trackers


class Trainer:
    """Train `model` on `train_dataset` with a DPO-family objective.

    model: a model name (`smollm2-135m-instruct`, a hub name), a folder or .gguf path, or a
        loaded `PreTrainedModel` / peft model (trained in place; a peft model trains its own
        adapters, with train.scope=lora); None: `model.name` of the config.
    train_dataset, eval_dataset: a `datasets.Dataset`, a list of dicts or a file path
        (JSONL, JSON, Parquet), one split each (a DatasetDict is refused as train_dataset,
        naming its splits); eval_dataset may be a dict of named sets (a DatasetDict too);
        rows are checked like a file's, and errors name the argument and row
        (`train_dataset:3: field 'chosen' is empty`). train_dataset None: the config's
        `data.path`, or the embedded default. eval_dataset None: a seeded `data.eval_fraction`
        of the training rows.
    tokenizer: the model's tokenizer; None: loaded from the model's folder or name.
    ref_model: the reference pi_ref, a name or folder (`model.reference`) or a loaded model;
        None: the policy's starting weights. Its log-probs are stored once, keyed by its
        weights; its tokenizer must be the policy's.
    compute_metrics: pairs -> {name: number}, called at each evaluation with per-pair arrays
        (dpolab.scoring.user_metrics); logged under eval/.
    config: a `RunConfig` or a YAML file; None: the defaults.
    overrides: `section.key` names as on the command line, `**{"loss.beta": 0.1}`, checked
        the same way (an unknown key is a UserError listing the valid ones).
    """

    def __init__(self, model: Any = None, train_dataset: Any = None, *, tokenizer: Any = None,
                 eval_dataset: Any = None, config: C.RunConfig | str | Path | None = None,
                 compute_metrics: Callable[[dict], dict[str, float]] | None = None,
                 ref_model: Any = None, **overrides: Any):
        _one_split_each(train_dataset, eval_dataset)
        if isinstance(ref_model, (str, Path)):
            overrides["model.reference"] = str(ref_model)
        elif ref_model is not None:
            overrides["model.reference"] = _in_memory_name(ref_model)
        if _named_files(eval_dataset):  # named held-out files: recorded as data.eval
            overrides["data.eval"] = {str(k): str(v) for k, v in eval_dataset.items()}
        raw = _raw_config(config)
        named = _named_keys(raw) | set(overrides)
        if isinstance(model, (str, Path)):
            overrides["model.name"] = str(model)
        elif model is not None and is_peft(model) and "train.scope" not in named:
            overrides["train.scope"] = "lora"  # what a model with adapters means to train
        for key, value in (("data.path", train_dataset), ("data.eval_path", eval_dataset)):
            if isinstance(value, (str, Path)):
                overrides[key] = str(value)
        cfg = C.build_config(C.apply_values(raw, overrides),
                             source=str(config) if isinstance(config, (str, Path)) else "config")
        check_trackers(cfg.train.report_to)  # a missing tracker package fails now, not after loading
        self.config, self.inputs = _in_memory(cfg, named, model, tokenizer, train_dataset,
                                              eval_dataset)
        self.inputs = dataclasses.replace(
            self.inputs, compute_metrics=compute_metrics,
            reference=None if isinstance(ref_model, (str, Path)) else ref_model)

    def train(self, *, resume: bool = False) -> Path:
        """Train; returns the run directory (metrics.jsonl, the exported model, report.html).
        resume: continue the run in `config.out` from its last checkpoint."""
        from dpolab.train import train

        return train(self.config, resume=resume, inputs=self.inputs)

    def evaluate(self, eval_dataset: Any = None, *, checkpoint: int | None = None
                 ) -> dict[str, float]:
        """Score `eval_dataset` (None: the run's held-out pairs; a file, a Dataset, a list of
        dicts, or a dict of named sets) with the weights of `checkpoint` (None: the last
        checkpoint, i.e. the exported weights; 0: the base model, before any training)
        against the run's reference; returns the `eval/...` metrics and appends them to
        RUN/metrics.jsonl as a line marked `evaluate`. See dpolab.evaluate."""
        from dpolab.evaluate import evaluate_run

        if self.inputs.model is not None:
            raise UserError("evaluate(): the model was given as an object and trained in "
                            "place; evaluate the run directory with the model named by its "
                            "folder, or score the object with a new Trainer")
        if eval_dataset is not None:
            _one_split_each(None, eval_dataset)
        return evaluate_run(self.config.out, eval_dataset, checkpoint=checkpoint,
                            inputs=self.inputs, compute_metrics=self.inputs.compute_metrics,
                            label="" if eval_dataset is None or isinstance(eval_dataset, (
                                str, Path, dict)) else "eval_dataset")


def _in_memory(cfg: C.RunConfig, named: set[str], model, tokenizer, train_dataset,
               eval_dataset) -> tuple[C.RunConfig, Inputs]:
    """The objects given in memory as `Inputs`, and the config recording where they came from."""
    replace: dict[str, dict[str, Any]] = {"model": {}, "data": {}}
    if isinstance(tokenizer, (str, Path)):
        from dpolab.models import load_tokenizer

        tokenizer = load_tokenizer(str(tokenizer), trust_remote_code=cfg.model.trust_remote_code)
    if model is not None and not isinstance(model, (str, Path)):
        check_model(model)
        check_peft(model)  # a peft method dpolab cannot train is refused here, not at backward
        dtype = _dtype_name(model)
        if "model.dtype" in named and dtype != cfg.model.dtype:
            raise UserError(f"model.dtype={cfg.model.dtype}, but the model given is {dtype}; "
                            f"convert the model, or leave model.dtype unset")
        replace["model"] = {"name": _in_memory_name(model), "dtype": dtype}
        if tokenizer is None:
            tokenizer = _tokenizer_of(model, cfg)
        check_fit(model, tokenizer)
    elif tokenizer is not None:
        check_tokenizer(tokenizer)  # its fit with the named model: when training starts
    rows = None
    if train_dataset is not None and not isinstance(train_dataset, (str, Path)):
        held = None if eval_dataset is None else _held(eval_dataset, cfg)
        rows = _split(cfg, _rows(train_dataset, "train_dataset", cfg), held)
        replace["data"] = {"path": "<in-memory train_dataset>",
                           "eval_path": "" if eval_dataset is None or isinstance(eval_dataset, dict)
                           else str(eval_dataset) if isinstance(eval_dataset, (str, Path))
                           else "<in-memory eval_dataset>"}
        if isinstance(eval_dataset, dict):
            replace["data"]["eval"] = {str(k): str(v) if isinstance(v, (str, Path))
                                       else f"<in-memory eval_dataset[{k}]>"
                                       for k, v in eval_dataset.items()}
    elif (eval_dataset is not None and not isinstance(eval_dataset, (str, Path))
          and not _named_files(eval_dataset)):
        raise UserError("eval_dataset in memory needs train_dataset in memory too "
                        "(a file or the embedded default splits its own held-out rows)")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **replace["model"]),
                              data=dataclasses.replace(cfg.data, **replace["data"]))
    return cfg, Inputs(model=None if isinstance(model, (str, Path)) else model,
                       tokenizer=tokenizer, rows=rows)


def _one_split_each(train_dataset, eval_dataset) -> None:
    """A DatasetDict (or a dict of splits, or a folder saved by DatasetDict.save_to_disk) given
    as train_dataset is refused, naming its splits and which argument takes which; as
    eval_dataset a folder of splits is refused the same way, while a dict in memory (a
    DatasetDict too) is a set of named eval sets."""
    from dpolab.sources import holder_name, split_names, splits_message

    splits = split_names(train_dataset)
    if splits is not None:
        raise UserError(splits_message("train_dataset", splits, holder=holder_name(train_dataset),
                                       argument="train_dataset"))
    if isinstance(eval_dataset, (str, Path)) and split_names(eval_dataset) is not None:
        raise UserError(splits_message("eval_dataset", split_names(eval_dataset),
                                       holder=holder_name(eval_dataset), argument="eval_dataset"))


def _named_files(eval_dataset) -> bool:
    """Whether `eval_dataset` is a dict of named held-out files (recorded in the config)."""
    return (isinstance(eval_dataset, dict) and bool(eval_dataset)
            and all(isinstance(v, (str, Path)) for v in eval_dataset.values()))


def _held(eval_dataset, cfg) -> list:
    """Validated held-out rows of an eval_dataset in memory; a dict names its sets."""
    from dpolab.splits import eval_rows

    return eval_rows(eval_dataset, cfg, name="eval_dataset")


def _raw_config(config) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, C.RunConfig):
        return C.to_dict(config)
    if isinstance(config, (str, Path)):
        return C.load_yaml(config)
    raise UserError(f"config: expected a RunConfig or a YAML file path, got "
                    f"{type(config).__name__}")


def _named_keys(raw: dict[str, Any]) -> set[str]:
    """`section.key` of every field a config file sets (a RunConfig sets them all)."""
    return {f"{s}.{k}" for s, v in raw.items() if isinstance(v, dict) for k in v}


def _in_memory_name(model) -> str:
    """How config.yaml records a model given as an object: it cannot be loaded from this name,
    so resuming such a run from the command line fails clearly instead of loading other weights."""
    source = getattr(model, "name_or_path", "") or ""
    return f"<in-memory {type(model).__name__}{' from ' + source if source else ''}>"


def _dtype_name(model) -> str:
    from dpolab.models import dtype_name

    name = dtype_name(model.dtype)
    if name is None:
        raise UserError(f"model: parameters of dtype {model.dtype} are not supported; "
                        f"convert it with model.to(torch.X), X one of {', '.join(C.DTYPES)}")
    return name


def _tokenizer_of(model, cfg):
    """The tokenizer saved beside a model loaded from a folder or the hub."""
    from dpolab.models import load_tokenizer

    source = getattr(model, "name_or_path", "") or ""
    if not source:
        raise UserError("model: an object built in memory has no folder to load its tokenizer "
                        "from; pass tokenizer=...")
    return load_tokenizer(source, trust_remote_code=cfg.model.trust_remote_code)


def _rows(dataset, name: str, cfg) -> list:
    """Validated PreferenceRows of an in-memory data set; errors read `NAME:ROW: field ...`."""
    from dpolab.data import load_rows

    from dpolab.splits import report_skipped

    loaded = load_rows(dataset, skip_invalid=cfg.data.skip_invalid, name=name)
    report_skipped(loaded, name)
    return list(loaded.rows)


def _split(cfg, train: list, held_out: list | None) -> tuple[list, list]:
    from dpolab.splits import split_held_out

    return (train, held_out) if held_out is not None else split_held_out(train, cfg)

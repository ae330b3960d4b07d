"""Run configuration: frozen dataclasses, loaded from YAML, overridden by `section.key=value`.

Every field has its default here and nowhere else; the resolved config is written into the
run directory (`config.yaml`) so a run can be read, resumed and compared later.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpolab import atomic
from dpolab.errors import UserError
from dpolab.settings import allowed, check_field, setting


DTYPES = ("float32", "bfloat16", "float16")  # model.dtype names (torch's own)
PAIR_FORWARDS = ("auto", "shared_prompt", "two_rows", "per_sequence")  # dpolab.policy.FORWARDS + auto
SCOPE_NAMES = ("full", "lora", "last_layer", "token_rows")  # dpolab.scopes.SCOPES (no torch here)


@dataclass(frozen=True)
class ModelConfig:
    name: str = setting("smollm2-135m-instruct", "the embedded default, a local folder, a .gguf file or a hub name")
    dtype: str = setting("float32", "parameter dtype (log-probs float32 either way)", choices=DTYPES)
    trust_remote_code: bool = setting(False, "run code shipped with a model folder only when asked")
    reference: str = setting("", "the reference model pi_ref, a name or folder as `name`; empty = the policy's starting weights")
    router_aux_loss_coef: float | None = setting(None, "MoE: weight of the routers' load-balancing loss; null = the model config's (0 if it has none); 0 = off", ge=0)


@dataclass(frozen=True)
class DataConfig:
    path: str = setting("", "JSONL / JSON / Parquet file; empty = the embedded multi-value default")
    eval_path: str = setting("", "held-out file; empty = split eval_fraction off `path`")
    eval: dict[str, str] = setting({}, "named held-out files {name: file}, each scored on its own as eval/<name>/...; instead of eval_path")
    eval_fraction: float = setting(0.1, "held-out share of `path` when no eval_path (seeded split)", gt=0, lt=1)
    max_length: int = setting(512, "prompt + completion tokens", ge=2)
    max_prompt_length: int = setting(256, "prompt tokens kept (see truncation); < max_length", ge=1)
    truncation: str = setting("keep_end", "which end of a long prompt is kept", choices=("keep_end", "keep_start"))
    skip_invalid: bool = setting(False, "drop and count bad rows instead of stopping")
    per_group: int = setting(24, "embedded default: training pairs per group (0 = all)", ge=0)
    eval_per_group: int = setting(24, "embedded default: held-out pairs per group (0 = all)", ge=0)
    groups: tuple[str, ...] = setting((), "embedded default: groups to use (empty = all)")
    group_weights: dict[str, float] = setting({}, "per-group loss weights, e.g. {factual: 2.0} (missing = 1)", ge=0)
    chat_template_kwargs: dict[str, bool | int | float | str | list | dict] = setting({}, "chat-template variables, e.g. {enable_thinking: false}; a row's column wins")


@dataclass(frozen=True)
class LossConfig:
    name: str = setting("dpo", "one term of dpolab.losses.LOSSES (TRL's names too), used when `weights` is empty")
    weights: dict[str, float] = setting({}, "weighted terms, e.g. {sigmoid: 1.0, sft: 0.1}", ge=0)
    beta: float = setting(0.5, "inverse temperature (0 trains nothing, IPO divides by it); 0.5 measured best of 0.1/0.5 on the embedded default", gt=0)
    label_smoothing: float = setting(0.0, "label-noise rate eps of cDPO (dpo), robust (< 0.5), aot, aot_unpaired, exo_pair (> 0)", ge=0, lt=1)
    dpop_lambda: float = setting(50.0, "DPOP penalty weight", ge=0)
    average_logps: bool = setting(False, "per-token means in the terms that follow it (changes beta's meaning)")
    f_divergence: str = setting("reverse_kl", "dpo, sigmoid: the f-divergence in place of the KL", choices=("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"))
    f_alpha: float = setting(0.5, "alpha of f_divergence=alpha_divergence (alpha -> 1 is reverse_kl)")
    ld_alpha: float = setting(1.0, "LD-DPO: weight of tokens past the shorter completion's length (1 = off)", ge=0, le=1)
    discopop_tau: float = setting(0.05, "discopop: temperature of the logistic/exponential blend", gt=0)
    gpo_f: str = setting("logistic", "gpo: f of the margin (logistic = DPO)", choices=("logistic", "squared", "hinge"))
    simpo_gamma: float = setting(0.5, "simpo: target reward margin gamma (reward units)")
    cpo_alpha: float = setting(1.0, "cpo: weight of the NLL term", ge=0)
    orpo_lambda: float = setting(0.1, "orpo: weight of the odds-ratio term", ge=0)
    aux_lr: float = setting(0.05, "AuxDPO: learning rate of the per-pair auxiliary rewards", ge=0)
    aux_null_weight: float = setting(1.0, "AuxDPO: lambda_null of the batchwise null-space penalty", ge=0)
    aux_amp_weight: float = setting(0.01, "AuxDPO: lambda_amp of the amplitude penalty", ge=0)
    aux_mode: str = setting("soft", "AuxDPO: soft (a batchwise penalty) or exact (delta in N(A) by construction)", choices=("soft", "exact"))
    aux_form: str = setting("seed", "AuxDPO: seed (free delta, +lambda_amp ||delta||^2) or authors (delta = aux_cap tanh(raw), -lambda_amp/2 (mean dc^2 + mean dr^2)); dpolab.losses.core", choices=("seed", "authors"))
    aux_cap: float = setting(1.0, "AuxDPO authors' form: the bound on |delta| (delta = cap tanh(raw))", gt=0)
    aux_max_gib: float = setting(2.0, "AuxDPO: memory allowed for the per-response gradients of A (GiB)", gt=0)
    ref_sync: dict[str, int | float] = setting({}, "TR-DPO (arXiv 2404.09656): {every: tau, alpha: a}: after every tau-th optimizer step the reference becomes a * policy + (1 - a) * reference (a = 1: a hard update) and its stored log-probs are recomputed; {} = off. The full scope holds one more copy of the trained weights, lora one of its target modules' weights (dpolab.ref_sync)", keys={"every": {"integer": True, "ge": 1}, "alpha": {"gt": 0, "le": 1}})

    def __post_init__(self):
        # The loss terms read these fields directly (dpolab.losses' Objective takes this class),
        # so a combination they cannot use is refused where it is set.
        from dpolab.losses.registry import check_hyper

        try:
            check_hyper(list(self.term_weights()), self)
        except ValueError as err:
            raise UserError(f"config loss: {err}") from None

    def term_weights(self) -> dict[str, float]:
        return dict(self.weights) if self.weights else {self.name: 1.0}


@dataclass(frozen=True)
class TrainConfig:
    scope: str = setting("last_layer", "what trains (last_layer: the head only, body states cached once; token_rows: only the head rows of tokens in the training completions)", choices=SCOPE_NAMES)
    lora_r: int = setting(8, "LoRA rank", ge=1)
    lora_alpha: float = setting(16.0, "LoRA scale numerator (scale = alpha / r)", gt=0)
    lora_targets: tuple[str, ...] = setting(("q_proj", "k_proj", "v_proj", "o_proj"), "LoRA: module names")
    lr: float = setting(1e-4, "peak learning rate of the model parameters", gt=0)
    schedule: str = setting("cosine", "learning rate after linear warmup", choices=("cosine", "constant"))
    warmup_steps: int = setting(2, "linear warmup from 0", ge=0)
    epochs: int = setting(3, "passes over the training pairs (ignored when max_steps > 0)", ge=1)
    max_steps: int = setting(0, "optimizer steps; 0 = as many as `epochs` take", ge=0)
    batch_size: int = setting(8, "pairs per micro-batch (per process)", ge=1)
    grad_accum: int = setting(1, "micro-batches per optimizer step", ge=1)
    max_grad_norm: float = setting(1.0, "clip the global gradient norm; 0 = no clipping", ge=0)
    weight_decay: float = setting(0.0, "AdamW decoupled weight decay", ge=0)
    eval_every: int = setting(-1, "steps between held-out evaluations; -1 = ~8 per run (every ceil(steps/8)); 0 = start and end only; train pairs: start and end", ge=-1)
    save_every: int = setting(25, "optimizer steps between checkpoints; 0 = only at the end", ge=0)
    keep_checkpoints: int = setting(2, "newest checkpoints kept on disk (resume falls back to an older one)", ge=1)
    seed: int = setting(0, "data order, initialisation of new parameters, every random draw")
    logps_chunk: int = setting(1024, "completion positions per head chunk (memory O(chunk x V))", ge=1)
    activation_checkpointing: bool = setting(False, "full/lora: recompute each block in backward")
    cpu_reuse_memory: bool = setting(True, "CPU/glibc: keep freed tensor memory mapped (dpolab.memory)")
    pair_forward: str = setting("auto", "auto: the fastest layout that passes dpolab.forward_check on the model; shared_prompt: one row per pair under a 4D mask; two_rows: chosen and rejected rows apart; per_sequence: each sequence alone", choices=PAIR_FORWARDS)
    distributed: str = setting("ddp", "under torchrun: ddp (DistributedDataParallel) or fsdp2 (every weight sharded; needs scope full)", choices=("ddp", "fsdp2"))
    dist_timeout_s: float = setting(1800.0, "under torchrun: seconds any collective may wait for the other ranks", gt=0)
    eval_batch_size: int = setting(16, "pairs per forward at evaluation and reference time", ge=1)
    device: str = setting("auto", "where to train", choices=("auto", "cpu", "cuda"))
    bf16_autocast: bool = setting(True, "bf16 autocast of the body on CUDA (never on CPU)")
    progress: bool = setting(True, "progress bar on a terminal, plain lines otherwise")
    export_merged: bool = setting(True, "lora: export the merged model (False: the adapter alone)")
    report: bool = setting(True, "write report.html and its figures at the end of the run")
    report_to: tuple[str, ...] = setting((), "trackers that also get metrics.jsonl's rows: tensorboard | wandb | mlflow | trackio")
    tracker_project: str = setting("dpolab", "wandb/trackio project, mlflow experiment; the run is named after its directory")
    did_samples: int = setting(4, "DID entropy at the end: samples per held-out prompt (0 = off)", ge=0)
    did_prompts: int = setting(8, "DID entropy: held-out prompts sampled", ge=0)
    did_max_new_tokens: int = setting(24, "DID entropy: tokens per sample at most", ge=1)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str = setting("runs/default", "the run directory")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "loss": LossConfig, "train": TrainConfig}


def describe(section: str | None = None) -> list[dict[str, Any]]:
    """Every field (of one section, or all and `out`) as {key, type, default, help,
    allowed}: what `dpolab config` and `dpolab train --help` print, read from the classes
    alone (nothing is constructed, so nothing of torch is imported)."""
    if section is not None and section not in SECTIONS:
        raise UserError(f"unknown config section {section!r}; valid: {', '.join(SECTIONS)}")
    named = [(f"{name}.", cls) for name, cls in SECTIONS.items() if section in (None, name)]
    rows = []
    for prefix, cls in named:
        rows += [_row(prefix + f.name, f) for f in dataclasses.fields(cls)]
    if section is None:
        rows.append(_row("out", next(f for f in dataclasses.fields(RunConfig) if f.name == "out")))
    return rows


def _row(key: str, f: dataclasses.Field) -> dict[str, Any]:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return {"key": key, "type": str(f.type), "default": list(default) if isinstance(
        default, tuple) else default, "help": f.metadata.get("help", ""), "allowed": allowed(f)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML value to the field's annotated type; a clear error otherwise."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(v, typing.get_args(tp)[0], where) for v in value)
    elif origin is dict:
        if isinstance(value, dict):
            _, vt = typing.get_args(tp)
            return {str(k): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    elif origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:  # an optional field: its one type, checked as such
            return _coerce(value, others[0], where)
        return value
    type_name = getattr(tp, "__name__", str(tp))
    raise UserError(f"{where}: expected {type_name}, got {value!r}")


# Keys that runs once had, with the only value they could take: an old run's config.yaml
# still loads; any other value is refused with what to do instead.
_RETIRED = {
    # WPO's weight needs log sum_v pi(v)^2 at every completion position (TRL's
    # log_sum_sq_probs); the chunked head returns log pi(label) only.
    (LossConfig, "use_weighting"): (False, "WPO's weight needs the policy's per-token "
                                    "log sum_v pi(v)^2, which dpolab's forward does not "
                                    "compute; remove loss.use_weighting"),
}


def _section(cls: type, values: dict[str, Any], where: str):
    if not isinstance(values, dict):
        raise UserError(f"{where}: expected a mapping, got {values!r}")
    for (owner, key), (old, why) in _RETIRED.items():
        if owner is cls and key in values:
            if values[key] != old:
                raise UserError(f"{where}.{key}: {why}")
            values = {k: v for k, v in values.items() if k != key}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: "
                        f"{', '.join(sorted(names))}")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()})


def build_config(raw: dict[str, Any], *, source: str = "config") -> RunConfig:
    unknown = sorted(set(raw) - set(SECTIONS) - {"out"})
    if unknown:
        raise UserError(f"{source}: unknown section(s) {', '.join(unknown)}; valid: "
                        f"{', '.join([*SECTIONS, 'out'])}")
    kwargs: dict[str, Any] = {name: _section(cls, raw.get(name) or {}, f"{source}: {name}")
                              for name, cls in SECTIONS.items()}
    if "out" in raw:
        kwargs["out"] = _coerce(raw["out"], str, f"{source}: out")
    cfg = RunConfig(**kwargs)
    validate(cfg)
    return cfg


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"{path}: cannot read config: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a config file must be a mapping of sections")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str], *,
                    source: str = "config") -> dict[str, Any]:
    """`section.key=value` strings; values are parsed as YAML (`0.05`, `true`, `[a, b]`)."""
    values = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r}: expected section.key=value")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        values.append((key, value, f"override {item!r}"))
    return _apply(raw, values, source=source)


def apply_values(raw: dict[str, Any], values: dict[str, Any], *,
                 source: str = "config") -> dict[str, Any]:
    """Overrides given as Python values under their `section.key` names (`{"loss.beta": 0.1}`):
    the command line's overrides without the YAML parsing, checked the same way."""
    return _apply(raw, [(key, value, f"override {key!r}") for key, value in values.items()],
                  source=source)


def _apply(raw: dict[str, Any], values: list[tuple[str, Any, str]], *,
           source: str) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for key, value, item in values:
        if key == "out":
            out["out"] = value
            continue
        section, dot, name = key.partition(".")
        if not dot or section not in SECTIONS:
            raise UserError(f"{item}: key must be one of "
                            f"{', '.join(SECTIONS)} followed by .name (or 'out')")
        if out.get(section) is None:  # absent, or an empty `section:` in the YAML file
            out[section] = {}
        if not isinstance(out[section], dict):
            raise UserError(f"{source}: {section}: expected a mapping of key: value, got "
                            f"{type(out[section]).__name__} {out[section]!r}; cannot apply "
                            f"override {item!r}")
        if "." in name and isinstance(out.get(section, {}).get(name.split(".")[0]), dict | None):
            head, _, sub = name.partition(".")  # e.g. loss.weights.sft=0.1
            nested = dict(out.setdefault(section, {}).get(head) or {})
            nested[sub] = value
            out[section][head] = nested
            continue
        out.setdefault(section, {})[name] = value
    return out


def validate(cfg: RunConfig) -> None:
    """Every field against its own metadata (`setting`: choices, bounds, finiteness), then
    what depends on more than one field or on a registry."""
    for name in SECTIONS:
        section = getattr(cfg, name)
        for f in dataclasses.fields(section):
            check_field(f"{name}.{f.name}", f, getattr(section, f.name))
    from dpolab.losses import LOSSES

    for name in cfg.loss.term_weights():
        if name not in LOSSES:
            raise UserError(f"config loss: unknown loss {name!r}; valid: {', '.join(sorted(LOSSES))}")
    checks = [
        (cfg.train.distributed != "fsdp2" or cfg.train.scope == "full",
         "train.distributed=fsdp2 shards the full model: it needs train.scope=full"),
        # AdamW's decay shrinks every row, trained or not: it would move the frozen ones.
        (cfg.train.scope != "token_rows" or cfg.train.weight_decay == 0,
         "train.scope=token_rows needs train.weight_decay=0 (decay would move the frozen rows)"),
        (cfg.loss.aux_form != "authors" or cfg.loss.aux_mode == "soft",
         "loss.aux_form=authors is the authors' soft penalty; it needs loss.aux_mode=soft"),
        (not (cfg.data.eval and cfg.data.eval_path),
         "data.eval (named held-out files) and data.eval_path (one) exclude each other"),
        (cfg.data.max_prompt_length < cfg.data.max_length, "data.max_prompt_length must be < max_length"),
    ]
    if cfg.loss.ref_sync:  # TR-DPO (dpolab.ref_sync): what has no reference to move, or keeps it
        from dpolab.losses import Objective

        obj, terms = Objective(cfg.loss.term_weights(), cfg.loss), "+".join(cfg.loss.term_weights())
        checks += [
            (obj.needs_reference, f"loss.ref_sync: the loss {terms} has no reference term, so "
                                  f"there is no reference to sync; remove loss.ref_sync"),
            (not obj.needs_delta, "loss.ref_sync: AuxDPO's null space is taken at the starting "
                                  "reference and is not recomputed at a sync; remove one of them"),
            (cfg.train.distributed != "fsdp2", "loss.ref_sync needs train.distributed=ddp: under "
                                               "fsdp2 the reference's copy of the weights is not "
                                               "sharded like the policy's"),
        ]
    for ok, msg in checks:
        if not ok:
            raise UserError(f"config: {msg}")
    from dpolab.chat_data import RowProblem, check_template_kwargs
    try:
        check_template_kwargs(cfg.data.chat_template_kwargs, "data.chat_template_kwargs")
    except RowProblem as err:
        raise UserError(f"config: {err}") from None


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return {k: ({kk: list(vv) if isinstance(vv, tuple) else vv for kk, vv in v.items()}
                if isinstance(v, dict) else v) for k, v in d.items()}


def dump_yaml(cfg: RunConfig, path: Path) -> None:
    atomic.write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))

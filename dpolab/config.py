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


DTYPES = ("float32", "bfloat16", "float16")  # model.dtype names (torch's own)
PAIR_FORWARDS = ("auto", "shared_prompt", "two_rows", "per_sequence")  # dpolab.policy.FORWARDS + auto


@dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m-instruct"  # the embedded default, a local folder, a .gguf file or a hub name
    dtype: str = "float32"  # parameter dtype: float32 | bfloat16 | float16 (log-probs float32 either way)
    trust_remote_code: bool = False  # run code shipped with a model folder only when asked
    reference: str = ""  # the reference model pi_ref, a name or folder as `name`; empty = the policy's starting weights
    router_aux_loss_coef: float | None = None  # MoE: weight of the routers' load-balancing loss; null = the model config's (0 if it has none); 0 = off


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # JSONL / JSON / Parquet file; empty = the embedded multi-value default
    eval_path: str = ""  # held-out file; empty = split eval_fraction off `path`
    eval: dict[str, str] = field(default_factory=dict)  # named held-out files {name: file}, each scored on its own as eval/<name>/...; instead of eval_path
    eval_fraction: float = 0.1  # held-out share of `path` when no eval_path (seeded split)
    max_length: int = 512  # prompt + completion tokens
    max_prompt_length: int = 256  # prompt tokens kept (see truncation)
    truncation: str = "keep_end"  # keep_end | keep_start: which end of a long prompt is kept
    skip_invalid: bool = False  # drop and count bad rows instead of stopping
    per_group: int = 24  # embedded default: training pairs per group (0 = all)
    eval_per_group: int = 24  # embedded default: held-out pairs per group (0 = all)
    groups: tuple[str, ...] = ()  # embedded default: groups to use (empty = all)
    group_weights: dict[str, float] = field(default_factory=dict)  # per-group loss weights (missing = 1)
    chat_template_kwargs: dict[str, bool | int | float | str | list | dict] = field(default_factory=dict)  # chat-template variables, e.g. {enable_thinking: false}; a row's column wins


@dataclass(frozen=True)
class LossConfig:
    name: str = "dpo"  # one term of dpolab.losses.LOSSES (TRL's names too), used when `weights` is empty
    weights: dict[str, float] = field(default_factory=dict)  # weighted terms, e.g. {sigmoid: 1.0, sft: 0.1}
    beta: float = 0.5  # inverse temperature; 0.5 measured best of 0.1/0.5 on the embedded default
    label_smoothing: float = 0.0  # label-noise rate eps of cDPO (dpo), robust, aot, aot_unpaired, exo_pair
    dpop_lambda: float = 50.0  # DPOP penalty weight
    average_logps: bool = False  # per-token means in the terms that follow it (changes beta's meaning)
    f_divergence: str = "reverse_kl"  # dpo, sigmoid: reverse_kl | forward_kl | js_divergence | alpha_divergence
    f_alpha: float = 0.5  # alpha of f_divergence=alpha_divergence (alpha -> 1 is reverse_kl)
    use_weighting: bool = False  # WPO: multiply each pair's loss by w(y_w) w(y_l) (policy token probabilities)
    ld_alpha: float = 1.0  # LD-DPO: weight of tokens past the shorter completion's length (1 = off)
    discopop_tau: float = 0.05  # discopop: temperature of the logistic/exponential blend
    gpo_f: str = "logistic"  # gpo: f of the margin, logistic (= DPO) | squared | hinge
    simpo_gamma: float = 0.5  # simpo: target reward margin gamma (reward units)
    cpo_alpha: float = 1.0  # cpo: weight of the NLL term
    orpo_lambda: float = 0.1  # orpo: weight of the odds-ratio term
    aux_lr: float = 0.05  # AuxDPO: learning rate of the per-pair auxiliary rewards
    aux_null_weight: float = 1.0  # AuxDPO: lambda_null of the batchwise null-space penalty
    aux_amp_weight: float = 0.01  # AuxDPO: lambda_amp of the amplitude penalty
    aux_mode: str = "soft"  # AuxDPO: soft (batchwise penalty) | exact (delta in N(A) by construction)
    aux_form: str = "seed"  # AuxDPO: seed (free delta, +lambda_amp ||delta||^2) | authors (delta = aux_cap tanh(raw), -lambda_amp/2 (mean dc^2 + mean dr^2)); dpolab.losses.core
    aux_cap: float = 1.0  # AuxDPO authors' form: the bound on |delta|
    aux_max_gib: float = 2.0  # AuxDPO: memory allowed for the per-response gradients of A

    def __post_init__(self):
        # The loss terms read these fields directly (dpolab.losses' Objective takes this class),
        # so a value they cannot use is refused where it is set.
        from dpolab.losses.registry import check_hyper

        try:
            check_hyper(list(self.term_weights()), self)
        except ValueError as err:
            raise UserError(f"config loss: {err}") from None

    def term_weights(self) -> dict[str, float]:
        return dict(self.weights) if self.weights else {self.name: 1.0}


@dataclass(frozen=True)
class TrainConfig:
    scope: str = "last_layer"  # full | lora | last_layer (head only; body states cached once) | token_rows (only the head rows of tokens in the training completions)
    lora_r: int = 8  # LoRA rank
    lora_alpha: float = 16.0  # LoRA scale numerator (scale = alpha / r)
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # module names
    lr: float = 1e-4  # peak learning rate of the model parameters
    schedule: str = "cosine"  # cosine | constant (both after linear warmup)
    warmup_steps: int = 2  # linear warmup from 0
    epochs: int = 3  # passes over the training pairs (ignored when max_steps > 0)
    max_steps: int = 0  # optimizer steps; 0 = as many as `epochs` take
    batch_size: int = 8  # pairs per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float = 1.0  # clip the global gradient norm; 0 = no clipping
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    eval_every: int = -1  # steps between held-out evaluations; -1 = ~8 per run (every ceil(steps/8)); 0 = start and end only; train pairs: start and end
    save_every: int = 25  # optimizer steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept on disk (resume falls back to an older one)
    seed: int = 0  # data order, initialisation of new parameters, every random draw
    logps_chunk: int = 1024  # completion positions per head chunk (memory O(chunk x V))
    activation_checkpointing: bool = False  # full/lora: recompute each block in backward
    cpu_reuse_memory: bool = True  # CPU/glibc: keep freed tensor memory mapped (dpolab.memory)
    pair_forward: str = "auto"  # auto (the fastest that passes dpolab.forward_check on the model) | shared_prompt (one row per pair, 4D mask) | two_rows | per_sequence
    distributed: str = "ddp"  # under torchrun: ddp (DistributedDataParallel) | fsdp2 (all weights sharded)
    dist_timeout_s: float = 1800.0  # under torchrun: seconds any collective may wait for the other ranks
    eval_batch_size: int = 16  # pairs per forward at evaluation and reference time
    device: str = "auto"  # auto | cpu | cuda
    bf16_autocast: bool = True  # bf16 autocast of the body on CUDA (never on CPU)
    progress: bool = True  # progress bar on a terminal, plain lines otherwise
    export_merged: bool = True  # lora: export the merged model (False: the adapter alone)
    report: bool = True  # write report.html and its figures at the end of the run
    report_to: tuple[str, ...] = ()  # trackers that also get metrics.jsonl's rows: tensorboard | wandb | mlflow | trackio
    tracker_project: str = "dpolab"  # wandb/trackio project, mlflow experiment; the run is named after its directory
    did_samples: int = 4  # DID entropy at the end: samples per held-out prompt (0 = off)
    did_prompts: int = 8  # DID entropy: held-out prompts sampled
    did_max_new_tokens: int = 24  # DID entropy: tokens per sample at most


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str = "runs/default"  # the run directory


SECTIONS = {"model": ModelConfig, "data": DataConfig, "loss": LossConfig, "train": TrainConfig}


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


def _section(cls: type, values: dict[str, Any], where: str):
    if not isinstance(values, dict):
        raise UserError(f"{where}: expected a mapping, got {values!r}")
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
    from dpolab.losses import LOSSES

    for name in cfg.loss.term_weights():
        if name not in LOSSES:
            raise UserError(f"config loss: unknown loss {name!r}; valid: {', '.join(sorted(LOSSES))}")
    checks = [
        (cfg.train.scope in ("full", "lora", "last_layer", "token_rows"),
         "train.scope must be full, lora, last_layer or token_rows"),
        # AdamW's decay shrinks every row, trained or not: it would move the frozen ones.
        (cfg.train.scope != "token_rows" or cfg.train.weight_decay == 0,
         "train.scope=token_rows needs train.weight_decay=0 (decay would move the frozen rows)"),
        (cfg.loss.aux_form in ("seed", "authors"), "loss.aux_form must be seed or authors"),
        (cfg.loss.aux_form != "authors" or cfg.loss.aux_mode == "soft",
         "loss.aux_form=authors is the authors' soft penalty; it needs loss.aux_mode=soft"),
        (cfg.train.schedule in ("cosine", "constant"), "train.schedule must be cosine or constant"),
        (cfg.data.truncation in ("keep_end", "keep_start"), "data.truncation must be keep_end or keep_start"),
        (cfg.model.dtype in DTYPES, f"model.dtype must be one of {', '.join(DTYPES)}"),
        (cfg.loss.aux_mode in ("soft", "exact"), "loss.aux_mode must be soft or exact"),
        # WPO's weight needs log sum_v pi(v)^2 at every completion position (TRL's
        # log_sum_sq_probs); the chunked head returns log pi(label) only.
        (not cfg.loss.use_weighting, "loss.use_weighting needs the per-token log sum_v pi(v)^2 "
         "of the policy (WPO's weight), which dpolab's forward does not compute; set "
         "loss.use_weighting=false"),
        (cfg.train.distributed in ("ddp", "fsdp2"), "train.distributed must be ddp or fsdp2"),
        (cfg.train.distributed != "fsdp2" or cfg.train.scope == "full",
         "train.distributed=fsdp2 shards the full model: it needs train.scope=full"),
        (cfg.train.pair_forward in PAIR_FORWARDS,
         f"train.pair_forward must be one of {', '.join(PAIR_FORWARDS)}"),
        (cfg.train.device in ("auto", "cpu", "cuda"), "train.device must be auto, cpu or cuda"),
        (cfg.train.batch_size >= 1 and cfg.train.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
        (0 < cfg.data.eval_fraction < 1, "data.eval_fraction must lie in (0, 1)"),
        (not (cfg.data.eval and cfg.data.eval_path),
         "data.eval (named held-out files) and data.eval_path (one) exclude each other"),
        (cfg.data.max_prompt_length < cfg.data.max_length, "data.max_prompt_length must be < max_length"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(f"config: {msg}")
    from dpolab.chat_data import RowProblem, check_template_kwargs
    try:
        check_template_kwargs(cfg.data.chat_template_kwargs, "data.chat_template_kwargs")
    except RowProblem as err:
        raise UserError(f"config: {err}") from None
    _check_numbers(cfg)


# (section, field, lowest, lowest allowed itself?, why the bound): every number the math
# divides by, multiplies a loss with or steps with must be finite and in range. beta = 0
# makes every preference term constant (DPO: ln 2, gradient 0; IPO divides by beta).
_BOUNDS = [
    ("loss", "beta", 0, False, "the inverse temperature: 0 trains nothing and IPO divides by it"),
    ("loss", "label_smoothing", 0, True, "a label-noise rate"),
    ("loss", "dpop_lambda", 0, True, "a penalty weight"),
    ("loss", "aux_lr", 0, True, "a learning rate"),
    ("loss", "aux_null_weight", 0, True, "a penalty weight"),
    ("loss", "aux_amp_weight", 0, True, "a penalty weight"),
    ("loss", "aux_max_gib", 0, False, "a memory size"),
    ("loss", "aux_cap", 0, False, "the bound on |delta| (delta = cap tanh(raw))"),
    ("train", "lr", 0, False, "the peak learning rate"),
    ("train", "lora_alpha", 0, False, "the LoRA scale numerator"),
    ("train", "max_grad_norm", 0, True, "a norm (0 = no clipping)"),
    ("train", "weight_decay", 0, True, "a decay rate"),
    ("train", "lora_r", 1, True, "a rank"),
    ("train", "warmup_steps", 0, True, "a step count"),
    ("train", "epochs", 1, True, "a pass count"),
    ("train", "max_steps", 0, True, "a step count (0 = from epochs)"),
    ("train", "eval_every", -1, True, "a step count (0 = start and end, -1 = about 8 over the run)"),
    ("train", "save_every", 0, True, "a step count (0 = at the end)"),
    ("train", "keep_checkpoints", 1, True, "the number of checkpoints kept"),
    ("train", "logps_chunk", 1, True, "a chunk size"),
    ("train", "eval_batch_size", 1, True, "a batch size"),
    ("train", "did_samples", 0, True, "a sample count"),
    ("train", "did_prompts", 0, True, "a prompt count"),
    ("train", "did_max_new_tokens", 1, True, "a token count"),
    ("data", "max_length", 2, True, "a token count"),
    ("data", "max_prompt_length", 1, True, "a token count"),
    ("data", "per_group", 0, True, "a pair count (0 = all)"),
    ("data", "eval_per_group", 0, True, "a pair count (0 = all)"),
]


def _check_numbers(cfg: RunConfig) -> None:
    import math

    for section, name, low, inclusive, why in _BOUNDS:
        value = getattr(getattr(cfg, section), name)
        ok = math.isfinite(value) and (value >= low if inclusive else value > low)
        if not ok:
            raise UserError(f"config: {section}.{name} = {value} is out of range: it must be a "
                            f"finite number {'>=' if inclusive else '>'} {low} ({why})")
    coef = cfg.model.router_aux_loss_coef
    if coef is not None and not (math.isfinite(coef) and coef >= 0):
        raise UserError(f"config: model.router_aux_loss_coef = {coef} must be a finite number "
                        ">= 0 (a loss weight), or null for the model config's own")
    upper = 0.5 if "robust" in cfg.loss.term_weights() else 1.0  # robust DPO divides by 1 - 2 eps
    if cfg.loss.label_smoothing >= upper:
        raise UserError(f"config: loss.label_smoothing = {cfg.loss.label_smoothing} must be < "
                        f"{upper} for loss {', '.join(cfg.loss.term_weights())}")
    for where, weights in (("loss.weights", cfg.loss.weights),
                           ("data.group_weights", cfg.data.group_weights)):
        for key, w in weights.items():
            if not (math.isfinite(w) and w >= 0):
                raise UserError(f"config: {where}.{key} = {w} must be a finite number >= 0")


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return {k: ({kk: list(vv) if isinstance(vv, tuple) else vv for kk, vv in v.items()}
                if isinstance(v, dict) else v) for k, v in d.items()}


def dump_yaml(cfg: RunConfig, path: Path) -> None:
    atomic.write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))

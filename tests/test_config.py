"""Config: YAML + overrides into frozen dataclasses; every example config loads; bad keys
and values are clear errors."""

import re
from pathlib import Path

import pytest

from dpolab import config as C
from dpolab.errors import UserError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_configs_load(path):
    """Each file in configs/ builds a valid RunConfig (so the examples cannot drift)."""
    cfg = C.build_config(C.load_yaml(path), source=str(path))
    assert cfg.loss.term_weights()


def test_default_yaml_equals_defaults():
    """configs/default.yaml spells out exactly the built-in defaults."""
    path = Path(__file__).parent.parent / "configs" / "default.yaml"
    assert C.build_config(C.load_yaml(path)) == C.RunConfig()


def test_overrides_parse_yaml_values():
    raw = C.apply_overrides({}, ["loss.beta=0.05", "train.scope=lora", "loss.weights.sft=0.1",
                                 "loss.weights.dpo=1", "train.lora_targets=[q_proj, v_proj]",
                                 "out=runs/x"])
    cfg = C.build_config(raw)
    assert cfg.loss.beta == 0.05 and cfg.train.scope == "lora" and cfg.out == "runs/x"
    assert cfg.loss.term_weights() == {"sft": 0.1, "dpo": 1.0}
    assert cfg.train.lora_targets == ("q_proj", "v_proj")
    assert C.build_config(C.apply_overrides({}, ["train.lr=1e-3"])).train.lr == 0.001


@pytest.mark.parametrize("overrides,msg", [
    (["loss.betta=1"], "unknown key\\(s\\) betta; valid: .*beta"),
    (["loss.beta=abc"], "loss.beta: expected float, got 'abc'"),
    (["train.scope=half"], "train.scope must be one of full, lora, last_layer, token_rows, got 'half'"),
    (["loss.name=dop"], "unknown loss 'dop'; valid: aot, aot_unpaired, apo_down"),
    (["beta=1"], "key must be one of"),
    (["loss.beta"], "expected section.key=value"),
    (["train.epochs=true"], "train.epochs: expected int, got True"),
])
def test_bad_overrides_are_clear(overrides, msg):
    with pytest.raises(UserError, match=msg):
        C.build_config(C.apply_overrides({}, overrides))


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("loss: [1, 2")
    with pytest.raises(UserError, match="x.yaml: not valid YAML"):
        C.load_yaml(p)
    with pytest.raises(UserError, match="cannot read config"):
        C.load_yaml(tmp_path / "missing.yaml")


def test_dump_roundtrip(tmp_path):
    cfg = C.build_config(C.apply_overrides({}, ["loss.weights.dpo=1", "data.groups=[a, b]"]))
    C.dump_yaml(cfg, tmp_path / "c.yaml")
    assert C.build_config(C.load_yaml(tmp_path / "c.yaml")) == cfg


def _fields():
    import dataclasses

    return [(f"{name}.{f.name}", f) for name, cls in C.SECTIONS.items()
            for f in dataclasses.fields(cls)]


def test_every_field_has_a_meaning():
    """Each config field carries a one-line help text in its metadata, and the listing has
    one entry per field plus `out`, each with that text."""
    assert all(f.metadata.get("help", "").strip() for _, f in _fields())
    rows = C.describe()
    assert [r["key"] for r in rows] == [k for k, _ in _fields()] + ["out"]
    assert all(r["help"] for r in rows)


def test_validation_reads_each_bound_from_the_field():
    """A value just outside any bound or choice in a field's metadata is refused, naming the
    field: ge v -> v - 1, gt v -> v, le v -> v + 1, lt v -> v; a choice -> 'nope'; a
    mapping's value likewise; every float field refuses nan."""
    import math

    cases = []
    for key, f in _fields():
        for op, v in f.metadata["bounds"]:
            bad = {"ge": v - 1, "gt": v, "le": v + 1, "lt": v}[op]
            cases.append((key, {"k": bad} if "dict" in str(f.type) else bad))
        if f.metadata["choices"]:
            cases.append((key, "nope"))
        if str(f.type) == "float":
            cases.append((key, math.nan))
    assert len(cases) > 40
    for key, value in cases:
        with pytest.raises(UserError, match=re.escape(key)):
            C.build_config(C.apply_values({}, {key: value}))


def test_choices_are_the_loss_registries():
    """loss.f_divergence and loss.gpo_f allow exactly the names the loss functions take."""
    import dataclasses

    from dpolab.losses import F_DIVERGENCES, GPO_FAMILY

    meta = {f.name: f.metadata for f in dataclasses.fields(C.LossConfig)}
    assert meta["f_divergence"]["choices"] == tuple(F_DIVERGENCES)
    assert meta["gpo_f"]["choices"] == tuple(GPO_FAMILY)


@pytest.mark.parametrize("argv", [["train", "--help"], ["config"], ["config", "--json"]])
def test_help_lists_every_field_without_torch(argv):
    """`dpolab train --help` and `dpolab config` print every `section.key` with its default
    and meaning, in a process that never imports torch (nor transformers)."""
    import json
    import subprocess
    import sys

    code = ("import sys\nfrom dpolab.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit:\n    pass\nprint('IMPORTED', 'torch' in sys.modules, "
            "'transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=False,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    out, _, imported = r.stdout.rpartition("IMPORTED")
    assert imported.split() == ["False", "False"]
    if "--json" in argv:
        rows = json.loads(out)
        assert {r["key"]: r["default"] for r in rows}["loss.beta"] == C.LossConfig().beta
        assert {r["key"]: r["allowed"] for r in rows}["loss.beta"] == "> 0"
        return
    for key, _ in _fields():
        assert f"  {key} = " in out, key
    assert "  loss.beta = 0.5" in out and "inverse temperature" in out
    assert "one of full | lora | last_layer" in " ".join(out.split())  # wrapped at any space


def test_scope_names_are_the_registry():
    """The config's scope choices (torch-free, for `dpolab config`) are dpolab.scopes.SCOPES'
    names in the same order, so a scope added to the registry is offered and one removed is
    refused; the facts other modules ask (body trains, weights overwritten) come from there."""
    from dpolab.scopes import SCOPES

    assert C.SCOPE_NAMES == tuple(SCOPES)
    assert [k for k, s in SCOPES.items() if s.trains_body] == ["full", "lora"]
    assert [k for k, s in SCOPES.items() if s.overwrites_weights] == ["full"]

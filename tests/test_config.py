"""Config: YAML + overrides into frozen dataclasses; every example config loads; bad keys
and values are clear errors."""

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
    (["train.scope=half"], "train.scope must be full, lora, last_layer or token_rows"),
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

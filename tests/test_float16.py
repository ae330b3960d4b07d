"""model.dtype=float16: loaded in float16 as TRL loads it, log-probs in float32, trained as
float32 copies of the trained weights with the body under float16 autocast."""

import json

import pytest
import torch

import dpolab
from dpolab import config as C
from dpolab.cli import main
from dpolab.errors import UserError
from dpolab.models import body_and_head, load_configured
from dpolab.policy import make_forward
from dpolab.threads import single_thread
from dpolab.tokenize import PairExample


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


def test_config_names_the_three_dtypes():
    """float16 is a model.dtype; anything else is refused, listing the three."""
    assert C.build_config(C.apply_overrides({}, ["model.dtype=float16"])).model.dtype == "float16"
    with pytest.raises(UserError, match="model.dtype must be one of float32, bfloat16, float16"):
        C.build_config(C.apply_overrides({}, ["model.dtype=float64"]))


def test_float16_model_loads_and_scores_in_float32(tiny_dir):
    """load_configured gives float16 parameters; the pair forward's per-token log-probs are
    float32 and within float16 rounding (2e-2) of the float32 model's."""
    ex = [PairExample([5, 6, 7], [8, 9], [10, 11, 12], None, 0, 1, "x")]
    out = {}
    for dtype in ("float16", "float32"):
        model = load_configured(C.ModelConfig(name=str(tiny_dir), dtype=dtype), device="cpu")
        assert model.dtype == getattr(torch, dtype)
        body, head = body_and_head(model)
        fwd = make_forward("shared_prompt", body, head, pad_id=2, chunk_size=8,
                           device=torch.device("cpu"), autocast=None, dtype=model.dtype)
        with torch.no_grad():
            out[dtype] = fwd(ex).tokens
    assert out["float16"].dtype == torch.float32
    torch.testing.assert_close(out["float16"], out["float32"], atol=2e-2, rtol=0)


def test_float16_model_in_memory_is_named_float16(tiny_dir, tmp_path):
    """dpolab.Trainer records a float16 model given in memory as model.dtype=float16, and a
    disagreeing model.dtype is refused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float16)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert dpolab.Trainer(model, tokenizer=tok).config.model.dtype == "float16"
    with pytest.raises(UserError, match="model.dtype=float32, but the model given is float16"):
        dpolab.Trainer(model, tokenizer=tok, **{"model.dtype": "float32"})


def test_float16_training_tracks_float32(tiny_dir, tmp_path, cache):
    """Three full-scope steps with model.dtype=float16 follow the float32 run: each step's
    loss within 2e-3 and gradient norm within 1% (measured: 0.5422 vs 0.5424 at step 3).
    Pure float16 weights would not: AdamW's second moment underflows in float16 and the
    third step's gradient norm was 66 against 9."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}: is the cat kind?",
                                        "chosen": f"Yes, kind {i} times.", "rejected": "No."})
                            + "\n" for i in range(7)))
    runs = {}
    for dtype in ("float16", "float32"):
        out = tmp_path / dtype
        assert main(["train", "--model", str(tiny_dir), "--data", str(data), "--out", str(out),
                     f"model.dtype={dtype}", "train.scope=full", "train.max_steps=3",
                     "train.batch_size=2", "train.lr=1e-3", "train.eval_every=0",
                     "train.did_samples=0", "train.report=false", "train.progress=false",
                     "data.eval_fraction=0.3"]) == 0
        runs[dtype] = [json.loads(line) for line in (out / "metrics.jsonl").read_text()
                       .splitlines() if '"grad_norm"' in line]
    for half, full in zip(runs["float16"], runs["float32"]):
        assert half["loss"] == pytest.approx(full["loss"], abs=2e-3)
        assert half["grad_norm"] == pytest.approx(full["grad_norm"], rel=1e-2)
    assert runs["float32"][-1]["loss"] < runs["float32"][0]["loss"] - 1e-3  # it did train

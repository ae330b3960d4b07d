"""Mixture-of-experts models train with their routers' load-balancing loss, as TRL adds it:
`router_aux_loss_coef * aux_loss`, aux_loss from the architecture's own function over the
tokens of the two rows per pair TRL's forward runs, logged as `aux_loss`."""

import json

import pytest
import torch

from dpolab import forward_check, moe, tiny
from dpolab.cli import main
from dpolab.errors import UserError
from dpolab.models import body_and_head
from dpolab.policy import FORWARDS, make_forward
from dpolab.threads import single_thread
from dpolab.tokenize import PairExample, collate_pairs

MOE = ["qwen3_moe", "mixtral", "gpt_oss", "jamba", "granitemoehybrid", "qwen3_next"]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


def pairs():
    g = torch.Generator().manual_seed(0)
    t = lambda n: torch.randint(3, 500, (n,), generator=g).tolist()  # noqa: E731
    return [PairExample(t(p), t(c), t(r), None, i, i + 1, "x")
            for i, (p, c, r) in enumerate([(5, 3, 4), (2, 6, 1), (7, 9, 2)])]


@pytest.mark.parametrize("arch", MOE)
def test_router_loss_equals_the_models_own(arch):
    """For every forward the check accepts on the model, the router loss of a batch (while
    gradients are on) equals `model(two rows per pair, attention_mask,
    output_router_logits=True).aux_loss` to 1e-6: the shared-prompt layout counts each prompt
    slot twice, as TRL's two rows hold it; evaluation (no grad) computes none."""
    model = tiny.tiny_model(vocab_size=512, hidden_size=32, arch=arch, seed=1)
    router = moe.router_loss(model, None, scope="full")
    assert router is not None and router.coef == 0.01 and router.top_k == 2
    ex = pairs()
    batch = collate_pairs(ex, pad_id=2)
    own = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                output_router_logits=True).aux_loss
    if not torch.is_tensor(own):  # transformers 5.17's granitemoehybrid: no loss of its own
        pytest.skip(f"{arch} in this transformers computes no router loss to compare with")
    body, head = body_and_head(model)
    checked = 0
    for name in FORWARDS:
        try:
            forward_check.choose(name, model, ex, pad_id=2, device=CPU)
        except UserError:
            continue
        fwd = make_forward(name, body, head, pad_id=2, chunk_size=64, device=CPU,
                           autocast=False, dtype=torch.float32, router=router)
        assert fwd(ex).aux_loss.item() == pytest.approx(own.item(), abs=1e-6)
        with torch.no_grad():
            assert fwd(ex).aux_loss is None
        checked += 1
    assert checked >= 2


def test_router_loss_trains_the_routers():
    """The router loss is differentiable in the routers' weights (its gradient reaches every
    router of Mixtral's two layers)."""
    model = tiny.tiny_model(vocab_size=512, hidden_size=32, arch="mixtral", seed=1)
    model.requires_grad_(True)
    body, head = body_and_head(model)
    fwd = make_forward("shared_prompt", body, head, pad_id=2, chunk_size=64, device=CPU,
                       autocast=False, dtype=torch.float32,
                       router=moe.router_loss(model, None, scope="full"))
    fwd(pairs()).aux_loss.backward()
    routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    assert len(routers) == 2
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in routers)


def test_coefficient_from_config_override_and_scope():
    """The weight is the model config's router_aux_loss_coef unless model.router_aux_loss_coef
    sets it; 0 and the head scopes last_layer and token_rows (the routers do not train) turn
    it off; GLM-4-MoE
    (no load-balancing function) has none; setting one for it is a UserError."""
    mixtral = tiny.tiny_model(vocab_size=512, hidden_size=32, arch="mixtral")
    assert moe.router_loss(mixtral, None, scope="full").coef == 0.01
    assert moe.router_loss(mixtral, 0.5, scope="lora").coef == 0.5
    assert moe.router_loss(mixtral, 0.0, scope="full") is None
    assert moe.router_loss(mixtral, None, scope="last_layer") is None
    assert moe.router_loss(mixtral, None, scope="token_rows") is None
    glm = tiny.tiny_model(vocab_size=512, hidden_size=32, arch="glm4_moe")
    assert moe.router_loss(glm, None, scope="full") is None
    with pytest.raises(UserError, match="computes no router load-balancing loss"):
        moe.router_loss(glm, 0.1, scope="full")


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}: is the cat kind?",
                                        "chosen": f"Yes, it is kind {i} times.",
                                        "rejected": "No."}) + "\n" for i in range(7)))
    return tiny.save_tiny(root / "mixtral", arch="mixtral", hidden_size=32, seed=1), data


def run(folder, data, out, *extra):
    return main(["train", "--model", str(folder), "--data", str(data), "--out", str(out),
                 "train.scope=full", "train.max_steps=2", "train.batch_size=2",
                 "train.eval_every=0", "train.did_samples=0", "train.report=false",
                 "train.progress=false", "data.eval_fraction=0.3", *extra])


def steps(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"grad_norm"' in line]


def test_training_logs_and_weights_the_router_loss(mixtral_dir, tmp_path, cache, capsys):
    """`dpolab train` on a tiny Mixtral says it trains the router loss and logs aux_loss
    (positive) at every step; with model.router_aux_loss_coef=0 nothing is logged and the
    first step's gradient differs (the loss it weights is part of the gradient); the
    last_layer scope logs none."""
    folder, data = mixtral_dir
    assert run(folder, data, tmp_path / "on", "model.router_aux_loss_coef=10") == 0
    assert "router load-balancing loss: weight 10" in capsys.readouterr().out
    on = steps(tmp_path / "on")
    assert len(on) == 2 and all(r["aux_loss"] > 0 for r in on)
    assert run(folder, data, tmp_path / "off", "model.router_aux_loss_coef=0") == 0
    assert "router load-balancing loss" not in capsys.readouterr().out
    off = steps(tmp_path / "off")
    assert all("aux_loss" not in r for r in off)
    assert on[0]["grad_norm"] != pytest.approx(off[0]["grad_norm"], rel=1e-6)
    assert on[0]["loss"] == pytest.approx(off[0]["loss"], abs=1e-9)  # the DPO loss itself
    assert run(folder, data, tmp_path / "head", "train.scope=last_layer") == 0
    assert all("aux_loss" not in r for r in steps(tmp_path / "head"))


def test_router_coefficient_on_a_dense_model_is_refused(tiny_dir, mixtral_dir, tmp_path,
                                                        cache, capsys):
    """model.router_aux_loss_coef on a model without routers: exit 2, one line."""
    _, data = mixtral_dir
    capsys.readouterr()
    assert run(tiny_dir, data, tmp_path / "r", "model.router_aux_loss_coef=0.1") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "model.router_aux_loss_coef=0.1, but LlamaForCausalLM" in err[0]

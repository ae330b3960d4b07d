"""The token_rows scope: only the head rows of the tokens in the training completions train.
For single-token completions it is last_layer training exactly; its AuxDPO null space has the
dimension 2n - rank(A) with rank(A) <= rows x hidden size."""

import json
from types import SimpleNamespace

import torch

from dpolab import config as C
from dpolab import scopes
from dpolab.distributed import Distributed
from dpolab.losses import dpo_loss
from dpolab.tokenize import PairExample


def _examples(n: int, *, tokens: int, seed: int) -> list[PairExample]:
    """n pairs with random prompts and completions of `tokens` tokens each from a small set of
    ids (so the completions share rows), chosen != rejected at the first token."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(10, 500, (5,), generator=g).tolist()
        a, b = torch.randperm(6, generator=g)[:2].add(40).tolist()
        tail = torch.randint(40, 46, (tokens - 1,), generator=g).tolist()
        out.append(PairExample(prompt, [a, *tail], [b, *tail], None, i, i + 1, "mem"))
    return out


def _trained_head(tiny_dir, scope: str, examples, *, steps: int = 5, lr: float = 0.5):
    """The head after `steps` plain gradient steps of mean DPO loss (beta 1) under `scope`,
    and the head before."""
    from dpolab.models import load_model

    torch.manual_seed(0)
    model = load_model(str(tiny_dir))
    cfg = C.build_config({"train": {"scope": scope, "progress": False}})
    tok = {"train": SimpleNamespace(examples=examples),
           "held_out": SimpleNamespace(examples=examples[:2])}
    sc = scopes.apply(cfg, model, tok, pad_id=0, device=torch.device("cpu"), autocast=False,
                      dist=Distributed.from_env("cpu"))
    start = model.get_output_embeddings().weight.detach().clone()
    opt = torch.optim.SGD(list(sc.params), lr=lr)
    with torch.no_grad():
        rc, rr = sc.reference(examples, split="train").sums()
    for _ in range(steps):
        pc, pr = sc.forward(examples, split="train").sums()
        opt.zero_grad()
        dpo_loss(pc, pr, rc, rr, beta=1.0).mean().backward()
        opt.step()
    return model.get_output_embeddings().weight.detach().clone(), start, sc


def test_token_rows_equal_last_layer_for_single_token_completions(tiny_dir):
    """Five gradient steps of DPO on 12 pairs of one-token completions: the whole head under
    token_rows equals the head under last_layer (every other row gets a zero gradient from
    the margin there too), and token_rows left every other row bitwise as it was. With
    three-token completions the two scopes differ (later tokens are scored from states the
    completions do not share), so the comparison can fail."""
    one = _examples(12, tokens=1, seed=0)
    w_rows, start, sc = _trained_head(tiny_dir, "token_rows", one)
    w_full, _, _ = _trained_head(tiny_dir, "last_layer", one)
    torch.testing.assert_close(w_rows, w_full, rtol=0, atol=1e-6)
    rows = sc.trained_rows
    assert rows.tolist() == sorted({t for ex in one for t in (*ex.chosen_ids, *ex.rejected_ids)})
    others = torch.ones(start.shape[0], dtype=torch.bool)
    others[rows] = False
    assert torch.equal(w_rows[others], start[others])
    assert (w_rows[rows] - start[rows]).abs().max() > 1e-3  # the trained rows moved

    three = _examples(12, tokens=3, seed=0)
    w_rows3, _, _ = _trained_head(tiny_dir, "token_rows", three)
    w_full3, _, _ = _trained_head(tiny_dir, "last_layer", three)
    assert (w_rows3 - w_full3).abs().max() > 1e-4


def test_head_gram_on_trained_rows_equals_autograd():
    """head_gradient_gram(rows=U) == A_U^T A_U with A_U's columns the autograd gradients of
    each response's log-prob w.r.t. the rows U of the head only."""
    from dpolab.auxdpo import head_gradient_gram
    from dpolab.logps import Head, label_logps

    g = torch.Generator().manual_seed(4)
    V, D, lens = 11, 3, [1, 2, 1, 3]
    W = torch.randn(V, D, generator=g, dtype=torch.float64)
    rows = torch.tensor([2, 5, 7])
    hs = [torch.randn(n, D, generator=g, dtype=torch.float64) for n in lens]
    ys = [torch.randint(0, V, (n,), generator=g) for n in lens]
    sub = W[rows].clone().requires_grad_(True)
    cols = []
    for h, y in zip(hs, ys):
        full = W.index_put((rows,), sub)  # W with rows U taken from the trainable `sub`
        (grad,) = torch.autograd.grad(label_logps(h, Head(full), y).sum(), sub)
        cols.append(grad.reshape(-1))
    A = torch.stack(cols, dim=1)  # (U D, m)
    G = head_gradient_gram(list(zip(hs, ys)), Head(W), max_bytes=2**20, rows=rows)
    torch.testing.assert_close(G, A.T @ A, rtol=1e-5, atol=1e-6)  # token gradients in float32


def _pairs_file(path, n: int):
    from dpolab.tiny import tiny_corpus

    prompts = tiny_corpus(lines=n, seed=1)  # distinct sentences: states far from collinear
    rows = [{"prompt": f"{prompts[i]}?", "chosen": " Yes" if i % 2 else " No",
             "rejected": " No" if i % 2 else " Yes"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_token_rows_gram_by_autograd_equals_the_closed_form_on_its_rows(tiny_dir):
    """Under token_rows the per-response gradients that AuxDPO's Gram is built from (autograd
    through the scope's forward, the row mask applied by its hook) equal the head's closed
    form restricted to the trained rows, and differ from the whole head's closed form."""
    from dpolab.auxdpo import head_gradient_gram, response_gradient_gram

    ex = _examples(6, tokens=2, seed=3)
    _, _, sc = _trained_head(tiny_dir, "token_rows", ex, steps=0)
    G = response_gradient_gram(lambda e: sc.forward(e, split="train"), ex, list(sc.params),
                               max_bytes=2**30)
    hs, ys = sc.head_states.responses(ex, split="train")
    responses = list(zip(hs, ys))
    on_rows = head_gradient_gram(responses, sc.reference_head, max_bytes=2**30,
                                 rows=sc.trained_rows)
    whole = head_gradient_gram(responses, sc.reference_head, max_bytes=2**30)
    torch.testing.assert_close(G, on_rows, rtol=1e-4, atol=1e-6)
    assert (G - whole).abs().max() > 1e-3 * whole.abs().max()


def test_auxdpo_null_space_dimension_under_token_rows(tiny_dir, tmp_path, cache):
    """AuxDPO (exact mode) on 200 training pairs whose completions are " Yes"/" No" plus EOS
    under token_rows: A has 64 U rows (U completion tokens, 64 the hidden size), so
    rank(A) <= 64 U < 400 responses and auxdpo.json records the null-space dimension
    400 - rank >= 400 - 64 U > 0. The exported model keeps every row outside U as the
    reference had it."""
    from dpolab.models import load_model
    from dpolab.train import train
    from tests.test_train import cfg_for

    data = _pairs_file(tmp_path / "pairs.jsonl", 220)
    run = train(cfg_for(tiny_dir, data, tmp_path / "run", "train.scope=token_rows",
                        "loss.name=auxdpo", "loss.aux_mode=exact", "train.max_steps=2",
                        "data.eval_fraction=0.0909", "train.weight_decay=0"))
    rec = json.loads((run / "auxdpo.json").read_text())
    assert rec["responses"] == 400 and rec["scope"] == "token_rows"
    units = rec["trained_parameters"] // 64
    assert 2 <= units <= 6 and rec["rank"] <= 64 * units
    assert rec["null_dim"] == 400 - rec["rank"] >= 400 - 64 * units > 0
    ref = load_model(str(tiny_dir)).get_output_embeddings().weight.detach()
    out = load_model(str(run / "model")).get_output_embeddings().weight.detach()
    moved = (out - ref).abs().amax(dim=1) > 0
    assert 0 < int(moved.sum()) <= units

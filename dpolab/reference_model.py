"""An explicit reference model (`model.reference`, or `ref_model=` from Python): pi_ref is
another model than the policy's starting weights, e.g. the SFT model while the policy starts
from a later checkpoint.

Its log-probs go into the same store as the usual reference's, keyed by the hash of *its*
weights and the token ids, computed once with the run's pair forward over its body and head
(`forward`); the model is then dropped, so training holds no second model. The step-0 check
cannot compare the policy with the store any more (they differ by design), so it becomes a
check of the store against the reference's own forward (`check_own_forward`): the longest
and shortest pairs of each split scored through `model(input_ids).logits`, full logits and
torch's log_softmax, must give the stored sums.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from dpolab.errors import UserError

Tensor = torch.Tensor


def load(cfg, spec: Any, tokenizer, device) -> tuple[torch.nn.Module, str]:
    """(the reference model on `device`, eval mode, frozen; how messages name it). `spec` is
    a name or folder as `model.name` takes, or a loaded causal LM. Its tokenizer must be the
    policy's: a named model's own tokenizer is compared token by token, a loaded model's
    embedding must hold every id of `tokenizer`."""
    from dpolab.inputs import check_fit, check_model
    from dpolab.models import load_configured, load_tokenizer

    if isinstance(spec, (str, Path)):
        where = f"model.reference {spec}"
        theirs = load_tokenizer(str(spec), trust_remote_code=cfg.model.trust_remote_code)
        check_same_tokenizer(tokenizer, theirs, where)
        model = load_configured(replace(cfg.model, name=str(spec)), device=device)
    else:
        where = f"ref_model {type(spec).__name__}"
        check_model(spec)
        model = spec.to(device).eval().requires_grad_(False)
    check_fit(model, tokenizer)
    return model, where


def check_same_tokenizer(ours, theirs, where: str) -> None:
    """The policy's and the reference's tokenizers give the same ids: same vocabulary (added
    tokens included) and the same eos; else one UserError naming the first difference."""
    a, b = ours.get_vocab(), theirs.get_vocab()
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])
        tok, i = diff[0]
        side = "the policy's" if (tok, i) in a.items() else "the reference's"
        raise UserError(f"{where}: its tokenizer differs from the policy's ({len(a)} vs "
                        f"{len(b)} tokens; {tok!r} = {i} only in {side}): the reference's "
                        f"log-probs would be of other token ids")
    if ours.eos_token_id != theirs.eos_token_id:
        raise UserError(f"{where}: its eos token id is {theirs.eos_token_id}, the policy's "
                        f"{ours.eos_token_id}")


def forward(model, cfg, *, name: str, pad_id: int, device, autocast):
    """The run's pair forward (FORWARDS layout `name`) over the reference's body and head."""
    from dpolab.models import body_and_head
    from dpolab.policy import make_forward

    body, head = body_and_head(model)
    return make_forward(name, body, head, pad_id=pad_id, chunk_size=cfg.train.logps_chunk,
                        device=device, autocast=autocast, dtype=model.dtype)


def check_own_forward(model, examples: Sequence, store, path: Path, split: str, *,
                      device, n: int = 4) -> None:
    """The stored reference sums of the `n` longest and `n` shortest pairs of `split` against
    the reference model's own forward on each sequence alone (full logits, log_softmax in
    float32, scored tokens only); a difference beyond rounding (dpolab.reference.disagree) is
    a UserError naming the store."""
    from dpolab.reference import disagree

    if not examples:
        return
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids)
                   + len(examples[i].chosen_ids) + len(examples[i].rejected_ids))
    few = sorted(set(order[:n] + order[-n:]))
    rc, rr = store.sums()
    for i in few:
        ex = examples[i]
        for ids, mask, want, what in (
                (ex.chosen_ids, getattr(ex, "chosen_mask", None), rc[i], "chosen"),
                (ex.rejected_ids, getattr(ex, "rejected_mask", None), rr[i], "rejected")):
            got = own_logp(model, ex.prompt_ids, ids, mask, device=device)
            if disagree(torch.tensor([got]), want.reshape(1)).any():
                raise UserError(
                    f"reference check failed: {split} pair {ex.source}:{ex.row} ({what}) "
                    f"scores {got:.6f} with the reference model's own forward, {float(want):.6f} "
                    f"in the stored reference log-probs ({path}); delete that file and run "
                    f"again to compute it anew")


def own_logp(model, prompt_ids, ids, mask=None, *, device) -> float:
    """log pi(ids | prompt) summed over the scored tokens (`mask`, all when None), from the
    model's own forward on the one sequence: (1, T, V) logits, float32 log_softmax."""
    seq = torch.tensor([list(prompt_ids) + list(ids)], device=device)
    with torch.no_grad():
        z = model(input_ids=seq).logits[0, len(prompt_ids) - 1:-1].float()  # (n, V)
    lp = torch.log_softmax(z, -1).gather(1, torch.tensor(list(ids), device=device)[:, None])
    keep = torch.ones(len(ids), dtype=torch.bool) if mask is None else torch.tensor(mask).bool()
    return float(lp[:, 0].double().cpu()[keep].sum())


class Explicit:
    """The explicit reference of one run while its store is made: the loaded model, the hash
    of its weights (the store's key) and how messages name it. Dropped after `check`."""

    def __init__(self, cfg, spec: Any, tokenizer, device):
        from dpolab.losses import Objective
        from dpolab.reference import hash_parameters

        if Objective(cfg.loss.term_weights(), cfg.loss).needs_delta:
            raise UserError("loss auxdpo: its null space is taken at the reference, which must "
                            "be the policy's starting weights; leave model.reference unset")
        self.model, self.where = load(cfg, spec, tokenizer, device)
        self.hash = hash_parameters(self.model)[:16] + (
            "-f16" if self.model.dtype == torch.float16 else "")

    def forward(self, cfg, *, name: str, pad_id: int, device, autocast):
        return forward(self.model, cfg, name=name, pad_id=pad_id, device=device,
                       autocast=autocast)

    def check(self, tok: dict, refs: dict, device) -> None:
        """Each split's store against the reference's own forward (`check_own_forward`)."""
        from dpolab.models import dpolab_cache_dir
        from dpolab.reference import store_path

        for split, t in tok.items():
            check_own_forward(self.model, t.examples, refs[split],
                              store_path(dpolab_cache_dir(), refs[split].key), split,
                              device=device)

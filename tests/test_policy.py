"""The shared-prompt pair forward (one row per pair, 4D mask, restarted positions) gives the
log-probs of the plain two-rows forward, for every architecture family."""

import pytest
import torch

from dpolab.models import body_and_head
from dpolab.policy import BodyForward, SharedPromptForward, shared_prompt_batch
from dpolab.tiny import tiny_model
from dpolab.tokenize import PairExample


def examples():
    g = torch.Generator().manual_seed(0)
    t = lambda n: torch.randint(3, 500, (n,), generator=g).tolist()  # noqa: E731
    return [PairExample(t(p), t(c), t(r), None, i, i + 1, "x")
            for i, (p, c, r) in enumerate([(5, 3, 4), (2, 6, 1), (7, 2, 2), (1, 1, 1)])]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "gpt2"])
def test_shared_prompt_equals_two_rows(arch):
    """Per-token log-probs agree to 1e-5 (float32), token order and sequence ids are equal,
    and gradients w.r.t. the parameters agree."""
    model = tiny_model(vocab_size=512, arch=arch).eval()
    body, head = body_and_head(model)
    kw = dict(pad_id=2, chunk_size=16, device=torch.device("cpu"), autocast=False)
    a = BodyForward(body, lambda: head, **kw)(examples())
    b = SharedPromptForward(body, lambda: head, dtype=torch.float32, **kw)(examples())
    assert torch.equal(a.seg, b.seg)
    torch.testing.assert_close(a.tokens, b.tokens, atol=1e-5, rtol=1e-5)
    params = [p for p in model.parameters()]
    ga = torch.autograd.grad(a.tokens.sum(), params, allow_unused=True)
    gb = torch.autograd.grad(b.tokens.sum(), params, allow_unused=True)
    for x, y in zip(ga, gb):
        if x is not None:
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
    assert b.n_processed == sum(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids)
                                for e in examples())


def test_shared_prompt_mask_structure():
    """Pair (P=2, C=2, R=1): rejected token 4 sees the prompt (0, 1) and itself, not the chosen
    tokens (2, 3); its position restarts at 2; padding sees only itself."""
    ex = [PairExample([7, 8], [9, 10], [11], None, 0, 1, "x"),
          PairExample([7, 8, 9], [10, 11], [12, 13], None, 1, 2, "x")]
    ids, pos, mask, gather, labels, seg = shared_prompt_batch(ex, pad_id=0, dtype=torch.float32)
    allow = mask[0, 0] == 0
    assert allow[4].tolist() == [True, True, False, False, True, False, False]
    assert pos[0, :5].tolist() == [0, 1, 2, 3, 2]
    assert allow[6].tolist() == [False] * 6 + [True]
    # chosen of pair 0 predicted from positions 1, 2; rejected from 1 (the last prompt token)
    assert gather[:2].tolist() == [1, 2] and labels[:2].tolist() == [9, 10]
    assert seg.tolist() == [0, 0, 1, 1, 2, 3, 3]

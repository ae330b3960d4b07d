"""The pair layouts of dpolab.packing: hand-checked indices, the rows mask equal to its
definition, and the packed forward (FlexAttention BlockMask, or the same layout with a dense
mask) equal to the rows forward and to two rows per pair in float64."""

from dataclasses import dataclass

import pytest
import torch

from dpolab import packing
from dpolab.logps import label_logps
from dpolab.models import body_and_head
from dpolab.policy import BodyForward, SharedPromptForward, packed_states
from dpolab.tiny import tiny_model
from dpolab.tokenize import PairExample

CPU = torch.device("cpu")
# On the CPU FlexAttention runs uncompiled (the reference path), which it warns about.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def examples():
    g = torch.Generator().manual_seed(0)
    t = lambda n: torch.randint(3, 500, (n,), generator=g).tolist()  # noqa: E731
    return [PairExample(t(p), t(c), t(r), None, i, i + 1, "x")
            for i, (p, c, r) in enumerate([(5, 3, 4), (2, 6, 1), (7, 2, 2), (1, 1, 1)])]


@dataclass(frozen=True)
class MaskedPair:
    """A pair with per-token score masks (multi-turn completions)."""
    prompt_ids: list
    chosen_ids: list
    rejected_ids: list
    chosen_mask: list | None
    rejected_mask: list | None
    index: int = 0
    row: int = 1
    source: str = "x"


def test_packed_layout_by_hand():
    """Pairs (P=2, C=2, R=1) and (P=1, C=1, R=2), blocks aligned to 4 slots:
    ids   7 8 9 10 11 pad pad pad | 5 6 12 13     pair 0 in slots 0..7 (5 real), pair 1 8..11
    pos   0 1 2 3  2  0   0   0   | 0 1 1  2      rejected restarts at P
    chosen of pair 0 is predicted from slots 1 (last prompt), 2; its rejected from 1;
    pair 1's chosen from 8 (= 8 + P - 1), its rejected from 8 and 10 (its own first token)."""
    ex = [PairExample([7, 8], [9, 10], [11], None, 0, 1, "x"),
          PairExample([5], [6], [12, 13], None, 1, 2, "x")]
    lay = packing.packed(ex, pad_id=0, multiple=4)
    assert lay.ids.tolist() == [7, 8, 9, 10, 11, 0, 0, 0, 5, 6, 12, 13]
    assert lay.pos.tolist() == [0, 1, 2, 3, 2, 0, 0, 0, 0, 1, 1, 2]
    assert lay.doc.tolist() == [0] * 8 + [1] * 4
    assert lay.kind.tolist() == [0, 0, 1, 1, 2, 3, 3, 3, 0, 1, 2, 2]
    assert lay.gather.tolist() == [1, 2, 8, 1, 8, 10]
    assert lay.labels.tolist() == [9, 10, 6, 11, 12, 13]
    assert lay.seg.tolist() == [0, 0, 1, 2, 3, 3]
    assert packing.packed(ex, pad_id=0, multiple=1).ids.tolist() == [7, 8, 9, 10, 11, 5, 6, 12, 13]


def test_packed_block_does_not_depend_on_its_neighbours():
    """float64: a pair's log-probs in the packed layout (FlexAttention, 128-slot blocks) are
    bitwise the same alone and after other pairs (tests/test_gpu.py checks the CUDA kernel,
    whose tiles are what the 128-slot alignment keeps in place)."""
    model = tiny_model(vocab_size=512, arch="qwen2").double().eval()
    body, head = body_and_head(model)
    packing.use_packed_attention(body.decoder)
    ex = examples()
    with torch.no_grad():
        h, y, seg, _ = packed_states(body, ex, pad_id=2, device=CPU, autocast=False)
        h1, y1, _, _ = packed_states(body, ex[2:3], pad_id=2, device=CPU, autocast=False)
    mine = (seg == 2) | (seg == 4 + 2)
    assert torch.equal(label_logps(h[mine], head, y[mine]), label_logps(h1, head, y1))


def test_rows_mask_is_its_definition():
    """The vectorised rows mask equals the mask written out pair by pair: causal within the
    pair, rejected (slots P+C..) never seeing chosen (P..P+C-1), padding seeing itself only."""
    g = torch.Generator().manual_seed(1)
    ex = [PairExample([3] * int(p), [4] * int(c), [5] * int(r), None, i, i + 1, "x")
          for i, (p, c, r) in enumerate(torch.randint(1, 6, (5, 3), generator=g).tolist())]
    _, _, mask, _, _, _ = packing.rows(ex, pad_id=0, dtype=torch.float64)
    L = mask.shape[-1]
    want = torch.zeros(len(ex), L, L, dtype=torch.bool)
    for b, e in enumerate(ex):
        P, C, R = len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids)
        n = P + C + R
        want[b, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
        want[b, P + C:n, P:P + C] = False
        want[b, n:, n:] = torch.eye(L - n, dtype=torch.bool)
    assert torch.equal(mask[:, 0] == 0, want)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_packed_equals_rows_and_two_rows_float64(arch):
    """float64 model: per-token log-probs of the packed forward (FlexAttention without
    compile, forward only: it has no CPU backward; and the same layout with a dense mask)
    equal the rows forward and two rows per pair to 1e-10, in the same token order.
    Gradients of the dense-mask packed forward equal the rows forward's to 1e-6 relative to
    each tensor's largest entry: not 1e-15, because RMSNorm computes in float32 even in a
    float64 model, so a different summation order shows at float32 roundoff (~1e-7)."""
    model = tiny_model(vocab_size=512, arch=arch).double().eval()
    body, head = body_and_head(model)
    assert packing.use_packed_attention(body.decoder)
    kw = dict(pad_id=2, chunk_size=16, device=CPU, autocast=False)
    two = BodyForward(body, lambda: head, **kw)(examples())
    rows = SharedPromptForward(body, lambda: head, dtype=torch.float64, **kw)(examples())
    with torch.no_grad():
        h, y, seg, n = packed_states(body, examples(), pad_id=2, device=CPU, autocast=False)
        flex = label_logps(h, head, y, chunk_size=16)
    h, y, seg_d, _ = packed_states(body, examples(), pad_id=2, device=CPU, autocast=False,
                                   dense=True)
    dense = label_logps(h, head, y, chunk_size=16)
    assert torch.equal(seg, two.seg) and torch.equal(seg_d, two.seg)
    assert n == rows.n_processed
    for got in (rows.tokens, flex, dense):
        torch.testing.assert_close(got, two.tokens, atol=1e-10, rtol=0)
    params = list(model.parameters())
    g_rows = torch.autograd.grad(rows.tokens.sum(), params, allow_unused=True)
    g_dense = torch.autograd.grad(dense.sum(), params, allow_unused=True)
    for a, b in zip(g_rows, g_dense):
        if a is not None:
            assert (a - b).abs().max() <= 1e-6 * a.abs().max()


def test_score_masks_select_tokens():
    """With chosen_mask / rejected_mask only the True tokens are scored, with the values the
    unmasked forward gives them; a None mask scores every token of that completion."""
    model = tiny_model(vocab_size=512, arch="llama").double().eval()
    body, head = body_and_head(model)
    packing.use_packed_attention(body.decoder)
    base = [MaskedPair([5, 6, 7], [8, 9, 10], [11, 12], None, None),
            MaskedPair([13], [14, 15], [16, 17, 18], None, None)]
    masked = [MaskedPair([5, 6, 7], [8, 9, 10], [11, 12], [True, False, True], None),
              MaskedPair([13], [14, 15], [16, 17, 18], [False, True], [False, False, True])]
    keep = torch.tensor([True, False, True, False, True, True, True, False, False, True])
    for dense in (True, False):
        with torch.no_grad():
            h0, y0, s0, _ = packed_states(body, base, pad_id=2, device=CPU, autocast=False,
                                          dense=dense)
            h1, y1, s1, _ = packed_states(body, masked, pad_id=2, device=CPU, autocast=False,
                                          dense=dense)
        assert s1.tolist() == [0, 0, 1, 2, 2, 3]
        assert torch.equal(y1, y0[keep]) and torch.equal(s1, s0[keep])
        torch.testing.assert_close(h1, h0[keep], atol=1e-12, rtol=0)
    ids, pos, mask, gather, labels, seg = packing.rows(masked, pad_id=2, dtype=torch.float64)
    assert labels.tolist() == [8, 10, 15, 11, 12, 18]


def test_score_mask_length_is_checked():
    """A mask whose length differs from its completion names the source row and field."""
    bad = [MaskedPair([5], [6, 7], [8], [True], None, row=4, source="d.jsonl")]
    with pytest.raises(ValueError, match=r"d.jsonl:4: chosen_mask has 1 entries for 2"):
        packing.packed(bad, pad_id=0)


def test_packed_attention_is_sdpa_for_other_masks():
    """A model switched to the packed attention gives the same logits and greedy generations
    (left padding, KV cache) as before for ordinary padded batches (its 2D-mask path is SDPA);
    GPT-2, which takes no BlockMask, is left alone."""
    model = tiny_model(vocab_size=512, arch="qwen2").double().eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 2, 2]])
    am = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    left, left_am = torch.tensor([[5, 6, 7, 8], [2, 2, 9, 10]]), am.flip(1)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=2)
    with torch.no_grad():
        before = model(ids, attention_mask=am).logits
        gen_before = model.generate(left, attention_mask=left_am, **gen)
        assert packing.use_packed_attention(model.model)
        assert model.config._attn_implementation == packing.ATTENTION
        after = model(ids, attention_mask=am).logits
        gen_after = model.generate(left, attention_mask=left_am, **gen)
    assert torch.equal(before, after) and torch.equal(gen_before, gen_after)
    gpt2 = tiny_model(vocab_size=512, arch="gpt2")
    assert not packing.use_packed_attention(gpt2.transformer)
    assert gpt2.config._attn_implementation == "sdpa"

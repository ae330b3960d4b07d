"""Chunked log-probs with bf16 states against float32 master weights (the bf16 autocast
case): the head's matmuls run in bf16, exponents and sums in float32; the result stays within
bf16 rounding of a float64 reference, and gradients keep each input's dtype."""

import torch

from dpolab.logps import Head, label_logps


def test_bf16_states_float32_weights_match_float64_reference():
    """h (N, D) bf16, W (V, D) float32. Reference: the same bf16-rounded h and W in float64.
    The bf16 matmul rounds each logit z to 8 significant bits: |dz| <= 2^-8 |z| with |z| < 4
    here, so each log-prob (z_y - logsumexp z) is off by at most ~2 * 4 * 2^-8 = 0.03; the
    stated tolerance is 0.03. Gradients: same bound, relative to their largest entry."""
    g = torch.Generator().manual_seed(0)
    N, D, V = 40, 32, 300
    h = (torch.randn(N, D, generator=g) * 0.3).bfloat16().requires_grad_(True)
    w = (torch.randn(V, D, generator=g) * 0.3).requires_grad_(True)
    y = torch.randint(0, V, (N,), generator=g)
    out = label_logps(h, Head(w), y, chunk_size=16)
    assert out.dtype == torch.float32
    h64 = h.detach().double().requires_grad_(True)
    w64 = w.detach().bfloat16().double().requires_grad_(True)
    z = h64 @ w64.T
    assert z.abs().max() < 4
    ref = torch.log_softmax(z, dim=1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(out.double(), ref, atol=0.03, rtol=0)
    gh, gw = torch.autograd.grad(out.sum(), [h, w])
    rh, rw = torch.autograd.grad(ref.sum(), [h64, w64])
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.float32
    assert (gh.double() - rh).abs().max() <= 0.03 * rh.abs().max()
    assert (gw.double() - rw).abs().max() <= 0.03 * rw.abs().max()


def test_bf16_path_differs_from_float32_path():
    """The bf16 matmul is really taken: bf16 states against float32 weights do not give the
    float32 result of the same (upcast) states, which is what the head computed before."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(20, 64, generator=g).bfloat16()
    w = torch.randn(500, 64, generator=g)
    y = torch.randint(0, 500, (20,), generator=g)
    low = label_logps(h, Head(w), y, chunk_size=8)
    full = label_logps(h.float(), Head(w), y, chunk_size=8)
    assert not torch.equal(low, full)
    torch.testing.assert_close(low, full, atol=0.3, rtol=0)

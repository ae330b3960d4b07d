"""The reference store's weight key: the same hash values as the stores already written
(names, dtypes, shapes and bytes), computed from the weights in place."""

import hashlib
import tracemalloc

import torch

from dpolab.reference import hash_parameters


def _module() -> torch.nn.Module:
    """Weights set without any random draw: float32, a bfloat16 parameter that is not
    contiguous (a transpose), an int64 buffer and an empty one."""
    m = torch.nn.Module()
    m.lin = torch.nn.Linear(3, 4)
    with torch.no_grad():
        m.lin.weight.copy_(torch.arange(12, dtype=torch.float32).view(4, 3) / 7 - 0.5)
        m.lin.bias.copy_(torch.tensor([1e-3, -2.5, 3.25, 0.0]))
    m.scale = torch.nn.Parameter(torch.linspace(-1, 1, 6, dtype=torch.bfloat16).view(2, 3).t())
    m.register_buffer("ids", torch.arange(5, dtype=torch.int64))
    m.register_buffer("none", torch.zeros(0, 3))
    return m


def _copying_hash(model: torch.nn.Module) -> str:
    """The key as first written: each tensor's bytes copied out with .tobytes()."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
    return h.hexdigest()


def test_weight_key_is_unchanged(tiny_dir):
    """The key of a fixed module is the value the stores on disk were written under
    (recorded from the copying implementation), and a tiny transformer's key equals the
    copying implementation's: existing reference stores stay found."""
    from dpolab.models import load_model

    assert hash_parameters(_module()) == "517d3aadd32addaf2b1c192d971f2dff"
    assert _copying_hash(_module()) == "517d3aadd32addaf2b1c192d971f2dff"
    model = load_model(str(tiny_dir))
    assert hash_parameters(model) == _copying_hash(model)


def test_weight_key_reads_the_weights_in_place():
    """Hashing an 8 MiB float32 weight allocates no copy of its bytes: the peak of Python's
    allocations during the hash stays under 1 MiB (a .tobytes() copy alone is 8 MiB)."""
    m = torch.nn.Linear(1024, 2048, bias=False)  # 2 Mi float32 = 8 MiB
    tracemalloc.start()
    try:
        hash_parameters(m)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak

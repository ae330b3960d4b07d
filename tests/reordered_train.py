"""`dpolab train ARGS` whose optimizer holds the parameters in another order than the run
that wrote its checkpoints: each shape's parameters in reverse order, so that every position
keeps its shape and a state matched by position would load another parameter's moments
without any error. Run by tests/test_distributed.py under torchrun."""

import sys
from collections import defaultdict

import dpolab.train
from dpolab.cli import main

_make_adamw = dpolab.train.make_adamw


def reordered(groups: list[dict], *, lr: float):
    out = []
    for group in groups:
        params = list(group["params"])
        same_shape = defaultdict(list)
        for p in params:
            same_shape[tuple(p.shape)].append(p)
        for ps in same_shape.values():
            ps.reverse()
        out.append({**group, "params": [same_shape[tuple(p.shape)].pop(0) for p in params]})
    moved = [a is not b for a, b in zip(out[0]["params"], groups[0]["params"], strict=True)]
    assert any(moved)  # some shape is shared by several parameters: their order changed
    return _make_adamw(out, lr=lr)


if __name__ == "__main__":
    dpolab.train.make_adamw = reordered
    sys.exit(main(["train", *sys.argv[1:]]))

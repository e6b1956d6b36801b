"""Compiled autograd (torch._dynamo.compiled_autograd) traces the backward of every miss op.

Users turn it on to compile the backward pass as one graph (torch._dynamo.config.
compiled_autograd = True, FSDP2 setups among them). The ops' backwards are C++
torch::autograd::Function classes; unmarked, compiled autograd ran each in eager behind a graph
break, and with fullgraph=True failed with a Dynamo message naming no miss op (a review,
2026-12-05). They are marked is_traceable (their backwards are dispatcher calls only): each
backward here runs eagerly and under compiled autograd with fullgraph=True, float64, from the
same forward and the same gradient, and the gradients must be equal.
"""
import pytest
import torch
from torch._dynamo import compiled_autograd

import miss_ext
from miss_ext.bank import MissBankLinear

from conftest import rand

ops = torch.ops.miss
F64 = torch.float64


def key(seed=1234, offset=5678):
    return torch.tensor([seed, offset], dtype=torch.int64)


def leaf(*shape):
    return rand(*shape, dtype=F64, requires_grad=True)


def cases():
    """name -> (forward returning one tensor, its leaf inputs)."""
    x, w, b = leaf(5, 10), rand(6, 10, dtype=F64), rand(6, dtype=F64)
    d, mini, bat = leaf(4, 6), leaf(4, 3), leaf(3, 2, 2)   # bat: 6 = 3 * 2 rows, in 10 = 5 * 2
    wb = rand(6, 6, dtype=F64, requires_grad=True)
    out, src = leaf(5, 10), leaf(5, 4)
    bank = MissBankLinear(torch.nn.Linear(10, 6).double(), capacity=3, max_r=4)
    bank.add_adapter("a", r=4, block=torch.randn(4, 6, dtype=F64), dropout=0.3)
    bank.add_adapter("m", r=3, mode="mini", mini_r=3, block=torch.randn(3, 3, dtype=F64))
    rows = bank.index_of(["a", "m", None, "a", "m"])
    return {
        "fold": (lambda: ops.fold(x, 3, 0.4, key()), [x]),
        "tile_add": (lambda: ops.tile_add(out, src, -0.5, 0.25, key()), [out, src]),
        "linear": (lambda: ops.linear(x, w, b, d), [x, d]),
        "linear-dropout": (lambda: ops.linear(x, w, b, d, 0.3, key(7, 9)), [x, d]),
        "linear-mini": (lambda: ops.linear(x, w, None, mini), [x, mini]),
        "merge": (lambda: ops.merge(wb, leaf(3, 6)), [wb]),
        "merge-bat": (lambda: ops.merge(wb, bat), [wb, bat]),
        "bat_weight": (lambda: ops.bat_weight(wb, bat), [wb, bat]),
        "bat_linear": (lambda: ops.bat_linear(rand(5, 6, dtype=F64), wb, None, bat), [wb, bat]),
        "bank (bank_fold, bank_add)": (lambda: bank.train()(x, rows), [x, bank.bank]),
    }


@pytest.mark.parametrize("name", list(cases()))
def test_backward_under_compiled_autograd_fullgraph(name):
    torch.manual_seed(0)
    forward, inputs = cases()[name]
    grads = []
    for compiled in (False, True):
        torch.manual_seed(1)  # the same dropout key for the bank's draw
        y = forward()
        g = torch.randn_like(y)
        for t in inputs:
            t.grad = None
        if compiled:
            torch._dynamo.reset()
            with compiled_autograd._enable(torch.compile(backend="aot_eager", fullgraph=True)):
                y.backward(g)
        else:
            y.backward(g)
        grads.append([t.grad.clone() for t in inputs])
    for eager, traced in zip(*grads):
        assert eager.abs().sum() > 0
        torch.testing.assert_close(traced, eager, rtol=1e-12, atol=1e-12)
    assert miss_ext  # registers the ops

"""A MissLinear whose base torch.ao.quantization.quantize_dynamic replaced:
model code that asks `isinstance(layer.weight, torch.Tensor)` before casting to its dtype
(transformers' T5 family, on `wo`) must run as it does on the quantized base and in PEFT."""
import copy

import pytest
import torch
import torch.nn as nn

import miss_ext


class T5LikeFFN(nn.Module):
    """transformers' T5DenseActDense.forward, reduced to the weight read around `wo`."""

    def __init__(self):
        super().__init__()
        self.wi = nn.Linear(8, 12, bias=False)
        self.wo = nn.Linear(12, 8, bias=False)

    def forward(self, x):
        h = torch.relu(self.wi(x))
        if (isinstance(self.wo.weight, torch.Tensor) and h.dtype != self.wo.weight.dtype
                and self.wo.weight.dtype != torch.int8):
            h = h.to(self.wo.weight.dtype)
        return self.wo(h)


def _quantized(model):
    return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def test_t5_like_weight_read_on_quantized_base_runs():
    torch.manual_seed(0)
    model = miss_ext.apply_miss(T5LikeFFN(), ["wo"], r=4, init_weights=False)
    q = _quantized(copy.deepcopy(model))
    x = torch.randn(3, 5, 8)
    layer = q.wo
    assert not isinstance(layer.weight, torch.Tensor)
    want = layer.base_layer(torch.relu(q.wi(x))) + miss_ext.ops.fold(torch.relu(q.wi(x)), 4) @ layer.miss_block
    torch.testing.assert_close(q(x), want)
    with pytest.raises(RuntimeError, match=r"bypass the adapter"):
        layer.weight()


"""No hidden host-device synchronisation on CUDA (GPU only).

A synchronisation makes the host wait for all the GPU work queued so far, so the host can no
longer run ahead and launch the next kernels while the GPU computes. torch's sync debug mode
(`torch.cuda.set_sync_debug_mode("error")`) raises on every synchronising call torch makes
(stream synchronisation, a blocking copy, `.item()`, `nonzero`, ...), so each training or
inference step below runs under it: the miss ops' forward and backward, the modules, a mixed
adapter batch (its row ids reach the device through pinned memory, miss_ext.bank.host_to_device)
and PEFT's `adapter_names=` on an accelerated model. Model building, the checks and anything
that must synchronise (safe_merge's finiteness check, a bat unmerge's conditioning check, unmerge's
one-bool check that the block did not change since the merge) stay outside or are stubbed.
"""
import contextlib
from unittest import mock

import pytest
import torch
from torch import nn

import miss_ext
from conftest import needs_gpu

pytestmark = needs_gpu


@contextlib.contextmanager
def no_sync():
    torch.cuda.synchronize()  # work queued before the step may synchronise as it likes
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.parametrize("mode, mini_r, dropout", [("default", 1, 0.0), ("default", 1, 0.1), ("mini", 16, 0.1),
                                                   ("bat", 1, 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_training_step_of_miss_linear_does_not_synchronise(mode, mini_r, dropout, dtype):
    layer = miss_ext.MissLinear(nn.Linear(256, 128, device="cuda", dtype=dtype), r=16, mode=mode, mini_r=mini_r,
                                dropout=dropout, init_weights=False).train()
    x = torch.randn(4, 32, 256, device="cuda", dtype=dtype, requires_grad=True)
    with no_sync():
        layer(x).float().square().sum().backward()
    torch.cuda.synchronize()
    assert torch.isfinite(layer.miss_block.grad).all() and torch.isfinite(x.grad).all()
    with no_sync(), torch.no_grad():
        layer.merge()  # not safe_merge: that one checks finiteness on the host
    # unmerge() reads one bool on the host by design: whether the block changed since the merge
    # (MissLinear.block_changed_since_merge, miss_ext/merged_block.py, a warning then). Stubbed
    # here (the block did not change), so what is checked is that the unmerge's own write does not
    # synchronise. A bat unmerge also checks each I + B_i's conditioning on the host (it raises
    # rather than write an ill-conditioned inverse): a synchronisation by design, like safe_merge.
    with no_sync() if mode != "bat" else contextlib.nullcontext(), torch.no_grad(), \
            mock.patch.object(miss_ext.merged_block, "changed", lambda layer, block: False):
        layer.unmerge()
    assert not layer.merged


class Block(nn.Module):
    """Two projections, as in an attention block; our code only (a transformers model's own mask
    and cache code may synchronise, which is not ours to test)."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(64, 64), nn.Linear(64, 48)

    def forward(self, x):
        return self.q_proj(x).sum(-1, keepdim=True) * self.v_proj(x)


def test_a_mixed_adapter_batch_does_not_synchronise():
    model = Block().cuda()
    miss_ext.apply_bank(model, ["q_proj", "v_proj"], capacity=3, max_r=8)
    miss_ext.add_bank_adapter(model, "a", r=8, dropout=0.1)
    miss_ext.add_bank_adapter(model, "b", r=4, mode="mini", mini_r=8)
    x = torch.randn(4, 9, 64, device="cuda")
    model.train()
    with no_sync(), miss_ext.mixed_batch(model, ["a", None, "b", "a"]):
        model(x).square().sum().backward()


def test_peft_adapter_names_do_not_synchronise():
    pytest.importorskip("peft")
    from peft import MissConfig, get_peft_model

    model = get_peft_model(Block(), MissConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False),
                           adapter_name="a")
    model.add_adapter("b", MissConfig(r=8, mini_r=4, target_modules=["q_proj"], init_weights="mini"))
    miss_ext.peft.accelerate(model)
    model = model.cuda().eval()
    x = torch.randn(3, 7, 64, device="cuda")
    with no_sync(), torch.no_grad():
        model(x, adapter_names=["a", "__base__", "b"])

"""The merge check: the merged model (miss_ext.merge_and_unload) must give the unmerged logits."""
import copy
from dataclasses import dataclass

import torch
from torch import nn

import miss_ext
from miss_ext.model import miss_layers
from miss_ext.targets import set_module

# Merge check tolerance. float32: merging only reorders the additions (a few ulps per layer), so
# the logits must agree to MERGE_RTOL_FP32 times the largest logit. bfloat16: the merged weight
# W + dW is rounded to bf16 while the unmerged model adds an fp32 adapter branch to a bf16 GEMM;
# the two roundings differ like two independent bf16 evaluations, whose logits can be several
# bf16 ulps apart after a few layers. So the tolerance is measured: BF16_NOISE_FACTOR times the
# distance between the unmerged model's bf16 and float32 evaluations (its own rounding noise).
# A wrong merge moves the logits by the adapter's whole effect, far beyond that.
MERGE_RTOL_FP32 = 1e-4
BF16_NOISE_FACTOR = 3.0
# The check can only tell a right merge from a merge that lost the adapter if the adapter moves the
# logits by clearly more than the tolerance: it must move them by this many tolerances, or the check
# is inconclusive (a very short run, or a tiny --lr, in bf16) and does not pass.
MIN_EFFECT_IN_TOLERANCES = 2.0


@dataclass
class MergeCheck:
    max_abs_diff: float
    tolerance: float
    rule: str  # how the tolerance was set, for the printout
    adapter_effect: float  # max |unmerged - base logits|: what a merge that lost the adapter would give

    @property
    def conclusive(self) -> bool:
        return self.adapter_effect >= MIN_EFFECT_IN_TOLERANCES * self.tolerance

    @property
    def passed(self) -> bool:
        return self.conclusive and self.max_abs_diff <= self.tolerance

    @property
    def verdict(self) -> str:
        if not self.conclusive:
            return (f"INCONCLUSIVE: the adapter moves the logits by only {self.adapter_effect:.1e}, not "
                    f"{MIN_EFFECT_IN_TOLERANCES:g}x the tolerance, so a merge that lost it would pass too; "
                    "train longer or with a larger --lr")
        return "PASS" if self.passed else "FAIL"


def logits_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def merge_tolerance(model: nn.Module, tokens: torch.Tensor, unmerged: torch.Tensor, dtype: torch.dtype):
    """(tolerance, rule) for comparing merged with unmerged logits; see MERGE_RTOL_FP32."""
    scale = max(1.0, unmerged.abs().max().item())
    if dtype == torch.float32:
        return MERGE_RTOL_FP32 * scale, f"{MERGE_RTOL_FP32:g} x max|logit|"
    reference = logits_of(copy.deepcopy(model).float(), tokens)
    noise = (unmerged - reference).abs().max().item()
    return (BF16_NOISE_FACTOR * noise + MERGE_RTOL_FP32 * scale,
            f"{BF16_NOISE_FACTOR:g} x the unmerged model's own {str(dtype).replace('torch.', '')} rounding "
            f"noise {noise:.2e}")


def base_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The logits of a copy of the model with every MissLinear replaced by its base layer."""
    base = copy.deepcopy(model)
    for path, layer in miss_layers(base):
        set_module(base, path, layer.base_layer)
    return logits_of(base, tokens)


def check_merge(model: nn.Module, tokens: torch.Tensor, dtype: torch.dtype):
    """Merges in place; returns (MergeCheck, the merged plain model, the unmerged logits)."""
    unmerged = logits_of(model, tokens)
    tolerance, rule = merge_tolerance(model, tokens, unmerged, dtype)
    effect = (unmerged - base_logits(model, tokens)).abs().max().item()
    merged_model = miss_ext.merge_and_unload(model)
    leftovers = [n for n, m in merged_model.named_modules() if isinstance(m, miss_ext.MissLinear)]
    if leftovers:
        raise RuntimeError(f"merge_and_unload left MissLinear layers behind: {leftovers[:3]}")
    merged = logits_of(merged_model, tokens)
    check = MergeCheck(max_abs_diff=(merged - unmerged).abs().max().item(), tolerance=tolerance, rule=rule,
                       adapter_effect=effect)
    return check, merged_model, unmerged

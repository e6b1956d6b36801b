"""Which block a merged MissLinear's weight holds: a fingerprint of the block's values noted at the
merge and compared later (MissLinear.block_changed_since_merge), so that unmerge() and save_adapter
can say when the block moved while merged (README, "unmerge()"): unmerge then subtracts the dW of
the block as it is, not the one the weight holds, and save_adapter writes that block.

Values, not the block's version counter (tried and reverted, 2026-12-05: inference tensors have
none, so merges under inference_mode crashed; a weak reference to the block made
`set_swap_module_params_on_conversion(True)` conversions refuse to swap it; fused optimizers'
steps do not count; DDP's initial broadcast counts a write that changes nothing). The fingerprint
is four float64 sums over the block (its values, their squares, its even-indexed values, their
magnitudes: about 2.7 ms for a 64 x 11008 float32 block on one CPU thread, a fraction of the merge's
pass over the weight) on the block's device, taken before the merge writes the weight: no host
synchronisation at the merge, one at the comparison. Outside the layer (weakly keyed), so that a
deepcopy or pickle of a merged layer starts unknown. Unknown (never "changed") after a cast or a
device move, for parametrized, tensor-subclass or fake blocks, under a fake-tensor mode, and while
compiling. The comparison allows float64 reordering only (1e-10 of the magnitudes): a change far
smaller than the block's own rounding (one element of a float32 block moved by 1e-4 of itself, say)
can pass unseen, and its effect on the weight is as small. Non-finite sums compare equal when both
are the same (a NaN or inf in the block at the merge hides later changes); a block that turns
non-finite counts as changed."""
import weakref
from typing import Optional

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

# layer -> (device, dtype, shape, fingerprint): the block its weight holds.
_NOTED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()

# Relative difference of two fingerprints of the same values taken in another reduction order (a
# thread count, another kernel): float64 rounding.
_REORDER_TOLERANCE = 1e-10


def _usable(block: object) -> bool:
    return (type(block) in (Tensor, nn.Parameter) and not block.is_meta and block.is_floating_point()
            and not torch.compiler.is_compiling() and not is_fake(block)
            and torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None)


def fingerprint(block: Optional[Tensor]) -> Optional[tuple]:
    """What note() keeps of `block`: (device, dtype, shape, [sum x, sum x^2, sum of the
    even-indexed x, sum |x|] in float64), or None where the block cannot be judged (unknown). Taken
    by MissLinear before a merge writes the weight, so that a failure here changes nothing."""
    return _fingerprint(block) if _usable(block) else None


def _fingerprint(block: Tensor) -> tuple:
    with torch.no_grad():
        x = block.detach().reshape(-1)
        sums = torch.stack([x.sum(dtype=torch.float64), (x * x).sum(dtype=torch.float64),
                            x[::2].sum(dtype=torch.float64), x.abs().sum(dtype=torch.float64)])
    return block.device, block.dtype, tuple(block.shape), sums


def note(layer: nn.Module, noted: Optional[tuple]) -> None:
    """Notes a fingerprint() as the block `layer`'s merged weight holds (None: unknown)."""
    _NOTED.pop(layer, None)
    if noted is not None:
        _NOTED[layer] = noted


def forget(layer: nn.Module) -> None:
    _NOTED.pop(layer, None)


def changed(layer: nn.Module, block: Optional[Tensor]) -> bool:
    """Whether `block` differs from the one noted for `layer` (beyond float64 reordering); False
    where nothing was noted, or the block was cast or moved since, or cannot be judged (unknown)."""
    noted = _NOTED.get(layer)
    if noted is None or not _usable(block) or is_fake(noted[3]):
        return False
    device, dtype, shape, then = noted
    if (block.device, block.dtype) != (device, dtype):
        return False
    if tuple(block.shape) != shape:
        return True
    now = _fingerprint(block)[3]
    magnitude = then[3] + now[3]
    scale = torch.stack([magnitude, then[1] + now[1], magnitude, magnitude])
    both_finite = now.isfinite() & then.isfinite()
    same = torch.where(both_finite, (now - then).abs() <= _REORDER_TOLERANCE * scale,
                       (now == then) | (now.isnan() & then.isnan()))
    return not bool(same.all())

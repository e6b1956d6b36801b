"""Which block a merged MissLinear's weight holds: a fingerprint of the block's values noted at the
merge and compared later (MissLinear.block_changed_since_merge), so that unmerge() and save_adapter
can say when the block moved while merged (README, "unmerge()"): unmerge then subtracts the dW of
the block as it is, not the one the weight holds, and save_adapter writes that block.

Values, not the block's version counter (tried and reverted, 2026-12-05: inference tensors have
none, so merges under inference_mode crashed; a weak reference to the block made
`set_swap_module_params_on_conversion(True)` conversions refuse to swap it; fused optimizers'
steps do not count; DDP's initial broadcast counts a write that changes nothing). The fingerprint
is four float64 sums over the block (its values, their squares, a fixed pseudo-random weighting of
them, their magnitudes) on the block's device: no host synchronisation at the merge, one at the
comparison. Outside the layer (weakly keyed), so that a deepcopy or pickle of a merged layer
starts unknown. Unknown (never "changed") after a cast or a device move, for parametrized or
tensor-subclass blocks, and while compiling."""
import weakref
from typing import Optional

import torch
from torch import Tensor, nn

# layer -> (device, dtype, shape, fingerprint): the block its weight holds.
_NOTED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()

# Relative difference of two fingerprints of the same values taken in another reduction order (a
# thread count, another kernel): float64 rounding, far below any change of a float32 block.
_REORDER_TOLERANCE = 1e-10


def _plain(block: object) -> bool:
    return type(block) in (Tensor, nn.Parameter) and not block.is_meta


def _fingerprint(block: Tensor) -> Tensor:
    """[sum x, sum x^2, sum w x, sum |x|] in float64, w a fixed pattern in [-0.5, 0.5) (a
    multiplicative hash of the index), so that changes that keep the plain sums (a permutation, a
    cancelling pair) still show."""
    with torch.no_grad():
        x = block.detach().reshape(-1).to(torch.float64)
        index = torch.arange(x.numel(), device=x.device, dtype=torch.int64)
        w = ((index * 2654435761) % 4294967296).to(torch.float64) / 4294967296.0 - 0.5
        return torch.stack([x.sum(), (x * x).sum(), (w * x).sum(), x.abs().sum()])


def note(layer: nn.Module, block: Optional[Tensor]) -> None:
    """Notes `block` as the one `layer`'s merged weight holds (forgets any earlier note)."""
    _NOTED.pop(layer, None)
    if _plain(block) and block.is_floating_point() and not torch.compiler.is_compiling():
        _NOTED[layer] = (block.device, block.dtype, tuple(block.shape), _fingerprint(block))


def forget(layer: nn.Module) -> None:
    _NOTED.pop(layer, None)


def changed(layer: nn.Module, block: Optional[Tensor]) -> bool:
    """Whether `block` differs from the one noted for `layer` (beyond float64 reordering); False
    where nothing was noted or the block was cast or moved since (unknown)."""
    noted = _NOTED.get(layer)
    if noted is None or not _plain(block):
        return False
    device, dtype, shape, then = noted
    if (block.device, block.dtype) != (device, dtype):
        return False
    if tuple(block.shape) != shape:
        return True
    now = _fingerprint(block)
    scale = torch.stack([then[3] + now[3], then[1] + now[1], then[3] + now[3]])
    return bool(((now[:3] - then[:3]).abs() > _REORDER_TOLERANCE * scale).any())

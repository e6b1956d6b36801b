"""FSDP2 and DTensor questions about a module or a tensor, for the adapters' checks: is a tensor a
DTensor, which `fully_shard` modules manage a module's parameters, and resharding them before a
write. Internal (README, "Layout"); every answer is [] / False where torch has no distributed
package or no FSDP2."""
from typing import Iterable, Optional

import torch
from torch import Tensor, nn


def is_dtensor(t: Optional[Tensor]) -> bool:
    """Whether t is a DTensor (torch.distributed.tensor: FSDP2, tensor parallelism)."""
    if t is None or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def reshard_fsdp(model: nn.Module) -> list:
    """Reshards every FSDP2 (`fully_shard`) module that manages a parameter of `model` (those
    inside it, and those above it: fully_shard applied to a module that holds `model`), locally,
    with no communication, and returns them. FSDP2 leaves a module's parameters unsharded after a
    forward that no backward followed when it does not reshard after forward (the root module,
    reshard_after_forward=False): the registered parameters are then FSDP's gathered copies (in
    the mixed-precision param_dtype), and a write into them (loading, merging) would be lost at
    the next reshard, while a check of them would take them for plain parameters. After this the
    registered parameters are the sharded DTensors; the next forward gathers them again."""
    inside = fsdp_modules(model.modules())
    inside_ids = {id(m) for m in inside}
    above = [owner for owner in fsdp_owners(model) if id(owner) not in inside_ids]
    for module in inside + above:
        module.reshard()
    return inside + above


def fsdp_modules(modules: Iterable[nn.Module]) -> list:
    """The FSDP2 (`fully_shard`) modules among `modules`; [] where torch has no FSDP2."""
    if not torch.distributed.is_available():
        return []
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return []
    return [m for m in modules if isinstance(m, FSDPModule)]


def fsdp_owners(module: nn.Module) -> list:
    """The FSDP2 (`fully_shard`) modules that manage `module`'s parameters: `module` itself or
    modules holding it that `fully_shard` was applied to. The module itself cannot tell: FSDP2
    swaps its parameters between sharded DTensors and plain gathered copies from an ancestor's
    hooks, and a gathered copy looks like any parameter. So the FSDP2 modules are found where
    torch's composable APIs register them (torch.distributed._composable_state, private but
    unchanged since torch 2.0); if that registry moves in a later torch, this answers [] and only
    the DTensor checks remain (a sharded weight is still refused; a gathered copy would not be)."""
    if not torch.distributed.is_available():
        return []
    try:
        from torch.distributed._composable_state import _module_state_mapping
    except ImportError:
        return []
    return [owner for owner in fsdp_modules(list(_module_state_mapping.keys()))
            if any(m is module for m in owner.modules())]


def fsdp_managed(module: nn.Module) -> bool:
    """Whether FSDP2 (`fully_shard`) manages `module`'s parameters (fsdp_owners)."""
    return bool(fsdp_owners(module))

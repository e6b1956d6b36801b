"""miss_ext: MiSS (Matrix Shard Sharing) adapters on fast custom ops, `torch.ops.miss`.

Importing the package loads the compiled op library, which registers `torch.ops.miss.*` with
the dispatcher (CPU always; CUDA when built with it). See README.md.

- layers and ops: `MissLinear`, `miss_ext.ops` (also re-exported here);
- models without PEFT: `apply_miss`, `merge_and_unload`, `save_adapter` / `load_adapter` (PEFT's
  file format), `export_lora`;
- many adapters in one batch (one per sequence): `MissBankLinear`, `load_bank` /
  `apply_bank` / `load_bank_adapter` / `add_bank_adapter` / `save_bank_adapter` and the
  `mixed_batch(model, adapter_names)` context (miss_ext.bank_model); PEFT's `adapter_names=` on
  an accelerated PEFT model;
- PEFT models: `miss_ext.peft.accelerate(peft_model)` / `restore` (imported on first use, so
  `import miss_ext` does not import PEFT);
- tensor parallelism: `miss_ext.tensor_parallel` (MissColwiseParallel / MissRowwiseParallel;
  importing it registers the ops' DTensor sharding strategies).
"""
import importlib as _importlib

from ._library import build_info
from . import _aoti_guard, _functorch
from .adapter_files import load_adapter, save_adapter
from .bank import MissBankLinear
from .bank_model import (add_bank_adapter, apply_bank, bank_adapter_names, load_bank, load_bank_adapter, mixed_batch,
                         remove_bank_adapter, save_bank_adapter)
from .lora import export_lora
from .model import apply_miss, merge_and_unload, miss_layers
from .modules import MissLinear
from .ops import (bank_add, bank_add_, bank_fold, bat_linear, bat_transform, bat_transform_, bat_weight, fold, linear,
                  merge, merge_, new_dropout_key, tile_add, tile_add_)

__all__ = [
    "MissLinear", "apply_miss", "bat_linear", "bat_weight", "build_info", "export_lora", "fold", "linear",
    "load_adapter", "merge", "merge_", "merge_and_unload", "miss_layers", "new_dropout_key", "save_adapter",
    "tile_add", "tile_add_", "bat_transform", "bat_transform_", "bank_fold", "bank_add", "bank_add_",
    "MissBankLinear", "add_bank_adapter", "apply_bank", "bank_adapter_names", "load_bank", "load_bank_adapter",
    "mixed_batch", "remove_bank_adapter", "save_bank_adapter",
]
__version__ = "0.1.0"

_functorch.register()  # torch.func transforms of the miss ops (see miss_ext/_functorch.py)
_aoti_guard.install()  # torch < 2.12: refuse AOTInductor packages with miss ops (see miss_ext/_aoti_guard.py)


def __getattr__(name: str):
    # `miss_ext.peft` needs PEFT installed; load it only when asked for.
    if name == "peft":
        return _importlib.import_module(".peft", __name__)
    # `miss_ext.tensor_parallel` imports torch.distributed.tensor (half a second) and registers
    # the miss ops' DTensor sharding strategies: loaded when first used.
    if name == "tensor_parallel":
        return _importlib.import_module(".tensor_parallel", __name__)
    raise AttributeError(f"module 'miss_ext' has no attribute {name!r}")

"""miss_ext: MiSS (Matrix Shard Sharing) adapters on fast custom ops, `torch.ops.miss`.

Importing the package loads the compiled op library, which registers `torch.ops.miss.*` with
the dispatcher (CPU always; CUDA when built with it). See README.md.
"""
from ._library import build_info
from .modules import MissLinear
from .ops import bat_linear, bat_weight, fold, linear, merge, merge_, new_dropout_key, tile_add_

__all__ = [
    "MissLinear", "bat_linear", "bat_weight", "build_info", "fold", "linear", "merge", "merge_", "new_dropout_key",
    "tile_add_",
]
__version__ = "0.1.0"

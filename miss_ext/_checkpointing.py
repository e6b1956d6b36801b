"""Whether a layer's forward runs inside activation checkpointing, which runs it again inside
backward().

Why: per-row adapter names reach a layer for one call (PEFT's `adapter_names=` through hooks,
`miss_ext.mixed_batch` through the bank's row ids). A recompute runs the layer again after that
call, without the names or with another call's, and nothing in its arguments shows it: every row
then silently used the active adapter, or another batch's (helper reviews, 2026-12-03). The
layers ask here at forward time, when the checkpoint is still visible:

- torch.utils.checkpoint's frames: its entry point `checkpoint` (called by checkpoint_sequential,
  torch's checkpoint_wrapper / apply_activation_checkpointing, transformers', FSDP's and
  accelerate's activation checkpointing) and the reentrant form's CheckpointFunction.forward;
- the forward of any other autograd.Function on the stack (a frame whose first argument is the
  Function's context): how reentrant checkpointing outside torch (DeepSpeed, Megatron,
  fairscale) runs the module; an ordinary Function computes on tensors and calls no module;
- a non-reentrant checkpoint's saved-tensor hooks (defined in torch/utils/checkpoint.py), which
  torch's composable `checkpoint(module)` installs from hooks, leaving no frame.

A checkpoint around a whole call is not inside it (`since` below): its recompute repeats the call.
"""
import contextlib
import inspect
import sys
from typing import Optional

import torch
import torch.utils.checkpoint

_CHECKPOINT_FILE = torch.utils.checkpoint.__file__
_FUNCTION_CONTEXT = torch._C._FunctionBase  # the ctx an autograd.Function's forward receives


def checkpoint_hooks():
    """The innermost saved-tensor hooks' pack function if a non-reentrant checkpoint's, else None."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    pack = hooks[0] if hooks else None
    code = getattr(pack, "__code__", None)
    return pack if code is not None and code.co_filename == _CHECKPOINT_FILE else None


# Per code object, by id: None for frames that never mean a checkpoint, True for
# torch.utils.checkpoint's, False for a frame whose first argument is called ctx (autograd.Function's
# convention), whose value decides. Reading co_varnames or comparing file names on every frame of
# the stack, at every layer call, cost several times the walk itself. _HELD keeps each code object
# alive, so that its id is never another's.
_KIND: dict = {}
_HELD: list = []
_UNSEEN = object()


def _kind(code):
    if code.co_filename == _CHECKPOINT_FILE:
        kind = True
    elif code.co_argcount and code.co_varnames[0] == "ctx":
        kind = False
    else:
        kind = None
    _HELD.append(code)
    _KIND[id(code)] = kind
    return kind


def inside_checkpoint(since: Optional[tuple] = None) -> bool:
    """Whether the caller runs inside activation checkpointing (the module docstring says how it
    is seen). `since`, from `entry()` at the start of a call: only a checkpoint entered after it
    counts (frames below its `with` frame, checkpoint hooks other than those then in force)."""
    stop, hooks = since if since is not None else (None, None)
    if checkpoint_hooks() not in (None, hooks):
        return True
    frame = sys._getframe(1)
    while frame is not None and frame is not stop:
        code = frame.f_code
        kind = _KIND.get(id(code), _UNSEEN)
        if kind is _UNSEEN:
            kind = _kind(code)
        if kind or (kind is False and isinstance(frame.f_locals.get("ctx"), _FUNCTION_CONTEXT)):
            return True
        frame = frame.f_back
    return False


def entry() -> tuple:
    """What inside_checkpoint(since=...) needs of a call about to run, asked from the
    @contextmanager that starts it: the frame running its `with` statement (the first frame above
    that is neither a generator's, as that context manager and PeftModel's that enters it, nor
    contextlib's) and the checkpoint hooks in force. Keep it for the call only (it holds a frame)."""
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_flags & inspect.CO_GENERATOR
                                 or frame.f_code.co_filename == contextlib.__file__):
        frame = frame.f_back
    return frame, checkpoint_hooks()

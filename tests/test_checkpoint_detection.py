"""What miss_ext/_checkpointing.py takes for activation checkpointing, seen through PEFT's
`adapter_names=` call: a layer that a checkpoint recomputes in backward() runs again after the
call, without the names, so a names call with grad enabled inside a checkpoint is refused at the
forward; anything else that merely wraps the layer (a saved-tensor hook, a helper on a Function
class, a function whose first argument happens to be called ctx, a name bound to an instance)
must not be refused.

Each case here pins a mutation of the detection that no other test caught (mutation audit,
2026-12-04). The layer's input is made inside the wrapped block (as an MLP's down_proj), so the
layer's own recompute check, which follows the saved input, cannot stand in for the forward's.
"""
import gc

import pytest
import torch

pytest.importorskip("peft")
from peft import MissConfig, get_peft_model  # noqa: E402

import miss_ext._checkpointing as checkpointing  # noqa: E402
import miss_ext.peft  # noqa: E402
from conftest import NewStyleRecompute, Recompute, checkpointed_net  # noqa: E402

REFUSED = (r"^{}: adapter_names= cannot be combined with activation checkpointing with grad enabled: this layer runs "
           r"inside a checkpoint \(torch\.utils\.checkpoint, a wrapper built on it such as torch's checkpoint_wrapper, "
           r"or another library's\), whose recomputation in backward\(\) runs after this call, without the names")
NAMES = ["b", "b"]


def wrapped_net(wrap):
    """conftest.checkpointed_net in float64, whose forward is `wrap(block, x)` with `block`
    computing lin's input inside (as an MLP's down_proj)."""
    return checkpointed_net(lambda lin, x: wrap(lambda v: lin(v * 1.5), x), dtype=torch.float64)


# --- wrappers that are not checkpoints (module level: the detection resolves qualified names in
# the frame's module) ---

def under_save_on_cpu(f, x):
    with torch.autograd.graph.save_on_cpu():
        return f(x)


class Ops(torch.autograd.Function):
    """A Function class with a static helper besides its forward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad

    @staticmethod
    def run(f, x):
        return f(x)


def run_with_context(ctx, f, x):
    return f(x)


class Passthrough(torch.nn.Module):
    def forward(self, f, x):
        return f(x)


Passthrough = Passthrough()  # the class name now holds an instance (a singleton)


@pytest.mark.parametrize("wrap", [
    under_save_on_cpu,
    Ops.run,
    lambda f, x: run_with_context({}, f, x),
    lambda f, x: Passthrough(f, x),
], ids=["save_on_cpu", "static_helper_of_a_function", "ctx_argument_not_a_function_context",
        "module_name_bound_to_an_instance"])
def test_wrappers_that_are_not_checkpoints_are_accepted(wrap):
    """Not checkpoints, so a names call trains exactly what the unwrapped model trains:
    - save_on_cpu: only a non-reentrant checkpoint's saved-tensor hooks count, not any hooks (a
      mutant taking every pack hook refused this);
    - Ops.run: only a Function's `forward` counts, not another method of the class;
    - run_with_context({}, f, x): a first argument named ctx counts only when it is an
      autograd.Function context;
    - a module-level name bound to an instance (qualified name "Passthrough.forward"): not a class,
      so not a Function (a mutant without the isinstance guard raised TypeError in issubclass).
    Mutation audit, 2026-12-04 (C02, C05, C19, D01)."""
    x = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    model = wrapped_net(wrap)
    model(x, adapter_names=NAMES).sum().backward()
    reference = wrapped_net(lambda f, v: f(v))
    x_ref = x.detach().clone().requires_grad_()
    reference(x_ref, adapter_names=NAMES).sum().backward()
    got, want = model.base_model.model.lin.miss_block, reference.base_model.model.lin.miss_block
    assert got["a"].grad is None and want["a"].grad is None
    assert want["b"].grad.abs().sum() > 0
    torch.testing.assert_close(got["b"].grad, want["b"].grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=0)


class Outer:
    class Recompute(torch.autograd.Function):
        """A reentrant recompute with a new-style forward (no ctx) nested in a class: seen only by
        resolving the qualified name Outer.Recompute.forward (its own forward, so that it is the
        frame seen)."""

        @staticmethod
        def forward(fn, x):
            with torch.no_grad():
                return fn(x)

        setup_context = staticmethod(NewStyleRecompute.setup_context)
        backward = staticmethod(Recompute.backward)


@pytest.mark.parametrize("function", [Recompute, Outer.Recompute], ids=["ctx_style", "nested_new_style"])
def test_other_libraries_recomputes_are_refused(function):
    """Another library's reentrant checkpoint (a Function whose forward runs the block without
    grad and whose backward runs it again, as DeepSpeed's) around a layer whose input is made
    inside it: refused at the forward. Let through, the recompute ran the layer with the active
    adapter "a" ("b" got no gradient, silently): the names hook must not be torch-only (D04), and a
    nested Function's forward must be resolved through every part of its qualified name (C07).
    Mutation audit, 2026-12-04."""
    model = wrapped_net(function.apply)
    with pytest.raises(ValueError, match=REFUSED.format("AcceleratedMissLinear")):
        model(torch.randn(2, 8, dtype=torch.float64, requires_grad=True), adapter_names=NAMES)
    assert all(p.grad is None for p in model.parameters())


def test_a_ctx_style_function_defined_inside_a_function_is_refused():
    """A Function defined inside a function ("<locals>" in its qualified name, so not found in
    its module) with an old-style forward(ctx, ...): seen by its first argument, an autograd
    context. Without that check it passed and the recompute trained "a" for rows named "b"
    (mutation audit, 2026-12-04, C11)."""
    class LocalRecompute(torch.autograd.Function):
        @staticmethod
        def forward(ctx, fn, x):  # its own (a delegating one would show conftest's frame)
            ctx.fn = fn
            ctx.save_for_backward(x)
            with torch.no_grad():
                return fn(x)

        backward = staticmethod(Recompute.backward)

    model = wrapped_net(LocalRecompute.apply)
    with pytest.raises(ValueError, match=REFUSED.format("AcceleratedMissLinear")):
        model(torch.randn(2, 8, dtype=torch.float64, requires_grad=True), adapter_names=NAMES)
    assert all(p.grad is None for p in model.parameters())


def test_a_modules_to_save_module_inside_a_checkpoint_is_refused():
    """The refusal applies to every module the names call hooks, PEFT's modules_to_save wrapper
    too, not only the MiSS layers: here the MiSS layer runs outside the checkpoint and only the
    modules_to_save head inside a reentrant one, whose recompute would run the head with the
    active adapter's copy for rows named "b" (mutation audit, 2026-12-04, D06)."""
    from torch.utils.checkpoint import checkpoint

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8, dtype=torch.float64)
            self.head = torch.nn.Linear(8, 8, dtype=torch.float64)

        def forward(self, x):
            return checkpoint(lambda v: self.head(v * 1.5), self.lin(x), use_reentrant=True)

    model = get_peft_model(Net(), MissConfig(r=4, target_modules=["lin"], init_weights=False,
                                             modules_to_save=["head"]), adapter_name="a")
    model.add_adapter("b", MissConfig(r=4, target_modules=["lin"], init_weights=False, modules_to_save=["head"]))
    miss_ext.peft.accelerate(model).train()
    for name, p in model.named_parameters():
        p.requires_grad_("modules_to_save" in name)
    with pytest.raises(ValueError, match=REFUSED.format("ModulesToSaveWrapper")):
        model(torch.randn(2, 8, dtype=torch.float64, requires_grad=True), adapter_names=NAMES)
    assert all(p.grad is None for p in model.parameters())


SOURCE_FUNCTION = """
import torch
class F(torch.autograd.Function):
    @staticmethod
    def forward(fn, x):
        return fn(x)
"""
SOURCE_PLAIN = """
class G:
    @staticmethod
    def forward(fn, x):
        return fn(x)
"""


def test_a_dead_code_objects_cached_kind_goes_with_it():
    """The detection caches what each frame's code is, by id(code). When a code object dies its
    entry must go (a weak reference's callback): code made at run time (notebook cells, exec,
    generated functions) is freed and a new code object at the same address, here the forward of
    a plain class, inherited "the forward of an autograd.Function" and every layer call under it
    was taken for a checkpoint (mutation audit, 2026-12-04, C14/C15: the callback emptied, or the
    weak reference not kept)."""
    def probe(x):
        return checkpointing.inside_checkpoint()

    namespace = {}
    exec(SOURCE_FUNCTION, namespace)
    assert namespace["F"].forward(probe, 0)  # a Function's forward: taken for a checkpoint, cached
    dead = id(namespace["F"].forward.__code__)
    assert dead in checkpointing._KIND
    del namespace
    gc.collect()
    assert dead not in checkpointing._KIND
    kept = []  # allocate code objects of the same size until one lands at the dead one's address
    for _ in range(500):
        namespace = {}
        exec(SOURCE_PLAIN, namespace)
        kept.append(namespace)
        if id(namespace["G"].forward.__code__) == dead:
            assert not namespace["G"].forward(probe, 0)
            break

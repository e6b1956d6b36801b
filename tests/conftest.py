"""Shared fixtures of the miss_ext test suite.

- `device` (fixture) / `DEVICES` (params): "cpu" always; "cuda" marked to skip only when no GPU
  is visible. Nothing here ever skips on the CPU.
- `snapshot(model)` / `assert_unchanged(model, snap)`: a refused call changed nothing.
- `autocast_sensitive_inputs(weight, block, rows, rounded, amp_dtype)`: a layer input whose result
  under torch.autocast depends on which adapter operands are rounded to the autocast dtype.
- `poison(t)`: fill a tensor with NaN so an element a kernel forgets to write shows up.
- `poison_heap(numel, dtype, device)`: allocate NaN-filled blocks and free them, so that the next
  uninitialised allocation of that size (at::empty in a kernel wrapper) very likely starts as NaN
  rather than as lucky zeros.
- Every test starts from its own reproducible torch seed (derived from the test id).
- The TorchScript deprecation warnings of recent torch releases are silenced.
- The slowest files run first (SLOW_FILES_FIRST), so that parallel workers finish together.
- `--miss-part cuda` runs only the tests that need a GPU, `--miss-part rest` the others (is_gpu_test).
- `PACKAGE_PARENT`: the folder holding the miss_ext the tests import, for child processes (the
  checkout after an in-place build; site-packages when an installed copy, say from an sdist, is
  tested, where the checkout's own miss_ext/ has no compiled library).
"""
import os
import zlib
from pathlib import Path

import pytest
import torch

import miss_ext  # noqa: F401  (registers torch.ops.miss)

CUDA_AVAILABLE = torch.cuda.is_available()
PACKAGE_PARENT = Path(miss_ext.__file__).resolve().parents[1]
if PACKAGE_PARENT != Path(__file__).resolve().parents[1]:
    # An installed copy is under test (a wheel, an sdist's install): child processes that tests
    # start in the checkout (python -c, -m, with the checkout as cwd) would import its unbuilt
    # miss_ext/ first. PYTHONSAFEPATH keeps the current directory off their sys.path.
    os.environ.setdefault("PYTHONSAFEPATH", "1")

# The mark of every test (or parameter) that needs a GPU, and the device parameter of the tests that
# run on both devices.
needs_gpu = pytest.mark.skipif(not CUDA_AVAILABLE, reason="no CUDA device visible")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=needs_gpu)]


@pytest.fixture
def gloo_world(tmp_path):
    """A one-rank gloo process group in this process (FSDP2 on a CPU mesh, DDP wrappers)."""
    import torch.distributed as dist

    if not dist.is_available():  # pragma: no cover - CI's torch has it
        pytest.skip("torch.distributed is not available in this build")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def pytest_configure(config):
    # pytest-xdist's mark, known also where xdist is missing (scripts/gpu_check.sh: --dist loadgroup)
    config.addinivalue_line("markers", "xdist_group(name): tests that one xdist worker runs in turn")
    for line in (
        r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning",
        r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning",
        r"ignore:.*TorchScript.*deprecated:FutureWarning",
        r"ignore:.*TorchScript.*deprecated:DeprecationWarning",
        # transformers' own deprecation notice, raised by its training forward on tiny models
        r"ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
    ):
        config.addinivalue_line("filterwarnings", line)


# The files that take longest, first. scripts/test.sh gives each file to one pytest-xdist worker
# (--dist loadfile) in collection order (--no-loadscope-reorder: xdist would otherwise send the
# files with the most tests first, which put these, each of few tests, last, with one worker left
# running them alone). Measured with --durations on 2 cores, 2026-12-03: large_tensors 93-290 s,
# soak 67 s, fsdp 57 s, aoti 53 s, impl_choice 45 s, tensor_parallel 42 s, peft_accelerate 36 s,
# cuda_emulated 31 s (plus its compile), the demos 69 s; every other file under 25 s.
SLOW_FILES_FIRST = ("test_large_tensors.py", "test_soak.py", "test_fsdp.py", "test_aoti.py", "test_impl_choice.py",
                    "test_tensor_parallel.py", "test_cuda_emulated.py", "test_peft_accelerate.py",
                    "test_demo_mixed.py", "test_demo.py", "test_demo_user_model.py", "test_bat.py", "test_ddp.py")


# The reasons of the skip marks that mean "needs a GPU" (needs_gpu's, the `device` fixture's, ...).
GPU_SKIP_REASONS = ("no CUDA device visible", "CUDA not available", "needs a CUDA device")


def is_gpu_test(item) -> bool:
    """Whether a test is skipped where no GPU is visible (a skipif mark whose reason is one of
    GPU_SKIP_REASONS, the `device` fixture's "cuda" parameter included): the tests CI's CPU
    machines never run, which a lent GPU must run first (--miss-part cuda, scripts/gpu_check.sh)."""
    return any(any(r in str(mark.kwargs.get("reason", "")) for r in GPU_SKIP_REASONS)
               for mark in item.iter_markers("skipif"))


def pytest_addoption(parser):
    # A command-line option, not an environment variable: pytest-xdist hands it to its workers, and
    # the pytest runs some tests start in a child process do not inherit it.
    parser.addoption("--miss-part", choices=("cuda", "rest"), default=None,
                     help="cuda: only the tests that need a GPU (is_gpu_test); rest: only the others")
    parser.addoption("--miss-given-order", action="store_true",
                     help="run the files in the order given, not SLOW_FILES_FIRST's (scripts/gpu_check.sh's "
                          "memcheck: the newest kernels' tests first, in case its time limit stops it)")


def pytest_collection_modifyitems(session, config, items):
    """Runs SLOW_FILES_FIRST's files first (each file's tests keep their order; not with
    --miss-given-order). With
    --miss-part cuda only the tests that need a GPU run, with --miss-part rest only the others
    (scripts/gpu_check.sh: on a lent GPU, whose time is short, the GPU tests first)."""
    part = config.getoption("--miss-part")
    if part:
        chosen = [is_gpu_test(item) == (part == "cuda") for item in items]
        config.hook.pytest_deselected(items=[item for item, c in zip(items, chosen) if not c])
        items[:] = [item for item, c in zip(items, chosen) if c]

    def rank(item):
        name = item.path.name
        return SLOW_FILES_FIRST.index(name) if name in SLOW_FILES_FIRST else len(SLOW_FILES_FIRST)

    if not config.getoption("--miss-given-order"):
        items.sort(key=rank)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed_torch(request):
    """A distinct, reproducible seed per test (stable across runs and test orders)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill `t` in place with a value no kernel should produce (NaN for floating tensors)."""
    with torch.no_grad():
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        elif t.dtype == torch.bool:
            t.fill_(True)
        else:
            t.fill_(torch.iinfo(t.dtype).max)
    return t


def poison_heap(numel: int, dtype: torch.dtype = torch.float32, device="cpu", copies: int = 4) -> None:
    """Leave freed NaN-filled blocks of `numel` elements behind for the allocator to reuse."""
    blocks = [poison(torch.empty(max(numel, 1), dtype=dtype, device=device)) for _ in range(copies)]
    del blocks


def rand(*shape, dtype=torch.float32, device="cpu", low=0.25, high=1.5, requires_grad=False):
    """Random data that is never zero: magnitudes in [low, high) with random signs."""
    mag = torch.empty(shape, dtype=torch.float64).uniform_(low, high)
    sign = torch.randint(0, 2, shape, dtype=torch.float64) * 2 - 1
    return (mag * sign).to(dtype=dtype, device=device).requires_grad_(requires_grad)


BF16_ULP = 2.0 ** -7  # one unit in the last place of bf16, relative (at most; 7 stored bits)


def assert_within_ulp(got, want, what="", ulps=1, rounded_part=None):
    """|got - want| <= one bf16 ulp of want, elementwise (a rounding flipped by a tiny difference),
    plus fp32-sized noise for elements near zero (2^-20 of the largest: where the terms of a sum
    cancel, an fp32 accumulation's order moves the small result by more than its ulp). `rounded_part`:
    a term of the result that was rounded to bf16 on its own first (the base GEMM's part of dx), whose
    rounding may differ by one ulp of that part (not of the result: they differ where the sum
    cancels)."""
    got, want = got.to(torch.float64), want.to(torch.float64)
    noise = 2.0 ** -20 * want.abs().max().item() if want.numel() else 0.0
    excess = (got - want).abs() - ulps * BF16_ULP * want.abs() - noise
    if rounded_part is not None:
        excess = excess - BF16_ULP * rounded_part.to(torch.float64).abs()
    assert excess.numel() == 0 or excess.max().item() <= 1e-30, f"{what}: {excess.max().item():.3g} beyond one ulp"


def autocast_sensitive_inputs(weight, block, rows: int, rounded: str, amp_dtype) -> torch.Tensor:
    """An input x (rows, in) for a default/mini layer with this base weight (out, in) and block
    (r, out or mini_r), both float32 and overwritten here, on which the result under
    torch.autocast(amp_dtype) depends on whether `S @ D` rounds its operands to amp_dtype (issue 11;
    a few of amp_dtype's ulps of the output, the tolerance of a comparison, cannot tell on random
    data). Each row's fold is S = sign * (s, -s, small integers...) with s = 16 / eps(amp_dtype),
    and block rows 0 and 1 are (nearly) equal, so S @ D is a small difference of large products:
    - rounded="block": block row 0 is row 1 times 1 + eps/2 + eps/32, which amp_dtype rounds up to
      1 + eps; rows 0 and 1 then add about 16 |m| in amp_dtype, 8.5 |m| in float32 (m: row 1);
    - rounded="fold": rows 0 and 1 are equal and S[0] is sign * (s + 6), which amp_dtype rounds to
      sign * s (its spacing there is 16); rows 0 and 1 add 0 in amp_dtype, 6 |m| in float32.
    Everything else is exact in amp_dtype: block entries are +-1, +-1/2 or multiples of 1/4, x is
    integer valued, and the weight's columns 0 and 1 are zeroed so the base GEMM never sees +-s.
    Needs r >= 3 and in > r."""
    r, q = block.shape
    in_features = weight.shape[1]
    assert r >= 3 and in_features > r and rounded in ("block", "fold")
    eps = torch.finfo(amp_dtype).eps
    s = 16.0 / eps
    sign = (torch.randint(0, 2, (rows, 1)) * 2 - 1).float()
    m = (torch.randint(0, 2, (q,)) * 2 - 1).float() * torch.where(torch.rand(q) < 0.5, 1.0, 0.5)
    new_block = torch.randint(-4, 5, (r, q)).float() / 4
    new_block[1] = m
    new_block[0] = m * (1 + eps / 2 + eps / 32) if rounded == "block" else m
    x = torch.zeros(rows, in_features)
    noise = [i for i in range(2, in_features) if i % r >= 2]
    x[:, noise] = torch.randint(-3, 4, (rows, len(noise))).float()
    x[:, :2] = sign * torch.tensor([s, -s])
    if rounded == "fold":
        x[:, r:r + 1] = sign * 6.0
    with torch.no_grad():
        block.copy_(new_block)
        weight[:, :2] = 0.0
    return x.to(weight.device)


_SETTINGS = (bool, int, float, str, type(None))


def module_settings(model):
    """Each module's public attributes holding plain values, or lists/tuples of them (a
    MissLinear's dropout, r, mode, merged; training; PEFT's merged_adapters): settings that live
    outside the state_dict, which a failed call must leave alone too (a mutation round found a
    refused load that kept the file's dropout, 2026-12-07). Dicts and objects are not compared."""
    def plain(v):
        return isinstance(v, _SETTINGS) or (isinstance(v, (list, tuple)) and all(isinstance(e, _SETTINGS) for e in v))

    return {n: {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in vars(m).items()
                if not k.startswith("_") and plain(v)}
            for n, m in model.named_modules()}


def snapshot(model):
    """Everything a failed call must leave alone: module types, values, requires_grad flags and
    the modules' plain settings."""
    return ([(n, type(m)) for n, m in model.named_modules()],
            {n: t.clone() for n, t in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            module_settings(model))


def assert_unchanged(model, snap):
    """`model` is as `snapshot` saw it."""
    types, state, flags, settings = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[n], state[n]) for n in state)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert module_settings(model) == settings


def run_fwd_bwd(layer, block, x, grad_out=None):
    """Forward and backward of one layer; returns (y, x.grad, block.grad, grad_out)."""
    x = x.detach().clone().requires_grad_(True)
    block.grad = None
    y = layer(x)
    if grad_out is None:
        grad_out = torch.randn_like(y)
    y.backward(grad_out)
    return y.detach(), x.grad, block.grad.clone(), grad_out


def run_opcheck(op, samples):
    """torch.library.opcheck on each (name, args, kwargs) sample, naming the one that fails."""
    from torch.library import opcheck

    for name, args, kwargs in samples:
        try:
            opcheck(op, args, kwargs)
        except Exception as exc:  # name the sample that failed
            raise AssertionError(f"opcheck({op}) failed on sample {name!r}: {exc}") from exc


@pytest.fixture
def dynamo_reset():
    """A clean torch.compile state (caches and counters) before and after a test."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


class Recompute(torch.autograd.Function):
    """Reentrant activation checkpointing outside torch (as DeepSpeed's own): the forward runs fn
    without grad, the backward runs it again on the saved input. No torch.utils.checkpoint frame
    shows; miss_ext/_checkpointing.py sees it by the Function's forward frame."""

    @staticmethod
    def forward(ctx, fn, x):
        ctx.fn = fn
        ctx.save_for_backward(x)
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def backward(ctx, grad):
        x = ctx.saved_tensors[0].detach().requires_grad_()
        with torch.enable_grad():
            torch.autograd.backward(ctx.fn(x), grad)
        return None, x.grad


class NewStyleRecompute(torch.autograd.Function):
    """Recompute with a new-style forward (no ctx argument; setup_context saves the input)."""

    @staticmethod
    def forward(fn, x):
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.fn = inputs[0]
        ctx.save_for_backward(inputs[1])

    backward = staticmethod(Recompute.backward)


def checkpointed_net(checkpoint_fn, dtype=torch.float32):
    """An accelerated PEFT model in training with adapters "a" (active) and "b" on a linear `lin`
    that its forward runs through checkpoint_fn(lin, x); only the blocks trainable."""
    from peft import MissConfig, get_peft_model

    import miss_ext.peft

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8, dtype=dtype)

        def forward(self, x):
            return checkpoint_fn(self.lin, x)

    torch.manual_seed(0)
    model = get_peft_model(Net(), MissConfig(r=4, target_modules=["lin"], init_weights=False), adapter_name="a")
    model.add_adapter("b", MissConfig(r=4, target_modules=["lin"], init_weights=False))
    miss_ext.peft.accelerate(model).train()
    for name, p in model.named_parameters():
        p.requires_grad_("miss_block" in name)
    return model

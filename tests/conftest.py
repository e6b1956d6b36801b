"""Shared fixtures of the miss_ext test suite.

- `device` (fixture) / `DEVICES` (params): "cpu" always; "cuda" marked to skip only when no GPU
  is visible. Nothing here ever skips on the CPU.
- `snapshot(model)` / `assert_unchanged(model, snap)`: a refused call changed nothing.
- `poison(t)`: fill a tensor with NaN so an element a kernel forgets to write shows up.
- `poison_heap(numel, dtype, device)`: allocate NaN-filled blocks and free them, so that the next
  uninitialised allocation of that size (at::empty in a kernel wrapper) very likely starts as NaN
  rather than as lucky zeros.
- Every test starts from its own reproducible torch seed (derived from the test id).
- The TorchScript deprecation warnings of recent torch releases are silenced.
"""
import zlib

import pytest
import torch

import miss_ext  # noqa: F401  (registers torch.ops.miss)

CUDA_AVAILABLE = torch.cuda.is_available()

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not CUDA_AVAILABLE, reason="no CUDA device visible")),
]


def pytest_configure(config):
    for line in (
        r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning",
        r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning",
        r"ignore:.*TorchScript.*deprecated:FutureWarning",
        r"ignore:.*TorchScript.*deprecated:DeprecationWarning",
        # transformers' own deprecation notice, raised by its training forward on tiny models
        r"ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
    ):
        config.addinivalue_line("filterwarnings", line)


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


def snapshot(model):
    """Everything a failed call must leave alone: module types, values, requires_grad flags."""
    return ([(n, type(m)) for n, m in model.named_modules()],
            {n: t.clone() for n, t in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_unchanged(model, snap):
    """`model` is as `snapshot` saw it."""
    types, state, flags = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[n], state[n]) for n in state)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


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

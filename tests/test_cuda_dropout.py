"""Dropout on CUDA: tracing with fake CUDA tensors (runs without a GPU) and CUDA graphs (GPU).

The dropout key is an int64 tensor [seed, offset] on the data's device, read by the kernels where
it lives (csrc/ops/common/dropout_mask.h). So:

- FakeTensor, torch.compile and torch.export see a key on the same (fake) CUDA device as the
  data. These tests run on the CPU-only CI machine: the CUDA build of torch makes fake `cuda`
  tensors without a GPU, and the ops' fake kernels are the C++ Meta kernels. Forward only: the
  autograd engine touches the CUDA context for a CUDA backward, even a fake one, so backward
  tracing on CUDA is covered on a GPU (test_module.py's compile tests with the `cuda` parameter
  and the CUDA-graph test below).
- A CUDA graph that captures the key's draw (torch.randint on the device is graph-safe) draws a
  new key, hence a new mask, on every replay (GPU only).
"""
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import miss_ext
from conftest import needs_gpu

ops = torch.ops.miss

# Fake CUDA tensors need a CUDA build of torch, not a GPU. CI installs one (torch 2.14.1+cu130),
# so this never skips there; it skips on a CPU-only torch, where "cuda" cannot even be faked.
needs_cuda_torch = pytest.mark.skipif(torch.version.cuda is None, reason="CPU-only build of torch: no fake CUDA")


def _fake_cuda_layer(mode, mini_r, dropout):
    """A MissLinear built on fake CUDA tensors, in training mode."""
    base = nn.Linear(10, 20, device="cuda")
    return miss_ext.MissLinear(base, 3, mode=mode, mini_r=mini_r, dropout=dropout).train()


@needs_cuda_torch
def test_ops_with_a_device_key_trace_on_fake_cuda():
    """The issue's reproduction: a key on the data's device is accepted by FakeTensor (a CPU key
    of 2 elements beside CUDA tensors was a device mismatch)."""
    with FakeTensorMode():
        x = torch.empty(8, 16, device="cuda")
        key = miss_ext.new_dropout_key(x.device)
        assert key.device.type == "cuda" and key.shape == (2,)
        s = ops.fold(x, 4, 0.1, key, None)
        assert s.shape == (8, 4) and s.device.type == "cuda"
        out = torch.empty(8, 16, device="cuda")
        ops.tile_add_(out, s, 1.0, 0.1, key)
        w, b, blk = torch.empty(24, 16, device="cuda"), torch.empty(24, device="cuda"), torch.empty(4, 24, device="cuda")
        y = ops.linear(x, w, b, blk, 0.1, key)
        assert y.shape == (8, 24) and y.device.type == "cuda"
        # bf16 data with an fp32 block (PEFT's precision) and a 3-D input
        xh = torch.empty(2, 5, 16, device="cuda", dtype=torch.bfloat16)
        y = ops.linear(xh, w.bfloat16(), None, blk, 0.5, miss_ext.new_dropout_key(xh.device))
        assert y.shape == (2, 5, 24) and y.dtype == torch.bfloat16


@needs_cuda_torch
def test_fake_cuda_errors_name_the_devices():
    with FakeTensorMode():
        x = torch.empty(8, 16, device="cuda")
        with pytest.raises(Exception, match=r"(?i)device"):  # FakeTensor or the op's own check
            ops.fold(x, 4, 0.1, torch.zeros(2, dtype=torch.int64), None)
        with pytest.raises(ValueError, match=r"r=0\b"):
            ops.fold(x, 0, 0.0, None, None)


@needs_cuda_torch
@pytest.mark.parametrize("mode,mini_r", [("default", 1), ("mini", 5)])
def test_miss_linear_with_dropout_runs_on_fake_cuda(mode, mini_r):
    with FakeTensorMode():
        layer = _fake_cuda_layer(mode, mini_r, 0.1)
        y = layer(torch.empty(2, 7, 10, device="cuda"))
        assert y.shape == (2, 7, 20) and y.device.type == "cuda"


@needs_cuda_torch
@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_export_miss_linear_with_dropout_on_fake_cuda(strict):
    """torch.export of a training-mode MissLinear with dropout on CUDA: the key is drawn on the
    device inside the graph, and the miss op takes it."""
    from torch.export import Dim

    with FakeTensorMode(allow_non_fake_inputs=False):
        layer = _fake_cuda_layer("default", 1, 0.1)
        x = torch.empty(6, 10, device="cuda")
        ep = torch.export.export(layer, (x,), strict=strict, dynamic_shapes={"x": {0: Dim("rows", min=2)}})
    nodes = [n for n in ep.graph.nodes if n.op == "call_function"]
    names = [str(n.target) for n in nodes]
    assert any(n.startswith("miss.linear") for n in names), names
    draws = [n for n in nodes if "randint" in str(n.target)]
    assert draws, f"the key is not drawn inside the graph: {names}"
    assert all(str(n.kwargs.get("device")) == "cuda" or "cuda" in str(n.meta["val"].device) for n in draws)
    linear = next(n for n in nodes if str(n.target).startswith("miss.linear"))
    assert linear.meta["val"].device.type == "cuda"


def _to_fake_cuda(value):
    """A fake CUDA tensor with the value's sizes, strides, dtype and requires_grad (call inside a
    FakeTensorMode); other values unchanged."""
    if not isinstance(value, torch.Tensor):
        return value
    t = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="cuda")
    return t.requires_grad_(value.requires_grad)


@needs_cuda_torch
@pytest.mark.parametrize("op_name", ["fold", "tile_add_", "linear", "merge", "merge_"])
def test_fake_cuda_kernels_match_the_real_kernels_metadata(op_name):
    """The fake-tensor part of opcheck, on CUDA, without a GPU. (opcheck itself returns at once
    when its inputs are fake, so it cannot be fed fake CUDA samples: it would pass vacuously.)
    Every opcheck sample of the op, dropout ones included, is run by the real CPU kernel and by
    the fake kernel on fake CUDA copies of its inputs (the key too): same shapes, strides and
    dtypes, and the output on the CUDA device."""
    from test_opcheck import fold_samples, linear_samples, merge_samples, tile_add_samples

    samples = {"fold": fold_samples, "tile_add_": tile_add_samples, "linear": linear_samples,
               "merge": lambda d: merge_samples(d, grad=False), "merge_": lambda d: merge_samples(d, grad=False)}
    op = getattr(ops, op_name).default
    for name, args, kwargs in samples[op_name]("cpu"):
        with torch.no_grad():
            real_args = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
            real = op(*real_args, **kwargs)
            real = real_args[0] if real is None else real  # in-place ops: their first argument
        with FakeTensorMode():
            fake_args = [_to_fake_cuda(a) for a in args]
            fake_kwargs = {k: _to_fake_cuda(v) for k, v in kwargs.items()}
            fake = op(*fake_args, **fake_kwargs)
            fake = fake_args[0] if fake is None else fake
        what = f"{op_name} sample {name!r}"
        assert fake.device.type == "cuda", what
        assert (fake.shape, fake.stride(), fake.dtype) == (real.shape, real.stride(), real.dtype), what


@needs_cuda_torch
@pytest.mark.parametrize("mode,mini_r", [("default", 1), ("mini", 5)])
def test_compile_traces_dropout_on_fake_cuda(mode, mini_r, dynamo_reset):
    """torch.compile(fullgraph=True, dynamic=True) of a training-mode MissLinear with dropout on
    (fake) CUDA: one graph, no break, the key drawn by torch.randint on the device and passed to
    miss.linear, a second batch size without recompiling; then AOTAutograd (aot_eager) runs the
    forward through the Meta kernels and functionalisation (under no_grad: an AOTAutograd joint
    graph on CUDA needs the CUDA context, so the backward is checked on a GPU)."""
    from torch._dynamo.utils import counters

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with FakeTensorMode(allow_non_fake_inputs=True):
        layer = _fake_cuda_layer(mode, mini_r, 0.1)
        compiled = torch.compile(layer, backend=record, fullgraph=True, dynamic=True)
        y = compiled(torch.empty(6, 10, device="cuda"))
        assert y.shape == (6, 20) and y.device.type == "cuda"
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert compiled(torch.empty(9, 10, device="cuda")).shape == (9, 20)
        assert len(graphs) == 1 and not counters["graph_break"]
        nodes = [n for n in graphs[0].graph.nodes if n.op == "call_function"]
        draw = next(n for n in nodes if n.target is torch.randint)
        assert draw.kwargs["device"].type == "cuda", draw.kwargs
        linear = next(n for n in nodes if "miss.linear" in str(n.target))
        assert linear.args[5] is draw, "miss.linear does not take the key drawn on the device"

        torch._dynamo.reset()
        with torch.no_grad():
            aot = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=True)
            y = aot(torch.empty(5, 10, device="cuda"))
        assert y.shape == (5, 20) and y.device.type == "cuda"


# ---------------------------------------------------------------------------------------------
# a real GPU
# ---------------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("mode,mini_r", [("default", 1), ("mini", 4)])
def test_cuda_graph_replays_draw_a_fresh_mask_equal_to_eager(mode, mini_r, monkeypatch):
    """Capture a training step (forward + backward) of a MissLinear with dropout in a CUDA graph.
    Each replay must draw a new key, hence a new mask, and give exactly what eager gives with
    that replay's key."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    p = 0.5
    layer = miss_ext.MissLinear(nn.Linear(64, 96, device=dev), 8, mode=mode, mini_r=mini_r, dropout=p,
                                init_weights=False).train()
    x = torch.randn(32, 64, device=dev, requires_grad=True)
    g = torch.randn(32, 96, device=dev)
    last_key = torch.zeros(2, dtype=torch.int64, device=dev)
    draw = miss_ext.modules.new_dropout_key

    def recording_draw(device=None):
        k = draw(device)
        last_key.copy_(k)  # a device copy: captured, so replays record their own key
        return k

    monkeypatch.setattr(miss_ext.modules, "new_dropout_key", recording_draw)

    def step():
        y = layer(x)
        y.backward(g)
        return y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, as torch.cuda.graph requires
        for _ in range(3):
            x.grad = None
            layer.miss_block.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    x.grad = None
    layer.miss_block.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = step()

    w, b, blk = layer.base_layer.weight, layer.base_layer.bias, layer.miss_block.detach()
    seen = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        key = last_key.clone()
        got = (y_static.detach().clone(), x.grad.clone(), layer.miss_block.grad.clone())
        xe = x.detach().clone().requires_grad_(True)
        be = blk.clone().requires_grad_(True)
        ye = ops.linear(xe, w, b, be, p, key)
        ye.backward(g)
        for name, a, e in zip(("y", "x.grad", "miss_block.grad"), got, (ye.detach(), xe.grad, be.grad)):
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6, msg=lambda m: f"replay vs eager, {name}: {m}")
        seen.append((key.cpu(), got[0].cpu()))
    keys = [tuple(k.tolist()) for k, _ in seen]
    assert len(set(keys)) == len(keys), f"replays reused a key: {keys}"
    assert not torch.equal(seen[0][1], seen[1][1]) and not torch.equal(seen[1][1], seen[2][1]), \
        "replays drew the same mask"

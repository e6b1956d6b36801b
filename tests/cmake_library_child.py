"""Run by test_cmake_library.py in a fresh interpreter: loads the CMake-built op library with
torch.ops.load_library, never importing miss_ext (one process must not register the `miss`
namespace twice), and checks that the library alone gives the ops with autograd and meta kernels.

Usage: python cmake_library_child.py <libmiss_ext.so>
Prints the registered dispatch keys as one JSON line, then OK; any failure raises. Last, it checks
that `import miss_ext` then refuses (ImportError) rather than registering the namespace twice.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference import F64, linear_ref  # noqa: E402  (plain torch, no miss_ext)

KEYS = ("CPU", "CUDA", "Meta", "Autograd", "AutocastCPU", "AutocastCUDA")


def check_linear():
    """Forward and backward of miss.linear (mini mode, in % r != 0) against the float64 reference."""
    x = torch.randn(4, 3, 20, requires_grad=True)
    w, b = torch.randn(12, 20), torch.randn(12)
    block = torch.randn(6, 4, requires_grad=True)  # r=6 does not divide in=20; mini_r=4
    y = torch.ops.miss.linear(x, w, b, block)
    g = torch.randn_like(y)
    y.backward(g)

    x64 = x.detach().to(F64).requires_grad_(True)
    block64 = block.detach().to(F64).requires_grad_(True)
    y64 = linear_ref(x64, w.to(F64), b.to(F64), block64)
    y64.backward(g.to(F64))
    torch.testing.assert_close(y, y64.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block.grad, block64.grad.float(), rtol=1e-5, atol=1e-5)


def check_bat_linear():
    """bat_linear's gradient w.r.t. the block against autograd through plain torch, float64."""
    r, out_f, in_f = 4, 8, 12
    x = torch.randn(5, in_f, dtype=F64)
    w, b = torch.randn(out_f, in_f, dtype=F64), torch.randn(out_f, dtype=F64)
    block = (0.3 * torch.randn(out_f // r, r, r, dtype=F64)).requires_grad_(True)

    def plain(blk):
        tiles = w.view(out_f // r, r, in_f // r, r).permute(0, 2, 1, 3)  # (i, j, r, r): W_ij
        wp = tiles + tiles @ blk[:, None] + blk[:, None]                   # W_ij + W_ij B_i + B_i
        return x @ wp.permute(0, 2, 1, 3).reshape(out_f, in_f).T + b

    torch.testing.assert_close(torch.ops.miss.bat_linear(x, w, b, block), plain(block))
    g = torch.randn(5, out_f, dtype=F64)
    (grad,) = torch.autograd.grad(torch.ops.miss.bat_linear(x, w, b, block), block, g)
    (grad_ref,) = torch.autograd.grad(plain(block), block, g)
    torch.testing.assert_close(grad, grad_ref)


def check_meta():
    """Meta kernels: shapes without data, and symbolic ones under torch.export (dynamic batch)."""
    x = torch.empty(7, 3, 20, device="meta")
    y = torch.ops.miss.linear(x, torch.empty(12, 20, device="meta"), None, torch.empty(6, 4, device="meta"))
    assert y.device.type == "meta" and y.shape == (7, 3, 12), y.shape
    y = torch.ops.miss.bat_linear(torch.empty(7, 12, device="meta"), torch.empty(8, 12, device="meta"), None,
                                  torch.empty(2, 4, 4, device="meta"))
    assert y.shape == (7, 8), y.shape

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.blk = torch.nn.Parameter(torch.randn(12, 20)), torch.nn.Parameter(torch.randn(6, 12))

        def forward(self, x):
            return torch.ops.miss.linear(x, self.w, None, self.blk)

    # torch.export runs the meta (fake) kernels with a symbolic batch and keeps the op whole.
    batch = torch.export.Dim("batch", min=2, max=64)
    ep = torch.export.export(Layer(), (torch.randn(5, 20),), dynamic_shapes={"x": {0: batch}}, strict=False)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.miss.linear.default], targets
    out = [n for n in ep.graph.nodes if n.op == "output"][0].args[0][0]
    assert isinstance(out.meta["val"].shape[0], torch.SymInt), out.meta["val"].shape


def main(library):
    torch.ops.load_library(library)
    assert "miss_ext" not in sys.modules, "the child must not import the Python package"
    info = torch.ops.miss.build_info()
    assert "backends=CPU" in info and f"built_with_torch={torch.__version__.split('+')[0]}" in info, info
    check_linear()
    check_bat_linear()
    check_meta()
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("miss::"))
    keys = {n: [k for k in KEYS if torch._C._dispatch_has_kernel_for_dispatch_key(n, k)] for n in names}
    assert "miss_ext" not in sys.modules
    # Importing the package now would register the namespace a second time (which aborts the
    # process inside torch): it refuses with an ImportError instead.
    try:
        import miss_ext  # noqa: F401
        refused = None
    except ImportError as exc:
        refused = str(exc)
    assert refused is not None and "already registered" in refused, refused
    print(json.dumps({"build_info": info, "keys": keys}))
    print("OK")


if __name__ == "__main__":
    main(sys.argv[1])

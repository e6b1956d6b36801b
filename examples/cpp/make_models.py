"""Writes the inputs of the C++ serving examples (serve_torchscript.cpp, serve_aoti.cpp):

  <out>/miss_model.pt     TorchScript of a small model with MissLinear layers in all three modes
  <out>/miss_model.pt2    the same model exported with a dynamic batch and compiled by
                          AOTInductor for CPU (skipped with --no-aoti)
  <out>/miss_expected.pt  TorchScript container of the test data: input x, output y, upstream
                          gradient grad_y, the gradients Python's autograd computed for x and for
                          every miss_block (dict `grads`, keyed by parameter name), and a second
                          input x2 / output y2 at another batch size

Usage: python examples/cpp/make_models.py <out dir> [--no-aoti]
Runs with the setup.py-built miss_ext; the C++ programs then link the CMake-built library (a
separate process: one process must never register the `miss` namespace twice).
"""
import os
import warnings
from typing import Dict

import torch
from torch import Tensor, nn

import miss_ext

# TorchScript is deprecated on torch >= 2.13 (still supported): keep the output readable.
warnings.filterwarnings("ignore", message=".*(TorchScript|torch\\.jit).*deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*(TorchScript|torch\\.jit).*deprecated", category=DeprecationWarning)


class ThreeModes(nn.Module):
    """default -> mini -> bat; r=5 on 48 inputs leaves a partial shard (48 % 5 != 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.l_default = miss_ext.MissLinear(nn.Linear(32, 48), r=8, init_weights=False)
        self.l_mini = miss_ext.MissLinear(nn.Linear(48, 40), r=5, mode="mini", mini_r=10, init_weights=False)
        self.l_bat = miss_ext.MissLinear(nn.Linear(40, 24), r=8, mode="bat", init_weights=False)
        with torch.no_grad():  # random, clearly non-zero blocks: every adapter path matters
            for layer in (self.l_default, self.l_mini, self.l_bat):
                layer.miss_block.uniform_(-0.3, 0.3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.l_default(x))
        h = torch.tanh(self.l_mini(h))
        return self.l_bat(h)


class Expected(nn.Module):
    grads: Dict[str, Tensor]

    def __init__(self, tensors: Dict[str, Tensor], grads: Dict[str, Tensor]) -> None:
        super().__init__()
        for name, value in tensors.items():
            self.register_buffer(name, value)
        self.grads = grads

    def forward(self) -> Tensor:  # TorchScript wants one; the C++ side reads the attributes
        return self.x


def main(out_dir: str, aoti: bool = True) -> None:
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(2409)
    model = ThreeModes().eval()
    x = torch.randn(4, 3, 32, requires_grad=True)  # (batch, seq, in): leading dims are flattened
    y = model(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    assert sorted(grads) == ["l_bat.miss_block", "l_default.miss_block", "l_mini.miss_block"], sorted(grads)

    x2 = torch.randn(9, 3, 32)
    with torch.no_grad():
        y2 = model(x2)

    torch.jit.save(torch.jit.script(model), os.path.join(out_dir, "miss_model.pt"))
    tensors = {"x": x.detach(), "y": y.detach(), "grad_y": grad_y, "grad_x": x.grad.detach(), "x2": x2, "y2": y2}
    torch.jit.save(torch.jit.script(Expected(tensors, grads)), os.path.join(out_dir, "miss_expected.pt"))
    written = ["miss_model.pt", "miss_expected.pt"]
    if aoti:
        batch = torch.export.Dim("batch", min=2, max=64)  # x has batch 4, x2 batch 9
        ep = torch.export.export(model, (x.detach(),), dynamic_shapes={"x": {0: batch}})
        torch._inductor.aoti_compile_and_package(ep, package_path=os.path.join(out_dir, "miss_model.pt2"))
        written.append("miss_model.pt2")
    print(f"wrote {', '.join(written)} to {out_dir} (miss_ext from {miss_ext.__file__})")


if __name__ == "__main__":
    import argparse

    # argparse: a bare "--help" or "--no-aoti" was taken for the output folder (a new-user review).
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("out_dir", help="folder to write the files into (made if missing)")
    ap.add_argument("--no-aoti", action="store_true", help="skip the AOTInductor package (miss_model.pt2)")
    args = ap.parse_args()
    main(args.out_dir, aoti=not args.no_aoti)

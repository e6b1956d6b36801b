"""AOTInductor round trip on CPU: export a model with MissLinear layers (all three modes, dynamic
batch), compile it to a .pt2 package, load the package and compare with eager at two batch sizes.

The compiled code calls the miss ops through the dispatcher (AOTInductor's proxy executor for
C++ custom ops), so the loading process needs the op library: here the imported miss_ext; a C++
server links the CMake-built library instead (README, "Deploy without Python")."""
import zipfile

import torch
from torch.export import Dim

from deploy_models import IN_FEATURES, ThreeModes


def test_aoti_package_round_trip(tmp_path):
    model = ThreeModes().eval()
    x = torch.randn(5, 3, IN_FEATURES)
    ep = torch.export.export(model, (x,), dynamic_shapes={"x": {0: Dim("batch", min=2, max=64)}}, strict=False)

    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "miss_three_modes.pt2"))
    # The package calls the hand-written kernels by op name. Inductor traces miss.linear through
    # its C++ autograd, which is a composition of dispatcher calls (miss.fold, a GEMM,
    # miss.tile_add_; README "Design decisions"), so fold and tile_add_ appear rather than linear.
    with zipfile.ZipFile(path) as package:
        text = b"".join(package.read(n) for n in package.namelist() if n.endswith(".json"))
    for op in (b"miss::fold", b"miss::tile_add_", b"miss::bat_linear"):
        assert b'"target": "' + op + b'"' in text, op

    runner = torch._inductor.aoti_load_package(path)
    for batch in (3, 17):  # neither is the traced batch size
        xb = torch.randn(batch, 3, IN_FEATURES)
        with torch.no_grad():
            expected = model(xb)
        torch.testing.assert_close(runner(xb), expected, rtol=1e-5, atol=1e-5)

"""Determinism and threads (issue 13, "Reliability").

- Under torch.use_deterministic_algorithms(True) every op's forward and backward is bitwise
  repeatable (the kernels use no atomics: the CPU kernels give each row to one thread, the CUDA
  fold reduces in a fixed tree).
- Python threads that run forward+backward on modules shared between them give the results of
  sequential runs. Dropout keys come from torch's default generator, which threads share: a
  thread's keys then depend on the interleaving, so with dropout only the distribution is
  reproducible across threads, not the masks (README, "The ops"). A key passed explicitly is
  reproducible in any thread.
"""
import threading

import pytest
import torch
from torch import nn

import miss_ext
from conftest import rand

ops = torch.ops.miss


def _fwd_bwd_all_ops(device):
    """Outputs and gradients of every differentiable op on fixed random inputs."""
    torch.manual_seed(0)
    key = torch.tensor([5, 7], dtype=torch.int64, device=device)
    x = rand(64, 37, device=device, requires_grad=True)
    w, b = rand(24, 37, device=device), rand(24, device=device)
    blk = rand(5, 24, device=device, requires_grad=True)
    mini = rand(5, 6, device=device, requires_grad=True)
    bat_w, bat_b = rand(24, 36, device=device), (rand(6, 4, 4, device=device) * 0.1).requires_grad_(True)
    xb = rand(64, 36, device=device, requires_grad=True)
    outs = [ops.fold(x, 5, 0.3, key), ops.linear(x, w, b, blk, 0.3, key), ops.linear(x, w, b, mini),
            ops.tile_add(rand(64, 24, device=device), blk[:1].expand(64, 24).contiguous(), 1.0, 0.2, key),
            ops.merge(w, blk), ops.bat_weight(bat_w, bat_b), ops.bat_linear(xb, bat_w, b, bat_b)]
    loss = sum((o.float() ** 2).sum() for o in outs)
    grads = torch.autograd.grad(loss, (x, blk, mini, bat_b, xb))
    return [o.detach() for o in outs] + list(grads)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device visible"))])
def test_every_op_is_bitwise_repeatable_under_deterministic_algorithms(device):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = _fwd_bwd_all_ops(device)
        for _ in range(3):
            again = _fwd_bwd_all_ops(device)
            for i, (a, b) in enumerate(zip(first, again)):
                assert torch.equal(a, b), f"result {i} differs between repeated runs"
    finally:
        torch.use_deterministic_algorithms(previous)


def test_threads_on_shared_modules_equal_sequential_runs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 16))
    miss_ext.apply_miss(model, ["0", "2"], r=4, init_weights=False)
    inputs = [rand(20, 32, requires_grad=True) for _ in range(8)]

    def run(x):
        y = model(x)
        gx, g0, g2 = torch.autograd.grad(y.square().sum(), (x, model[0].miss_block, model[2].miss_block))
        return y.detach(), gx, g0, g2

    expected = [run(x) for x in inputs]
    results = [None] * len(inputs)

    def worker(i):
        for _ in range(5):
            results[i] = run(inputs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    for i, (got, want) in enumerate(zip(results, expected)):
        for a, b in zip(got, want):
            assert torch.equal(a, b), f"thread {i} differs from the sequential run"


def test_an_explicit_key_gives_the_same_mask_in_any_thread():
    x = rand(16, 40)
    key = torch.tensor([3, 9], dtype=torch.int64)
    want = ops.fold(x, 4, 0.5, key)
    got = []
    threads = [threading.Thread(target=lambda: got.append(ops.fold(x, 4, 0.5, key))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(got) == 6 and all(torch.equal(g, want) for g in got)


def test_a_second_copy_of_the_package_is_refused_not_an_abort(tmp_path):
    """A vendored copy of miss_ext under another name, imported after miss_ext (or miss_ext under a
    second name): its _C would register the `miss` namespace again, which aborts the process inside
    torch (a review, 2026-12-05: SIGABRT, since the guard looked for "miss_ext._C" by that literal
    name). Now an ImportError naming the cause, and the first copy keeps working."""
    import os
    import shutil
    import subprocess
    import sys

    shutil.copytree(os.path.dirname(miss_ext.__file__), tmp_path / "miss_ext_vendored",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import sys, torch, miss_ext\n"
            f"sys.path.insert(0, {str(tmp_path)!r})\n"
            "try:\n"
            "    import miss_ext_vendored\n"
            "    print('imported')\n"
            "except ImportError as e:\n"
            "    print('refused:', e)\n"
            "x = torch.randn(3, 8)\n"
            "print('works:', miss_ext.ops.fold(x, 4).shape == (3, 4))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path)
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
    assert "refused: the miss ops are already registered in this process (by another copy of miss_ext" in run.stdout, \
        run.stdout
    assert "works: True" in run.stdout, run.stdout

"""Runs a function on several CPU ranks (gloo), each in its own process, for the distributed tests.

    results = run_ranks(fn, world_size=2, args=(...,))   # [fn's return value on rank 0, rank 1, ...]

`fn(rank, world_size, *args)` must be a module-level function of an importable module (the
children are spawned, not forked: torch and gloo do not survive a fork safely). The process
group is initialised with a file store in a fresh temporary folder before `fn` runs and
destroyed after. Return values travel back through torch.save, so tensors are fine. Bounded in
time: a rank that has not finished after `timeout` seconds is killed and the test fails, naming
it; a rank that raises fails the test with its traceback.
"""
import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

TESTS = str(Path(__file__).resolve().parent)


def _entry(fn, rank, world_size, folder, args):
    import torch.distributed as dist

    out = Path(folder) / f"rank{rank}.pt"
    try:
        torch.set_num_threads(1)  # 2 ranks on this 2-core machine
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world_size)
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        torch.save({"ok": True, "result": result}, out)
    except BaseException:  # noqa: BLE001 - reported to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, out)


def run_ranks(fn, world_size: int = 2, args=(), timeout: float = 600.0):
    """fn(rank, world_size, *args) on `world_size` gloo ranks; returns the ranks' results."""
    os.environ["PYTHONPATH"] = os.pathsep.join([TESTS] + [p for p in sys.path if p])  # the children import fn
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        procs = [ctx.Process(target=_entry, args=(fn, rank, world_size, folder, args)) for rank in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if hung:
            raise AssertionError(f"ranks {hung} did not finish within {timeout} s")
        results = []
        for rank, p in enumerate(procs):
            path = Path(folder) / f"rank{rank}.pt"
            if not path.exists():
                raise AssertionError(f"rank {rank} died with exit code {p.exitcode} before reporting")
            report = torch.load(path, weights_only=False)
            if not report["ok"]:
                raise AssertionError(f"rank {rank} failed:\n{report['error']}")
            results.append(report["result"])
        return results

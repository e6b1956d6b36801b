"""Measurements shared by the mixed-adapter benchmarks: interleaved timing, and the peak memory
a call allocates beyond what exists before it.

Timing: every rep runs each case once, in an order reshuffled per rep (seeded), after one
warm-up rep; per case the median time, and the median over reps of (case / baseline) within the
same rep (the machine is shared and noisy, so ratios from one rep beat ratios of medians). CUDA:
events around each call.

Memory:
CPU: PyTorch's profiler memory timeline (`profile_memory=True`), which sees every allocation and
free of PyTorch's CPU allocator, including those inside the miss kernels; the peak is the highest
running sum of created minus destroyed bytes. CUDA: torch.cuda.max_memory_allocated around the
call. The result the call returns counts (it is alive at the end).
"""
import argparse
import contextlib
import json
import os
import random
import statistics
import tempfile
import time
from typing import Callable, Dict, Optional, Tuple

import torch


CUDA_LEAD_CYCLES = 1_000_000  # torch.cuda._sleep before a timed call: ~0.5 ms at an H200's 1.98 GHz


# argparse types of the benchmarks' flags: a bad value exits 2 with a message naming it, before any
# work (rather than a traceback from inside a measurement, or after a whole run for --json).
def _int_at_least(text: str, least: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    return _int_at_least(text, 0, "0 or a positive integer")


def device_arg(text: str) -> str:
    """A torch device string this process can use: cpu, or cuda[:N] with such a GPU visible."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return text


def shapes_arg(text: str) -> list:
    """'INxOUT,INxOUT' -> [(in, out), ...], each a positive integer."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"expected INxOUT with positive integers (e.g. 4096x11008), got {item!r}")
        shapes.append((int(parts[0]), int(parts[1])))
    return shapes


def json_path_arg(text: str) -> str:
    """An output path whose folder exists (or can be made) and is writable, checked up front."""
    folder = os.path.dirname(os.path.abspath(text))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{text}: cannot create its folder ({exc.strerror})") from None
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: is a folder; give a file path")
    try:  # a real write: os.access says yes to root even where nothing can be created (/proc)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{text}: cannot write in {folder} ({exc.strerror})") from None
    return text


def add_common_arguments(ap, reps: int) -> None:
    """The flags both mixed-adapter benchmarks take: --r, --adapters, --reps, --device, --dtype, --json."""
    ap.add_argument("--r", type=positive_int, default=64)
    ap.add_argument("--adapters", type=positive_int, default=16)
    ap.add_argument("--reps", type=positive_int, default=reps)
    ap.add_argument("--device", type=device_arg, default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--json", type=json_path_arg, help="also write the figures here")


def interleaved_medians(cases: Dict[str, Callable], reps: int, device: torch.device,
                        baseline: str) -> Tuple[Dict[str, float], Dict[str, float]]:
    """({case: median ms}, {case: median of case / baseline per rep})."""
    times = {k: [] for k in cases}
    ratios = {k: [] for k in cases}
    order = list(cases)
    rng = random.Random(0)
    for rep in range(reps + 1):
        rng.shuffle(order)
        this = {}
        for name in order:
            if device.type == "cuda":
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                # Keep the GPU busy while the host enqueues `start` and the case's launches:
                # after a synchronize the GPU is idle, so `start` would be stamped at once and
                # the case's host overhead (Python, dispatch, launch: 10-30 us) timed with its
                # kernels, a large share of a 20 us fold.
                torch.cuda._sleep(CUDA_LEAD_CYCLES)
                start.record()
                cases[name]()
                end.record()
                torch.cuda.synchronize()
                this[name] = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                cases[name]()
                this[name] = (time.perf_counter() - t0) * 1e3
        if rep == 0:
            continue  # warm-up
        for name in cases:
            times[name].append(this[name])
            ratios[name].append(this[name] / this[baseline])
    return ({k: statistics.median(v) for k, v in times.items()},
            {k: statistics.median(v) for k, v in ratios.items()})


def peak_mib(fn, device: torch.device) -> float:
    """MiB: the largest amount of `device` memory alive at once that `fn()` allocated."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    now = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            now += size
        elif action == Action.DESTROY:
            now -= size
        peak = max(peak, now)
    return peak / 2**20


def report(result: dict, digits: int, json_path=None) -> None:
    """Prints the per-case table (median ms, ratio to single, peak MiB) and how much faster the
    mixed batch is than the other mixed-batch cases; writes `result` as JSON if asked."""
    ms, ratio, peaks = result["median_ms"], result["median_ratio_vs_single"], result["peak_mib_allocated"]
    print(f"{'case':<8} {'median ms':>10} {'x single':>9} {'peak MiB':>9}")
    for k in ms:
        print(f"{k:<8} {ms[k]:>10.{digits}f} {ratio[k]:>9.3f} {peaks[k]:>9.1f}")
    print("mixed against the other mixed-batch cases (their time / mixed's: above 1 = mixed is faster): "
          f"gathered (c) {ratio['gathered'] / ratio['mixed']:.2f}x, masked (c') {ratio['masked'] / ratio['mixed']:.2f}x, "
          f"split (b) {ratio['split'] / ratio['mixed']:.2f}x")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)


def _set_environment(values: Dict[str, Optional[str]]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextlib.contextmanager
def environment(overrides: Dict[str, Optional[str]]):
    """os.environ with `overrides` applied (None: unset) inside the block, restored after: the
    MISS_EXT_* implementation choices are read by the ops at each call (csrc/ops/impl_choice.h)."""
    old = {k: os.environ.get(k) for k in overrides}
    try:
        _set_environment(overrides)
        yield
    finally:
        _set_environment(old)

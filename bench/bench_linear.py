#!/usr/bin/env python
"""Forward+backward time and memory of ONE adapted linear layer: miss_ext vs PEFT MiSS vs PEFT LoRA.

Run from the repository root (the venv active):

    python bench/bench_linear.py                        # CPU defaults: T=4096, 2048x2048, r=64, fp32
    python bench/bench_linear.py --reps 30 --json bench/out/cpu.json
    python bench/bench_linear.py --cases 'miss*,peft_miss*'   # "frozen" is always included
    python bench/bench_linear.py --cases 'miss_bat,peft_miss_bat'   # the bat cases only (+ frozen)
    python bench/bench_linear.py --paired --no-peak     # frozen between every two cases (bursty load)
    python bench/bench_linear.py --preset gpu           # cuda, bf16, T=8192, 4096x4096 and 4096x11008
    python bench/bench_linear.py --list-cases

Cases (each on its own deep copy of ONE seeded nn.Linear, frozen, with bias; x requires grad
so dx is computed as inside a network; every module is in train mode):

    frozen           the frozen nn.Linear alone: the baseline every ratio is taken against
    miss             miss_ext.MissLinear, default mode, block (r, out)
    miss_drop        same with dropout p (default 0.1)
    miss_mini        mini mode, block (r, mini_r), mini_r=64
    miss_bat         bat mode, block (out/r, r, r): W' = W_ij (I + B_i) + B_i per r x r tile; no dropout
                     (bat ignores it, as PEFT); skipped when r does not divide in and out
    peft_miss*       PEFT's MiSS for the same four configs (get_peft_model on a wrapper module;
                     peft_miss_bat = MissConfig(init_weights="bat", r=r))
    case@variant     the case with one step forced onto another implementation (csrc/ops/impl_choice.h):
                     miss@fp32, miss_drop@fp32 (adapter GEMMs in fp32 instead of the split-bf16
                     tensor-core path that "auto" takes on CUDA for a bf16 layer), miss_mini@split
                     (mini on the split path), miss_bat@kernel (W' by the hand-written kernel instead
                     of the batched GEMM), miss@before, miss_drop@before, miss_mini@before (the
                     adapter term written first and the base GEMM adding onto it, beta = 1, instead of
                     a pass over y and dx after it: MISS_EXT_ADAPTER_TERM; with dropout only y's,
                     dx's mask is drawn by tile_add_ after the GEMM), miss@high (under
                     torch.set_float32_matmul_precision("high"): the split path's fp32 operands in two
                     bf16 parts instead of three); included by default with --device cuda only
    lora*            PEFT's LoRA with the same trainable-parameter count: default r*out params ->
                     rank round(r*out/(in+out)); mini r*mini_r params -> rank max(1, round(r*mini_r/(in+out)));
                     lora_drop uses lora_dropout p.  lora_alpha = rank (scaling 1).

All adapter weights (miss_block, lora_B) are random and non-zero, so nothing is short-circuited;
the two MiSS implementations of one config get the same block values.  The bat blocks are
0.01 * randn (seeded), small so that W' = W (I + B) + B stays close to W (a uniform +-1/sqrt(r)
block would add a weight-sized perturbation and change the output scale).  PEFT layers are called
directly (peft_model.base_model.model.lin), not through PeftModel.forward, so its hook/context
overhead is not charged to it.

Timing: one process, interleaved repetitions: for each rep the case order is reshuffled (seeded)
and every case runs one fwd+bwd (y = layer(x); y.backward(g) with a fixed random g).  Gradients
are set to None outside the timed region (like optimizer.zero_grad(set_to_none=True)), so every
timed backward allocates its gradients.  CPU: time.perf_counter around the call (autograd on CPU
is synchronous).  CUDA: synchronize, CUDA events around the call, synchronize.  We report each
case's median time and the median over reps of (case time / frozen time in the same rep): the
machine is shared and noisy, and the per-rep ratio cancels slow phases that hit all cases.
--paired runs the frozen layer between every two cases (F c1 F c2 ... F) and divides each case by
the mean of its two neighbours: better when the load comes in bursts shorter than a rep.  "min ms"
and "min/min" (fastest case run / fastest frozen run) are printed too: contention only ever adds
time, so on a busy machine they are the least load-sensitive view.  torch's default thread count
is kept (printed in the header).

Memory:
  saved MiB  - bytes kept for backward: every tensor packed by torch.autograd.graph.saved_tensors_hooks
               during the forward, deduplicated by storage, summed as the storage's nbytes,
               excluding the module's parameters (matched by storage data_ptr: W, b, miss_block,
               lora weights and views of them such as W.t()).  x itself counts when an op saves it.
               "+saved" is that minus the frozen baseline's, i.e. what the adapter adds.
  peak MiB   - CUDA: torch.cuda.max_memory_allocated() - memory_allocated() over one fwd+bwd (after
               reset_peak_memory_stats, grads set to None first, so dx/dblock allocations count).
               CPU: each case runs in a fresh subprocess of this script (hidden flag --_peak-case):
               build the case, one full-size warm-up fwd+bwd, grads to None, gc, then reset the
               kernel's peak-RSS counter (write "5" to /proc/self/clear_refs, Linux >= 4.0), read
               VmRSS, run one fwd+bwd, read VmHWM: peak = VmHWM_after - VmRSS_before.  If the reset
               is refused, the fallback is max(VmHWM, ru_maxrss) after minus VmRSS before, and the
               row is marked "~": that also covers the warm-up's and the setup's peaks, so it is an
               upper bound (close when the warm-up peaked like the measured run).  The subprocess sets
               MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ so glibc hands freed buffers back
               to the OS (otherwise the warm-up's freed memory is reused invisibly and the peak
               is under-reported).  RSS also counts allocator/library scratch, so CPU peaks are
               coarser than CUDA's.

Interpretation (the issue's targets, fwd+bwd vs the frozen linear):
  miss       <= 1.06x      miss_mini <= 1.04x      miss_drop <= 1.12x
  and each faster than its PEFT counterpart (peft_miss, peft_miss_mini, peft_miss_drop).
  Saved activations with dropout: target <= T*r floats + the 16-byte key beyond the frozen layer
  (T=4096, r=64 fp32: 1 MiB), vs PEFT's ~33 MiB (it keeps the T x in dropout mask and more).
  bat: miss_bat <= 1.53x and faster than peft_miss_bat (PEFT measured 1.59x on CPU, T=4096,
  2048x2048, r=64, fp32).  Saved activations: PEFT keeps ~64 MiB there (x 32 MiB + W' 16 MiB +
  a contiguous copy of W's tiles for its batched W_ij @ B_i 16 MiB); the target is x alone (32 MiB):
  the block gradient needs G' = G^T x, so x must be kept, but W' must not be (it is rebuilt or not
  needed in the backward).  The targets line reports both cases' saved MiB, x's MiB, and whether any
  saved tensor other than x (after excluding parameters and views of them, W included) is weight-sized
  (numel >= out*in); for ours it also checks saved bytes == x's bytes.
  The "Targets" section printed under each table checks these.

Portability: runs unchanged on torch 2.11 without internet; without peft the PEFT/LoRA cases
are skipped with a note; a case whose setup or first run raises (e.g. a CPU-only miss_ext build
asked for --device cuda) is skipped with a note instead of ending the run.
"""
import argparse
import contextlib
import copy
import datetime
import fnmatch
import gc
import json
import math
import os
import platform
import random
import resource
import shlex
import statistics
import subprocess
import sys
import time
import warnings

import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import (CUDA_LEAD_CYCLES, device_arg, environment, json_path_arg, nonnegative_int,  # noqa: E402
                     positive_int, shapes_arg)

MISS_ERR = None
try:
    import miss_ext
except ImportError:
    sys.path.insert(0, REPO)
    try:
        import miss_ext
    except Exception as exc:  # pragma: no cover
        miss_ext = None
        MISS_ERR = f"{type(exc).__name__}: {exc}"

PEFT_ERR = None
try:
    import peft
    from peft import LoraConfig, MissConfig, get_peft_model
except Exception as exc:  # peft missing or too old (no MissConfig)
    peft = None
    PEFT_ERR = f"{type(exc).__name__}: {exc}"

CASES = [
    "frozen",
    "miss", "miss_drop", "miss_mini", "miss_bat",
    "peft_miss", "peft_miss_drop", "peft_miss_mini", "peft_miss_bat",
    "lora", "lora_drop", "lora_mini",
    # The same layer forced onto the other implementation of a step (csrc/ops/impl_choice.h), to
    # compare both in one run: by default only with --device cuda, where "auto" differs from them.
    "miss@fp32", "miss_drop@fp32", "miss_mini@split", "miss_bat@kernel",
    "miss@before", "miss_drop@before", "miss_mini@before", "miss@high",
    # The forward under torch.autocast(bf16) (issue 11: "under autocast, default <= 1.15x"); by
    # default only with --device cuda, like the variants above. With --preset gpu the layer is
    # already bf16, so autocast changes only the adapter: S @ D runs in bf16 as PEFT's does under
    # autocast, instead of PEFT's fp32 precision. The frozen bf16 layer it is compared with is the
    # same with or without autocast. (An fp32 model under autocast would add weight casts to both.)
    # The bat pair: autocast makes bat_linear round W' (built from the fp32 block) to bf16 and run
    # its GEMM in bf16 (the opt-in compute_dtype), where PEFT's autocast F.linear casts its fp32 W'
    # to bf16: the README's bf16 bat speed, unmeasured until a GPU runs these (a README
    # fact-check, 2026-12-07).
    "miss@autocast", "peft_miss@autocast", "miss_bat@autocast", "peft_miss_bat@autocast",
]
# case suffix -> environment set around its forward and backward (read by the ops at each call)
VARIANT_ENV = {"fp32": {"MISS_EXT_GEMM": "fp32"}, "split": {"MISS_EXT_GEMM": "split"},
               "kernel": {"MISS_EXT_BAT_TRANSFORM": "kernel"}, "before": {"MISS_EXT_ADAPTER_TERM": "before"},
               "autocast": {}, "high": {}}
# case suffix -> torch.set_float32_matmul_precision around its forward and backward: "high" (TF32
# allowed) cuts the split path's fp32 operands into two bf16 parts instead of three (split_gemm.h),
# three part products for S D instead of six: what PEFT-level fp32 accuracy costs at "highest".
VARIANT_PRECISION = {"high": "high"}
# (family, config) per case; config in {"default", "drop", "mini", "bat"}
CASE_KIND = {
    "frozen": ("frozen", None),
    "miss": ("miss", "default"), "miss_drop": ("miss", "drop"), "miss_mini": ("miss", "mini"),
    "miss_bat": ("miss", "bat"),
    "peft_miss": ("peft_miss", "default"), "peft_miss_drop": ("peft_miss", "drop"),
    "peft_miss_mini": ("peft_miss", "mini"), "peft_miss_bat": ("peft_miss", "bat"),
    "lora": ("lora", "default"), "lora_drop": ("lora", "drop"), "lora_mini": ("lora", "mini"),
}
CASE_KIND.update({n: CASE_KIND[n.split("@")[0]] for n in CASES if "@" in n})
# the issue's targets: ratio vs frozen, and the PEFT case it must beat
TARGETS = {"miss": (1.06, "peft_miss"), "miss_mini": (1.04, "peft_miss_mini"), "miss_drop": (1.12, "peft_miss_drop"),
           "miss_bat": (1.53, "peft_miss_bat")}
# Issue 11's targets on a GPU (H200, bf16, --preset gpu): ratio vs frozen, or (bat) time vs PEFT's.
GPU_TARGETS = {"miss": 1.20, "miss_mini": 1.12, "miss_drop": 1.25, "miss@autocast": 1.15}
GPU_BAT_VS_PEFT = 0.8
GPU_PEAK_OVER_FROZEN_MIB = 16
BAT_SCALE = 0.01  # bat blocks: BAT_SCALE * randn, so W' = W (I + B) + B stays near W

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
MiB = float(1 << 20)
PEAK_MARK = "@@PEAK@@"


# ----------------------------------------------------------------------------------------------
# building the cases

class AutocastForward(nn.Module):
    """The layer's forward under torch.autocast(bf16); the backward runs outside it, as in a
    training loop."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.inner(x)


class Wrap(nn.Module):
    """The module PEFT's get_peft_model is applied to: it holds the Linear as `.lin`."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def lora_rank(cfg, r, mini_r, fin, fout):
    if cfg == "mini":
        return max(1, int(round(r * mini_r / (fin + fout))))
    return max(1, int(round(r * fout / (fin + fout))))


def random_like(t, seed):
    """Deterministic non-zero values, uniform in +-1/sqrt(last dim), generated on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(max(1, t.shape[-1]))
    vals = (torch.rand(t.shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound
    return vals.to(device=t.device, dtype=t.dtype)


def small_randn_like(t, seed, scale=BAT_SCALE):
    """Deterministic scale * randn values (bat blocks), generated on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    vals = torch.randn(t.shape, generator=gen, dtype=torch.float32) * scale
    return vals.to(device=t.device, dtype=t.dtype)


def block_values(t, cfg, seed):
    return small_randn_like(t, seed) if cfg == "bat" else random_like(t, seed)


def make_base(fin, fout, device, dtype, seed):
    torch.manual_seed(seed)
    base = nn.Linear(fin, fout, bias=True)
    base = base.to(device=device, dtype=dtype)
    base.requires_grad_(False)
    return base


def build_case(name, proto, a, fin, fout):
    """Returns dict(module=callable layer, params=[all params], trainable=int, what=str)."""
    family, cfg = CASE_KIND[name]
    base = copy.deepcopy(proto)
    p = a.dropout if cfg == "drop" else 0.0
    seed = a.seed + 1000 + {None: 0, "default": 0, "drop": 1, "mini": 2, "bat": 3}[cfg]  # miss / peft_miss of a config match
    if family == "frozen":
        mod, what = base, "frozen nn.Linear"
    elif family == "miss":
        if miss_ext is None:
            raise RuntimeError(f"miss_ext not importable: {MISS_ERR}")
        mode = cfg if cfg in ("mini", "bat") else "default"
        mod = miss_ext.MissLinear(base, a.r, mode=mode, mini_r=a.mini_r if mode == "mini" else 1,
                                  dropout=p, init_weights=True)
        with torch.no_grad():
            mod.miss_block.copy_(block_values(mod.miss_block, cfg, seed))
        what = f"miss_ext {mode}" + (f" mini_r={a.mini_r}" if mode == "mini" else "") + (f" p={p}" if p else "")
    elif family == "peft_miss":
        if peft is None:
            raise RuntimeError(f"peft not importable: {PEFT_ERR}")
        init = cfg if cfg in ("mini", "bat") else True
        conf = MissConfig(r=a.r, mini_r=a.mini_r if cfg == "mini" else 1, init_weights=init,
                          miss_dropout=p, target_modules=["lin"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(Wrap(base), conf)
        mod = pm.base_model.model.lin
        mod.to(proto.weight.device)  # device only: keep PEFT's fp32 adapter dtype
        blk = mod.miss_block["default"]
        with torch.no_grad():
            blk.copy_(block_values(blk, cfg, seed))
        what = f"PEFT MiSS init={init!r}" + (f" mini_r={a.mini_r}" if cfg == "mini" else "") + (f" p={p}" if p else "")
    elif family == "lora":
        if peft is None:
            raise RuntimeError(f"peft not importable: {PEFT_ERR}")
        rank = lora_rank(cfg, a.r, a.mini_r, fin, fout)
        conf = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=p, target_modules=["lin"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(Wrap(base), conf)
        mod = pm.base_model.model.lin
        mod.to(proto.weight.device)
        lb = mod.lora_B["default"].weight
        with torch.no_grad():
            lb.copy_(random_like(lb, seed + 7))
        what = f"PEFT LoRA rank={rank}" + (f" p={p}" if p else "")
    else:  # pragma: no cover
        raise ValueError(name)
    what += f" [{name.split('@')[1]}]" if "@" in name else ""
    if name.endswith("@autocast"):
        mod = AutocastForward(mod)
    mod.train()
    mod._bench_env = VARIANT_ENV[name.split("@")[1]] if "@" in name else {}
    mod._bench_precision = VARIANT_PRECISION.get(name.split("@")[1]) if "@" in name else None
    params = list(mod.parameters())
    trainable = sum(q.numel() for q in params if q.requires_grad)
    return {"module": mod, "params": params, "trainable": trainable, "what": what}


# ----------------------------------------------------------------------------------------------
# measuring

def clear_grads(case, x):
    x.grad = None
    for q in case["params"]:
        q.grad = None


@contextlib.contextmanager
def case_env(mod):
    """The case's environment (VARIANT_ENV) and fp32 matmul precision (VARIANT_PRECISION) around a
    forward and its backward."""
    precision = getattr(mod, "_bench_precision", None)
    with environment(getattr(mod, "_bench_env", {})):
        if precision is None:
            yield
            return
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(precision)
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(old)


# The PEFT case each miss_ext case computes the same layer as (same config and block values).
PEFT_COUNTERPART = {"default": "peft_miss", "drop": "peft_miss_drop", "mini": "peft_miss_mini", "bat": "peft_miss_bat"}
# Agreement tolerance relative to the largest output, per base dtype: PEFT rounds the adapter term
# on its own where ours is added with one rounding (a few ulps of the output in half precision).
AGREE_RTOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def check_agreement(cases, x, dtype):
    """Before anything is measured: each miss_ext case gives its PEFT counterpart's output in eval
    mode (no dropout) on the first rows of x, and the adapters change the frozen layer's output by
    more than that difference, so the compared cases really compute the same adapted layer."""
    rows = x[:256].detach()

    def output(name):
        mod = cases[name]["module"]
        was_training = mod.training
        mod.eval()
        with torch.no_grad(), case_env(mod):
            y = mod(rows).float()
        mod.train(was_training)
        return y

    frozen = output("frozen")
    for name in cases:
        family, cfg = CASE_KIND[name]
        peer = None if family != "miss" else PEFT_COUNTERPART[cfg] + ("@autocast" if name.endswith("@autocast") else "")
        if peer not in cases:
            continue
        ours, theirs = output(name), output(peer)
        diff = (ours - theirs).abs().max().item()
        effect = (theirs - frozen).abs().max().item()
        tol = AGREE_RTOL[dtype] * max(1.0, theirs.abs().max().item())
        if diff > tol or not effect > diff:
            raise SystemExit(f"{name} and {peer} do not compute the same layer: outputs {diff:.3e} apart (tolerance "
                             f"{tol:.1e}), adapter effect {effect:.3e}; a timing of them would compare nothing")


def fwd_bwd(mod, x, g):
    with case_env(mod):
        y = mod(x)
        y.backward(g)


def saved_activation_bytes(case, x, g):
    """Sum of unique storages saved for backward during one forward, parameters excluded."""
    param_ptrs = {q.untyped_storage().data_ptr() for q in case["params"]}
    x_ptr = x.untyped_storage().data_ptr()
    seen = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            ptr, nbytes = st.data_ptr(), st.nbytes()
        except Exception:  # tensors without a plain storage: not counted
            return t
        if ptr not in param_ptrs:
            key = (ptr, str(t.device))
            if key not in seen:
                seen[key] = {"nbytes": nbytes, "shape": list(t.shape), "numel": t.numel(),
                             "dtype": str(t.dtype).replace("torch.", ""), "is_x": ptr == x_ptr}
        return t

    clear_grads(case, x)
    with case_env(case["module"]):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = case["module"](x)
        y.backward(g)
    del y
    clear_grads(case, x)
    return sum(v["nbytes"] for v in seen.values()), list(seen.values())


def cuda_peak_bytes(case, x, g):
    clear_grads(case, x)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fwd_bwd(case["module"], x, g)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    clear_grads(case, x)
    return peak


def proc_status_kib():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0])
    return out


def reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_child(a, fin, fout):
    """Hidden mode: build one case in this fresh process, report peak RSS growth of one fwd+bwd."""
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    proto = make_base(fin, fout, device, dtype, a.seed)
    case = build_case(a._peak_case, proto, a, fin, fout)
    del proto
    x, g = make_inputs(a, fin, fout, device, dtype)
    fwd_bwd(case["module"], x, g)  # warm-up at full size: library scratch, thread pools, first-touch
    clear_grads(case, x)
    gc.collect()
    did_reset = reset_hwm()
    s0 = proc_status_kib()
    fwd_bwd(case["module"], x, g)
    s1 = proc_status_kib()
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    hwm = s1["VmHWM"] if did_reset else max(s1["VmHWM"], ru)
    res = {"case": a._peak_case, "peak_bytes": (hwm - s0["VmRSS"]) * 1024, "exact": did_reset,
           "rss_before_kib": s0["VmRSS"], "hwm_before_kib": s0["VmHWM"], "hwm_after_kib": s1["VmHWM"],
           "rss_after_kib": s1["VmRSS"], "ru_maxrss_kib": ru}
    print(PEAK_MARK + json.dumps(res), flush=True)


def cpu_peak_subprocess(name, a, fin, fout):
    cmd = [sys.executable, os.path.abspath(__file__), "--_peak-case", name,
           "--device", a.device, "--dtype", a.dtype, "-T", str(a.T), "--in-features", str(fin),
           "--out-features", str(fout), "-r", str(a.r), "--mini-r", str(a.mini_r),
           "--dropout", str(a.dropout), "--seed", str(a.seed), "--grad", a.grad]  # every flag make_inputs reads
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # fixed threshold: big buffers are mmap'd and
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "131072")  # unmapped on free, so RSS tracks live memory
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.peak_timeout)
    except subprocess.TimeoutExpired:
        return None, "timeout"
    for line in cp.stdout.splitlines():
        if line.startswith(PEAK_MARK):
            return json.loads(line[len(PEAK_MARK):]), None
    tail = (cp.stderr or cp.stdout).strip().splitlines()[-1:] or ["no output"]
    return None, f"rc={cp.returncode}: {tail[0][:200]}"


def make_inputs(a, fin, fout, device, dtype):
    gen = torch.Generator().manual_seed(a.seed + 1)
    x = torch.randn(a.T, fin, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    g = torch.randn(a.T, fout, generator=gen).to(device=device, dtype=dtype)
    if a.grad == "expanded":  # what y.sum().backward() delivers: one value, stride 0
        g = torch.ones((), device=device, dtype=dtype).expand(a.T, fout)
    return x, g


def time_cases(cases, x, g, a, device):
    """Interleaved repetitions.  Returns (times, ratios): per case, the timed fwd+bwd seconds and
    the per-rep ratios to the frozen layer.  Default: every rep runs each case once in a reshuffled
    order; ratio = case / frozen of the same rep.  --paired: every rep runs frozen between all cases
    (F c1 F c2 ... cn F, cases reshuffled); ratio = case / mean of the two frozen runs around it."""
    others = [n for n in cases if n != "frozen"]
    times = {n: [] for n in cases}
    ratios = {n: [] for n in cases}
    rng = random.Random(a.seed)
    cuda = device.type == "cuda"
    if cuda:
        ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def one(n):
        case = cases[n]
        clear_grads(case, x)  # outside the timed region
        if cuda:
            torch.cuda.synchronize()
            torch.cuda._sleep(CUDA_LEAD_CYCLES)  # hide the launch latency (bench/measure.py)
            ev0.record()
            fwd_bwd(case["module"], x, g)
            ev1.record()
            torch.cuda.synchronize()
            return ev0.elapsed_time(ev1) / 1e3
        t0 = time.perf_counter()
        fwd_bwd(case["module"], x, g)
        return time.perf_counter() - t0

    gc.collect()
    gc_was = gc.isenabled()
    gc.disable()
    t_start = time.perf_counter()
    try:
        for rep in range(a.warmup + a.reps):
            keep = rep >= a.warmup
            if a.paired:
                rng.shuffle(others)
                f_prev = one("frozen")
                rep_t = {"frozen": [f_prev]}
                for n in others:
                    t = one(n)
                    f_next = one("frozen")
                    rep_t["frozen"].append(f_next)
                    rep_t[n] = [t]
                    if keep:
                        ratios[n].append(t / (0.5 * (f_prev + f_next)))
                    f_prev = f_next
                if keep:
                    for n, ts in rep_t.items():
                        times[n].extend(ts)
                    ratios["frozen"].append(1.0)
            else:
                order = ["frozen"] + others
                rng.shuffle(order)
                rep_t = {n: one(n) for n in order}
                if keep:
                    for n, t in rep_t.items():
                        times[n].append(t)
                        ratios[n].append(t / rep_t["frozen"])
            clear_grads(cases["frozen"], x)
            for n in others:
                clear_grads(cases[n], x)
            gc.collect()
            if a.progress:
                print(f"  rep {rep + 1}/{a.warmup + a.reps}{'' if keep else ' (warm-up)'} "
                      f"{time.perf_counter() - t_start:.0f}s", file=sys.stderr, flush=True)
    finally:
        if gc_was:
            gc.enable()
    return times, ratios


def quantile(v, q):
    s = sorted(v)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# ----------------------------------------------------------------------------------------------
# one shape

def run_shape(a, fin, fout, device, dtype, wanted):
    print(f"\n## T={a.T}, in={fin}, out={fout}, r={a.r}, mini_r={a.mini_r}, dropout p={a.dropout}, "
          f"dtype={a.dtype}, device={device}")
    notes = []
    proto = make_base(fin, fout, device, dtype, a.seed)
    x, g = make_inputs(a, fin, fout, device, dtype)
    cases = {}
    for name in wanted:
        fam = CASE_KIND[name][0]
        if fam in ("peft_miss", "lora") and peft is None:
            notes.append(f"skipped {name}: peft not available ({PEFT_ERR})")
            continue
        if fam == "miss" and miss_ext is None:
            notes.append(f"skipped {name}: miss_ext not importable ({MISS_ERR})")
            continue
        if fam == "miss" and CASE_KIND[name][1] == "mini" and fout % a.mini_r:
            notes.append(f"skipped {name}: mini_r={a.mini_r} does not divide out={fout}")
            continue
        if CASE_KIND[name][1] == "bat" and (fin % a.r or fout % a.r):
            notes.append(f"skipped {name}: bat needs r={a.r} to divide in={fin} and out={fout}")
            continue
        try:
            case = build_case(name, proto, a, fin, fout)
            fwd_bwd(case["module"], x, g)  # trial run: a failing case is dropped, not fatal
            if device.type == "cuda":
                torch.cuda.synchronize()  # surface asynchronous kernel errors here
            clear_grads(case, x)
        except Exception as exc:
            if name == "frozen":
                raise
            notes.append(f"skipped {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            continue
        cases[name] = case
    for n in notes:
        print(f"> note: {n}")
    check_agreement(cases, x, dtype)

    # memory first (short), then timing
    res = {n: {"what": c["what"], "trainable": c["trainable"]} for n, c in cases.items()}
    for n, c in cases.items():
        sb, detail = saved_activation_bytes(c, x, g)
        res[n]["saved_bytes"], res[n]["saved_detail"] = sb, detail
    if a.no_peak:
        pass
    elif device.type == "cuda":
        for n, c in cases.items():
            res[n]["peak_bytes"], res[n]["peak_exact"] = cuda_peak_bytes(c, x, g), True
    else:
        for n in cases:
            r, err = cpu_peak_subprocess(n, a, fin, fout)
            if r is None:
                print(f"> note: peak for {n} failed: {err}")
            else:
                res[n]["peak_bytes"], res[n]["peak_exact"] = r["peak_bytes"], r["exact"]
                res[n]["peak_raw"] = r

    t0 = time.perf_counter()
    times, ratios = time_cases(cases, x, g, a, device)
    wall = time.perf_counter() - t0
    for n in cases:
        rs = ratios[n]
        res[n].update(times_s=times[n], ratios=rs, median_ms=statistics.median(times[n]) * 1e3,
                      min_ms=min(times[n]) * 1e3, ratio_median=statistics.median(rs),
                      ratio_p25=quantile(rs, 0.25), ratio_p75=quantile(rs, 0.75),
                      ratio_of_mins=min(times[n]) / min(times["frozen"]))

    print_table(res, cases)
    print(f"\n{a.reps} interleaved reps (+{a.warmup} warm-up) of {len(cases)} cases took {wall:.0f}s.")
    print_targets(res, a, fin, fout, x)
    for n in cases:
        cases[n]["module"] = None
    return {"T": a.T, "in": fin, "out": fout, "r": a.r, "mini_r": a.mini_r, "dropout": a.dropout,
            "notes": notes, "timing_wall_s": wall, "cases": res}


def print_table(res, cases):
    base_saved = res["frozen"]["saved_bytes"]
    print()
    print("| case | what | trainable | median ms | vs frozen | ratio p25-p75 | min ms | min/min | saved MiB "
          "| +saved MiB | peak MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in CASES:
        if n not in cases:
            continue
        r = res[n]
        peak = r.get("peak_bytes")
        peak_s = "n/a" if peak is None else (("" if r.get("peak_exact", True) else "~") + f"{peak / MiB:.1f}")
        print(f"| {n} | {r['what']} | {r['trainable']:,} | {r['median_ms']:.2f} | {r['ratio_median']:.3f}x "
              f"| {r['ratio_p25']:.3f}-{r['ratio_p75']:.3f} | {r['min_ms']:.2f} | {r['ratio_of_mins']:.3f}x "
              f"| {r['saved_bytes'] / MiB:.2f} "
              f"| {(r['saved_bytes'] - base_saved) / MiB:+.2f} | {peak_s} |")


def describe_saved(detail):
    """'shape dtype MiB' of each saved storage, x marked."""
    if not detail:
        return "nothing"
    return ", ".join(f"{'x ' if d.get('is_x') else ''}{tuple(d['shape'])} {d['dtype']} {d['nbytes'] / MiB:.1f}"
                     for d in detail)


def weight_sized_saved(detail, x, fin, fout):
    """Saved storages (parameters and their views already excluded, so W never appears) that are
    weight-sized (numel >= out*in) and are neither x nor an x-shaped copy/cast of it."""
    return [d for d in detail
            if not d.get("is_x") and d["shape"] != list(x.shape) and d.get("numel", 0) >= fin * fout]


def print_targets(res, a, fin, fout, x):
    lines = []
    base_saved = res["frozen"]["saved_bytes"]
    for n, (limit, peft_case) in TARGETS.items():
        if n not in res:
            continue
        ratio = res[n]["ratio_median"]
        ok = ratio <= limit
        s = (f"- {n}: {ratio:.3f}x vs target <= {limit:.2f}x: "
             + ("met" if ok else f"MISSED by {ratio - limit:+.3f}x ({(ratio / limit - 1) * 100:+.1f}%)"))
        if peft_case in res:
            # per-rep time ratio against the PEFT case, median over reps (same noise-cancelling as vs frozen)
            vs = statistics.median(t / u for t, u in zip(res[n]["ratios"], res[peft_case]["ratios"]))
            s += (f"; vs {peft_case} ({res[peft_case]['ratio_median']:.3f}x): {vs:.3f}x its time -> "
                  + ("faster" if vs < 1 else "NOT faster"))
        lines.append(s)
    if "miss_drop" in res:
        extra = res["miss_drop"]["saved_bytes"] - base_saved
        limit = a.T * a.r * 4 + 16
        s = (f"- miss_drop +saved {extra / MiB:.3f} MiB vs target <= T*r*4B + key = {limit / MiB:.3f} MiB: "
             + ("met" if extra <= limit else "MISSED"))
        if "peft_miss_drop" in res:
            s += f"; peft_miss_drop +saved {(res['peft_miss_drop']['saved_bytes'] - base_saved) / MiB:.2f} MiB"
        lines.append(s)
    x_bytes = x.untyped_storage().nbytes()
    for n in ("miss_bat", "peft_miss_bat"):
        if n not in res:
            continue
        sb, detail = res[n]["saved_bytes"], res[n]["saved_detail"]
        heavy = weight_sized_saved(detail, x, fin, fout)
        s = (f"- {n} saved {sb / MiB:.2f} MiB [{describe_saved(detail)}]; weight-sized besides W: "
             + ("none" if not heavy else "YES: " + describe_saved(heavy)))
        if n == "miss_bat":
            s += (f"; target = x alone ({x_bytes / MiB:.2f} MiB): "
                  + ("met (saved bytes == x's bytes)" if sb == x_bytes and not heavy else
                     f"MISSED (saved - x = {(sb - x_bytes) / MiB:+.2f} MiB)"))
        lines.append(s)
    if x.is_cuda:
        lines += gpu_target_lines(res)
    if lines:
        gpu = ", ".join(f"<={limit:.2f}x {n}" for n, limit in GPU_TARGETS.items())
        print("\nTargets (issue): <=1.06x default, <=1.04x mini, <=1.12x dropout, <=1.53x bat, each faster than PEFT;"
              + (f" GPU (issue 11): {gpu}, bat <={GPU_BAT_VS_PEFT}x PEFT's time, peak <= frozen + "
                 f"{GPU_PEAK_OVER_FROZEN_MIB} MiB" if x.is_cuda else ""))
        # The issues set them for one configuration each; elsewhere met/MISSED is only a hint.
        issue_config = ((8192, 4096, "bfloat16") if x.is_cuda else (4096, 2048, "float32"))
        if (a.T, fin, DTYPES[a.dtype], a.r) != (issue_config[0], issue_config[1], DTYPES[issue_config[2]], 64) \
                or fout not in ((issue_config[1], 11008) if x.is_cuda else (issue_config[1],)):
            print(f"(set for T={issue_config[0]}, in={issue_config[1]}, {issue_config[2]}, r=64"
                  f"{' (--preset gpu)' if x.is_cuda else ' (the defaults)'}: this run differs, so met/MISSED below "
                  "only hints)")
        print("\n".join(lines))


def gpu_target_lines(res):
    """Issue 11's GPU targets, one line each ("- gpu ..."), from the figures of this shape."""
    lines = []
    for n, limit in GPU_TARGETS.items():
        if n in res:
            ratio = res[n]["ratio_median"]
            lines.append(f"- gpu {n}: {ratio:.3f}x vs target <= {limit:.2f}x: " + ("met" if ratio <= limit else "MISSED"))
    # The adapter term written before the base GEMM (MISS_EXT_ADAPTER_TERM=before), against the
    # same case's target: what "auto" would give if it took that order (linear.cpp).
    for n, variant, how in (("miss", "before", "MISS_EXT_ADAPTER_TERM=before"),
                            ("miss_drop", "before", "MISS_EXT_ADAPTER_TERM=before"),
                            ("miss_mini", "before", "MISS_EXT_ADAPTER_TERM=before"),
                            ("miss", "high", 'two bf16 parts: float32 matmul precision "high"')):
        if f"{n}@{variant}" in res and n in GPU_TARGETS:
            ratio, limit = res[f"{n}@{variant}"]["ratio_median"], GPU_TARGETS[n]
            lines.append(f"- gpu {n}@{variant}: {ratio:.3f}x vs {n}'s target <= {limit:.2f}x: "
                         + ("met" if ratio <= limit else "MISSED") + f" ({how})")
    if "miss_bat" in res and "peft_miss_bat" in res:
        vs = statistics.median(t / u for t, u in zip(res["miss_bat"]["ratios"], res["peft_miss_bat"]["ratios"]))
        lines.append(f"- gpu miss_bat: {vs:.3f}x PEFT's time vs target <= {GPU_BAT_VS_PEFT:.2f}x: "
                     + ("met" if vs <= GPU_BAT_VS_PEFT else "MISSED"))
    frozen_peak = res.get("frozen", {}).get("peak_bytes")
    for n in ("miss", "miss_mini"):
        peak = res.get(n, {}).get("peak_bytes")
        if peak is not None and frozen_peak is not None:
            extra = (peak - frozen_peak) / MiB
            lines.append(f"- gpu {n} peak: frozen {extra:+.1f} MiB vs target <= +{GPU_PEAK_OVER_FROZEN_MIB} MiB: "
                         + ("met" if extra <= GPU_PEAK_OVER_FROZEN_MIB else "MISSED"))
    return lines


# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["cpu", "gpu"], default=None,
                    help="gpu: --device cuda --dtype bfloat16 -T 8192 -r 64, shapes 4096x4096 and 4096x11008")
    ap.add_argument("--device", type=device_arg, default=None, help="cpu (default) or cuda[:N]")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="base dtype (default float32; bfloat16 for gpu)")
    ap.add_argument("-T", "--tokens", dest="T", type=positive_int, default=None, help="rows of x (default 4096; 8192 for gpu)")
    ap.add_argument("--in-features", type=positive_int, default=None, help="default 2048")
    ap.add_argument("--out-features", type=positive_int, default=None, help="default 2048")
    ap.add_argument("--shapes", type=shapes_arg, default=None, help="comma list of INxOUT, overrides --in/--out-features")
    ap.add_argument("-r", type=positive_int, default=64)
    ap.add_argument("--mini-r", type=positive_int, default=64)
    ap.add_argument("--dropout", type=float, default=0.1, help="p of the *_drop cases")
    ap.add_argument("--reps", type=positive_int, default=None, help="timed repetitions (default 20 cpu, 100 cuda)")
    ap.add_argument("--warmup", type=nonnegative_int, default=None, help="untimed repetitions first (default 2 cpu, 10 cuda)")
    ap.add_argument("--paired", action="store_true",
                    help="run the frozen layer between every two cases; ratio = case / mean of its neighbours "
                         "(more robust on a machine with bursty load; about 1.9x the time)")
    ap.add_argument("--cases", default=None,
                    help="comma list of names/globs; 'frozen' is always added (default: all; the @ variants "
                         "only on cuda)")
    ap.add_argument("--list-cases", action="store_true")
    ap.add_argument("--no-peak", action="store_true", help="skip peak-memory measurement")
    ap.add_argument("--peak-timeout", type=float, default=600, help="seconds per CPU peak subprocess")
    ap.add_argument("--grad", choices=["dense", "expanded"], default="dense",
                    help="the output gradient: random dense (default) or expanded from one value, as "
                         "y.sum().backward() gives")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=json_path_arg, default=None, metavar="PATH", help="also write all results (incl. raw times) here")
    ap.add_argument("--progress", action="store_true", help="print per-rep progress to stderr")
    ap.add_argument("--_peak-case", dest="_peak_case", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    gpu = fill_layer_defaults(ap, a)
    cuda = a.device.startswith("cuda")
    a.reps = a.reps if a.reps is not None else (100 if cuda else 20)
    a.warmup = a.warmup if a.warmup is not None else (10 if cuda else 2)
    if a.shapes:
        a.shape_list = a.shapes
    elif gpu and a.in_features is None and a.out_features is None:
        a.shape_list = [(4096, 4096), (4096, 11008)]
    else:
        a.shape_list = [(a.in_features or 2048, a.out_features or 2048)]
    return a


def fill_layer_defaults(ap, a):
    """Checks --dropout and fills --device, --dtype and -T from --preset (gpu: cuda, bf16, 8192;
    else cpu, fp32, 4096) where not given; returns whether the preset is gpu. Shared with
    profile_linear.py."""
    if not 0.0 <= a.dropout < 1.0:
        ap.error(f"--dropout must be in [0, 1), got {a.dropout}")
    gpu = a.preset == "gpu"
    a.device = a.device or ("cuda" if gpu else "cpu")
    a.dtype = a.dtype or ("bfloat16" if gpu else "float32")
    a.T = a.T or (8192 if gpu else 4096)
    return gpu


def select_cases(spec):
    pats = [p.strip() for p in spec.split(",") if p.strip()]
    out = [n for n in CASES if any(fnmatch.fnmatchcase(n, p) for p in pats)]
    unknown = [p for p in pats if not any(fnmatch.fnmatchcase(n, p) for n in CASES)]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    if "frozen" not in out:
        out.insert(0, "frozen")
    return out


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    a = parse_args()
    if a._peak_case:
        fin, fout = a.in_features, a.out_features
        peak_child(a, fin, fout)
        return
    if a.list_cases:
        for n in CASES:
            print(n)
        return
    device = torch.device(a.device)
    dtype = DTYPES[a.dtype]
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
        if device.index is not None:
            torch.cuda.set_device(device)
    wanted = select_cases(a.cases or "*")
    if a.cases is None and not a.device.startswith("cuda"):
        wanted = [n for n in wanted if "@" not in n]

    now = datetime.datetime.now().astimezone()
    print("# miss_ext linear benchmark (fwd+bwd of one adapted nn.Linear)\n")
    print(f"- command: `{shlex.join([sys.executable] + sys.argv)}`")
    print(f"- date: {now.isoformat(timespec='seconds')}")
    print(f"- torch {torch.__version__}, threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}), "
          f"python {platform.python_version()}")
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"- device {device} ({dev_name}), os.cpu_count {os.cpu_count()}")
    print(f"- peft {peft.__version__ if peft else 'missing: ' + str(PEFT_ERR)}; miss_ext "
          + (f"{miss_ext.__version__} {miss_ext.build_info()}" if miss_ext else f"missing: {MISS_ERR}"))
    if a.paired:
        print(f"- {a.reps} timed reps (+{a.warmup} warm-up), paired: frozen runs between every two cases, order "
              f"reshuffled every rep (seed {a.seed}); 'vs frozen' = median over reps of (case / mean of the frozen "
              "runs just before and after it)")
    else:
        print(f"- {a.reps} timed reps (+{a.warmup} warm-up), case order reshuffled every rep (seed {a.seed}); "
              "'vs frozen' = median over reps of (case / frozen in the same rep)")
    print("- min ms / min/min: fastest run and fastest-case / fastest-frozen: contention only adds time, so this "
          "is the least load-sensitive view on a shared machine")
    if device.type == "cpu" and not a.no_peak:
        print("- CPU peak = VmHWM - VmRSS around one fwd+bwd in a fresh subprocess after a warm-up, peak counter "
              "reset via /proc/self/clear_refs ('~' = reset refused, upper-envelope fallback)")

    results = []
    for fin, fout in a.shape_list:
        results.append(run_shape(a, fin, fout, device, dtype, wanted))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        meta = {"argv": [sys.executable] + sys.argv, "date": now.isoformat(), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "device": str(device), "device_name": dev_name,
                "dtype": a.dtype, "peft": peft.__version__ if peft else None,
                "miss_ext": miss_ext.build_info() if miss_ext else None, "reps": a.reps, "warmup": a.warmup}
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "shapes": results}, f, indent=1)
        print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()

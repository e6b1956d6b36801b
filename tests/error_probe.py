"""Raises every kind of error message that formats a number, in this process; prints "all raised".

    python tests/error_probe.py cpu|cuda

Run in a child process by tests/test_errors.py and tests/test_cxx_runtime.py (and by
scripts/gpu_check.sh through them): issue 9 saw every such message crash the process with
SIGSEGV (a second C++ runtime serving std::ostream::operator<<(long)), which a test in the
pytest process itself could only report by dying. Exit status: 0 when each case raised its
exception with its number in the message, 1 with the failing case named otherwise.
"""
import sys

import torch

import miss_ext

ops = torch.ops.miss
dev = sys.argv[1]
x = torch.randn(24, 8, device=dev)
w = torch.randn(24, 8, device=dev)
singular = torch.zeros(6, 4, 4, device=dev)
singular[2] = -torch.eye(4, device=dev)                      # I + B_2 = 0
nonfinite = torch.zeros(6, 4, 4, device=dev)
nonfinite[4, 1, 1] = float("nan")
key = miss_ext.new_dropout_key(x.device)
xg = x.clone().requires_grad_(True)
# an adapter bank (issue 14): 3 slots of r_cap 8, q_cap 12
bank = torch.zeros(3, 8, 12, device=dev)
ranks, periods = torch.tensor([8, 4, 2], device=dev), torch.tensor([12, 6, 12], device=dev)
yb, sb, ids = torch.zeros(4, 12, device=dev), torch.zeros(4, 8, device=dev), torch.tensor([0, 1, 2, -1], device=dev)
cases = [
    ("no key, x requiring grad", lambda: ops.fold(xg, 2, 0.5, None, None), ValueError, "p=0.5 > 0 needs a key"),
    ("no key, tile_add", lambda: ops.tile_add(xg, x[:, :2], 1.0, 0.5, None), ValueError, "p=0.5 > 0 needs a key"),
    ("no key", lambda: ops.fold(x, 2, 0.5, None, None), ValueError, "p=0.5 > 0 needs a key"),
    ("int64", lambda: ops.fold(x, 0, 0.0, None, None), ValueError, "got r=0"),
    ("negative int64", lambda: ops.fold(x, -3, 0.0, None, None), ValueError, "got r=-3"),
    ("double", lambda: ops.fold(x, 2, 1.5, key, None), ValueError, "got p=1.5"),
    ("sizes", lambda: ops.linear(x[:, :7], w, None, torch.zeros(2, 24, device=dev)), ValueError, "x.shape[-1]=7"),
    ("SymInt sizes", lambda: ops.linear(x, w, None, torch.zeros(2, 7, device=dev)), ValueError, "mini_r=7"),
    ("dtype", lambda: ops.fold(x.long(), 2, 0.0, None, None), TypeError, "Long"),
    ("device", lambda: ops.fold(x, 2, 0.5, torch.zeros(2, dtype=torch.int64, device="meta"), None), ValueError,
     "got a key on meta"),
    ("2^32 rows", lambda: ops.fold(x[:1, :1].expand(2**32 + 1, 1), 1, 0.5, key, None), ValueError, "4294967297"),
    ("bat block index", lambda: ops.merge_(w.clone(), singular, True), ValueError, "miss_block[2] is singular"),
    ("bat non-finite index", lambda: ops.merge(w, nonfinite, True), ValueError, "miss_block[4] holds non-finite"),
    ("bat shapes", lambda: ops.bat_weight(w, torch.zeros(5, 3, 3, device=dev)), ValueError, "r=3"),
    ("bank shape", lambda: ops.bank_add(yb, sb, bank[0], ranks, periods, ids), ValueError, "got shape [8, 12]"),
    ("bank index shape", lambda: ops.bank_add(yb, sb, bank, ranks, periods, ids[:3]), ValueError, "got shape [3]"),
]
if dev == "cpu":  # value checks; CUDA checks them with device-side assertions (no host sync)
    cases.append(("bank rank value", lambda: ops.bank_add(yb, sb, bank, torch.tensor([8, 0, 2]), periods, ids), ValueError,
                  "ranks[1]=0"))
else:  # the CUDA kernels' own limit: the block's row of fp32 partial sums in 48 KiB of shared memory
    cases.append(("bank r_cap on CUDA", lambda: ops.bank_add(yb, sb, torch.zeros(3, 12289, 12, device=dev), ranks, periods,
                                                             ids), ValueError, "r_cap=12289"))
for name, call, exc, text in cases:
    try:
        call()
    except exc as e:
        if text not in str(e):
            sys.exit(f"{name}: message {str(e)!r} lacks {text!r}")
        print("ok", name, flush=True)
    else:
        sys.exit(f"{name}: no {exc.__name__} raised")
print("all raised", flush=True)

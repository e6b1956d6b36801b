"""Builds the CPU emulation of the CUDA kernels (tests/cuda_emu/README.md).

`load()` copies csrc/ops/cuda/{shard_kernels,bat_kernel,bank_kernel,bank_fold_kernel,split_bf16_kernel}.cu into a
build directory, rewrites only what g++ cannot parse (kernel<<<...>>>(...) launches and `extern __shared__`
arrays), and compiles them as C++20 host code with the stub CUDA headers of include/ first on the
include path, the emulator runtime, csrc/ops/impl_choice.cpp and csrc/ops/common/checks.cpp (no
registration of the `miss` ops: loading a second one aborts the process) into a torch extension
named miss_cuda_emu_<hash>. The build is cached under a directory keyed by the hash of every
input, so an edited kernel or header is rebuilt and tested.

`unavailable()` says why the emulator cannot be built here (no C++ compiler or ninja, not Linux on
x86-64 or aarch64), or returns None.
"""
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CSRC_OPS = os.path.join(REPO, "csrc", "ops")
KERNELS = ["shard_kernels.cu", "bat_kernel.cu", "bank_kernel.cu", "bank_fold_kernel.cu", "split_bf16_kernel.cu"]
HOST_SOURCES = [os.path.join(CSRC_OPS, "impl_choice.cpp"), os.path.join(CSRC_OPS, "common", "checks.cpp")]
EMU_SOURCES = [os.path.join(HERE, "runtime.cpp"), os.path.join(HERE, "bindings.cpp")]
SELFTEST = os.path.join(HERE, "selftest.cu")
SANITIZE = ("alignment,bounds,shift,signed-integer-overflow,integer-divide-by-zero,vla-bound,bool,enum,builtin,"
            "pointer-overflow,return,unreachable")
EMU_MAX_BLOCKS = 3
EMU_BANK_WIDE_BYTES = 8192
CFLAGS = ["-std=c++20", "-O1", "-g0", "-fno-strict-aliasing", "-fvisibility=hidden", "-fvisibility-inlines-hidden",
          f"-fsanitize={SANITIZE}", "-fsanitize-recover=all", "-fno-sanitize-recover=unreachable,return",
          "-DMISS_EXT_WITH_CUDA", "-DCUDA_EMU_SELFTEST", "-Wno-unknown-pragmas",
          # Grid cap of the grid-stride loops (65536 on a GPU): 3 makes the tests' small inputs run
          # the wrap, where a block serves several rows and reuses its shared memory.
          f"-DMISS_EXT_CUDA_MAX_BLOCKS={EMU_MAX_BLOCKS}",
          # The bank backward's workspace budget (64 MiB on a GPU): small, so that the tests' banks
          # run their block gradient in groups of slots.
          f"-DMISS_EXT_BANK_WIDE_BYTES={EMU_BANK_WIDE_BYTES}"]
# -Bsymbolic: calls inside the module bind to its own definitions, never to the same-named
# functions of miss_ext/_C (which holds the real, GPU-launching fold_kernel_cuda and friends).
LDFLAGS = ["-Wl,-Bsymbolic"]


def unavailable():
    """Why the emulator cannot run here, or None."""
    if sys.platform != "linux":
        return f"cuda_emu needs Linux (fibers, mmap guard pages), not {sys.platform}"
    if platform.machine() not in ("x86_64", "AMD64", "aarch64"):
        return f"cuda_emu is written for x86-64 and aarch64, not {platform.machine()}"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not on PATH) to build the CUDA kernel emulation"
    try:
        import torch.utils.cpp_extension  # noqa: F401
    except Exception as e:  # pragma: no cover
        return f"torch.utils.cpp_extension unavailable: {e}"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401
        except ImportError:
            return "ninja is needed by torch.utils.cpp_extension.load and is not installed"
    return None


# --------------------------------------------------------------------------------------------
# Source rewriting


def _match_back_angle(src, close):
    """Index of the '<' matching the '>' at `close`, scanning backwards (template arguments)."""
    depth = 0
    i = close
    while i >= 0:
        c = src[i]
        if c in ">)]":
            depth += 1
        elif c in "<([":
            depth -= 1
            if depth == 0:
                return i
        i -= 1
    raise ValueError("unbalanced template arguments before <<<")


def _kernel_expr_start(src, end):
    """Start of the kernel expression that ends just before `end` (where <<< starts)."""
    i = end - 1
    while i >= 0 and src[i].isspace():
        i -= 1
    if src[i] == ">":
        i = _match_back_angle(src, i) - 1
        while i >= 0 and src[i].isspace():
            i -= 1
    while i >= 0 and (src[i].isalnum() or src[i] in "_:"):
        i -= 1
    return i + 1


def _split_top_level(text):
    parts, depth, cur = [], 0, ""
    for c in text:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += c
    parts.append(cur)
    return parts


def rewrite_launches(src, path):
    """kernel<<<cfg>>>(args) -> ::cuda_emu::launch(file, line, "kernel", kernel, cfg)(args).

    Only characters on the launch's own line change (newlines are kept), so line numbers stay those
    of the original file."""
    out = []
    pos = 0
    count = 0
    while True:
        k = src.find("<<<", pos)
        if k < 0:
            break
        start = _kernel_expr_start(src, k)
        close = src.find(">>>", k)
        if close < 0:
            raise ValueError(f"{path}: <<< without >>>")
        config = src[k + 3:close]
        n_cfg = len(_split_top_level(config))
        if not 2 <= n_cfg <= 4:
            raise ValueError(f"{path}: launch configuration with {n_cfg} parts: {config!r}")
        expr = src[start:k]
        line = src.count("\n", 0, k) + 1
        literal = '"' + " ".join(expr.split()).replace("\\", "\\\\").replace('"', '\\"') + '"'
        out.append(src[pos:start])
        out.append(f"::cuda_emu::launch(__FILE__, {line}, {literal}, {expr}, {config})")
        pos = close + 3
        count += 1
    out.append(src[pos:])
    return "".join(out), count


_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+([^;\[\]]*?)\s*\b(\w+)\s*\[\s*\]\s*;")


def rewrite_extern_shared(src):
    """extern __shared__ [__align__(n)] T name[]; -> T* const name = (T*) the launch's dynamic buffer."""

    def repl(m):
        ty = re.sub(r"__align__\s*\(\s*\d+\s*\)|alignas\s*\(\s*\d+\s*\)", " ", m.group(1))
        ty = " ".join(ty.split())
        newlines = m.group(0).count("\n")
        return f"{ty}* const {m.group(2)} = static_cast<{ty}*>(::cuda_emu::dynamic_shared());" + "\n" * newlines

    return _EXTERN_SHARED.subn(repl, src)


def rewrite(path, display):
    with open(path) as f:
        src = f.read()
    src, launches = rewrite_launches(src, path)
    src, _ = rewrite_extern_shared(src)
    if "<<<" in src or re.search(r"extern\s+__shared__", src):
        raise ValueError(f"{path}: a launch or extern __shared__ was not rewritten")
    return f'#line 1 "{display}"\n' + src, launches


# --------------------------------------------------------------------------------------------
# Build


def _inputs():
    files = [os.path.join(CSRC_OPS, "cuda", k) for k in KERNELS] + HOST_SOURCES + EMU_SOURCES + [SELFTEST]
    files.append(os.path.abspath(__file__))
    for root in (CSRC_OPS, os.path.join(HERE, "include")):
        for d, _, names in os.walk(root):
            files += [os.path.join(d, n) for n in names if n.endswith((".h", ".hpp", ".cuh"))]
    return sorted(set(files))


def source_hash():
    import torch

    h = hashlib.sha256()
    for p in _inputs():
        h.update(os.path.relpath(p, REPO).encode())
        with open(p, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


def build_root():
    return os.environ.get("MISS_EXT_CUDA_EMU_BUILD", os.path.join(REPO, "build", "cuda_emu"))


_module = None


def load(verbose=False):
    """The emulation module (built on first use, then cached by source hash)."""
    global _module
    if _module is not None:
        return _module
    import torch.utils.cpp_extension as ext

    digest = source_hash()
    build_dir = os.path.join(build_root(), digest)
    src_dir = os.path.join(build_dir, "src")
    os.makedirs(src_dir, exist_ok=True)
    sources = []
    for name in KERNELS:
        text, launches = rewrite(os.path.join(CSRC_OPS, "cuda", name), f"csrc/ops/cuda/{name}")
        if launches == 0:
            raise ValueError(f"{name}: no kernel launch found to rewrite")
        sources.append(_write(os.path.join(src_dir, name[:-3] + ".emu.cpp"), text))
    text, _ = rewrite(SELFTEST, "tests/cuda_emu/selftest.cu")
    sources.append(_write(os.path.join(src_dir, "selftest.emu.cpp"), text))
    sources += HOST_SOURCES + EMU_SOURCES
    includes = [os.path.join(HERE, "include"), CSRC_OPS, os.path.join(CSRC_OPS, "cuda")]
    _module = ext.load(
        name=f"miss_cuda_emu_{digest}",
        sources=sources,
        extra_cflags=CFLAGS,
        extra_ldflags=LDFLAGS,
        extra_include_paths=includes,
        build_directory=build_dir,
        with_cuda=False,
        verbose=verbose,
    )
    _module.kernel_names = _symbol_table(_module.__file__)
    return _module


def _write(path, text):
    old = None
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    if old != text:  # keep the timestamp (ninja) when nothing changed
        # Atomically: xdist workers call load() at the same time, and an in-place rewrite (truncate,
        # then write) is seen half-written by another worker's read or by the compiler it runs.
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return path


def _symbol_table(so_path):
    """{offset in the module: demangled name} of its functions, to name launched kernels."""
    try:
        out = subprocess.run(["nm", "-C", "--defined-only", so_path], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    table = {}
    for line in out.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in "tTwW":
            table[int(parts[0], 16)] = parts[2]
    return table


def module_base(module):
    """Load address of the module (from /proc/self/maps), to turn kernel addresses into offsets."""
    path = os.path.realpath(module.__file__)
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and os.path.realpath(fields[5]) == path and int(fields[2], 16) == 0:
                return int(fields[0].split("-")[0], 16)
    raise RuntimeError("cuda_emu: module not found in /proc/self/maps")


def launched_kernels(module):
    """Demangled names of the kernels launched by the module's last call (unresolved: the address)."""
    base = module_base(module)
    names = []
    for addr, expr, *_ in module.launches():
        names.append(module.kernel_names.get(addr - base, f"{expr}@{addr:#x}"))
    return names


if __name__ == "__main__":
    import time

    reason = unavailable()
    if reason:
        sys.exit(reason)
    t = time.time()
    m = load(verbose="-v" in sys.argv)
    print(f"built/loaded {m.__file__} in {time.time() - t:.1f} s")

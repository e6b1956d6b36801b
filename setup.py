"""Build of miss_ext: `pip install --no-build-isolation .`

Build knobs (environment variables):
  MISS_EXT_CUDA=1      force the CUDA kernels; fail if torch is a CPU build or no toolkit is found
  MISS_EXT_CUDA=0      CPU-only build
  (unset)              CUDA kernels when torch is a CUDA build and a CUDA toolkit is found.
                       Never decided by a visible GPU: a GPU-less build machine builds them too.
  CUDA_HOME            the toolkit root; otherwise found from `nvcc` on PATH (wrappers allowed)
  TORCH_CUDA_ARCH_LIST architectures, e.g. "8.0;9.0"; default "8.0;9.0" when no GPU is visible
  MAX_JOBS             parallel compile jobs (ninja)
  MISS_EXT_PRIVATE_CXXRT=0  link the C++ runtime as torch does (shared libstdc++) instead of a
                       private, hidden copy (the default, see private_cxx_runtime)
  MISS_EXT_DEBUG_INFO=1  compile the C++ with debug information (-g); default none (debug_info_flags)
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"
# The torch releases this extension is built and tested against: 2.11 (the GPU machines) to 2.15.
TORCH_MIN, TORCH_END = "2.11", "2.16"
# The PEFT releases miss_ext.peft is built on (it refuses others at import; requirements-dev.txt too).
PEFT_REQUIREMENT = "peft>=0.21,<0.23"


def check_torch_version(version: str) -> None:
    """RuntimeError unless `version` (torch.__version__) is in [TORCH_MIN, TORCH_END): a custom op
    library is compiled against one torch's C++ API, and releases outside the range are untested."""
    major_minor = tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", version).groups())
    low = tuple(int(p) for p in TORCH_MIN.split("."))
    high = tuple(int(p) for p in TORCH_END.split("."))
    if not low <= major_minor < high:
        raise RuntimeError(f"miss_ext supports torch {TORCH_MIN} to {high[0]}.{high[1] - 1}, but the installed torch "
                           f"is {version}; install a supported torch first (pip install 'torch>={TORCH_MIN},<{TORCH_END}') "
                           "and build with --no-build-isolation")


def _toolkit_from_nvcc(nvcc):
    """The real toolkit root behind an `nvcc` that may be a wrapper script.

    nvcc's dry run prints the directory it runs from (`#$ TOP=<root>/bin/..`), which is right
    even when PATH holds a wrapper; torch's own guess (dirname of the wrapper) is not.
    """
    try:
        out = subprocess.run(
            [nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
        match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
        if match:
            return os.path.realpath(match.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.realpath(os.path.join(os.path.dirname(os.path.realpath(nvcc)), ".."))


def _is_toolkit(root):
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and \
        os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))


def find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            return root if _is_toolkit(root) else None
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _toolkit_from_nvcc(nvcc)
        if _is_toolkit(root):
            return root
    return "/usr/local/cuda" if _is_toolkit("/usr/local/cuda") else None


def decide_cuda(torch):
    """(build CUDA kernels?, toolkit root)."""
    flag = os.environ.get("MISS_EXT_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise RuntimeError(f"MISS_EXT_CUDA must be 0, 1 or unset, got {flag!r}")
    if flag == "0":
        return False, None
    home = find_cuda_home()
    if flag == "1":
        if torch.version.cuda is None:
            raise RuntimeError(f"MISS_EXT_CUDA=1 but torch {torch.__version__} is a CPU-only build")
        if home is None:
            raise RuntimeError("MISS_EXT_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to its root")
        return True, home
    return torch.version.cuda is not None and home is not None, home


def cuda_arch_list(torch, given):
    """The TORCH_CUDA_ARCH_LIST the CUDA build runs with, or None for none at all: the user's
    (`given`, when set and not blank) stays; with a GPU visible and none given, none (torch's
    cpp_extension then picks that GPU's architecture; a blank value would fail its build); else
    DEFAULT_ARCHS, as torch's default without a GPU is every architecture it knows, several
    times the build time for machines these kernels are not meant for."""
    if given and given.strip():
        return given
    return None if torch.cuda.is_available() else DEFAULT_ARCHS


def set_cuda_arch_list(torch, environ) -> None:
    """Puts cuda_arch_list's answer into `environ` (os.environ: torch's cpp_extension reads it)."""
    archs = cuda_arch_list(torch, environ.get("TORCH_CUDA_ARCH_LIST"))
    if archs is None:
        environ.pop("TORCH_CUDA_ARCH_LIST", None)
    else:
        environ["TORCH_CUDA_ARCH_LIST"] = archs


def cpu_only_reason(torch, cuda_home) -> str:
    """Why decide_cuda chose a CPU-only build, for the build's first line."""
    if os.environ.get("MISS_EXT_CUDA", "").strip() == "0":
        return "MISS_EXT_CUDA=0"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return "no CUDA toolkit found: set CUDA_HOME to its root for the CUDA kernels"


def env_switch(name: str, default: str) -> bool:
    """The 0/1 build knob `name` (`default` when unset); RuntimeError naming any other value."""
    flag = os.environ.get(name, default).strip()
    if flag not in ("0", "1"):
        raise RuntimeError(f"{name} must be 0 or 1, got {flag!r}")
    return flag == "1"


def private_cxx_runtime():
    """Link flags that give the module its own copy of libstdc++, linked in and hidden.

    Why (issue 9): with g++ 13 and pip's torch, every error message that formats a number
    crashed the process in std::ostream::operator<<(long), while messages with strings only
    worked. That is the crash of pytorch/pytorch#109923 and #133437: a second C++ runtime whose
    std:: symbols are exported into the process's global scope (a library linked with
    -static-libstdc++ and no version script, loaded with RTLD_GLOBAL) serves our ostream and
    locale calls, because the dynamic linker searches the global scope before our own
    dependencies; its num_put facet ids then index the locale built by the other runtime. The
    integer path builds an ostringstream (c10::str); string-only messages never do. Reproduced
    with such a library (tests/test_cxx_runtime.py builds one): SIGSEGV on the first number with
    g++ 13, the number silently dropped with g++ 12. On the GPU machines themselves (g++ 13.3,
    Ubuntu 24.04, torch 2.11; 2026-11-29) no foreign runtime was loaded, yet a shared-runtime
    build segfaulted on every numeric error and this private one did not (tests/GPU.md). With our own copy, linked statically and
    hidden by --exclude-libs, no other object in the process can serve these calls. Exceptions
    still cross into torch normally: their types (c10::Error) live in libc10, and unwinding is
    libgcc_s's. MISS_EXT_PRIVATE_CXXRT=0 turns it off; it is also off, with a message, when
    the compiler has no libstdc++.a (clang with libc++).
    """
    if not env_switch("MISS_EXT_PRIVATE_CXXRT", "1"):
        return []
    cxx = os.environ.get("CXX", "c++")
    try:
        archive = subprocess.run([cxx, "-print-file-name=libstdc++.a"], capture_output=True, text=True,
                                 timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        archive = ""
    if not (os.path.isabs(archive) and os.path.isfile(archive)):
        print(f"miss_ext: {cxx} has no libstdc++.a; linking the shared C++ runtime (see private_cxx_runtime)")
        return []
    return ["-static-libstdc++", "-Wl,--exclude-libs,ALL"]


def debug_info_flags():
    """C++ compile flags for debug information: ["-g0"] unless MISS_EXT_DEBUG_INFO=1 ([]: the
    compiler flags of Python's own build, which torch's build helpers put first and which usually
    carry -g). Why: with torch's headers in every file, -g doubled the compile time of each C++
    file (bank_autograd.cpp 54 s -> 27 s, fold.cpp 35 s -> 15 s, g++ 12 on a 2-core machine,
    2026-12-01) and made the module 68 MB. Symbols are kept either way, so backtraces still name
    functions; MISS_EXT_SANITIZE=1 adds -g1 after this (line tables: its reports give file and line)."""
    return [] if env_switch("MISS_EXT_DEBUG_INFO", "0") else ["-g0"]


def sanitizer_flags():
    """(compile flags, link flags) of MISS_EXT_SANITIZE=1: AddressSanitizer + UndefinedBehaviorSanitizer
    on the C++ sources (host code; the .cu files are compiled as usual). Every UBSan report aborts
    (-fno-sanitize-recover), so a test run with no abort had no report. Python and torch are not
    instrumented, so the ASan runtime must be loaded first: run with
    LD_PRELOAD=$(c++ -print-file-name=libasan.so) (scripts/sanitize_test.sh does all of it).
    The private C++ runtime is off in this build: a static libstdc++ would hide its allocations'
    operator new/delete from ASan's interceptors."""
    if not env_switch("MISS_EXT_SANITIZE", "0"):
        return [], []
    checks = "-fsanitize=address,undefined"
    # -g1: line tables only, enough for file:line in every report, at a fraction of -g's compile time.
    # -O1 (after the build's -O3, so it wins): the level AddressSanitizer's documentation recommends.
    # The checks are inserted at every source-level access whatever the level, and the CI leg builds
    # this variant only to run it: with the checks in every inlined ATen template, -O3 took 1.4-1.9x
    # as long to compile (fold_autograd.cpp 110 s against 75 s, the CPU bat kernel 32-37 s against
    # 18 s, g++ 12, 2 loaded cores, 2026-12-02).
    return [checks, "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g1", "-O1"], [checks]


def write_build_config(path, with_cuda, torch, private_cxxrt=False, sanitize=False):
    """Writes csrc/setup_build_config.h, only when its text changes: rewriting it on every build
    would recompile torch_bindings.cpp and relink each time."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
    archs = ",".join(a for a in re.split(r"[;\s]+", archs) if a)
    text = ("// Written by setup.py; describes this build (see torch_bindings.cpp).\n#pragma once\n"
            f'#define MISS_EXT_TORCH_VERSION "{torch.__version__}"\n'
            f'#define MISS_EXT_CUDA_VERSION "{torch.version.cuda or ""}"\n'
            f'#define MISS_EXT_CUDA_ARCHS "{archs}"\n'
            f'#define MISS_EXT_CXX_RUNTIME "{"private" if private_cxxrt else "shared"}"\n'
            f'#define MISS_EXT_SANITIZE "{"address,undefined" if sanitize else ""}"\n')
    if os.path.isfile(path):
        with open(path) as f:
            if f.read() == text:
                return
    with open(path, "w") as f:
        f.write(text)


# Commands that package the sources (`python -m build --sdist`, which runs them in an isolated
# environment without torch): they need neither torch nor a compiler. MANIFEST.in lists the files.
SOURCE_COMMANDS = {"sdist", "egg_info"}
# Any other command that could build or install (bdist, bdist_dumb, build_ext, install_lib, ...): a
# word of the command line starting so counts (an option's value too, which only errs on the side
# of building).
BUILD_PREFIXES = ("build", "bdist", "install", "develop", "editable", "dist_info")


def packages_sources_only(argv) -> bool:
    """True when setup.py was asked to package the sources and to build nothing."""
    args = set(argv[1:])
    return bool(args & SOURCE_COMMANDS) and not any(a.startswith(BUILD_PREFIXES) for a in args)


def extensions():
    if packages_sources_only(sys.argv):
        return [], {}
    try:
        import torch
    except ImportError:
        # pip's default build isolation hides the installed torch (the usual case: a plain `pip
        # install .` said "none was found" to a user whose torch was installed, a new-user pass,
        # 2026-12-07); without torch at all the user must install it first (the library is
        # compiled against that exact torch).
        raise RuntimeError(f"miss_ext builds against an installed torch, and {sys.executable} cannot import torch. "
                           "If torch is installed, pip's build isolation hid it (a plain `pip install .` builds in a "
                           "fresh environment): build with `pip install --no-build-isolation .` (extras: "
                           "`pip install --no-build-isolation '.[peft]'`). Otherwise install a supported torch first "
                           f"(pip install 'torch>={TORCH_MIN},<{TORCH_END}'), then pip install --no-build-isolation .") from None

    check_torch_version(torch.__version__)

    with_cuda, cuda_home = decide_cuda(torch)
    if with_cuda:
        # cpp_extension reads CUDA_HOME when it is imported: set it first.
        os.environ["CUDA_HOME"] = cuda_home
        set_cuda_arch_list(torch, os.environ)
    from torch.utils import cpp_extension

    if with_cuda:
        cpp_extension.CUDA_HOME = cuda_home

    csrc = os.path.join("csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "**", "*.cpp"), recursive=True))
    cuda_dir = os.path.join(csrc, "ops", "cuda") + os.sep
    if not with_cuda:
        sources = [s for s in sources if not s.startswith(cuda_dir)]
    sanitize_cxx, sanitize_link = sanitizer_flags()
    link = ["-fopenmp"] + (sanitize_link or private_cxx_runtime())
    write_build_config(os.path.join(ROOT, csrc, "setup_build_config.h"), with_cuda, torch,
                       private_cxxrt="-static-libstdc++" in link, sanitize=bool(sanitize_cxx))

    defines = ["-DMISS_EXT_SETUP_PY"] + (["-DMISS_EXT_WITH_CUDA"] if with_cuda else [])
    # -fopenmp: at::parallel_for is a header template that only runs in parallel when the
    # extension itself is compiled with OpenMP (torch's CPU backend is OpenMP; the runtime is
    # the libgomp torch already loads). Without it every CPU kernel ran on one thread.
    cxx = ["-O3", "-fopenmp"] + debug_info_flags() + defines + sanitize_cxx
    print(f"miss_ext: building {'CPU + CUDA' if with_cuda else 'CPU-only'} kernels"
          + (f" (toolkit {cuda_home}, archs {os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPU')})"
             if with_cuda else f" ({cpu_only_reason(torch, cuda_home)})"))
    if with_cuda:
        sources += sorted(glob.glob(os.path.join(csrc, "**", "*.cu"), recursive=True))
        ext = cpp_extension.CUDAExtension(
            "miss_ext._C", sources,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"] + defines},
            extra_link_args=link,
        )
    else:
        ext = cpp_extension.CppExtension("miss_ext._C", sources, extra_compile_args={"cxx": cxx},
                                         extra_link_args=link)
    config = f"torch{torch.__version__.split('+')[0]}-{'cuda' if with_cuda else 'cpu'}" + ("-sanitize" if sanitize_cxx else "")

    class BuildExtension(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        """Compiles into build/temp-<torch>-<backends>/ in the checkout. pip's editable and wheel
        builds would otherwise compile in a fresh temporary folder each time, so every
        `pip install -e .` (scripts/setup_env.sh runs one on each call) recompiled everything:
        minutes on a small machine. Here ninja rebuilds only what changed."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(ROOT, "build", f"temp-{config}")

    return [ext], {"build_ext": BuildExtension}


# Guarded so tests can import the build decisions (tests/test_build_config.py); pip and
# `python setup.py` run this file as __main__.
if __name__ == "__main__":
    ext_modules, cmdclass = extensions()

    setup(
        name="miss_ext",
        version="0.1.0",
        description="Fast MiSS (Matrix Shard Sharing) fine-tuning: CUDA/CPU kernels as torch.ops.miss",
        packages=find_packages(include=["miss_ext", "miss_ext.*"]),
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        # torch 2.14 (the pinned default) needs Python 3.10; the test dependencies need 3.11.
        python_requires=">=3.10",
        # safetensors: the adapter files of save_adapter / load_adapter (the model API).
        install_requires=[f"torch>={TORCH_MIN},<{TORCH_END}", "safetensors"],
        extras_require={
            "peft": [PEFT_REQUIREMENT],
            "demo": [PEFT_REQUIREMENT, "transformers", "matplotlib", "tqdm"],
            "test": ["pytest", "hypothesis", "expecttest", PEFT_REQUIREMENT, "accelerate", "transformers", "matplotlib", "tqdm"],
        },
    )

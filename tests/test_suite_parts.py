"""`pytest --miss-part cuda|rest` (tests/conftest.py, scripts/gpu_check.sh): the cuda part is the
tests a machine without a GPU skips for that reason (their skip marks' reasons), the rest part every
other test, and the two together are the whole selection."""
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
# test_cuda_no_sync.py: every test needs a GPU (module mark); test_cuda_emulated.py: none does (it
# skips where one is visible); test_bench_scripts.py: one refusal test per script, no GPU.
FILES = ["test_cuda_no_sync.py", "test_cuda_emulated.py", "test_bench_scripts.py"]


def collected(*args):
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args,
                          *FILES], cwd=TESTS, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return {Path(line.split("::")[0]).name for line in out.stdout.splitlines() if "::" in line}, \
        sum(1 for line in out.stdout.splitlines() if "::" in line)


def test_parts_split_the_suite_by_gpu_skip_marks():
    cuda_files, cuda_n = collected("--miss-part", "cuda")
    rest_files, rest_n = collected("--miss-part", "rest")
    all_files, all_n = collected()
    assert cuda_files == {"test_cuda_no_sync.py"}
    assert "test_cuda_no_sync.py" not in rest_files and {"test_cuda_emulated.py", "test_bench_scripts.py"} <= rest_files
    assert cuda_n + rest_n == all_n and cuda_n >= 10


def test_given_order_keeps_the_command_line_order_of_files():
    """By default SLOW_FILES_FIRST reorders the files (test_cuda_emulated.py before the others here);
    --miss-given-order keeps the order given (gpu_check.sh's memcheck: the newest kernels first)."""
    def first_file(*args):
        out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args,
                              "test_bench_scripts.py", "test_cuda_emulated.py"], cwd=TESTS, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        return Path(next(line for line in out.stdout.splitlines() if "::" in line).split("::")[0]).name
    assert first_file() == "test_cuda_emulated.py"
    assert first_file("--miss-given-order") == "test_bench_scripts.py"


def test_an_unknown_part_is_refused():
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "--miss-part", "gpu", FILES[0]], cwd=TESTS, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "invalid choice: 'gpu'" in out.stderr


@pytest.mark.parametrize("reason", ["no CUDA device visible", "CUDA not available", "needs a CUDA device beside the CPU"])
def test_every_gpu_skip_reason_of_the_suite_is_recognised(reason):
    from conftest import GPU_SKIP_REASONS
    assert any(r in reason for r in GPU_SKIP_REASONS)

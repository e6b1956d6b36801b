"""Filters a setup.py / pip -v build log down to its progress: one short line per compiler step
("[3/20] fold_kernel.cu"), the link step, warnings and errors. Reads stdin, writes stdout, flushes
each line so progress shows as it happens. The full log is what scripts/setup_env.sh keeps in
build/build.log.

    python setup.py build_ext --inplace 2>&1 | python3 scripts/build_progress.py
"""
import re
import sys
import time

STEP = re.compile(r"^\s*\[(\d+)/(\d+)\]\s+(.*)$")
KEEP = re.compile(r"error|warning:|Error|miss_ext:|FAILED|Traceback", re.IGNORECASE)


SOURCE = re.compile(r"""-c\s+['"]?([^'"\s]+\.(?:cpp|cu|cc|cxx|c))\b""")


def source_of(command: str) -> str:
    """The compiled file's name (the argument of -c), or the command's last word."""
    found = SOURCE.search(command)
    return (found.group(1) if found else command.split()[-1] if command.split() else "").rsplit("/", 1)[-1]


def main() -> None:
    sys.stdin.reconfigure(errors="replace")       # compiler output need not be valid UTF-8
    start = time.monotonic()
    for line in sys.stdin:
        line = line.rstrip("\n")
        step = STEP.match(line)
        if step:
            done, total, command = step.groups()
            print(f"  [{done}/{total}] {time.monotonic() - start:5.0f} s  {source_of(command)}", flush=True)
        elif re.search(r"\s-shared\s", line) and " -o " in line:
            print(f"  linking {line.split(' -o ')[1].split()[0].rsplit('/', 1)[-1]}", flush=True)
        elif KEEP.search(line):
            print(line, flush=True)
    print(f"  build output ended after {time.monotonic() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()

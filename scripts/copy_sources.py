"""Copies this checkout's sources into a folder: what git would commit (tracked files and
untracked ones it does not ignore), never .venv or build outputs. Used by scripts/torch_leg.sh
and scripts/sanitize_test.sh to build variants of the op library beside, not over, the in-place
build.

    python3 scripts/copy_sources.py DEST
"""
import os
import shutil
import subprocess
import sys


def main() -> None:
    dest = sys.argv[1]
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                          check=True).stdout.strip()
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, check=True).stdout.decode()
    copied = 0
    for path in listing.split("\0"):
        source = os.path.join(root, path)
        if path and os.path.isfile(source):          # a tracked file deleted in the work tree is skipped
            target = os.path.join(dest, path)
            os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
            shutil.copy2(source, target)
            copied += 1
    print(f"copied {copied} files into {dest}")


if __name__ == "__main__":
    main()

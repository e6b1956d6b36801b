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
    paths = sorted(p for p in listing.split("\0") if p and os.path.isfile(os.path.join(root, p)))
    for path in paths:                               # a tracked file deleted in the work tree is skipped
        target = os.path.join(dest, path)
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        shutil.copy2(os.path.join(root, path), target)
    # Files an earlier copy brought that the checkout no longer has (a deleted or renamed source
    # would otherwise still be globbed by setup.py, or a stale test still run).
    manifest = os.path.join(dest, ".copied-sources")
    if os.path.isfile(manifest):
        with open(manifest) as f:
            for stale in set(f.read().splitlines()) - set(paths):
                if os.path.isfile(os.path.join(dest, stale)):
                    os.remove(os.path.join(dest, stale))
    with open(manifest, "w") as f:
        f.write("\n".join(paths) + "\n")
    print(f"copied {len(paths)} files into {dest}")


if __name__ == "__main__":
    main()

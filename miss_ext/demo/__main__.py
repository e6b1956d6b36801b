"""python -m miss_ext.demo: see miss_ext/demo/__init__.py and --help."""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())

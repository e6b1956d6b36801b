"""Imports of optional dependencies with a message that names the pip extra to install."""
import importlib
from types import ModuleType
from typing import Optional, Sequence

# The extras of setup.py and what each brings (keep in sync with setup.py's extras_require).
EXTRAS = {"peft": "PEFT interop (miss_ext.peft, export_lora of PEFT models)",
          "demo": "the demo (python -m miss_ext.demo): transformers, peft, matplotlib, tqdm",
          "test": "the test suite"}


def require(module: str, extra: str, what: str) -> ModuleType:
    """`importlib.import_module(module)`, or ImportError saying that `what` needs it and which
    extra installs it (`pip install 'miss_ext[extra]'`)."""
    require_all([module], extra, what)
    return importlib.import_module(module)


def require_all(modules: Sequence[str], extra: str, what: str) -> None:
    """Imports each of `modules`; ImportError naming every missing package at once and the extra
    that installs them (one at a time, a user following the "(or pip install <package>)" hint met
    three failed runs before the demo started: a new-user pass, 2026-12-05)."""
    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError:
            missing.append(module.split(".")[0])
    if missing:
        quoted = ", ".join(f"'{p}'" for p in missing)
        raise ImportError(f"{what} needs the {quoted} package{'s' if len(missing) > 1 else ''}, not installed: "
                          f"pip install 'miss_ext[{extra}]' (or pip install {' '.join(missing)})")


def require_version(module: str, minimum: str, extra: str, what: str, why: str,
                    below: Optional[str] = None, why_below: str = "") -> ModuleType:
    """`require`, and ImportError if the installed version is older than `minimum` (saying `why`)
    or, with `below`, not older than `below` (saying `why_below`), before anything uses it.
    (packaging, for the version comparison, is a dependency of every package this is used for.)"""
    found = require(module, extra, what)
    from packaging.version import Version

    version = getattr(found, "__version__", "0")
    package = module.split(".")[0]
    wanted = f"{package}>={minimum}" + (f",<{below}" if below else "")
    if Version(version) < Version(minimum):
        raise ImportError(f"{what} needs {package} >= {minimum}, found {package} {version} ({why}): "
                          f"pip install '{wanted}'")
    if below is not None and Version(version) >= Version(below):
        raise ImportError(f"{what} needs {package} older than {below}, found {package} {version} ({why_below}): "
                          f"pip install '{wanted}'")
    return found

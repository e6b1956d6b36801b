"""Imports of optional dependencies with a message that names the pip extra to install."""
import importlib
from types import ModuleType

# The extras of setup.py and what each brings (keep in sync with setup.py's extras_require).
EXTRAS = {"peft": "PEFT interop (miss_ext.peft, export_lora of PEFT models)",
          "demo": "the demo (python -m miss_ext.demo): transformers, peft, matplotlib, tqdm",
          "test": "the test suite"}


def require(module: str, extra: str, what: str) -> ModuleType:
    """`importlib.import_module(module)`, or ImportError saying that `what` needs it and which
    extra installs it (`pip install 'miss_ext[extra]'`)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        package = module.split(".")[0]
        raise ImportError(f"{what} needs the '{package}' package, which is not installed: "
                          f"pip install 'miss_ext[{extra}]' (or pip install {package})") from exc

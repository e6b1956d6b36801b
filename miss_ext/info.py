"""`python -m miss_ext.info`: torch version, compiled backends and CUDA architectures, and the
registered `miss` ops with the dispatch keys each has a kernel for."""
import torch

from ._library import DISPATCH_KEYS, build_info, registered_ops


def report() -> str:
    """The text `python -m miss_ext.info` prints: torch's version, the build (build_info) and
    each registered miss op with the dispatch keys it has kernels for."""
    info = build_info()
    lines = [
        f"torch            {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"built with torch {info.get('built_with_torch', '?')}",
        f"backends         {', '.join(info['backends'])}",
        f"C++ runtime      {info.get('cxx_runtime', '?')}"
        + (" (libstdc++ linked in and hidden, see setup.py)" if info.get("cxx_runtime") == "private" else ""),
        f"sanitizers       {info.get('sanitize') or 'none'}",
    ]
    if "CUDA" in info["backends"]:
        lines.append(f"CUDA             {info.get('cuda_version')} for sm {', '.join(info['cuda_archs']) or 'visible GPU'}")
        lines.append(f"GPU visible      {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}")
    lines.append("")
    ops = registered_ops()
    width = max([len("op")] + [len(name) for name in ops]) + 2  # long op names must not run into the keys
    lines.append(f"{'op':<{width}}" + "".join(f"{k:<10}" for k in DISPATCH_KEYS))
    for name, keys in ops.items():
        lines.append(f"{name:<{width}}" + "".join(f"{('yes' if k in keys else '-'):<10}" for k in DISPATCH_KEYS))
    return "\n".join(lines)


def main(argv=None) -> None:
    """The command line: no arguments but --help (an unknown one exits 2, as argparse does; it was
    ignored: a review, 2026-12-05)."""
    import argparse

    # (Not __doc__: python -OO strips it.)
    argparse.ArgumentParser(prog="python -m miss_ext.info", description="torch, the build and the registered miss "
                            "ops with their dispatch keys").parse_args(argv)
    print(report())


if __name__ == "__main__":
    main()

"""The README's Python blocks are documentation tests (issue 13).

Every ```python block of README.md runs, top to bottom, in one namespace, as a reader who pastes
them in order into one session would run them. They run on CPU here: the README's own code picks
`device = "cuda" if torch.cuda.is_available() else "cpu"`, so on a GPU machine they run on CUDA.
The working directory is a fresh temporary folder, where the files the blocks write
(`out/adapter`, `model.pt`, ...) land, and where `path/to/llama`, the placeholder the README uses
for "your local Hugging Face model folder", holds a tiny random-init Llama written with
`save_pretrained` (no download). A failure names the README line where the failing block starts.

The README's shell and CMake blocks are covered by the scripts that run them (`.ci/run`,
scripts/cmake_test.sh, tests/test_cmake_library.py). After the blocks, a few of the claims their
comments make are checked on the objects they left behind.
"""
import re
import traceback
from pathlib import Path

import pytest
import torch

import miss_ext
from miss_ext import _aoti_guard

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(text: str):
    """(first line number, code) of each ```python block."""
    blocks, lines, start = [], text.splitlines(), None
    for number, line in enumerate(lines, 1):
        if start is None and line.strip() == "```python":
            start, code = number + 1, []
        elif start is not None and line.strip() == "```":
            blocks.append((start, "\n".join(code) + "\n"))
            start = None
        elif start is not None:
            code.append(line)
    assert start is None, f"README.md: the ```python block at line {start - 1} is never closed"
    return blocks


def save_tiny_llama(path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 8, "the README lost its Python examples, or this parser broke"
    save_tiny_llama(tmp_path / "path" / "to" / "llama")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    refused_aoti = False
    for line, code in blocks:
        if "aoti_compile_and_package" in code and _aoti_guard.affected():
            # The README says so: on torch < 2.12 AOTInductor packages with miss ops are refused.
            with pytest.raises(RuntimeError, match="pytorch/pytorch#169157"):
                exec(compile(code, f"README.md:{line}", "exec"), namespace)
            refused_aoti = True
            continue
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception:
            pytest.fail(f"the README's Python block at line {line} raised:\n{traceback.format_exc()}")

    # Claims in the blocks' comments, checked on what they left behind.
    ns = namespace
    assert ns["layer"].merged is False and ns["layer"].mode == "bat"
    assert tuple(ns["block"].shape) == (16, 512)
    assert ns["W2"].shape == ns["W"].shape and not torch.equal(ns["W2"], ns["W"])
    graph_ops = {str(n.target) for n in ns["ep_merged"].graph.nodes if n.op == "call_function"}
    assert not any("miss." in op for op in graph_ops), graph_ops        # merged: no miss op left
    assert any("miss." in str(n.target) for n in ns["ep"].graph.nodes), "unmerged: the miss ops stay"
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "lora" / "adapter_config.json").is_file()
    assert (tmp_path / "model.pt").is_file()
    # TorchScript compiles every branch: a scripted merged MissLinear still names the miss ops,
    # merge_and_unload's plain layers do not (the README says to script those).
    assert "miss::" in str(torch.jit.script(ns["merged"]).inlined_graph)
    assert "miss::" not in str(torch.jit.load(tmp_path / "merged.pt").inlined_graph)
    torch.testing.assert_close(torch.jit.load(tmp_path / "merged.pt")(ns["x"]), ns["model"](ns["x"]))
    if not refused_aoti:
        torch.testing.assert_close(ns["runner"](ns["x"]), ns["model"](ns["x"]))
    assert not miss_ext.peft.is_accelerated(ns["peft_model"])
    # Mixed-adapter batches (issue 14): three rows, one per name; the bank changed as the comments say.
    assert ns["mixed_tokens"].shape == (3, 16) and ns["beams"].shape == (3, 16)
    assert miss_ext.bank_adapter_names(ns["server"]) == ["support", "fresh"]
    assert (tmp_path / "out" / "support_again" / "adapter_config.json").is_file()


def test_python_blocks_parser():
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\nz = 3\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (9, "y = 2\nz = 3\n")]
    with pytest.raises(AssertionError, match="never closed"):
        python_blocks("```python\nx = 1\n")


PUBLIC_MODULES = ("ops", "modules", "model", "adapter_files", "bank", "bank_model", "lora", "peft", "tensor_parallel")


def test_public_names_are_each_modules_all_and_documented():
    """Each module's `__all__` names what users may import from it (its other functions are the
    package's internals): every name exists, every public callable has a docstring, the package's
    own `__all__` re-exports those same objects, and every `miss_ext.<module>.<name>` the README
    or docs/ mention is in that module's `__all__` (a renamed or dropped public name fails here)."""
    import importlib
    modules = {name: importlib.import_module(f"miss_ext.{name}") for name in PUBLIC_MODULES}
    public = {}
    for name, module in modules.items():
        assert module.__all__, name
        for attr in module.__all__:
            assert hasattr(module, attr), f"miss_ext.{name}.__all__ names {attr}, which it lacks"
            obj = getattr(module, attr)
            if callable(obj):
                assert obj.__doc__ and obj.__doc__.strip(), f"miss_ext.{name}.{attr} has no docstring"
            public[attr] = obj
    for attr in miss_ext.__all__:
        if attr != "build_info":  # the compiled library's build settings (miss_ext._library)
            assert public.get(attr) is getattr(miss_ext, attr), attr
    docs = [README] + sorted((README.parent / "docs").glob("*.md"))
    mentioned = set()
    for path in docs:
        mentioned |= set(re.findall(r"miss_ext\.(" + "|".join(PUBLIC_MODULES) + r")\.([A-Za-z_]\w*)", path.read_text()))
    assert mentioned
    missing = sorted(f"miss_ext.{m}.{a}" for m, a in mentioned if a not in modules[m].__all__)
    assert not missing, f"the docs mention names outside their module's __all__: {missing}"


def test_the_repository_names_only_documents_it_holds():
    """The project's documents are its own (issue 13): no file points outside the checkout (the
    developers' shared folder), and every `docs/<name>.md` a file names exists (a test docstring
    named the shared folder's spec file as if it were in docs/: an audit, 2026-12-06)."""
    root = README.parent
    outside = ".." + "/shared"  # spelled apart, so that this file does not match itself
    suffixes = {".py", ".md", ".txt", ".cpp", ".h", ".cu", ".cuh", ".sh", ".cmake", ".in", ".toml", ".cfg"}
    folders = ["docs", "miss_ext", "csrc", "tests", "bench", "scripts", "examples", "cmake", ".ci"]
    files = [p for p in (README, root / "setup.py", root / "CMakeLists.txt", root / "MANIFEST.in",
                         root / "requirements-dev.txt") if p.is_file()]
    files += [p for folder in folders for p in sorted((root / folder).rglob("*"))
              if p.is_file() and (p.suffix in suffixes or p.parent.name == ".ci")]
    docs = {p.name for p in (root / "docs").glob("*.md")}
    assert {"miss.md", "multi_gpu.md"} <= docs
    problems = []
    for path in files:
        text = path.read_text(errors="replace")
        if outside in text:
            problems.append(f"{path.relative_to(root)} names {outside}")
        problems += [f"{path.relative_to(root)} names docs/{name}, which does not exist"
                     for name in sorted(set(re.findall(r"docs/([\w.-]+\.md)", text)) - docs)]
    assert len(files) > 100 and not problems, problems

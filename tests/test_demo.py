"""The demo, `python -m miss_ext.demo`, run end to end with tiny settings on the CPU.

In-process runs go through `main(argv)` (exit code, printed table, files) or `run_demo` (when the
trained model's logits are needed); one run goes through the module entry point in a subprocess.
"""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

import miss_ext  # noqa: E402
from miss_ext import demo  # noqa: E402
from conftest import PACKAGE_PARENT  # noqa: E402

# One CPU thread (also the demo's default), said explicitly: on a machine shared with other busy
# processes, two OpenMP threads spend most of a tiny step waiting for each other.
TINY = ["--size", "tiny", "--device", "cpu", "--batch-size", "8", "--seq-len", "32", "--threads", "1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def has_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


needs_peft = pytest.mark.skipif(not has_peft(), reason="peft not installed")


def table_rows(text: str) -> dict:
    """{variant: [cells]} from the printed table (rows start with the variant's name)."""
    rows = {}
    for line in text.splitlines():
        cells = line.split()
        if len(cells) == 6 and cells[0] in ("miss_ext", "peft"):
            rows[cells[0]] = cells[1:]
    return rows


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    # IHDR: width and height, big-endian, right after the magic and the chunk header.
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 300 and height >= 200, (width, height)


@needs_peft
def test_main_compares_with_peft_and_writes_everything(tmp_path, capsys):
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    assert demo.main(TINY + ["--steps", "6", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads, "the demo must give the thread count back"
    printed = capsys.readouterr().out
    assert "torch CPU threads: 1" in printed

    rows = table_rows(printed)
    assert set(rows) == {"miss_ext", "peft"}, printed
    for variant, cells in rows.items():
        ms_per_step, tokens_per_s, saved_mib, first_loss, final_loss = (float(c.replace(",", "")) for c in cells)
        assert ms_per_step > 0 and tokens_per_s > 0 and saved_mib > 0, (variant, cells)
        # Zero-initialised adapters: step 1 sees the random base, so about ln(vocab).
        assert abs(first_loss - math.log(demo.VOCAB)) < 1.0, (variant, first_loss)
    assert "median ms/step" in printed and "saved for backward" in printed
    # Same base, init and data, no dropout: PEFT and miss_ext compute the same losses.
    diff = re.search(r"max over steps ([0-9.e+-]+)", printed)
    assert diff and float(diff.group(1)) < 1e-4, printed
    assert re.search(r"merge check .* PASS", printed), printed

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "MISS" and config["r"] == 8 and config["init_weights"] is True
    assert (out / "adapter_model.safetensors").is_file()
    assert (out / "base_model" / "config.json").is_file()
    assert_png(out / "loss_curve.png")
    assert f"PeftModel.from_pretrained(base, {str(out.resolve())!r})" in printed


@needs_peft
def test_peft_loads_the_saved_adapter_with_the_trained_logits(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    args = demo.parse_args(TINY + ["--steps", "6", "--no-peft", "--out", str(tmp_path)])
    result = demo.run_demo(args)
    assert result.merge.passed

    blocks = load_file(str(tmp_path / "adapter_model.safetensors"))
    layers = demo.model_dims(args).layers
    assert len(blocks) == 7 * layers
    assert all(k.startswith("base_model.model.model.layers.") and k.endswith(".miss_block") for k in blocks)
    assert all(b.abs().max() > 0 for b in blocks.values()), "some saved blocks are still zero"

    base = LlamaForCausalLM.from_pretrained(tmp_path / "base_model")
    base_logits = demo.logits_of(base, result.heldout)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path))
    peft_logits = demo.logits_of(peft_model, result.heldout)
    scale = result.unmerged_logits.abs().max().item()
    torch.testing.assert_close(peft_logits, result.unmerged_logits, rtol=0, atol=1e-5 * scale)
    # The adapter matters: without it the logits are far from the trained ones.
    assert (base_logits - result.unmerged_logits).abs().max() > 1e3 * 1e-5 * scale
    # The demo's merged model is a plain Llama with the same logits.
    assert not any(isinstance(m, miss_ext.MissLinear) for m in result.merged_model.modules())
    torch.testing.assert_close(demo.logits_of(result.merged_model, result.heldout), result.unmerged_logits,
                               rtol=0, atol=1e-4 * scale)


def test_loss_falls_with_only_miss_blocks_training(tmp_path):
    args = demo.parse_args(TINY + ["--steps", "80", "--no-peft", "--out", str(tmp_path)])
    result = demo.run_demo(args)
    (run,) = result.runs
    assert len(run.losses) == 80
    first, last = run.losses[0], sum(run.losses[-5:]) / 5
    # Seeded and deterministic; measured 4.63 -> 2.15 (mean of the last 5) with 1 and 2 threads.
    # The frozen random base alone stays near ln(64) = 4.16: this fall is the adapters learning.
    assert last < 0.6 * first, run.losses


@needs_peft
@pytest.mark.parametrize("extra", [["--mode", "mini", "--mini-r", "16"], ["--mode", "bat", "--r", "8"],
                                   ["--dtype", "bf16"]], ids=["mini", "bat", "bf16"])
def test_other_modes_and_bf16_match_peft_and_merge(tmp_path, capsys, extra):
    assert demo.main(TINY + ["--steps", "3", "--out", str(tmp_path)] + extra) == 0
    printed = capsys.readouterr().out
    assert set(table_rows(printed)) == {"miss_ext", "peft"}
    diff = float(re.search(r"max over steps ([0-9.e+-]+)", printed).group(1))
    assert diff < (2e-2 if "bf16" in extra else 1e-4), printed
    assert re.search(r"merge check .* PASS", printed), printed
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_weights"] == {"mini": "mini", "bat": "bat"}.get(extra[1], True)


def unload_without_merging(model):
    """What a broken merge would do: drop the adapters, keep the base weights unchanged."""
    for name, layer in miss_ext.miss_layers(model):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base_layer)
    return model


def test_a_wrong_merge_fails_the_check_and_the_exit_code(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(miss_ext, "merge_and_unload", unload_without_merging)
    assert demo.main(TINY + ["--steps", "6", "--no-peft", "--out", str(tmp_path)]) == 1
    assert re.search(r"merge check .* FAIL", capsys.readouterr().out)


def test_a_merge_check_that_cannot_tell_does_not_pass(tmp_path, capsys, monkeypatch):
    """One bf16 step at a tiny learning rate: the adapter moves the logits by less than the bf16
    tolerance, so a merge that dropped it would pass; the check must say so and not pass (exit 1),
    with a right merge or a wrong one."""
    argv = TINY + ["--dtype", "bf16", "--steps", "1", "--lr", "1e-4", "--no-peft", "--out", str(tmp_path)]
    assert demo.main(argv) == 1
    assert re.search(r"merge check .* INCONCLUSIVE: the adapter moves the logits by only", capsys.readouterr().out)
    monkeypatch.setattr(miss_ext, "merge_and_unload", unload_without_merging)
    assert demo.main(argv) == 1
    assert "INCONCLUSIVE" in capsys.readouterr().out


def test_training_that_collapsed_exits_2_and_saves_nothing(tmp_path, capsys):
    """--lr 1e6 leaves finite losses but logits that no longer depend on the input (all 0 when
    measured); the NaN check let that through to a saved adapter and exit 0."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        demo.main(["--size", "tiny", "--steps", "4", "--batch-size", "2", "--seq-len", "8", "--lr", "1e6",
                   "--no-peft", "--threads", "1", "--out", str(out)])
    assert exc.value.code == 2
    assert "--lr 1000000.0: training collapsed (miss_ext: the logits no longer depend on the input)" in \
        capsys.readouterr().err
    assert not out.exists()


def test_module_entry_point_runs_and_exits_zero(tmp_path):
    # The miss_ext under test (an installed copy's, not the checkout's unbuilt one), run elsewhere.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "miss_ext.demo", *TINY, "--steps", "3", "--no-peft",
                           "--out", str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "miss_ext" in table_rows(proc.stdout) and "PASS" in proc.stdout, proc.stdout
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert_png(tmp_path / "out" / "loss_curve.png")


@pytest.mark.parametrize("argv, message", [
    (["--mode", "bat", "--r", "12"], "--r 12 does not divide"),
    (["--mode", "mini", "--mini-r", "7"], "--mini-r 7 must divide"),
    (["--r", "0"], "must be a positive integer, got 0"),
    (["--r", "200", "--size", "tiny"],
     "--r 200 is larger than the smallest projection input (64); PEFT rejects that; pass --no-peft"),
    (["--heads", "5"], "--heads 5 must divide the hidden size 128"),
    (["--seq-len", "2"], "--seq-len must be at least 3"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1), got 1.5"),
    (["--mode", "lora"], "invalid choice: 'lora'"),
    (["--device", "tpu"], "--device tpu"),
    (["--threads", "-1"], "must be 0 or a positive integer, got -1"),
    # No traceback after minutes of allocation (a review, 2026-12-05)
    (["--threads", "100000"], "must be at most the machine's"),
    (["--seq-len", "100000000"], "--seq-len must be at most 4096 on the synthetic task"),
    # the user-model flags (tests/test_demo_user_model.py)
    (["--model", "x"], "--model needs --data"),
    (["--data", "x.txt"], "--data needs --model"),
    (["--model", "x", "--data", "y", "--hidden", "64"], "--hidden describes the random model"),
    (["--model", "x", "--data", "y", "--size", "tiny"], "--size describes the random model"),
    (["--model", "x", "--data", "y", "--seq-len", "1"], "--seq-len must be at least 2"),
    (["--target-modules", "a,,b"], "expected a comma list of module names"),
    (["--target-modules", "q_proj("], "is not a valid regex"),
    (["--heldout", "1.5"], "must be between 0 and 1"),
    (["--hidden", "96", "--heads", "32"], "needs an even head dimension"),
    (["--seed", str(2**64)], "--seed must be in [0, 2^63)"),
    (["--steps", str(10**12)], "is more than this demo runs"),
    # the held-out batch would take most of the task's 448 sequences (5000: make_batches never ended)
    (["--batch-size", "5000", "--no-peft"], "--batch-size 5000: the random model's task has only 448"),
    (["--batch-size", "113", "--no-peft"], "give at most 112"),
    (["--out", __file__], "is a file; give a folder"),
    (["--out", "/proc/miss_demo_out"], "--out /proc/miss_demo_out: cannot create or write it (making a folder in /proc failed:"),
    (["--out", ""], "--out: is empty; give a folder"),  # Path("") would be the current folder
])
def test_bad_flags_exit_with_a_message_naming_the_value(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        demo.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--device", "cuda"])
    assert exc.value.code == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--size", "--hidden", "--layers", "--steps", "--mode", "--r", "--mini-r", "--device", "--dtype",
                 "--batch-size", "--seq-len", "--lr", "--seed", "--out", "--no-peft"):
        assert re.search(rf"\s{re.escape(flag)}\b", text), flag


def test_an_out_folder_holding_a_model_is_refused(tmp_path, capsys):
    """An --out that holds another model (its config.json): the adapter's adapter_config.json
    beside it would make from_pretrained load the adapter's base there instead, and the model no
    longer loaded (a new-user pass, 2026-12-04). Refused with exit 2, nothing written."""
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as exc:
        demo.main(TINY + ["--steps", "1", "--no-peft", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert f"--out {tmp_path} holds a model (config.json)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def _printed_code(printed: str, start: str) -> str:
    """The indented code lines after the line starting with `start`, as a user would paste them."""
    lines = printed[printed.index(start):].splitlines()[1:]
    return "\n".join(line.removeprefix("    ") for line in lines if line.startswith("    "))


@needs_peft
def test_the_closing_lines_load_the_adapter_as_trained(tmp_path, capsys):
    """The printed loading lines: with the trained dtype, always (transformers 5 takes the
    checkpoint's dtype by default, so a float32 run on a bf16 --model came back in bf16), and with
    load_adapter only where PEFT cannot load the adapter (--no-peft allows r above a layer's
    in_features; the lines used to show PeftModel.from_pretrained, which raises there). A new-user
    pass and a review, 2026-12-04. The printed code is run, as a user would paste it."""
    out = tmp_path / "wide"
    assert demo.main(TINY + ["--steps", "2", "--no-peft", "--r", "100", "--dtype", "bf16", "--out", str(out)]) in (0, 1)
    printed = capsys.readouterr().out
    code = _printed_code(printed, "load the adapter (PEFT cannot")
    assert "PeftModel" not in code and "dtype=torch.bfloat16" in code, printed
    scope = {}
    exec(code, scope)
    assert scope["model"].dtype == torch.bfloat16 and miss_ext.miss_layers(scope["model"])
    out = tmp_path / "peft"
    assert demo.main(TINY + ["--steps", "2", "--out", str(out)]) in (0, 1)
    printed = capsys.readouterr().out
    code = _printed_code(printed, "load the adapter with PEFT")
    assert "PeftModel.from_pretrained" in code and "dtype=torch.float32" in code, printed
    scope = {}
    exec(code, scope)
    assert scope["model"].dtype == torch.float32 and any("miss_block" in n for n, _ in scope["model"].named_parameters())


def test_refused_runs_write_nothing(tmp_path, capsys):
    """Inputs the model refuses, and a diverged training run, exit 2 before anything is written
    (the random base used to be saved first, beside an older adapter of the folder)."""
    fast = ["--size", "tiny", "--steps", "3", "--seq-len", "16", "--batch-size", "2", "--no-peft"]
    for extra, message in ((["--target-modules", "nothing_here"], "cannot adapt it with --target-modules"),
                           (["--lr", "1e30"], "training diverged")):
        out = tmp_path / extra[0].strip("-")
        with pytest.raises(SystemExit) as exc:
            demo.main(fast + extra + ["--out", str(out)])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
        assert not out.exists(), extra


def test_shape_checks_look_at_the_targeted_projections_only(tmp_path, capsys):
    """--mini-r 192 divides the tiny model's MLP width but not its hidden size (64): with only the
    MLP's up-projections targeted the run is valid (it was refused for q_proj's 64)."""
    argv = ["--size", "tiny", "--steps", "2", "--seq-len", "16", "--batch-size", "2", "--no-peft",
            "--mode", "mini", "--r", "8", "--mini-r", "192"]
    with pytest.raises(SystemExit) as exc:
        demo.main(argv + ["--out", str(tmp_path / "all")])
    assert exc.value.code == 2 and "--mini-r 192 must divide" in capsys.readouterr().err
    # A target in a later layer only is checked too (layer 0's paths alone matched nothing).
    with pytest.raises(SystemExit) as exc:
        demo.main(argv + ["--target-modules", r"model\.layers\.1\.self_attn\.q_proj", "--out", str(tmp_path / "l1")])
    assert exc.value.code == 2 and "--mini-r 192 must divide" in capsys.readouterr().err
    for targets in ("gate_proj,up_proj", r"model\.layers\.\d+\.mlp\.(gate|up)_proj"):
        out = tmp_path / str(len(targets))
        demo.main(argv + ["--target-modules", targets, "--out", str(out)])
        assert (out / "adapter_model.safetensors").is_file(), targets


def test_heldout_sequences_are_not_trained_on():
    """The synthetic task has only 64 x 7 sequences: the held-out batch is kept out of the
    training batches explicitly (a different seed alone left all of them in)."""
    from miss_ext.demo._synthetic import make_batches

    heldout = make_batches(1, 16, 12, seed=2)[0]
    train = make_batches(200, 16, 12, seed=1, exclude=heldout).stacked().view(-1, 12)
    assert not (train.unsqueeze(1) == heldout.unsqueeze(0)).all(-1).any()
    assert (make_batches(200, 16, 12, seed=1).stacked().view(-1, 12).unsqueeze(1)
            == heldout.unsqueeze(0)).all(-1).any()


def test_bf16_base_keeps_float32_rotary_buffers_as_from_pretrained(tmp_path):
    """The demo's bf16 model is the model a user reloads from its saved base: weights in bf16,
    rotary frequencies in float32 (model.to(bf16) rounded them, and the logits moved by 0.06)."""
    from transformers import LlamaForCausalLM

    from miss_ext.demo._cli import ModelDims
    from miss_ext.demo._synthetic import build_base_model
    from miss_ext.demo._training import save_base_model

    model = build_base_model(ModelDims(64, 2, 4, 2, 192), 16, 0, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(b.dtype == torch.float32 for n, b in model.named_buffers() if "inv_freq" in n)
    save_base_model(model, tmp_path)
    again = LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    ids = torch.arange(16).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)


@pytest.mark.parametrize("failure", ["adapter write fails", "interrupted while saving the base"])
def test_a_rerun_whose_save_fails_leaves_no_loadable_mismatched_pair(tmp_path, capsys, monkeypatch, failure):
    """A second run into the same --out writes its new random base first; when the adapter write
    then failed (disk full) or the run was interrupted, the earlier run's adapter, whose config
    names that base folder, was left beside the new base and loaded onto it without an error. Now
    the earlier config is removed before the base is replaced: the folder holds no loadable
    adapter, and the demo says so (its Ctrl-C message points at that line)."""
    from miss_ext.demo import _driver

    fast = TINY + ["--steps", "2", "--no-peft", "--out", str(tmp_path)]
    assert demo.main(fast + ["--seed", "0"]) == 0
    assert f"saved the adapter into {tmp_path.resolve()} and the random base model into" in capsys.readouterr().out
    assert (tmp_path / "adapter_config.json").is_file()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if failure == "adapter write fails":
        monkeypatch.setattr(miss_ext, "save_adapter", disk_full)
        with pytest.raises(OSError, match="No space left"):
            demo.main(fast + ["--seed", "1"])
    else:
        monkeypatch.setattr(_driver, "save_base_model", interrupt)
        assert demo.main(fast + ["--seed", "1"]) == 130
    printed = capsys.readouterr()
    assert f"the save into {tmp_path.resolve()} did not complete: no adapter of this run was saved (any earlier " \
           "run's adapter there was removed first" in printed.err
    assert "saved the adapter" not in printed.out
    assert not (tmp_path / "adapter_config.json").exists()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        miss_ext.load_adapter(torch.nn.Linear(2, 2), str(tmp_path))


def test_demo_limits_are_inclusive():
    """Catches the change (--threads refused at the machine's core count) and the changes (--seq-len 4096
    refused, 4097 taken): the limits are "at most"."""
    from miss_ext.demo import _cli

    cores = _cli.max_threads()
    assert _cli.parse_args(["--threads", str(cores)]).threads == cores
    assert _cli.parse_args(["--seq-len", str(_cli.MAX_SYNTHETIC_SEQ_LEN)]).seq_len == _cli.MAX_SYNTHETIC_SEQ_LEN
    with pytest.raises(SystemExit):
        _cli.parse_args(["--seq-len", str(_cli.MAX_SYNTHETIC_SEQ_LEN + 1)])

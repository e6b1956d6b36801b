"""`python -m miss_ext.demo.mixed` (issue 14): two adapters trained together on two tasks, saved in
PEFT's format, loaded into a fresh bank, then one mixed generate() batch where each row must equal
its adapter alone and follow its own adapter's task (the demo's exit code checks it)."""
import subprocess
import sys

import pytest
import torch

import miss_ext

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from miss_ext.demo import mixed  # noqa: E402


def test_each_row_follows_its_adapter(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)
    assert mixed.main(["--out", tmp_path.name]) == 0  # a relative --out: the configs name the base absolutely
    out = capsys.readouterr().out
    assert "each row follows its adapter" in out
    shares = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in out.splitlines()
              if line.strip().split(" ")[0] in ("up", "down", "__base__") and len(line.split()) == 3}
    assert shares["up"][0] >= 0.9 and shares["down"][1] >= 0.9 and max(shares["__base__"]) < 0.5
    for task in ("up", "down"):
        assert (tmp_path / task / "adapter_config.json").is_file()
        assert (tmp_path / task / "adapter_model.safetensors").is_file()
    # The folders stand alone: PEFT finds the saved random base through base_model_name_or_path
    # (from any folder), and the reloaded adapter still follows its task.
    peft = pytest.importorskip("peft")
    monkeypatch.chdir("/")
    for task in ("up", "down"):
        model = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / task)).eval()
        assert model.peft_config["default"].base_model_name_or_path == str((tmp_path / "base_model").resolve())
        start = torch.arange(0, 64, 4)
        with torch.no_grad():
            generated = model.generate(input_ids=start[:, None], max_new_tokens=6, do_sample=False,
                                       pad_token_id=0)[:, 1:]
        assert mixed.follows(generated, start, task) >= 0.9, task


def test_an_untrained_bank_fails_the_check(capsys):
    """The check can fail: after one step neither adapter follows its task."""
    assert mixed.main(["--steps", "1"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_one_prompt_per_adapter_runs_to_the_check(capsys):
    # --prompts 1 passed the flag check and then raised IndexError printing two sample rows
    # (a new-user review, 2026-12-03); exit 1 is the check's answer for an untrained bank.
    assert mixed.main(["--steps", "1", "--prompts", "1"]) == 1
    assert "rows that differ from their adapter" in capsys.readouterr().out


def test_base_rows_served_by_an_adapter_fail_the_check(capsys, monkeypatch):
    """A bank that serves the "__base__" rows of the generate batch with adapter "up": the base rows
    then differ from the base model alone (and follow "up"), which the exit code must catch; it
    checked the adapters' rows only."""
    real = miss_ext.mixed_batch

    def base_rows_to_up(model, names):
        return real(model, ["up" if name == "__base__" else name for name in names])

    monkeypatch.setattr(miss_ext, "mixed_batch", base_rows_to_up)
    assert mixed.main([]) == 1
    out = capsys.readouterr().out
    assert "rows that differ from their adapter (or the base) generating alone: 16 of 48" in out
    assert "FAILED" in out


def test_module_entry_point_and_bad_flags():
    run = subprocess.run([sys.executable, "-m", "miss_ext.demo.mixed", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "Two MiSS adapters" in run.stdout
    run = subprocess.run([sys.executable, "-m", "miss_ext.demo.mixed", "--batch-size", "3"], capture_output=True,
                         text=True)
    assert run.returncode == 2 and "--batch-size must be even" in run.stderr
    assert mixed.parse_args(["--threads", "0"]).threads == 0  # torch's choice, as in the main demo


@pytest.mark.parametrize("argv, message", [
    (["--min-accuracy", "0"], "--min-accuracy must be in (0, 1]"),  # 0 passed rows that follow nothing
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--seed", str(2**64)], "--seed must be in [0, 2^63)"),
    (["--out", __file__], "is a file; give a folder"),
    # A folder that cannot be created is refused before training (root passes os.access there).
    (["--out", "/proc/miss_demo_out"], "--out /proc/miss_demo_out: cannot create or write it (making a folder in /proc failed:"),
    (["--out", ""], "--out: is empty; give a folder"),
    (["--batch-size", "5"], "--batch-size must be even (half the sequences per task), got 5"),
    (["--seq-len", "1"], "--seq-len must be at least 2 (a token and its successor), got 1"),
    # Generating past the trained positions failed the accuracy check after training, unexplained.
    (["--seq-len", "8", "--new-tokens", "8"], "--new-tokens 8 would generate past the trained length (--seq-len 8"),
    (["--threads", "-1"], "--threads must be 0 (torch's choice) or positive, got -1"),
    (["--threads", "100000"], "--threads must be at most the machine's"),
    (["--seq-len", "100000000", "--new-tokens", "3"], "--seq-len must be at most 4096, got 100000000"),
    # PEFT refuses to load r > in_features (the tiny model's hidden size is 64)
    (["--r", "100"], "--r 100 is larger than the smallest projection input (64); PEFT cannot load"),
])
def test_bad_values_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        mixed.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_rerun_removes_the_earlier_adapters_before_replacing_the_base(tmp_path, monkeypatch):
    """Each adapter's config names OUT/base_model: the earlier run's configs are removed before a
    new base replaces it, so a save that fails part way (here the base's) leaves no earlier adapter
    that would load onto the new base without an error. Also the other demo's (python -m
    miss_ext.demo into the same --out writes OUT/adapter_config.json naming OUT/base_model; review,
    2026-12-03); an adapter naming another base is kept."""
    import json

    names_base = json.dumps({"base_model_name_or_path": str((tmp_path / "base_model").resolve())})
    for folder in [*mixed.TASKS, "."]:
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / "adapter_config.json").write_text(names_base)
        (tmp_path / folder / "adapter_model.safetensors").write_bytes(b"earlier run's")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/model"}))
    removed = [tmp_path / folder / "adapter_config.json" for folder in [*mixed.TASKS, "."]]

    def disk_full(model, path):
        assert not any(config.exists() for config in removed)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mixed, "save_base_model", disk_full)
    with pytest.raises(OSError, match="No space left"):
        mixed.main(["--steps", "1", "--out", str(tmp_path)])
    assert not any(config.exists() for config in removed)
    assert (tmp_path / "other" / "adapter_config.json").exists()


def test_an_interrupt_is_a_line_and_exit_130(capsys, monkeypatch):
    """Ctrl-C during training printed a KeyboardInterrupt traceback (a new-user pass, 2026-12-04);
    the main demo's line and exit code now."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mixed, "train", interrupted)
    assert mixed.main(["--steps", "1"]) == 130
    assert "interrupted: nothing was saved" in capsys.readouterr().out

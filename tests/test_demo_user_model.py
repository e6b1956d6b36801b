"""The demo on a user's own model folder and text (`--model DIR --data FILE`), without network.

The model folder is built here: a tiny random Llama saved with save_pretrained, and a BPE
tokenizer trained with the `tokenizers` library on Python standard-library source (shipped with
every Python), wrapped in PreTrainedTokenizerFast and saved into the same folder. The training
text is another standard-library module's source.
"""
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from miss_ext import demo  # noqa: E402
from conftest import PACKAGE_PARENT  # noqa: E402
from test_demo import _printed_code  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
VOCAB_SIZE = 320
SEQ_LEN = 32
STEPS = 60
# Small and fast: one thread, few steps; --heldout 0.2 keeps more held-out tokens for a stable loss.
FAST = ["--device", "cpu", "--threads", "1", "--seq-len", str(SEQ_LEN), "--batch-size", "8", "--steps", str(STEPS),
        "--r", "8", "--heldout", "0.2"]


def stdlib_text(name: str) -> str:
    return (STDLIB / name).read_text(encoding="utf-8")


def save_tokenizer(folder: Path, text: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<unk>", "<eos>"], show_progress=False)
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    wrapped.save_pretrained(folder)


def save_model(folder: Path, vocab: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, initializer_range=48 ** -0.5)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_llama")
    save_tokenizer(folder, stdlib_text("argparse.py"))
    from transformers import AutoTokenizer

    save_model(folder, len(AutoTokenizer.from_pretrained(folder, local_files_only=True)))
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "textwrap.txt"
    path.write_text(stdlib_text("textwrap.py"), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def jsonl_file(tmp_path_factory) -> Path:
    # One record per top-level definition of another module: many documents, EOS between them.
    chunks = [c for c in re.split(r"\n(?=def |class )", stdlib_text("shlex.py")) if c.strip()]
    path = tmp_path_factory.mktemp("data") / "shlex.jsonl"
    path.write_text("".join(json.dumps({"text": c, "source": "shlex"}) + "\n" for c in chunks), encoding="utf-8")
    return path


def adapted(out: Path) -> list:
    """"layer.projection" of every block in the saved adapter (save_adapter writes target_modules
    as a regex of the adapted paths, so the weights say which layers were adapted)."""
    from safetensors.torch import load_file

    names = []
    for key in load_file(str(out / "adapter_model.safetensors")):
        found = re.fullmatch(r"base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.miss_block", key)
        assert found, key
        names.append(f"{found.group(1)}.{found.group(2)}")
    return names


def heldout_losses(printed: str) -> dict:
    """{"before": loss, "miss_ext": loss, "peft": loss} from the printed held-out lines."""
    found = {}
    for what, loss, ppl in re.findall(r"(before training|after training \((?:miss_ext|peft)\))(?: \(base model\))?: "
                                      r"loss ([0-9.]+), perplexity ([0-9.,]+)", printed):
        key = "before" if what.startswith("before") else what[len("after training ("):-1]
        found[key] = float(loss)
        assert float(ppl.replace(",", "")) == pytest.approx(torch.tensor(float(loss)).exp().item(), rel=2e-3)
    return found


def test_text_file_trains_saves_and_peft_loads_the_adapter(model_dir, text_file, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    args = demo.parse_args(["--model", str(model_dir), "--data", str(text_file), "--no-peft", "--out", str(out)]
                           + FAST)
    result = demo.run_demo(args)
    printed = capsys.readouterr().out
    assert result.merge.passed and re.search(r"merge check .* PASS", printed), printed

    # Held-out loss dropped: measured 6.28 -> 5.55 (seeds 0-2: 5.53-5.57) in 60 steps; the random
    # base's fan-in init makes confident wrong guesses, above a uniform guess's ln 320 = 5.77.
    before, after = result.heldout_before.loss, result.heldout_after["miss_ext"].loss
    assert after < before - 0.5, (before, after)
    assert heldout_losses(printed) == {"before": pytest.approx(before, abs=1e-4),
                                       "miss_ext": pytest.approx(after, abs=1e-4)}
    assert re.search(r"data: .*textwrap.txt -> [0-9,]+ tokens, \d+ sequences of 32", printed), printed

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "MISS" and config["base_model_name_or_path"] == str(model_dir.resolve())
    # all-linear by default with --model: the seven projections of each of the 2 layers, not lm_head.
    assert sorted(adapted(out)) == sorted(f"{layer}.{name}" for layer in range(2) for name in demo.TARGET_MODULES)
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "base_model").exists(), "the user's model is not copied"

    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    peft_model = PeftModel.from_pretrained(base, str(out))
    logits = demo.logits_of(peft_model, result.heldout)
    scale = result.unmerged_logits.abs().max().item()
    torch.testing.assert_close(logits, result.unmerged_logits, rtol=0, atol=1e-5 * scale)
    reloaded = demo.heldout_loss(peft_model, result.heldout, 8, torch.device("cpu")).loss
    assert reloaded < before - 0.5


def test_jsonl_with_peft_comparison_and_a_regex_target(model_dir, jsonl_file, tmp_path, capsys):
    out = tmp_path / "out"
    target = r".*\.(q_proj|v_proj|down_proj)"
    assert demo.main(["--model", str(model_dir), "--data", str(jsonl_file), "--out", str(out),
                      "--target-modules", target] + FAST) == 0
    printed = capsys.readouterr().out
    losses = heldout_losses(printed)
    assert set(losses) == {"before", "miss_ext", "peft"}, printed
    assert losses["miss_ext"] < losses["before"] - 0.3, losses
    assert losses["peft"] == pytest.approx(losses["miss_ext"], abs=1e-3), losses  # same init, data and seed
    diff = re.search(r"max over steps ([0-9.e+-]+)", printed)
    assert diff and float(diff.group(1)) < 1e-4, printed
    assert sorted(adapted(out)) == sorted(f"{layer}.{name}" for layer in range(2)
                                          for name in ("q_proj", "v_proj", "down_proj"))
    # In the trained dtype, always: transformers 5 loads the checkpoint's dtype by default.
    assert f"AutoModelForCausalLM.from_pretrained({str(model_dir.resolve())!r}, dtype=torch.float32)" in printed


def test_comma_list_of_targets(model_dir, text_file, tmp_path, capsys):
    """Also: a random-model run's base_model left in --out is named as not this adapter's base
    (it sat there without a word, a new-user pass 2026-12-07), and kept."""
    (tmp_path / "base_model").mkdir()
    (tmp_path / "base_model" / "config.json").write_text("{}")
    args = demo.parse_args(["--model", str(model_dir), "--data", str(text_file), "--no-peft", "--out", str(tmp_path),
                            "--target-modules", "k_proj, o_proj"] + FAST + ["--steps", "2"])
    assert args.target_modules == ["k_proj", "o_proj"]
    demo.run_demo(args)
    assert sorted(adapted(tmp_path)) == ["0.k_proj", "0.o_proj", "1.k_proj", "1.o_proj"]
    printed = capsys.readouterr().out
    assert f"note: {tmp_path / 'base_model'} is not this adapter's base model" in printed, printed
    assert (tmp_path / "base_model" / "config.json").read_text() == "{}"


@pytest.mark.parametrize("text, expected", [
    ("all-linear", "all-linear"), ("q_proj", ["q_proj"]), ("q_proj,v_proj", ["q_proj", "v_proj"]),
    ("self_attn.q_proj", ["self_attn.q_proj"]), (r".*\.layers\.\d{1,2}\.mlp\..*", r".*\.layers\.\d{1,2}\.mlp\..*"),
])
def test_target_modules_flag_parses_as_apply_miss_takes_it(text, expected):
    assert demo.parse_target_modules(text) == expected


def test_pack_and_split_holds_out_the_last_tenth_at_least_one():
    ids = torch.arange(25 * 4 + 3)
    data = demo.pack_and_split(ids, 4, 0.1, Path("x"))
    assert data.train.shape == (23, 4) and data.heldout.shape == (2, 4) and data.dropped == 3
    assert data.heldout[-1, -1] == 99 and data.train[0, 0] == 0  # consecutive, held-out text last
    data = demo.pack_and_split(torch.arange(5 * 4), 4, 0.1, Path("x"))
    assert data.train.shape == (4, 4) and data.heldout.shape == (1, 4)
    with pytest.raises(demo.DemoInputError, match=r"--data x is too short: 7 tokens .* needs at least 8"):
        demo.pack_and_split(torch.arange(7), 4, 0.1, Path("x"))


def test_training_batches_cover_every_sequence_before_repeating():
    train = torch.arange(10).view(5, 2)
    batches = demo.training_batches(train, steps=4, batch_size=3, seed=0).stacked()
    assert batches.shape == (4, 3, 2)
    first_pass = batches.reshape(-1, 2)[:5, 0].tolist()
    assert sorted(first_pass) == [0, 2, 4, 6, 8]


def _no_tokenizer(tmp: Path, model_dir: Path) -> Path:
    folder = tmp / "no_tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((model_dir / name).read_bytes())
    return folder


@pytest.mark.parametrize("case, message", [
    ("missing folder", r"--model {tmp}/nowhere: no such folder"),
    ("file as folder", r"--model {tmp}/file.txt is a file"),
    ("no config", r"--model {tmp}/empty has no config.json"),
    ("no tokenizer", r"--model {tmp}/no_tokenizer has no tokenizer: none of tokenizer.json"),
    ("missing data", r"--data {tmp}/missing.txt: no such file"),
    ("empty data", r"--data {tmp}/empty.txt is empty"),
    ("blank data", r"--data {tmp}/blank.jsonl is empty"),
    ("short data", r"--data {tmp}/short.txt is too short: \d+ tokens with this tokenizer, but --seq-len 32 needs "
                   r"at least 64"),
    ("jsonl without text", r"--data {tmp}/notext.jsonl, line 2: no \"text\" field"),
    ("jsonl not json", r"--data {tmp}/bad.jsonl, line 1: not JSON"),
    ("jsonl text not a string", r"--data {tmp}/number.jsonl, line 1: \"text\" must be a string, got int"),
    ("seq-len too long", r"--seq-len 256 is longer than --model .* supports \(max_position_embeddings 128\)"),
    ("target matches nothing", r"cannot adapt it with --target-modules .*nothing_here"),
    ("batch larger than the data", r"--batch-size 100000 is more than the \d+ training sequences of --data "),
])
def test_bad_inputs_exit_2_naming_the_path(model_dir, text_file, tmp_path, capsys, case, message):
    tmp = tmp_path
    (tmp / "file.txt").write_text("x")
    (tmp / "empty").mkdir()
    (tmp / "empty.txt").write_text("")
    (tmp / "blank.jsonl").write_text("\n  \n")
    (tmp / "short.txt").write_text("def f(x):\n    return x\n")
    (tmp / "notext.jsonl").write_text('{"text": "a b c"}\n{"content": "no text here"}\n')
    (tmp / "bad.jsonl").write_text("this is not json\n")
    (tmp / "number.jsonl").write_text('{"text": 3}\n')
    model, data, extra = model_dir, text_file, []
    if case in ("missing folder", "file as folder", "no config"):
        model = {"missing folder": tmp / "nowhere", "file as folder": tmp / "file.txt", "no config": tmp / "empty"}[case]
    elif case == "no tokenizer":
        model = _no_tokenizer(tmp, model_dir)
    elif case == "missing data":
        data = tmp / "missing.txt"
    elif case in ("empty data", "blank data", "short data", "jsonl without text", "jsonl not json",
                  "jsonl text not a string"):
        data = tmp / {"empty data": "empty.txt", "blank data": "blank.jsonl", "short data": "short.txt",
                      "jsonl without text": "notext.jsonl", "jsonl not json": "bad.jsonl",
                      "jsonl text not a string": "number.jsonl"}[case]
    elif case == "seq-len too long":
        extra = ["--seq-len", "256"]
    elif case == "target matches nothing":
        extra = ["--target-modules", "nothing_here"]
    elif case == "batch larger than the data":
        extra = ["--batch-size", "100000"]
    out = tmp / "out"
    with pytest.raises(SystemExit) as exc:
        demo.main(["--model", str(model), "--data", str(data), "--out", str(out), "--no-peft"] + FAST + extra)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message.format(tmp=re.escape(str(tmp))), err), err
    assert not out.exists(), "nothing is written when the inputs are refused"


def test_module_entry_point_with_a_model_folder(model_dir, text_file, tmp_path):
    # The miss_ext under test (an installed copy's, not the checkout's unbuilt one), run elsewhere.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "miss_ext.demo", "--model", str(model_dir), "--data", str(text_file),
                           "--out", str(tmp_path / "out"), "--no-peft"] + FAST + ["--steps", "3"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "before training (base model)" in proc.stdout and "PASS" in proc.stdout, proc.stdout
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file() and (tmp_path / "out" / "loss_curve.png").is_file()


def test_an_adapter_folder_or_out_in_the_model_folder_is_refused(model_dir, text_file, tmp_path, capsys):
    """A --model folder holding an adapter_config.json would load with that adapter applied and be
    reported as the base; --out equal to --model would create that situation."""
    import shutil

    folder = tmp_path / "with_adapter"
    shutil.copytree(model_dir, folder)
    (folder / "adapter_config.json").write_text("{}")
    for model, out, message in ((folder, tmp_path / "out", "holds an adapter"),
                                (model_dir, model_dir, "is the --model folder")):
        with pytest.raises(SystemExit) as exc:
            demo.main(["--model", str(model), "--data", str(text_file), "--out", str(out), "--no-peft"] + FAST)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (model_dir / "adapter_config.json").exists()


def test_a_model_that_is_not_causal_is_refused():
    """BERT loaded as a causal LM sees later tokens, so its next-token loss is meaningless."""
    from transformers import BertConfig, BertLMHeadModel, LlamaConfig, LlamaForCausalLM

    from miss_ext.demo._user import DemoInputError, check_causal

    bert = BertLMHeadModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32)).eval()
    with pytest.raises(DemoInputError, match="is not a causal language model"):
        check_causal(bert, Path("bert"), torch.device("cpu"))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    check_causal(llama, Path("llama"), torch.device("cpu"))


def test_jsonl_lines_split_on_newlines_only(tmp_path):
    """A JSON string may hold U+2028 or U+0085 raw (json.dumps(ensure_ascii=False) writes them):
    str.splitlines would cut the line there and report valid JSON as broken."""
    from miss_ext.demo._user import read_documents

    path = tmp_path / "sep.jsonl"
    texts = ["a\\u2028b", "c\\u0085d", "plain"]
    path.write_text("\r\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts) + "\n", encoding="utf-8")
    assert read_documents(path) == texts


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A tiny random GPT-2 (transformers Conv1D projections, tied lm_head) with the BPE tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny_gpt2")
    save_tokenizer(folder, stdlib_text("argparse.py"))
    vocab = len(AutoTokenizer.from_pretrained(folder, local_files_only=True))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=128, n_embd=48, n_layer=2, n_head=4,
                               bos_token_id=1, eos_token_id=1)).save_pretrained(folder)
    return folder


def test_a_conv1d_model_trains_and_says_peft_cannot_load_it(gpt2_dir, text_file, tmp_path, capsys):
    """GPT-2's Conv1D projections: miss_ext adapts them, PEFT's MiSS refuses them. With the PEFT
    comparison the refusal names --no-peft (it blamed --target-modules / --r / --mini-r); with
    --no-peft the closing lines load the adapter with load_adapter (they showed PeftModel, which
    raises "Target module Conv1D ... is not supported"). A review, 2026-12-05. The printed code is
    run, as a user would paste it, and gives the trained model's logits."""
    fast = [arg for arg in FAST if arg != str(STEPS)]
    fast[fast.index("--steps") + 1:fast.index("--steps") + 1] = ["5"]
    with pytest.raises(SystemExit) as exc:
        demo.main(["--model", str(gpt2_dir), "--data", str(text_file), "--out", str(tmp_path / "peft")] + fast)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "transformers Conv1D layers" in err and "--no-peft" in err, err
    assert not (tmp_path / "peft").exists()

    out = tmp_path / "out"
    args = demo.parse_args(["--model", str(gpt2_dir), "--data", str(text_file), "--no-peft", "--out", str(out)] + fast)
    result = demo.run_demo(args)
    assert result.merge.passed and result.peft_refusal and "Conv1D" in result.peft_refusal
    from miss_ext.demo._report import print_where

    capsys.readouterr()
    print_where(out, gpt2_dir, "AutoModelForCausalLM", "float32", peft_refusal=result.peft_refusal)
    printed = capsys.readouterr().out
    code = _printed_code(printed, "load the adapter (PEFT cannot: it adapts transformers Conv1D layers")
    assert "PeftModel" not in code and "miss_ext.load_adapter" in code, printed
    scope = {}
    exec(code, scope)
    logits = demo.logits_of(scope["model"], result.heldout)
    scale = result.unmerged_logits.abs().max().item()
    torch.testing.assert_close(logits, result.unmerged_logits, rtol=0, atol=1e-5 * scale)


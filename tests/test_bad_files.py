"""Adapter files that are broken or lie (issue 13, "Bad files"): load_adapter raises a clear
error naming the problem, and the model is left exactly as it was."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import miss_ext
from conftest import assert_unchanged, snapshot

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 6))


@pytest.fixture
def saved(tmp_path):
    model = _model()
    miss_ext.apply_miss(model, ["0", "2"], r=4, init_weights=False)
    miss_ext.save_adapter(model, tmp_path)
    return tmp_path


def _expect_refused(path, pattern, exc=ValueError):
    model = _model()
    snap = snapshot(model)
    with pytest.raises(exc, match=pattern):
        miss_ext.load_adapter(model, path)
    assert_unchanged(model, snap)


def test_truncated_weights_file(saved):
    data = (saved / WEIGHTS).read_bytes()
    (saved / WEIGHTS).write_bytes(data[: len(data) // 2])
    _expect_refused(saved, r"(?i)adapter_model\.safetensors|safetensors|truncat|incomplete", Exception)


def test_corrupted_header(saved):
    data = bytearray((saved / WEIGHTS).read_bytes())
    data[8:16] = b"\xff" * 8  # inside the JSON header
    (saved / WEIGHTS).write_bytes(bytes(data))
    _expect_refused(saved, r"(?i)safetensors|header|invalid|corrupt", Exception)


def test_config_that_lies_about_r(saved):
    config = json.loads((saved / CONFIG).read_text())
    config["r"] = 2
    (saved / CONFIG).write_text(json.dumps(config))
    _expect_refused(saved, r"block shape \(4, 8\) in the file, the model needs \(2, 8\)")


def test_integer_blocks(saved):
    blocks = load_file(saved / WEIGHTS)
    save_file({k: v.to(torch.int32) for k, v in blocks.items()}, saved / WEIGHTS)
    _expect_refused(saved, r"block dtype torch\.int32 is not floating point")


def test_non_finite_blocks(saved):
    blocks = load_file(saved / WEIGHTS)
    key = sorted(blocks)[0]
    blocks[key][0, 0] = float("nan")
    save_file(blocks, saved / WEIGHTS)
    _expect_refused(saved, r"(?i)non-finite|nan")


def test_saving_non_finite_blocks_warns(tmp_path):
    """save_adapter writes a diverged run's blocks (worth keeping to look at) but says so, naming
    them: load_adapter refuses that file."""
    model = _model()
    miss_ext.apply_miss(model, ["0", "2"], r=4, init_weights=False)
    with torch.no_grad():
        model[2].miss_block[1, 2] = float("inf")
    with pytest.warns(UserWarning, match=r"save_adapter: 2\.miss_block holds non-finite values"):
        miss_ext.save_adapter(model, tmp_path)
    _expect_refused(tmp_path, r"(?i)non-finite|nan")
    bank = _model()
    miss_ext.apply_bank(bank, ["0", "2"], capacity=2, max_r=4)
    miss_ext.add_bank_adapter(bank, "a", r=4)
    with torch.no_grad():
        bank[0].block("a")[0, 0] = float("nan")
    with pytest.warns(UserWarning, match=r"save_bank_adapter: 0\.miss_block holds non-finite values"):
        miss_ext.save_bank_adapter(bank, "a", tmp_path / "bank")


def test_missing_config(saved):
    (saved / CONFIG).unlink()
    _expect_refused(saved, r"adapter_config\.json", Exception)


def _write_bin(folder, obj):
    (folder / WEIGHTS).unlink()
    torch.save(obj, folder / "adapter_model.bin")


def _truncated_bin(folder):
    _write_bin(folder, load_file(folder / WEIGHTS))
    data = (folder / "adapter_model.bin").read_bytes()
    (folder / "adapter_model.bin").write_bytes(data[: len(data) // 2])


BROKEN = {
    "config holds a list": (lambda d: (d / CONFIG).write_text("[1, 2]"),
                            CONFIG, r"holds a JSON list, not an object of config fields", None),
    "config truncated": (lambda d: (d / CONFIG).write_text((d / CONFIG).read_text()[:40]),
                         CONFIG, r"not a JSON adapter config \(truncated or corrupted\?\)", json.JSONDecodeError),
    "config not text": (lambda d: (d / CONFIG).write_bytes(b"\xff\xfe\x00{"),
                        CONFIG, r"not a JSON adapter config", UnicodeDecodeError),
    "weights empty": (lambda d: (d / WEIGHTS).write_bytes(b""),
                      WEIGHTS, r"cannot be read as adapter weights \(truncated or corrupted\?\): SafetensorError",
                      Exception),
    "bin holds a tensor": (lambda d: _write_bin(d, torch.zeros(3)),
                           "adapter_model.bin", r"holds a Tensor, not a dict of tensors by key", None),
    "bin holds a list": (lambda d: _write_bin(d, [torch.zeros(3)]),
                         "adapter_model.bin", r"holds a list, not a dict of tensors by key", None),
    "bin holds numbers": (lambda d: _write_bin(d, {"base_model.model.0.miss_block": 3}),
                          "adapter_model.bin", r"not a dict of tensors by key: 'base_model\.model\.0\.miss_block' "
                                               r"hold something else", None),
    "bin truncated": (_truncated_bin, "adapter_model.bin", r"cannot be read as adapter weights: ", Exception),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_files_raise_value_error_naming_the_file_and_the_problem(saved, case):
    """A config that is not a JSON object (a list: AttributeError 'list' has no 'get'; truncated:
    a bare JSONDecodeError) and weights that cannot be read as a dict of tensors (an empty
    safetensors file: SafetensorError 'header too small'; a .bin holding a tensor: AttributeError
    'items') raised errors naming neither the file nor the problem. Now ValueError naming both,
    the reader's exception chained, the model unchanged; load_bank the same."""
    edit, name, problem, cause = BROKEN[case]
    edit(saved)
    pattern = re.escape(str(saved / name)) + ": " + problem
    model = _model()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=pattern) as info:
        miss_ext.load_adapter(model, saved)
    assert_unchanged(model, snap)
    if cause is None:
        assert info.value.__cause__ is None
    else:
        assert isinstance(info.value.__cause__, cause)
    with pytest.raises(ValueError, match=pattern):
        miss_ext.load_bank(model, {"a": saved})
    assert_unchanged(model, snap)


def test_non_finite_blocks_are_refused_by_the_bank_too(saved):
    """load_bank_adapter and load_bank check a file's blocks as load_adapter does: a NaN block would
    make every output of the rows that name the adapter non-finite."""
    blocks = load_file(saved / WEIGHTS)
    key = sorted(blocks)[0]
    blocks[key][0, 0] = float("nan")
    save_file(blocks, saved / WEIGHTS)
    model = miss_ext.apply_bank(_model(), ["0", "2"], capacity=2, max_r=4)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"the block is not floating point or holds NaN/inf"):
        miss_ext.load_bank_adapter(model, "x", str(saved))
    assert_unchanged(model, snap)
    assert miss_ext.bank_adapter_names(model) == []
    with pytest.raises(ValueError, match=r"the block is not floating point or holds NaN/inf"):
        miss_ext.load_bank(_model(), {"x": str(saved)})


def test_blocks_finite_in_the_file_but_not_in_the_dtype_they_load_into(saved):
    """float64 values beyond float32's range are finite in the file and loaded as inf into a
    float32 model's blocks (load_adapter) or bank (load_bank_adapter), past the non-finite check
    (an atomicity review, 2026-12-03)."""
    blocks = load_file(saved / WEIGHTS)
    key = sorted(blocks)[0]
    blocks = {k: v.double() for k, v in blocks.items()}
    blocks[key][0, 0] = 1e300
    save_file(blocks, saved / WEIGHTS)
    _expect_refused(saved, r"the block holds values beyond the range of torch\.float32, the dtype it loads into")
    # Into a model that has its MissLinear layers already (their block's dtype decides).
    model = miss_ext.apply_miss(_model(), ["0", "2"], r=4)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"beyond the range of torch\.float32"):
        miss_ext.load_adapter(model, saved)
    assert_unchanged(model, snap)
    model = miss_ext.apply_bank(_model(), ["0", "2"], capacity=2, max_r=4)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"holds NaN/inf \(in the bank's torch\.float32\)"):
        miss_ext.load_bank_adapter(model, "x", str(saved))
    assert_unchanged(model, snap)


def test_a_half_model_loads_float32_blocks_beyond_float16s_range(saved):
    """A float16 model's blocks are float32 (PEFT's autocast_adapter_dtype): a block value beyond
    float16's range is finite where it loads, and loads."""
    blocks = load_file(saved / WEIGHTS)
    key = sorted(blocks)[0]
    blocks[key][0, 0] = 1e5
    save_file(blocks, saved / WEIGHTS)
    model = miss_ext.load_adapter(_model().half(), saved)
    layer = dict(miss_ext.miss_layers(model))[key.split(".")[2]]
    assert layer.miss_block.dtype == torch.float32 and layer.miss_block[0, 0] == 1e5


@pytest.mark.parametrize("value", ["nan", "int", "complex", "beyond_float32"])
def test_modules_to_save_values_that_would_load_silently_wrong(tmp_path, value):
    """A modules_to_save (or trained bias) tensor holding NaN loaded silently, an integer one was
    cast, a complex one lost its imaginary part (a torch warning only): refused as blocks are."""
    model = _model()
    miss_ext.apply_miss(model, ["0"], r=4, modules_to_save=["2"], init_weights=False)
    miss_ext.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    key = next(k for k in tensors if k.endswith("2.weight"))
    if value in ("nan", "beyond_float32"):
        tensors[key] = tensors[key].double()
        tensors[key][0, 0] = float("nan") if value == "nan" else 1e300  # 1e300 is finite in the file
        pattern = r"non-finite values \(NaN or inf\) in torch\.float32"
    else:
        tensors[key] = tensors[key].to(torch.int64 if value == "int" else torch.complex64)
        pattern = rf"dtype torch\.{'int64' if value == 'int' else 'complex64'} in the file, the model's parameter is"
    save_file(tensors, tmp_path / WEIGHTS)
    _expect_refused(tmp_path, pattern)

"""The benchmark scripts (bench/) as tools, not as timings: their flags refuse bad values by name
before any work, and their agreement checks refuse to time variants that compute different
layers. Tiny sizes only; no figure is measured or asserted here (figures: bench/RESULTS.md)."""
import json
import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import bench_decode  # noqa: E402
from conftest import PACKAGE_PARENT  # noqa: E402
import bench_fusion  # noqa: E402
import bench_linear  # noqa: E402
import bench_model  # noqa: E402


@pytest.mark.parametrize("argv, message", [
    (["-r", "0"], "argument -r: expected a positive integer, got 0"),
    (["--reps", "0"], "argument --reps: expected a positive integer, got 0"),
    (["--warmup", "-1"], "argument --warmup: expected 0 or a positive integer, got -1"),
    (["--shapes", "64y64"], "expected INxOUT with positive integers (e.g. 4096x11008), got '64y64'"),
    (["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
    (["--device", "tpu"], "argument --device: expected cpu or cuda[:N], got 'tpu'"),
    (["--json", "/proc/miss_bench.json"], "argument --json: /proc/miss_bench.json: cannot write in /proc"),
])
def test_bench_linear_refuses_bad_flags_by_name(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        bench_linear.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--dtype", "bf17"], "invalid choice: 'bf17'"),
    (["--modes", "default,foo"], "--modes: unknown ['foo']"),
    (["--reps", "0"], "argument --reps: expected a positive integer, got 0"),
    (["--heads", "5"], "--heads 5 must divide --hidden 512"),
])
def test_bench_model_refuses_bad_flags_by_name(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        bench_model.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
def test_cuda_without_a_gpu_is_refused_before_any_work(capsys):
    with pytest.raises(SystemExit):
        bench_model.parse_args(["--device", "cuda"])
    assert "cuda: torch sees no CUDA device" in capsys.readouterr().err


TINY_LINEAR = ["-T", "32", "--shapes", "32x48", "-r", "8", "--mini-r", "8", "--reps", "1", "--warmup", "0",
               "--no-peak", "--cases", "miss,miss_mini,miss_bat,peft_miss,peft_miss_mini,peft_miss_bat"]


def test_bench_linear_runs_and_agrees_with_peft(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_linear.py"] + TINY_LINEAR)
    bench_linear.main()
    out = capsys.readouterr().out
    assert "| miss_bat |" in out and "| peft_miss_mini |" in out
    assert "this run differs, so met/MISSED below only hints" in out  # not the configuration


def test_bench_linear_refuses_to_time_cases_that_differ(monkeypatch):
    """A miss_ext case whose block differs from its PEFT counterpart's must stop the run."""
    build = bench_linear.build_case

    def off_by_a_little(name, proto, a, fin, fout):
        case = build(name, proto, a, fin, fout)
        if name == "miss_mini":
            with torch.no_grad():
                case["module"].miss_block.add_(0.01)
        return case

    monkeypatch.setattr(bench_linear, "build_case", off_by_a_little)
    monkeypatch.setattr(sys, "argv", ["bench_linear.py"] + TINY_LINEAR)
    with pytest.raises(SystemExit, match="miss_mini and peft_miss_mini do not compute the same layer"):
        bench_linear.main()


TINY_MODEL = ["--hidden", "64", "--intermediate", "128", "--layers", "1", "--heads", "4", "--vocab", "128",
              "--r", "8", "--mini-r", "8", "--reps", "1", "--warmup", "0"]


@pytest.mark.parametrize("argv, message", [
    (["--new-tokens", "1"], "--new-tokens must be at least 2 (a decode step is (t_N - t_1) / (N - 1)), got 1"),
    (["--modes", "bat,foo"], "--modes: unknown ['foo']"),
    (["--prompt", "0"], "argument --prompt: expected a positive integer, got 0"),
])
def test_bench_decode_refuses_bad_flags_by_name(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        bench_decode.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_bench_decode_runs_every_variant_and_counts_tokens(capsys):
    assert bench_decode.main(TINY_MODEL + ["--new-tokens", "3", "--batch", "2", "--modes", "default,bat"]) == 0
    out = capsys.readouterr().out
    for mode in ("default", "bat"):
        for variant in ("base (no adapter)", "peft", "peft+accelerate", "miss_ext.apply_miss", "peft merge_and_unload"):
            assert f"| {mode} | {variant} |" in out
        assert f"| {mode} | peft+accelerate |" in out and f"| {mode} | peft |" in out
    assert "| default | peft+accelerate | " in out and out.count(" 2/2 |") >= 6  # adapted variants: PEFT's tokens
    assert re.search(r"# bat: largest logit error against a float64 copy of PEFT's model: peft \S+, peft\+accelerate", out)


@pytest.mark.parametrize("script, variant, argv", [
    (bench_model, "miss_ext.apply_miss", ["--seq", "16", "--batch", "2"]),
    (bench_decode, "peft+accelerate", ["--new-tokens", "2"]),
], ids=["bench_model", "bench_decode"])
def test_model_benchmarks_refuse_to_time_variants_that_differ(monkeypatch, script, variant, argv):
    """A variant whose blocks differ from PEFT's by 0.01 must stop the run before any timing."""
    build = script.build_variants

    def off_by_a_little(base, mode, a):
        variants = build(base, mode, a)
        with torch.no_grad():
            for name, p in variants[variant].named_parameters():
                if "miss_block" in name:
                    p.add_(0.01)
        return variants

    monkeypatch.setattr(script, "build_variants", off_by_a_little)
    with pytest.raises(SystemExit, match=f"default: {re.escape(variant)}'s logits are .* from PEFT's"):
        script.main(TINY_MODEL + argv + ["--modes", "default"])


def test_profile_linear_tables_every_case(capsys, tmp_path):
    import profile_linear
    assert profile_linear.main(["-T", "64", "--in-features", "32", "--out-features", "48", "-r", "8", "--mini-r", "8",
                                "--steps", "2", "--warmup", "1", "--top", "3", "--cases", "miss,miss_mini",
                                "--json", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    for case in ("frozen", "miss", "miss_mini"):
        assert f"\n## {case}: " in out
    assert out.count("| ops (self CPU time) | calls/step | us/step | share |") == 3
    cases = json.loads((tmp_path / "p.json").read_text())["cases"]
    calls = {case: {name: c for name, c, _ in rows["rows"]} for case, rows in cases.items()}
    # the adapter's own ops, per step: the forward's fold (mini: and the backward's fold of G)
    assert calls["miss"]["miss::fold"] == 1 and calls["miss_mini"]["miss::fold"] == 2
    assert not any(name.startswith("miss::") for name in calls["frozen"])
    with pytest.raises(SystemExit, match="unknown case"):
        profile_linear.main(["--cases", "nope"])
    # CUDA kernel names as the profiler gives them: each kernel keeps its own row
    for name, short in [
        ("void miss_ext::(anonymous namespace)::fold_warp_kernel<c10::BFloat16, float, 8, false>(c10::BFloat16 "
         "const*, float*, long, long, long, miss_ext::DropoutParams)", "miss_ext::fold_warp_kernel"),
        ("void miss_ext::(anonymous namespace)::tile_add_2d_kernel<c10::BFloat16, float, 8, false>(...)",
         "miss_ext::tile_add_2d_kernel"),
        ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType"
         "<2u>, unsigned int, 2, 128, 1>(...)", "at::native::CatArrayBatchedCopy"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT")]:
        assert profile_linear.short_name(name) == short


def test_bench_kernels_refuses_to_time_implementations_that_differ():
    import bench_kernels
    x = torch.randn(64, 8)
    same = {"fold/fp32[auto]": lambda: x, "fold/fp32[rows]": lambda: x.clone(),
            "tile_add_/bf16[auto]": lambda: x.bfloat16(), "tile_add_/bf16[flat]": lambda: x.bfloat16()}
    bench_kernels.check_results(same)
    with pytest.raises(SystemExit, match=r"fold/fp32\[warp\]: .* from fold/fp32\[auto\]'s result"):
        bench_kernels.check_results({**same, "fold/fp32[warp]": lambda: x + 1e-3})
    with pytest.raises(SystemExit, match=r"fold/fp32\[warp\]"):  # an unwritten (NaN) element
        bench_kernels.check_results({**same, "fold/fp32[warp]": lambda: x.clone().index_fill_(0, torch.tensor([3]), float("nan"))})


def test_bench_kernels_runs_every_case(capsys):
    """A tiny run: every case is checked against its first implementation and timed, the
    split_bf16 kernel against the ATen composition it replaced (which must agree with it)."""
    import bench_kernels
    bench_kernels.main(["-T", "64", "--in-features", "64", "-r", "8", "--reps", "1"])
    out = capsys.readouterr().out
    for case in ("| copy |", "| fold/bf16/p=0.1[auto] |", "| tile_add_/bf16/p=0.0[auto] |", "| tile_add_/bf16/p=0.1[auto] |",
                 "| bat_weight/bf16[gemm] |",
                 "| split_bf16/S[kernel] |", "| split_bf16/S[aten] |", "| split_bf16/W'[aten] |"):
        assert case in out, out
    t = torch.randn(5, 7)
    assert torch.equal(bench_kernels.aten_split_bf16(t, 3, [0, 2, 1]).view(torch.int16),
                       torch.ops.miss.split_bf16(t, 3, [0, 2, 1], 1).view(torch.int16))


def test_bench_call_overhead_times_every_case_and_refuses_a_layer_that_differs(capsys, monkeypatch):
    import bench_call_overhead
    bench_call_overhead.main(["--reps", "1", "--calls", "2", "--modes", "default", "bat"])
    out = capsys.readouterr().out
    for case in ("frozen nn.Linear", "miss_ext default", "PEFT default accelerated", "miss_ext bat", "PEFT bat"):
        assert re.search(rf"^{case} +[0-9.]+ +[0-9.]+x$", out, re.MULTILINE), case
    build = bench_call_overhead.build

    def one_off(*args):
        layers = build(*args)
        with torch.no_grad():
            layers["miss_ext default"][1][0, 0] += 1e-2
        return layers

    monkeypatch.setattr(bench_call_overhead, "build", one_off)
    with pytest.raises(SystemExit, match="miss_ext default: output .* off PEFT's"):
        bench_call_overhead.main(["--reps", "1", "--calls", "2", "--modes", "default"])


def test_bench_bat_weight_runs_and_refuses_a_bad_r(capsys):
    import bench_bat_weight
    bench_bat_weight.main(["-n", "64", "-r", "16", "--reps", "2", "--isa", "auto"])
    out = capsys.readouterr().out
    assert "auto: float32 min" in out and "bfloat16 min" in out, out
    with pytest.raises(SystemExit):
        bench_bat_weight.main(["-n", "64", "-r", "24"])
    assert "-r 24 must divide -n 64" in capsys.readouterr().err


def test_bench_bank_train_checks_the_bank_gradients_against_split_rows(capsys):
    """Mixed-adapter training (half the adapters mini, mini_r = 1): the run first checks that every
    adapter's bank gradient equals the one its rows give through miss.linear alone, then times."""
    import bench_bank_train
    bench_bank_train.main(["--tokens", "37", "--features", "24", "--r", "4", "--adapters", "3", "--reps", "1"])
    out = capsys.readouterr().out
    assert "3 adapters (half mini, mini_r=1)" in out and "split (b) against mixed" in out, out
    with pytest.raises(SystemExit):
        bench_bank_train.main(["--features", "24", "--mini-r", "5"])
    assert "--mini-r 5 does not divide --features 24" in capsys.readouterr().err


def test_bench_checkpoint_check_runs_and_restores_the_check(capsys):
    import bench_checkpoint_check

    import miss_ext.bank

    names = ("checkpoints_around", "judge_recompute")
    shipped = [getattr(miss_ext.bank, name) for name in names]
    for checkpointing in ("off", "reentrant"):
        results = bench_checkpoint_check.main(["--depth", "0,3", "--reps", "1", "--seq", "4",
                                               "--checkpointing", checkpointing])
        assert set(results) == {0, 3} and all(r["ratio"] > 0 for r in results.values())
        assert [getattr(miss_ext.bank, name) for name in names] == shipped
    with pytest.raises(SystemExit):
        bench_checkpoint_check.parse_args(["--depth", "0,-1"])
    assert "expected comma-separated depths >= 0, got '0,-1'" in capsys.readouterr().err


def test_bench_fusion_tables_the_bound_and_every_piece(capsys):
    """bench_fusion's two tables, on the CPU with small sizes; the pieces table has a figure for
    every alternative, and dx_prefill only where in % r == 0."""
    bench_fusion.main(["--device", "cpu", "-T", "64", "--shapes", "64x48,40x32", "-r", "16", "--reps", "2"])
    out = capsys.readouterr().out
    assert "| 64x48 |" in out and "fusion could save" in out
    rows = [line for line in out.splitlines() if line.startswith("| 64x48 |") or line.startswith("| 40x32 |")]
    assert len(rows) == 4, out
    pieces = rows[2:]
    assert pieces[0].count("x |") == 4, pieces[0]           # every alternative timed
    assert "| - |" in pieces[1] and pieces[1].count("x |") == 3, pieces[1]  # 40 % 16 != 0


def test_compare_builds_times_each_checkout_and_refuses_a_bare_directory(capsys, tmp_path):
    import compare_builds
    with pytest.raises(SystemExit):
        compare_builds.main([str(tmp_path)])
    assert "holds no miss_ext package" in capsys.readouterr().err
    compare_builds.main([str(PACKAGE_PARENT), "--rounds", "1"])  # the folder of the miss_ext under test
    out = capsys.readouterr().out
    assert out.count(" ms |") == 3, out


def test_bench_state_dict_runs_and_refuses_bad_flags_by_name(capsys):
    import bench_state_dict

    bench_state_dict.main(["--layers", "3", "--reps", "2", "--kept", "2"])
    out = capsys.readouterr().out
    assert "| unmerged |" in out and "| merged |" in out and "with 2 merged state_dicts kept" in out
    for argv, message in ((["--layers", "0"], "--layers must be at least 1, got 0"),
                          (["--kept", "-1"], "--kept must be at least 0, got -1")):
        with pytest.raises(SystemExit) as exc:
            bench_state_dict.parse_args(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_bench_model_api_times_each_helper_and_checks_the_results(monkeypatch, capsys, tmp_path):
    """bench_model_api's helpers run and its checks hold (the loaded and the merged model give the
    adapted model's output) on a few layers."""
    import bench_model_api

    monkeypatch.setattr(sys, "argv", ["bench_model_api.py", "--layers", "3", "--reps", "1",
                                      "--json", str(tmp_path / "api.json")])
    bench_model_api.main()
    out = capsys.readouterr().out
    helpers = ["apply_miss", "save_adapter", "load_adapter", "load_adapter again", "merge_and_unload"]
    assert all(re.search(rf"^  {re.escape(name)} +\d+\.\d+ s$", out, re.M) for name in helpers), out
    assert set(json.loads((tmp_path / "api.json").read_text())["median_s"]) == set(helpers)

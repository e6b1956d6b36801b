"""PEFT interop, tensor parallelism and the choice of the rank that writes an adapter: behaviour no
other test pinned (a mutation audit of miss_ext/peft.py, tensor_parallel.py, _distributed.py and the
DDP/FSDP write-rank logic: each test here fails on a one-line change that the rest of the suite let
through; plus MissColwiseParallel's refusal of out_features=1, a forward failure the audit found).
PEFT's and transformers' semantics where they have one: nn.Dropout takes p=1, generate's
generation_config argument wins over the model's own, gradient checkpointing recomputes only in
training with grad."""
import os
import warnings

import pytest
import torch
from torch import nn

import miss_ext


def _peft():
    pytest.importorskip("transformers")
    return pytest.importorskip("peft")


def _two_adapter_lm():
    """An accelerated PEFT model of a tiny Llama with random adapters "a" (q_proj, v_proj) and "b"
    (q_proj), in eval mode."""
    peft = _peft()
    import miss_ext.peft
    from tiny_models import no_eos, randomize_blocks, tiny_causal_lm

    base = no_eos(tiny_causal_lm("llama"))
    model = peft.get_peft_model(base, peft.MissConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False),
                                adapter_name="a")
    model.add_adapter("b", peft.MissConfig(r=4, target_modules=["q_proj"], init_weights=False))
    randomize_blocks(model, scale=0.3, seed=0)
    miss_ext.peft.accelerate(model)
    return model.eval()


def _alone(model, name, ids, **kwargs):
    """generate() of prompt `ids` (one row) with adapter `name` active (the reference of a row)."""
    model.set_adapter(name)
    try:
        with torch.no_grad():
            return model.generate(input_ids=ids, **kwargs)
    finally:
        model.set_adapter("a")


def _linear_peft(targets, init_weights=False, n=2, width=8, dtype=torch.float64, **kwargs):
    """get_peft_model on nn.Sequential of `n` Linear(width, width) with one MiSS adapter."""
    peft = _peft()
    net = nn.Sequential(*(nn.Linear(width, width) for _ in range(n))).to(dtype)
    return peft.get_peft_model(net, peft.MissConfig(r=2, target_modules=targets, init_weights=init_weights), **kwargs)


# ---- PEFT: generate, checkpointing ------------------------------------------
def test_sampling_with_num_return_sequences_gives_each_returned_sequence_its_prompts_adapter():
    """generate(num_beams=1, do_sample=True, num_return_sequences=2, adapter_names=...) repeats each
    prompt twice, and each copy runs that prompt's adapter (top_k=1: the greedy tokens)."""
    from tiny_models import tokens

    model = _two_adapter_lm()
    ids = tokens(2, 5)
    with torch.no_grad():
        got = model.generate(input_ids=ids, adapter_names=["a", "b"], max_new_tokens=4, do_sample=True, top_k=1,
                             num_beams=1, num_return_sequences=2)
    assert got.shape[0] == 4
    for i, name in enumerate(["a", "b"]):
        want = _alone(model, name, ids[i:i + 1], max_new_tokens=4, do_sample=False)[0]
        assert torch.equal(got[2 * i], want) and torch.equal(got[2 * i + 1], want), name


def test_a_generation_config_keyword_wins_over_the_models_own_for_the_names():
    """A generation_config passed to generate() is the one transformers uses: its num_beams=3
    repeats the names, even where the model's own generation_config says num_beams=1."""
    from transformers import GenerationConfig

    from tiny_models import tokens

    model = _two_adapter_lm()
    model.base_model.model.generation_config.num_beams = 1
    ids = tokens(2, 5)
    config = GenerationConfig(max_new_tokens=4, do_sample=False, num_beams=3)
    with torch.no_grad():
        got = model.generate(input_ids=ids, adapter_names=["a", "b"], generation_config=config)
    for i, name in enumerate(["a", "b"]):
        assert torch.equal(got[i], _alone(model, name, ids[i:i + 1], generation_config=config)[0]), name


def test_gradient_checkpointing_refuses_names_only_when_it_would_recompute():
    """transformers' gradient checkpointing recomputes layers only in training with grad enabled:
    adapter_names= runs in eval mode with grad and in training under no_grad, and is refused in
    training with grad."""
    from tiny_models import tokens

    model = _two_adapter_lm()
    model.base_model.model.gradient_checkpointing_enable()
    ids = tokens(2, 5)
    with torch.no_grad():
        want = model(ids, adapter_names=["a", "b"]).logits
    model.eval()
    got = model(ids, adapter_names=["a", "b"]).logits
    assert got.requires_grad
    torch.testing.assert_close(got.detach(), want, rtol=0, atol=0)
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, adapter_names=["a", "b"]).logits, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot be combined with gradient checkpointing in training"):
        model(ids, adapter_names=["a", "b"])


# ---- PEFT: merges, dropout, mixed batches -------------------------------------------------------
def test_safe_merge_of_a_plain_peft_layer_checks_the_weight_in_its_own_dtype():
    """A PEFT layer added after accelerate() (plain PEFT code) on a float16 base with a float32
    block (PEFT's autocast_adapter_dtype): merge_adapter(safe_merge=True) whose merged value overflows
    float16 is refused before anything is merged, as the merged weight would hold inf."""
    import miss_ext.peft
    peft = _peft()

    model = _linear_peft(["0"], init_weights=True, dtype=torch.float16, adapter_name="a")
    miss_ext.peft.accelerate(model)
    model.add_adapter("b", peft.MissConfig(r=2, target_modules=["1"]))
    layer = model.base_model.model[1]
    assert type(layer) is peft.tuners.miss.MissLinear and layer.miss_block["b"].dtype == torch.float32
    with torch.no_grad():
        layer.base_layer.weight.fill_(60000.0)
        layer.miss_block["b"].fill_(10000.0)  # 70000: finite in float32, inf in float16
    before = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match=r"NaNs detected in the merged weights.*float16.*no layer was merged"):
        model.base_model.merge_adapter(["b"], safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before) and layer.merged_adapters == []


def test_a_refused_safe_merge_leaves_a_plain_peft_mini_block_as_it_was():
    """merge_adapter(safe_merge=True) refused for a PEFT layer added after accelerate() (a
    half-precision mini block on the CPU, whose PEFT merge code replaces the block by its tiled
    copy) leaves that block's shape and values as they were."""
    import miss_ext.peft
    peft = _peft()

    model = _linear_peft(["0"], init_weights=True, dtype=torch.float16, adapter_name="a",
                         autocast_adapter_dtype=False)
    miss_ext.peft.accelerate(model)
    model.add_adapter("b", peft.MissConfig(r=2, mini_r=2, init_weights="mini", target_modules=["1"]),
                      autocast_adapter_dtype=False)
    block = model.base_model.model[1].miss_block["b"]
    assert block.dtype == torch.float16 and tuple(block.shape) == (2, 2)
    with torch.no_grad():
        block[0, 0] = float("nan")
    before = block.detach().clone()
    with pytest.raises(ValueError, match="NaNs detected"):
        model.base_model.merge_adapter(["b"], safe_merge=True)
    after = model.base_model.model[1].miss_block["b"].detach()
    assert after.shape == before.shape
    torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)


def test_dropout_of_one_is_taken_and_drops_the_whole_term():
    """miss_dropout=1.0 (nn.Dropout accepts p=1) in training gives the base output, as PEFT's
    layer does, in a plain call and in an adapter_names= call; p > 1 is refused."""
    import miss_ext.peft
    peft = _peft()

    model = _linear_peft(["0"], n=1)
    model.add_adapter("b", peft.MissConfig(r=2, target_modules=["0"], init_weights=False, miss_dropout=1.0))
    model.base_model.set_adapter("b")
    x = torch.randn(3, 8, dtype=torch.float64)
    model.train()
    with torch.no_grad():
        want = model(x)
    miss_ext.peft.accelerate(model)
    layer = model.base_model.model[0]
    with torch.no_grad():
        base = layer.base_layer(x)
        torch.testing.assert_close(want, base)
        torch.testing.assert_close(model(x), base)
        torch.testing.assert_close(model(x, adapter_names=["b", "b", "__base__"]), base)
        layer.miss_dropout["b"].p = 1.5
        with pytest.raises(ValueError, match="dropout p=1.5, not a probability"):
            model(x)


def test_an_adapter_names_call_leaves_a_hooked_bases_output_as_the_base_computed_it():
    """A forward hook on an adapted layer's base (a feature extractor keeping its output) sees the
    base's own output after an adapter_names= call: the adapters' terms are not added into it in
    place."""
    import miss_ext.peft
    peft = _peft()

    model = _linear_peft(["0"], n=1, adapter_name="a")
    model.add_adapter("b", peft.MissConfig(r=2, target_modules=["0"], init_weights=False))
    miss_ext.peft.accelerate(model.eval())
    layer = model.base_model.model[0]
    kept = []
    layer.base_layer.register_forward_hook(lambda module, args, out: kept.append(out))
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        y = model(x, adapter_names=["a", "b", "__base__"])
        base = nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias)
    assert torch.equal(kept[0], base)
    assert torch.equal(y[2], base[2]) and not torch.equal(y[0], base[0])


def test_an_inactive_bat_adapter_merges_on_top_of_a_merged_active_one():
    """merge_adapter(["b2"]) of a bat adapter that is not active, after the active bat adapter b1 was
    merged: accepted (no forward applies b2 before b1), and the weight is b2's transform of b1's."""
    import miss_ext.peft
    peft = _peft()
    from tiny_models import randomize_blocks

    model = _linear_peft(["0"], init_weights="bat", n=1, adapter_name="b1")
    model.add_adapter("b2", peft.MissConfig(r=2, target_modules=["0"], init_weights="bat"))
    randomize_blocks(model, scale=0.1)
    miss_ext.peft.accelerate(model)
    layer = model.base_model.model[0]
    weight = layer.base_layer.weight.detach().clone()
    model.merge_adapter()
    model.merge_adapter(["b2"])
    assert layer.merged_adapters == ["b1", "b2"]
    merge = torch.ops.miss.merge
    want = merge(merge(weight, layer.miss_block["b1"].detach(), False), layer.miss_block["b2"].detach(), False)
    torch.testing.assert_close(layer.base_layer.weight.detach(), want, rtol=1e-12, atol=1e-12)


def test_a_default_adapter_converts_to_lora_while_merged():
    """PEFT's convert_to_lora of a default-mode adapter while it is merged: the layers support it
    (its delta comes from the block, not the weight), without a warning, and the factors are the
    unmerged model's."""
    import miss_ext.peft
    _peft()
    conversion = pytest.importorskip("peft.tuners.lora.conversion")

    model = _linear_peft(["0"], n=1)
    miss_ext.peft.accelerate(model)
    _, want = conversion.convert_to_lora(model, rank=2)
    model.merge_adapter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, got = conversion.convert_to_lora(model, rank=2)
    # UserWarnings only: a library's deprecation (DeprecationWarning/FutureWarning) is not ours.
    assert not [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_bat_adapter_is_not_merged_under_a_lora_merged_already():
    """A LoRA injected on the same module and merged on its own beforehand: a later merge_adapter
    naming only the bat adapter is refused (bat would transform W + dW), nothing changed."""
    import miss_ext.peft
    peft = _peft()
    from tiny_models import randomize_blocks

    model = _linear_peft(["0"], init_weights="bat", n=1)
    randomize_blocks(model, scale=0.1)
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False),
                                 model.base_model.model, adapter_name="lora")
    miss_ext.peft.accelerate(model.eval())
    lora = model.base_model.model[0]
    lora.merge()
    layer = lora.base_layer
    weight = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"cannot be merged under peft\.tuners\.lora\.layer\.Linear at '0'.*merged "
                                         r"first \(or already\)"):
        model.merge_adapter(adapter_names=["default"])
    assert torch.equal(layer.base_layer.weight, weight) and layer.merged_adapters == []


def test_a_disabled_forward_whose_later_unmerge_is_refused_unmerges_no_layer():
    """With the adapter layers disabled (disable_adapter_layers), a merged model's forward unmerges
    them (PEFT's rule); when a later layer's bat unmerge is refused (I + B singular), no earlier
    layer was unmerged: every unmerge is checked before any runs."""
    import miss_ext.peft

    model = _linear_peft(["0", "1"], init_weights="bat", width=4)
    from tiny_models import randomize_blocks

    randomize_blocks(model, scale=0.1)
    miss_ext.peft.accelerate(model.eval())
    model.merge_adapter()
    first, second = model.base_model.model[0], model.base_model.model[1]
    with torch.no_grad():
        second.miss_block["default"][0] = -torch.eye(2, dtype=torch.float64)
    weight = first.base_layer.weight.detach().clone()
    model.base_model.disable_adapter_layers()
    with pytest.raises(ValueError, match="cannot unmerge the bat adapter"):
        model(torch.randn(3, 4, dtype=torch.float64))
    assert first.merged_adapters == ["default"] and torch.equal(first.base_layer.weight, weight)


def test_is_accelerated_is_false_while_a_layer_added_since_runs_peft_code():
    """add_adapter on new modules after accelerate() adds plain PEFT layers: is_accelerated says
    False until accelerate() runs again."""
    import miss_ext.peft
    peft = _peft()

    model = _linear_peft(["0"], adapter_name="a")
    miss_ext.peft.accelerate(model)
    assert miss_ext.peft.is_accelerated(model)
    model.add_adapter("b", peft.MissConfig(r=2, target_modules=["1"]))
    assert not miss_ext.peft.is_accelerated(model)
    miss_ext.peft.accelerate(model)
    assert miss_ext.peft.is_accelerated(model)


# ---- tensor parallelism and the writing rank (2 gloo CPU ranks, one spawn) ----------------------
def tp_and_writers(rank: int, world_size: int, folder: str):
    """Per rank: a column-wise layer with one output column per rank (out_features == world) against
    the unsharded layer; the refusal of a column-wise bat layer whose out is not split in whole
    r x r tiles; a row-wise layer's bias placement; out_features=1 on a 1-rank mesh; and which ranks write a tensor-parallel model's
    adapter and an HSDP (fully_shard over a 1 x world mesh) model's, each rank to a path of its own."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    from miss_ext.tensor_parallel import MissColwiseParallel, MissRowwiseParallel

    mesh = init_device_mesh("cpu", (world_size,))
    out = {}
    torch.manual_seed(0)
    layer = miss_ext.MissLinear(nn.Linear(6, world_size, dtype=torch.float64), 2, init_weights=False)
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    want = layer(x).detach()
    try:
        parallelize_module(layer, mesh, MissColwiseParallel(use_local_output=False))
        out["one_column"] = (layer(x).full_tensor() - want).abs().max().item()
    except ValueError as e:
        out["one_column"] = str(e)
    try:
        parallelize_module(miss_ext.MissLinear(nn.Linear(8, 6), 2, mode="bat"), mesh, MissColwiseParallel())
        out["bat_tiles"] = None
    except ValueError as e:
        out["bat_tiles"] = str(e)
    row = parallelize_module(miss_ext.MissLinear(nn.Linear(8, 4), 2), mesh, MissRowwiseParallel())
    out["row_bias"] = tuple(row.base_layer.bias.placements)
    # out_features=1 on a 1-rank mesh (the "tp" dim of a world x 1 mesh): default and mini refused
    # column-wise (DTensor cannot run the sharded size-1 output), bat column-wise and default
    # row-wise exact, forward and x's gradient.
    single = init_device_mesh("cpu", (world_size, 1), mesh_dim_names=("dp", "tp"))["tp"]
    for name, kwargs in {"col_out_1": {}, "col_out_1_mini": {"mode": "mini", "mini_r": 1}}.items():
        try:
            parallelize_module(miss_ext.MissLinear(nn.Linear(6, 1), 2, **kwargs), single, MissColwiseParallel())
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    for name, (r, mode, style) in {"row_out_1": (2, "default", MissRowwiseParallel),
                                   "col_bat_out_1": (1, "bat", MissColwiseParallel)}.items():
        layer = miss_ext.MissLinear(nn.Linear(6, 1, dtype=torch.float64), r, mode, init_weights=False)
        xg = x.clone().requires_grad_(True)
        want = layer(xg)
        want_grad, = torch.autograd.grad(want.sum(), xg)
        parallelize_module(layer, single, style(use_local_output=True))
        got = layer(xg)
        got_grad, = torch.autograd.grad(got.sum(), xg)
        out[name] = max((got - want).abs().max().item(), (got_grad - want_grad).abs().max().item())

    tp = miss_ext.apply_miss(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), ["0", "1"], r=2, init_weights=False)
    parallelize_module(tp, mesh, {"0": MissColwiseParallel(), "1": MissRowwiseParallel()})
    miss_ext.save_adapter(tp, os.path.join(folder, f"tp{rank}"))
    hsdp = miss_ext.apply_miss(nn.Sequential(nn.Linear(8, 8)), ["0"], r=2, init_weights=False)
    fully_shard(hsdp, mesh=init_device_mesh("cpu", (1, world_size), mesh_dim_names=("replicate", "shard")))
    miss_ext.save_adapter(hsdp, os.path.join(folder, f"hsdp{rank}"))
    dist.barrier()
    out["written"] = sorted(os.listdir(folder))
    return out


@pytest.fixture(scope="module")
def tp_ranks(tmp_path_factory):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 14):
        pytest.skip(f"tensor parallelism needs torch >= 2.14, not {torch.__version__}")
    from dist_util import run_ranks

    return run_ranks(tp_and_writers, world_size=2, args=(str(tmp_path_factory.mktemp("tpw")),), timeout=300)


def test_colwise_layer_with_one_output_column_per_rank_is_sharded(tp_ranks):
    """MissColwiseParallel takes out_features == world (one output column per rank) and computes
    the unsharded layer's output."""
    for result in tp_ranks:
        assert isinstance(result["one_column"], float), result["one_column"]
        assert result["one_column"] < 1e-12


def test_colwise_bat_refuses_an_out_not_split_in_whole_tiles_over_the_ranks(tp_ranks):
    """A column-wise bat layer needs out_features % (r * world) == 0: out 6 with r=2 over 2 ranks is
    refused at parallelize time (each rank would hold a part of a tile)."""
    for result in tp_ranks:
        assert result["bat_tiles"] is not None and "multiple of r * world = 4" in result["bat_tiles"]


def test_a_single_output_column_is_refused_column_wise_and_exact_row_wise(tp_ranks):
    """On a 1-rank mesh, MissColwiseParallel refuses out_features=1 in default and mini mode at
    parallelize time with a ValueError naming it (the layer would fail inside DTensor), as it does
    on 2+ ranks; a bat layer column-wise and a default one row-wise match the unsharded layer."""
    for result in tp_ranks:
        for name, mode in (("col_out_1", "default"), ("col_out_1_mini", "mini")):
            assert result[name] is not None and f"out_features=1 cannot be sharded column-wise in {mode} mode" \
                in result[name], result[name]
        assert result["row_out_1"] < 1e-12 and result["col_bat_out_1"] < 1e-12


def test_rowwise_bias_is_replicated(tp_ranks):
    """MissRowwiseParallel replicates the base's bias, as torch's RowwiseParallel (docs table)."""
    from torch.distributed.tensor import Replicate

    for result in tp_ranks:
        assert result["row_bias"] == (Replicate(),)


def test_only_the_first_rank_writes_a_tensor_parallel_or_hsdp_model(tp_ranks):
    """save_adapter of a tensor-parallel model (blocks sharded as DTensors, no FSDP) and of one
    sharded by fully_shard over a 2-D (replicate x shard) mesh is written by rank 0 alone (the rank
    at coordinate 0 of every mesh dim): the other rank, at (0, 1), writes nothing."""
    assert tp_ranks[0]["written"] == ["hsdp0", "tp0"]

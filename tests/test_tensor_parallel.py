"""Tensor parallelism of MiSS layers (miss_ext.tensor_parallel, issue 12): a tiny Llama with MiSS
on q/k/v/o/gate/up/down, parallelized over 2 gloo CPU ranks with MissColwiseParallel on
q/k/v/gate/up and MissRowwiseParallel on o/down, against the same model in one process: logits,
block gradients (gathered with full_tensor) and the blocks after one SGD step.

All configurations run in one spawn of the 2 ranks (a module fixture: spawning costs seconds);
each test checks its own part of the result.
"""
import re
import warnings

import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)
pytest.importorskip("transformers")

from dist_util import run_ranks  # noqa: E402

# The styles refuse torch < 2.14 (miss_ext.tensor_parallel.MIN_TORCH: torch 2.11's DTensor failed
# in the backward there); on such a torch only the refusal is tested.
OLD_TORCH = tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 14)

from tiny_models import MINI_R, R, TARGETS, tiny_causal_lm, tokens  # noqa: E402
from reference import F64, linear_ref  # noqa: E402
from tiny_models import TOL64, nonzero, randomize_adapters  # noqa: E402
from miss_ext import MissLinear  # noqa: E402
from torch import nn  # noqa: E402

# name: (mode, r, mini_r, dropout). "gathered": r=3 does not divide o_proj's row-wise shards of in
# (32/2 = 16), so its fold runs on the all-gathered x; down_proj's (48/2 = 24) are multiples of 3, so
# its fold still splits (in % r == 0 is not needed, the shard starts are what matter). With dropout,
# the row-wise layers gather x too (the mask is indexed by the global column).
CONFIGS = {
    "default": ("default", R, 1, 0.0),
    "mini": ("mini", R, MINI_R, 0.0),
    "bat": ("bat", R, 1, 0.0),
    "dropout": ("default", R, 1, 0.1),
    "mini_dropout": ("mini", R, MINI_R, 0.2),
    "gathered": ("default", 3, 1, 0.0),
}
LR = 0.5


def build(mode, r, mini_r, dropout):
    import miss_ext

    model = tiny_causal_lm("llama")  # float64
    torch.manual_seed(5)  # the same random blocks in every process
    miss_ext.apply_miss(model, TARGETS, r=r, mode=mode, mini_r=mini_r, dropout=dropout, init_weights=False)
    return model


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train_step(model, dropout, seed=11):
    """Forward (train mode when there is dropout), a weighted-sum loss, backward, one SGD step.
    Returns logits, {block: grad}, {block: value after the step}."""
    model.train(dropout > 0)
    blocks = {n: p for n, p in model.named_parameters() if p.requires_grad}
    torch.manual_seed(seed)  # the dropout keys: the same draws on every rank and in the reference
    logits = model(tokens()).logits
    weights = torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view(logits.shape)
    (logits * weights).sum().backward()
    grads = {n: full(p.grad).detach().clone() for n, p in blocks.items()}
    torch.optim.SGD(list(blocks.values()), lr=LR).step()
    after = {n: full(p).detach().clone() for n, p in blocks.items()}
    return logits.detach(), grads, after


def tp_plan(**kwargs):
    from miss_ext.tensor_parallel import MissColwiseParallel as Col, MissRowwiseParallel as Row

    return {"self_attn.q_proj": Col(**kwargs), "self_attn.k_proj": Col(**kwargs), "self_attn.v_proj": Col(**kwargs),
            "self_attn.o_proj": Row(**kwargs), "mlp.gate_proj": Col(**kwargs), "mlp.up_proj": Col(**kwargs),
            "mlp.down_proj": Row(**kwargs)}


def parallelize(model, mesh, **kwargs):
    from torch.distributed.tensor.parallel import parallelize_module

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for layer in model.model.layers:
            parallelize_module(layer, mesh, tp_plan(**kwargs))
    return [str(w.message) for w in caught if "all-gathered" in str(w.message)]


def save_and_read(model, folder, name, rank):
    import os

    import miss_ext
    from safetensors.torch import load_file

    path = os.path.join(folder, name)
    miss_ext.save_adapter(model, path)
    dist.barrier()
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def _mini_full(mesh=None):
    """A column-wise mini layer with mini_r == out_features (its block is (r, out), a default one):
    (output, x grad, block grad) of one weighted-sum backward, sharded over `mesh` or in one
    process. It was refused as a mini layer whose shards of out do not start at multiples of
    mini_r (a review, 2026-12-05)."""
    import miss_ext

    torch.manual_seed(3)
    layer = miss_ext.MissLinear(torch.nn.Linear(12, 16, dtype=torch.float64), 4, mode="mini", mini_r=16,
                                init_weights=False)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(5, 16, dtype=torch.float64)
    if mesh is not None:
        from torch.distributed.tensor.parallel import parallelize_module
        from miss_ext.tensor_parallel import MissColwiseParallel

        parallelize_module(layer, mesh, MissColwiseParallel(use_local_output=False))
    y = full(layer(x))
    (y * weights).sum().backward()
    return y.detach(), x.grad, full(layer.miss_block.grad)


def rank_main(rank, world_size, folder):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world_size,))
    out = {}
    for name, (mode, r, mini_r, dropout) in CONFIGS.items():
        model = build(mode, r, mini_r, dropout)
        gather_warnings = parallelize(model, mesh, check_keys=dropout > 0)
        layer = model.model.layers[0]
        placements = {n: (tuple(p.placements), tuple(p.to_local().shape))
                      for n, p in layer.named_parameters() if p.requires_grad}
        logits, grads, after = train_step(model, dropout)
        # gradients of replicated blocks, as this rank holds them (must be Replicate and equal on every rank)
        local_grads = {n: (tuple(p.grad.placements), p.grad.to_local().clone()) for n, p in model.named_parameters()
                       if p.requires_grad and isinstance(p.grad, DTensor) and p.placements[0].is_replicate()}
        out[name] = dict(logits=logits, grads=grads, after=after, placements=placements, local_grads=local_grads,
                         gather_warnings=gather_warnings)
        if dropout > 0:  # eval mode: no dropout, so the output does not depend on the random stream
            with torch.no_grad():
                model.eval()
                evals = []
                for seed in (1, 2):
                    torch.manual_seed(seed)
                    evals.append(model(tokens()).logits)
            out[name]["eval_seed_gap"] = (evals[0] - evals[1]).abs().max().item()
        if name in ("default", "bat"):  # save_adapter gathers sharded blocks (every rank calls it, rank 0 writes)
            out[name]["saved"] = save_and_read(model, folder, name, rank)
            # load_adapter into a parallelized model: each rank takes its shard of the file's blocks.
            import os

            import miss_ext

            again = build(mode, r, mini_r, dropout)
            parallelize(again, mesh)
            miss_ext.load_adapter(again, os.path.join(folder, name))
            with torch.no_grad():
                out[name]["reloaded_gap"] = (again.eval()(tokens()).logits - model.eval()(tokens()).logits).abs().max().item()

    out["mini_full"] = _mini_full(mesh)
    # Refusals, at parallelize time. mini_r=16: gate/up_proj's out 48 splits into shards of 24, which
    # do not start at multiples of 16 (k/v_proj's out 16 = mini_r is a default block, sharded as one:
    # _mini_full); bat with r=16: o_proj's in 32 = 2 x 16 splits fine, down_proj's out 32 does
    # too, but k_proj's out 16 cannot be split into whole 16 x 16 tiles over 2 ranks.
    errors = {}
    for name, (mode, r, mini_r) in {"mini_r16": ("mini", 4, 16), "bat_r16": ("bat", 16, 1)}.items():
        model = build(mode, r, mini_r, 0.0)
        try:
            parallelize(model, mesh)
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    # Single layers: a row-wise bat layer whose out/r does not split over the ranks, a column-wise
    # layer with fewer output columns than ranks, and MiSS added after torch's own style sharded
    # the base (the adapter would see a local x or output beside its whole block).
    import miss_ext
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from miss_ext.tensor_parallel import MissColwiseParallel, MissRowwiseParallel

    for name, (layer, style) in {"bat_out_r_odd": (miss_ext.MissLinear(torch.nn.Linear(8, 6), 2, mode="bat"),
                                                   MissRowwiseParallel()),
                                 "col_out_lt_world": (miss_ext.MissLinear(torch.nn.Linear(10, 1), 3),
                                                      MissColwiseParallel())}.items():
        try:
            parallelize_module(layer, mesh, style)
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    # A second parallelize_module on a sharded layer: the documented ValueError (the plain-base
    # check, run first, raised a TypeError about its DTensor weight; a docstring review, 2026-12-03).
    twice = parallelize_module(miss_ext.MissLinear(torch.nn.Linear(8, 12), 2), mesh, MissColwiseParallel())
    try:
        parallelize_module(twice, mesh, MissColwiseParallel())
        errors["twice"] = None
    except (TypeError, ValueError) as e:
        errors["twice"] = f"{type(e).__name__}: {e}"
    sharded = parallelize_module(torch.nn.Sequential(torch.nn.Linear(8, 12)), mesh, {"0": ColwiseParallel()})
    try:
        miss_ext.apply_miss(sharded, ["0"], r=4)
        errors["miss_after_tp"] = None
    except (TypeError, ValueError) as e:
        errors["miss_after_tp"] = str(e)
    # torch's own styles aimed at an adapted layer's base_layer (helper review, 2026-12-03): the
    # base returned this rank's output columns, or took this rank's columns of x, and the whole
    # layer's adapter term was added to that part, silently (max error 10.3 and 5.5 in float64).
    # Refused at the forward, by MissLinear, MissBankLinear and the accelerated PEFT layer alike.
    from peft import MissConfig, get_peft_model

    x8 = torch.randn(3, 8, dtype=torch.float64)
    for style_name, style in (("colwise", ColwiseParallel), ("rowwise", RowwiseParallel)):
        x_in = x8 if style_name == "colwise" else x8.chunk(world_size, -1)[rank]
        miss = miss_ext.MissLinear(torch.nn.Linear(8, 12, dtype=torch.float64), 4, init_weights=False)
        bank_layer = miss_ext.MissBankLinear(torch.nn.Linear(8, 12, dtype=torch.float64), capacity=2, max_r=4)
        bank_layer.add_adapter("a", 4)
        accelerated = miss_ext.peft.accelerate(get_peft_model(
            torch.nn.Sequential(torch.nn.Linear(8, 12, dtype=torch.float64)), MissConfig(r=4, target_modules=["0"])))
        peft_layer = accelerated.base_model.model[0]
        for kind, layer, call in (("miss", miss, lambda m: m(x_in)),
                                  ("bank", bank_layer, lambda m: m(x_in, torch.zeros(3, dtype=torch.int64))),
                                  ("peft", peft_layer, lambda m: m(x_in))):
            parallelize_module(layer, mesh, {"base_layer": style()})
            try:
                with torch.no_grad():
                    call(layer)
                errors[f"base_{style_name}_{kind}"] = None
            except (ValueError, RuntimeError) as e:
                errors[f"base_{style_name}_{kind}"] = f"{type(e).__name__}: {e}"
    out["errors"] = errors

    # A 1-D x on the row-wise all-gather path (dropout, or in-shards not at multiples of r): it
    # raised in tile_add (with a bias) or in the backward (without); helper review, 2026-12-03.
    # Output and dx against the unsharded layer with the same dropout key.
    from torch.distributed.tensor import Replicate

    one_row = {}
    x1 = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for bias in (True, False):
        for r, p in ((3, 0.0), (2, 0.5)):
            torch.manual_seed(0)
            layer = miss_ext.MissLinear(torch.nn.Linear(8, 4, bias=bias, dtype=torch.float64), r, dropout=p,
                                        init_weights=False).train()
            torch.manual_seed(5)
            x_ref = x1.clone().requires_grad_()
            want = layer(x_ref)
            want.sum().backward()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the gather warning of these configurations
                parallelize_module(layer, mesh, MissRowwiseParallel(input_layouts=Replicate()))
            torch.manual_seed(5)
            x_tp = x1.clone().requires_grad_()
            got = layer(x_tp)
            got.sum().backward()
            one_row[(bias, r, p)] = (tuple(got.shape), (got - want).abs().max().item(),
                                     (x_tp.grad - x_ref.grad).abs().max().item())
    out["one_row"] = one_row

    # Mini under float16 autocast on the gathered fold (r not aligned with the shards of in): the
    # block gradient's out / mini_r copies were summed in float16 there (inf where PEFT's float32
    # sum is 120000; review, 2026-12-03). The unsharded layer's value on every rank.
    mini_autocast = {}
    for r in (2, 3):  # 2: the split fold; 3: the gathered one
        base = torch.nn.Linear(6, 3, bias=False)
        with torch.no_grad():
            base.weight.zero_()
        layer = miss_ext.MissLinear(base, r, mode="mini", mini_r=1, init_weights=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the gather warning of r=3
            parallelize_module(layer, mesh, MissRowwiseParallel(input_layouts=Replicate()))
        x = torch.zeros(1, 6)
        x[0, 0] = 1.0
        with torch.autocast("cpu", dtype=torch.float16):
            y = layer(x)
        y.backward(torch.full((1, 3), 40000.0, dtype=y.dtype))
        grad = layer.miss_block.grad
        mini_autocast[r] = float(full(grad)[0, 0]) if hasattr(grad, "full_tensor") else float(grad[0, 0])
    out["mini_autocast"] = mini_autocast

    # A bat layer on a bf16 base fed float32 x computes unsharded (as PEFT), so it must sharded too
    # (it raised a TypeError there). Column-wise: this rank's output columns.
    torch.manual_seed(7)
    single = miss_ext.MissLinear(torch.nn.Linear(8, 8).to(torch.bfloat16), 2, mode="bat", init_weights=False)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = single(x)
        parallelize_module(single, mesh, MissColwiseParallel())
        got = single(x)
    out["bat_mixed_dtype"] = (expected[:, 4 * rank:4 * (rank + 1)], full(got))

    # Found by a review (2026-12-01). Styles on adapter layers they cannot shard: named, not torch's
    # "only support nn.Linear and nn.Embedding".
    bank = torch.nn.Sequential(torch.nn.Linear(8, 8))
    miss_ext.apply_bank(bank, ["0"], capacity=2, max_r=2)
    accelerated = miss_ext.peft.accelerate(get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)),
                                                          MissConfig(r=2, target_modules=["0"])))
    for name, root in {"bank_style": bank, "peft_style": accelerated.base_model.model}.items():
        try:
            parallelize_module(root, mesh, {"0": MissColwiseParallel()})
            errors[name] = None
        except TypeError as e:
            errors[name] = str(e)

    # Replicated blocks' gradients are reduced to Replicate (identical on every rank) for a frozen
    # adapter (serving; a config with inference_mode=True) unfrozen later, after model.float()
    # replaced the parameters, and under torch.compile from the first step. The styles used to
    # register a tensor hook at sharding time: refused on a frozen block, silent after float()
    # (the hook stopped firing) and under compile (an attempt to register it at forward).
    def replicated_local_grads(model):
        return {n: (tuple(p.grad.placements), p.grad.to_local().clone()) for n, p in model.named_parameters()
                if p.requires_grad and p.placements[0].is_replicate()}

    reference = build("mini", R, MINI_R, 0.0).eval()
    frozen = build("mini", R, MINI_R, 0.0).eval().requires_grad_(False)
    parallelize(frozen, mesh)
    with torch.no_grad():
        out["frozen_gap"] = (frozen(tokens()).logits - reference(tokens()).logits).abs().max().item()
    for _, layer in miss_ext.miss_layers(frozen):
        layer.miss_block.requires_grad_(True)
    train_step(frozen, 0.0)
    out["unfrozen_local_grads"] = replicated_local_grads(frozen)
    frozen.float()
    frozen.zero_grad(set_to_none=True)
    train_step(frozen, 0.0)
    out["converted_local_grads"] = replicated_local_grads(frozen)
    compiled = build("mini", R, MINI_R, 0.0)
    parallelize(compiled, mesh)
    train_step(torch.compile(compiled, backend="aot_eager"), 0.0)
    out["compiled_local_grads"] = replicated_local_grads(compiled)

    # export_lora gathers sharded blocks (it raised inside safetensors): rank 0 writes one
    # process's file.
    import os

    from safetensors.torch import load_file

    lora = {}
    for mode, mini_r in (("default", 1), ("mini", MINI_R)):
        single_path, tp_path = os.path.join(folder, f"lora-{mode}-single{rank}"), os.path.join(folder, f"lora-{mode}{rank}")
        miss_ext.export_lora(build(mode, R, mini_r, 0.0), single_path)
        sharded_model = build(mode, R, mini_r, 0.0)
        parallelize(sharded_model, mesh)
        miss_ext.export_lora(sharded_model, tp_path)
        dist.barrier()
        single_file = load_file(os.path.join(single_path, "adapter_model.safetensors"))
        tp_file = load_file(os.path.join(folder, f"lora-{mode}0", "adapter_model.safetensors"))
        lora[mode] = (os.path.exists(tp_path), single_file.keys() == tp_file.keys() and len(single_file) > 0
                      and all(torch.equal(single_file[k], tp_file[k]) for k in single_file))
    out["lora"] = lora

    # check_keys: ranks seeded differently draw different dropout keys, which must be refused (a
    # replicated fold with a different mask on each rank would silently give wrong gradients).
    model = build("default", R, 1, 0.1)
    parallelize(model, mesh, check_keys=True)
    model.train()
    torch.manual_seed(100 + rank)
    try:
        model(tokens())
        out["key_error"] = None
    except RuntimeError as e:
        out["key_error"] = str(e)
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if OLD_TORCH:
        pytest.skip(f"tensor parallelism needs torch >= 2.14, not {torch.__version__}")
    return run_ranks(rank_main, world_size=2, args=(str(tmp_path_factory.mktemp("tp")),), timeout=300)


@pytest.fixture(scope="module")
def reference():
    return {name: train_step(build(*cfg), cfg[3]) for name, cfg in CONFIGS.items()}


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_single_process(ranks, reference, name):
    ref_logits, ref_grads, ref_after = reference[name]
    assert len(ref_grads) == 2 * len(TARGETS)
    for rank, result in enumerate(ranks):
        got = result[name]
        _close(got["logits"], ref_logits)
        assert got["grads"].keys() == ref_grads.keys()
        for key in ref_grads:
            assert ref_grads[key].abs().max() > 0, key  # every block gets a gradient
            _close(got["grads"][key], ref_grads[key])
            _close(got["after"][key], ref_after[key])


def test_colwise_mini_with_mini_r_equal_to_out_is_sharded_as_default(ranks):
    want = _mini_full()
    for result in ranks:
        for got, ref in zip(result["mini_full"], want):
            _close(got, ref)


@pytest.mark.parametrize("name", ["default", "bat"])
def test_save_adapter_writes_whole_blocks(ranks, name):
    after = ranks[0][name]["after"]  # the gathered blocks after the step
    for result in ranks:
        saved = result[name]["saved"]
        assert len(saved) == len(after)
        for key, block in after.items():
            torch.testing.assert_close(saved[f"base_model.model.{key}"], block, rtol=0, atol=0)


def test_load_adapter_into_a_parallelized_model(ranks):
    for result in ranks:
        for name in ("default", "bat"):
            assert result[name]["reloaded_gap"] < 1e-12, (name, result[name]["reloaded_gap"])


def test_dropout_changes_the_output(reference):
    # the dropout configurations really drop (so their comparison checks the mask's indexing)
    assert not torch.allclose(reference["dropout"][0], reference["default"][0])
    assert not torch.allclose(reference["mini_dropout"][0], reference["mini"][0])


def test_eval_mode_has_no_dropout(ranks):
    """A sharded layer with dropout, in eval mode, gives the same output whatever the random stream
    (tp_forward drops only in training, as MissLinear)."""
    for result in ranks:
        for name in ("dropout", "mini_dropout"):
            assert result[name]["eval_seed_gap"] == 0.0, name


def test_block_placements(ranks):
    from torch.distributed.tensor import Replicate, Shard

    expected = {  # mode: (colwise placement, local shape of q_proj's block (out 32), of o_proj's block)
        "default": (Shard(1), (R, 16), (R, 32)),
        "mini": (Replicate(), (R, MINI_R), (R, MINI_R)),
        "bat": (Shard(0), (4, R, R), (8, R, R)),  # (out/r, r, r) = (8, 4, 4)
    }
    for result in ranks:
        for mode, (col, q_shape, o_shape) in expected.items():
            placements = result[mode]["placements"]
            assert placements["self_attn.q_proj.miss_block"] == ((col,), q_shape)
            assert placements["self_attn.o_proj.miss_block"] == ((Replicate(),), o_shape)
            assert placements["mlp.down_proj.miss_block"][0] == (Replicate(),)


def test_replicated_block_gradients_identical_on_every_rank(ranks):
    from torch.distributed.tensor import Replicate

    for name in CONFIGS:
        local = [result[name]["local_grads"] for result in ranks]
        assert local[0], name  # the row-wise blocks at least
        for key, (placements, grad) in local[0].items():
            assert placements == (Replicate(),), (name, key)
            assert placements == local[1][key][0]
            assert torch.equal(grad, local[1][key][1]), (name, key)


def test_unsplittable_fold_warns_and_gathers(ranks):
    for result in ranks:
        assert result["default"]["gather_warnings"] == []
        # r=3: o_proj (in 32 -> shards of 16) gathers, in both decoder layers; down_proj (in 48 -> 24) splits
        gathered = result["gathered"]["gather_warnings"]
        assert len(gathered) == 2 and all("in_features=32 " in w and "multiples of r=3" in w for w in gathered)
        assert "dropout=0.1" in " ".join(result["dropout"]["gather_warnings"])
        assert result["mini"]["gather_warnings"] == []


def test_refusals(ranks):
    for result in ranks:
        errors = result["errors"]
        assert errors["mini_r16"] is not None and "mini_r=16" in errors["mini_r16"], errors
        assert errors["bat_r16"] is not None and "r * world = 32" in errors["bat_r16"], errors
        assert errors["bat_out_r_odd"] is not None and "out_features/r = 3" in errors["bat_out_r_odd"], errors
        assert errors["col_out_lt_world"] is not None and "out_features=1 over 2" in errors["col_out_lt_world"], errors
        assert errors["miss_after_tp"] is not None and "sharded over 2 ranks" in errors["miss_after_tp"], errors
        assert errors["twice"] is not None and errors["twice"].startswith("ValueError: MissColwiseParallel: this "
                                                                          "MissLinear is already tensor-parallel"), errors
        assert result["key_error"] is not None and "dropout key differs" in result["key_error"]


@pytest.mark.parametrize("kind", ["miss", "bank", "peft"])
@pytest.mark.parametrize("style", ["colwise", "rowwise"])
def test_torch_styles_on_an_adapted_layers_base_are_refused_at_the_forward(ranks, style, kind):
    """Ours name the widths; PEFT's own forward (which the accelerated layer runs for a base that
    is not a plain nn.Linear) fails loudly in its sum for a column-wise base."""
    for rank, result in enumerate(ranks):
        error = result["errors"][f"base_{style}_{kind}"]
        if kind == "peft" and style == "colwise":
            assert error is not None and error.startswith("RuntimeError: The size of tensor a (6) must match"), \
                (rank, error)
        else:
            assert error is not None and error.startswith("ValueError") and \
                "the adapter spans the whole layer: in_features=8, out_features=12" in error, (rank, error)


def test_rowwise_gathered_fold_takes_a_1d_input(ranks):
    for rank, result in enumerate(ranks):
        assert len(result["one_row"]) == 4
        for config, (shape, gap_y, gap_dx) in result["one_row"].items():
            assert shape == (4,) and gap_y < 1e-12 and gap_dx < 1e-12, (rank, config, shape, gap_y, gap_dx)


def test_mini_block_gradient_under_float16_autocast_is_summed_in_float32(ranks):
    for rank, result in enumerate(ranks):
        assert result["mini_autocast"] == {2: 120000.0, 3: 120000.0}, (rank, result["mini_autocast"])


def test_styles_refuse_adapter_layers_they_cannot_shard_by_name(ranks):
    for result in ranks:
        errors = result["errors"]
        assert errors["bank_style"] is not None and "MissBankLinear" in errors["bank_style"], errors
        assert errors["peft_style"] is not None and "AcceleratedMissLinear" in errors["peft_style"], errors


@pytest.mark.parametrize("case", ["unfrozen", "converted", "compiled"])
def test_replicated_gradients_reduced_after_unfreezing_converting_and_compiling(ranks, case):
    from torch.distributed.tensor import Replicate

    for result in ranks:
        assert result["frozen_gap"] < 1e-12, result["frozen_gap"]
        local = result[f"{case}_local_grads"]
        assert len(local) == 2 * len(TARGETS), sorted(local)  # mini: every block is replicated
        for key, (placements, grad) in local.items():
            assert placements == (Replicate(),), (case, key)
            assert torch.equal(grad, ranks[1][f"{case}_local_grads"][key][1]), (case, key)


def test_export_lora_gathers_sharded_blocks(ranks):
    for rank, result in enumerate(ranks):
        for mode, (wrote, equal) in result["lora"].items():
            assert wrote == (rank == 0), (rank, mode)
            assert equal, mode


def test_sharded_bat_takes_x_of_another_dtype_than_its_base(ranks):
    for result in ranks:
        expected, got = result["bat_mixed_dtype"]
        assert got.dtype == expected.dtype == torch.float32
        assert expected.abs().max() > 0
        torch.testing.assert_close(got, expected)  # float32's tolerance: the local GEMMs' shapes differ


def test_import_without_distributed_guard():
    # miss_ext registers its DTensor strategies on import; the guard is torch.distributed.is_available()
    import miss_ext
    from miss_ext import tensor_parallel

    assert tensor_parallel._REGISTERED
    assert miss_ext.MissLinear is not None


@pytest.mark.skipif(not OLD_TORCH, reason="checks the refusal on torch < 2.14")
def test_old_torch_is_refused_by_name():  # runs where torch < 2.14 (the GPU machines' 2.11)
    import miss_ext.tensor_parallel as tp

    with pytest.raises(RuntimeError, match=r"needs torch >= 2\.14"):
        tp.check_torch_version("MissColwiseParallel")


def test_the_version_gate_compares_major_minor(monkeypatch):
    import miss_ext.tensor_parallel as tp

    for version, refused in (("2.11.0+cu130", True), ("2.13.1", True), ("2.14.1+cu130", False), ("2.15.0", False)):
        monkeypatch.setattr(tp.torch, "__version__", version)
        if refused:
            with pytest.raises(RuntimeError, match=rf"torch {re.escape(version)}'s DTensor"):
                tp.check_torch_version("S")
        else:
            tp.check_torch_version("S")



def _chunk_starts(start, size, n):
    """torch.chunk-style shards of [start, start + size) into n: their (start, size) pairs."""
    c = -(-size // n) if size else 0
    return [(start + i * c, min(c, size - i * c)) for i in range(n) if i * c < size]


def test_shards_aligned_on_a_2d_mesh_holds_for_every_way_of_sharding():
    """On a mesh of more than one dim a tensor dim may be split over one mesh dim or over both in
    turn; shards_aligned must be True only when every shard start is a multiple of the period (a
    wrong True runs the fold's i mod r on local columns: a silent wrong result). Checked against the
    shards torch.chunk gives on a real 2 x 2 DeviceMesh (a fake process group: one process). The
    mutation audit (2026-12-03) found no test with a 2-D mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from miss_ext.tensor_parallel import shards_aligned

    if dist.is_initialized():  # pragma: no cover - the other tests spawn their ranks
        pytest.fail("a process group is already initialised in the test process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        mesh = init_device_mesh("cpu", (2, 2))
        assert (mesh.ndim, mesh.size()) == (2, 4)
        assert not shards_aligned(24, 4, mesh)  # both dims: 4 shards of 6 start at 6 and 18
        assert shards_aligned(32, 4, mesh) and shards_aligned(36, 3, mesh) and shards_aligned(7, 1, mesh)
        for size in range(1, 65):
            for period in range(1, 9):
                if not shards_aligned(size, period, mesh):
                    continue
                nested = [sub for s, n in _chunk_starts(0, size, 2) for sub in _chunk_starts(s, n, 2)]
                ways = [_chunk_starts(0, size, 2), nested, _chunk_starts(0, size, 4)]  # one mesh dim; both
                assert all(s % period == 0 for way in ways for s, _ in way), (size, period)
    finally:
        dist.destroy_process_group()


def test_a_base_that_is_not_plain_is_refused_with_the_reason():
    """The refusal named the base's short class name only ("got Linear"); it now names the class in
    full and why the base is not plain (checked before any mesh is used)."""
    import types

    import miss_ext
    import miss_ext.tensor_parallel as tp

    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    mesh = types.SimpleNamespace(ndim=1)
    with pytest.raises(TypeError, match=r"MissColwiseParallel: the MissLinear's base layer must be a plain nn\.Linear "
                                        r".*got \S*Doubled: its class \S*Doubled overrides nn\.Linear's forward"):
        tp._check_miss_layer("MissColwiseParallel", miss_ext.MissLinear(Doubled(8, 8), 2), mesh)
    hooked = torch.nn.Linear(8, 8)
    hooked.register_forward_hook(lambda m, a, out: out)
    with pytest.raises(TypeError, match=r"got torch\.nn\.modules\.linear\.Linear: it has forward or backward hooks"):
        tp._check_miss_layer("MissColwiseParallel", miss_ext.MissLinear(hooked, 2), mesh)
    tp._check_miss_layer("MissColwiseParallel", miss_ext.MissLinear(torch.nn.Linear(8, 8), 2), mesh)


@pytest.mark.skipif(OLD_TORCH, reason="the styles refuse torch < 2.14 (MIN_TORCH)")
def test_check_keys_is_a_flag():
    """check_keys="no" turned the cross-rank check on (a truthy string; a review, 2026-12-05)."""
    from miss_ext.tensor_parallel import MissColwiseParallel, MissRowwiseParallel

    for style in (MissColwiseParallel, MissRowwiseParallel):
        with pytest.raises(TypeError, match=f"{style.__name__}: check_keys must be True or False, got check_keys='no'"):
            style(check_keys="no")
        assert style(check_keys=True).check_keys is True and style().check_keys is False


# Paths no other test reached (a coverage audit of miss_ext/*.py, 2026-12-05): each test was checked
# to fail with the code it covers broken.

# ---- tensor_parallel.py: a sharded layer under torch.inference_mode ----------------------------------
# (mode, r, mini_r, style): column-wise default and mini (the local out shard starts at a multiple of
# mini_r), row-wise default and mini (the shards of in start at multiples of r: the fold splits).
TP_INFERENCE_CASES = [("default", 4, 1, "col"), ("mini", 2, 3, "col"), ("default", 4, 1, "row"), ("mini", 4, 4, "row")]


def _tp_inference_rank(rank, world_size):
    """On each rank: MissLinear(Linear(16, 24)) layers sharded by MissColwiseParallel /
    MissRowwiseParallel, run under torch.inference_mode() and under torch.no_grad(); returns each
    case's (inference output, no_grad output, float64 reference), the column-wise ones as this
    rank's columns."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from miss_ext.tensor_parallel import MissColwiseParallel, MissRowwiseParallel

    mesh = init_device_mesh("cpu", (world_size,))
    results = []
    for i, (mode, r, mini_r, style) in enumerate(TP_INFERENCE_CASES):
        torch.manual_seed(100 + i)  # the same layer and x on every rank
        layer = MissLinear(nn.Linear(16, 24).to(F64), r, mode=mode, mini_r=mini_r, init_weights=False)
        randomize_adapters(layer)
        x = nonzero(2, 3, 16)
        want = linear_ref(x, layer.base_layer.weight, layer.base_layer.bias, layer.miss_block)
        layer = parallelize_module(layer, mesh, (MissColwiseParallel if style == "col" else MissRowwiseParallel)())
        x_in = x if style == "col" else x.chunk(world_size, -1)[rank]  # row-wise: each rank's columns of x
        if style == "col":
            want = want.chunk(world_size, -1)[rank]
        # .clone(): a row-wise output may be torch's AsyncCollectiveTensor, whose all-reduce only
        # finishes at its next op; returned as is, the parent could read it unreduced.
        with torch.inference_mode():
            inference = layer(x_in).clone()
        with torch.no_grad():
            no_grad = layer(x_in).clone()
        results.append((inference, no_grad, want))
    # A plan may put the MiSS styles on plain nn.Linear layers too (an lm_head beside adapted
    # layers): they act as torch's ColwiseParallel / RowwiseParallel there.
    plain = []
    for i, style in enumerate(("col", "row")):
        torch.manual_seed(200 + i)
        linear = nn.Linear(16, 24).to(F64)
        x = nonzero(3, 16)
        want = x @ linear.weight.detach().t() + linear.bias.detach()
        linear = parallelize_module(linear, mesh, (MissColwiseParallel if style == "col" else MissRowwiseParallel)())
        with torch.no_grad():
            y = linear(x if style == "col" else x.chunk(world_size, -1)[rank]).clone()
        plain.append((y, want.chunk(world_size, -1)[rank] if style == "col" else want))
    # A merged layer is refused (its weight holds W + dW, the styles shard W and the block).
    layer = MissLinear(nn.Linear(16, 24).to(F64), 4, init_weights=False)
    layer.merge()
    try:
        parallelize_module(layer, mesh, MissColwiseParallel())
        refusal = None
    except ValueError as exc:
        refusal = str(exc)
    return results, plain, refusal, type(layer.base_layer.weight).__name__


@pytest.mark.skipif(tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 14),
                    reason="the styles refuse torch < 2.14 (miss_ext.tensor_parallel.MIN_TORCH)")
def test_tensor_parallel_layers_under_inference_mode_match_the_formula():
    """tensor_parallel.py, _linear_rules: under torch.inference_mode() autograd is off, so DTensor
    meets miss::linear itself (with grad or no_grad, the op's C++ autograd runs its parts, whose
    rules the TP tests cover) and shards it by _linear_rules, which no test reached: column-wise
    (x replicated, weight/bias Shard(0), block Shard(1) or, mini, Replicate) and row-wise (x and
    weight Shard(last), bias Partial, block Replicate, output Partial). 2 gloo ranks, float64,
    against y = x W^T + b + fold_r(x) @ D_full and against the no_grad result. In the same ranks
    (a spawn costs seconds): the styles on a plain nn.Linear fall back to torch's (never run), and
    a merged MissLinear is refused, left unsharded."""
    pytest.importorskip("torch.distributed")
    from dist_util import run_ranks

    for rank_results, plain, refusal, merged_weight_type in run_ranks(_tp_inference_rank, world_size=2, timeout=300):
        for (mode, r, mini_r, style), (inference, no_grad, want) in zip(TP_INFERENCE_CASES, rank_results):
            torch.testing.assert_close(inference, want, **TOL64, msg=lambda m: f"{mode} r={r} {style}: {m}")
            torch.testing.assert_close(no_grad, want, **TOL64)
        for got, want in plain:
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, **TOL64)
        assert refusal is not None and "MissColwiseParallel: the MissLinear is merged; unmerge it" in refusal
        assert merged_weight_type == "Parameter"  # not sharded

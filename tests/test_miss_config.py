"""apply_miss takes all of PEFT's MissConfig (issue 13): exclude_modules, layers_to_transform,
layers_pattern, modules_to_save and bias as keywords, or a `peft.MissConfig` / adapter_config.json
dict instead of target_modules. It adapts exactly the modules get_peft_model adapts and trains
the same parameters; save_adapter writes modules_to_save and biases so that PEFT loads the same
model, and PEFT's files load into ours the same way. Refusals change nothing."""
import copy
import json

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from packaging.version import Version  # noqa: E402
from peft import MissConfig, PeftModel, get_peft_model  # noqa: E402

import miss_ext  # noqa: E402
from conftest import assert_unchanged, snapshot  # noqa: E402
from tiny_models import R, TARGETS, tiny_causal_lm, tokens  # noqa: E402

TOL = dict(rtol=1e-9, atol=1e-10)
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def bases():
    return {arch: tiny_causal_lm(arch) for arch in ("llama", "qwen2")}


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64,
                                                                n_positions=64)).double()


def peft_adapted(model):
    return sorted(n[len(PREFIX):] for n, m in model.named_modules() if hasattr(m, "miss_block"))


def peft_trainable(model):
    """PEFT's trainable parameter names in our naming (no prefix, adapter name or wrapper)."""
    names = set()
    for n, p in model.named_parameters():
        if p.requires_grad:
            n = n[len(PREFIX):].replace(".modules_to_save.default.", ".")
            names.add(n[:-len(".default")] if n.endswith(".miss_block.default") else n)
    return names


def ours_adapted(model):
    return sorted(n for n, _ in miss_ext.miss_layers(model))


def ours_trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


# Each: MissConfig keyword arguments. Together they cover list / regex / "all-linear" targets,
# exclude_modules as a list and as a regex, layers_to_transform as an int and a list, with and
# without layers_pattern, a full path in the list (PEFT skips the layer filter for it),
# modules_to_save (PEFT's suffix rule, excluded from the targets) and every bias value.
CONFIGS = {
    "list": dict(target_modules=TARGETS),
    "regex": dict(target_modules=r"model\.layers\.1\.(self_attn|mlp)\.(q|k|down)_proj"),
    "all-linear": dict(target_modules="all-linear"),
    "exclude-list": dict(target_modules=TARGETS, exclude_modules=["k_proj", "mlp.up_proj"]),
    "exclude-regex": dict(target_modules="all-linear", exclude_modules=r".*\.0\.self_attn\..*"),
    "layers-int": dict(target_modules=["q_proj", "v_proj"], layers_to_transform=1),
    "layers-list-pattern": dict(target_modules=TARGETS, layers_to_transform=[0], layers_pattern="layers"),
    "layers-pattern-list": dict(target_modules=["o_proj"], layers_to_transform=[1], layers_pattern=["nope", "layers"]),
    "layers-full-path": dict(target_modules=["q_proj", "model.layers.0.self_attn.k_proj"], layers_to_transform=[1]),
    "layers-exclude": dict(target_modules=TARGETS, layers_to_transform=[0, 1], exclude_modules=["gate_proj"]),
    "modules_to_save": dict(target_modules=TARGETS, modules_to_save=["lm_head", "o_proj"]),
    "modules_to_save-suffix": dict(target_modules=["q_proj"], modules_to_save=["norm"]),
    "bias-all": dict(target_modules=TARGETS, bias="all"),
    "bias-miss-only": dict(target_modules=["q_proj", "o_proj"], bias="MiSS_only"),
    # PEFT takes any value ending in "_only" as MiSS_only; older releases wrote these spellings.
    "bias-miss-only-lowercase": dict(target_modules=["q_proj", "o_proj"], bias="miss_only"),
    "bias-lora-only": dict(target_modules=["q_proj", "o_proj"], bias="lora_only"),
    # target_modules None: PEFT's default for the model type (its TRANSFORMERS_MODELS_TO_MISS_TARGET_MODULES_MAPPING)
    "default-targets": dict(),
    "default-targets-excluded": dict(exclude_modules=["v_proj"], layers_to_transform=[1]),
}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_apply_miss_selects_and_trains_what_get_peft_model_does(bases, arch, name):
    kwargs = CONFIGS[name]
    reference = get_peft_model(copy.deepcopy(bases[arch]), MissConfig(r=R, **kwargs))
    expected = peft_adapted(reference)
    # A MissConfig, the dict of its adapter_config.json, and the same as keywords.
    from_config = miss_ext.apply_miss(copy.deepcopy(bases[arch]), MissConfig(r=R, **kwargs))
    from_dict = miss_ext.apply_miss(copy.deepcopy(bases[arch]), json.loads(json.dumps(
        {k: (sorted(v) if isinstance(v, set) else v) for k, v in
         MissConfig(r=R, **kwargs).to_dict().items() if k != "peft_type"} | {"peft_type": "MISS"})))
    keywords = miss_ext.apply_miss(copy.deepcopy(bases[arch]), r=R, **kwargs)
    for model in (from_config, from_dict, keywords):
        assert ours_adapted(model) == expected
        assert ours_trainable(model) == peft_trainable(reference)


def task_model(task_type):
    """A tiny Qwen2 (biases on q/k/v) with the head a task_type's PeftModel class trains: score
    (SEQ_CLS, TOKEN_CLS) or qa_outputs (QUESTION_ANS); the causal LM for CAUSAL_LM."""
    cls = {"SEQ_CLS": transformers.Qwen2ForSequenceClassification,
           "TOKEN_CLS": transformers.Qwen2ForTokenClassification,
           "QUESTION_ANS": transformers.Qwen2ForQuestionAnswering,
           "CAUSAL_LM": transformers.Qwen2ForCausalLM}[task_type]
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    torch.manual_seed(0)
    return cls(config).double().eval()


@pytest.mark.parametrize("task_type", ["SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "CAUSAL_LM"])
@pytest.mark.parametrize("inference_mode", [False, True], ids=["training", "inference_mode"])
@pytest.mark.parametrize("bias", ["none", "all"])
def test_task_type_and_inference_mode_train_what_get_peft_model_does(task_type, inference_mode, bias, tmp_path,
                                                                     recwarn):
    """get_peft_model with a SEQ_CLS / TOKEN_CLS config trains the model's new classifier head
    (PEFT adds "classifier" and "score" to modules_to_save; QUESTION_ANS: "qa_outputs"); with
    inference_mode=True it freezes the blocks and those heads, not the biases bias="all" trains.
    apply_miss(model, config) left the head frozen (a classifier that could never learn) and
    trained the blocks under inference_mode."""
    def config():
        return MissConfig(r=R, target_modules=["q_proj", "v_proj"], task_type=task_type, inference_mode=inference_mode,
                          bias=bias)

    base = task_model(task_type)
    reference = get_peft_model(copy.deepcopy(base), config())
    want = peft_trainable(reference)
    model = miss_ext.apply_miss(copy.deepcopy(base), config())
    assert ours_trainable(model) == want
    head = {"SEQ_CLS": "score", "TOKEN_CLS": "score", "QUESTION_ANS": "qa_outputs"}.get(task_type)
    assert sum("miss_block" in n for n in want) == (0 if inference_mode else 4)  # q/v blocks of 2 layers
    assert {n.split(".")[0] for n in want} & {"score", "qa_outputs"} == ({head} if head and not inference_mode else set())
    assert any("layers.0.self_attn.q_proj" in n and n.endswith(".bias") for n in want) == (bias == "all")
    assert not [w for w in recwarn if "modules_to_save" in str(w.message)]  # "classifier" matches nothing: silent
    if head and not inference_mode:  # the head is saved and PEFT loads the same model
        with torch.no_grad():
            getattr(model, head).weight.add_(1.0)
        miss_ext.save_adapter(model, tmp_path, task_type=task_type)
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
        ids = tokens()
        out, ref = model(ids), loaded(ids)
        key = "logits" if task_type != "QUESTION_ANS" else "start_logits"
        torch.testing.assert_close(out[key], ref[key], **TOL)
    if head and not inference_mode and bias == "none":
        # PEFT's own saved config (its task heads written into modules_to_save, inference_mode true)
        # applies silently too, and as get_peft_model applies it.
        reference.save_pretrained(tmp_path / "peft")
        saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
        assert head in saved["modules_to_save"] and saved["inference_mode"] is True
        again = miss_ext.apply_miss(copy.deepcopy(base), saved)
        assert ours_trainable(again) == peft_trainable(get_peft_model(copy.deepcopy(base), MissConfig(**{
            k: v for k, v in saved.items() if k in MissConfig.__dataclass_fields__})))
        assert not [w for w in recwarn if "modules_to_save" in str(w.message)]


def test_an_inference_mode_config_leaves_its_layers_and_saved_modules_in_eval_mode():
    """PEFT 0.22's get_peft_model puts a frozen (inference_mode) adapter's dropout and its
    modules_to_save copies in eval mode, whatever the model's mode, until the next model.train();
    apply_miss left them in the model's mode, so a train-mode model ran the adapter with dropout
    (outputs 1.06 off PEFT's; a PEFT 0.22 review, 2026-12-07). Now as 0.22, for every release."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 8)
            self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(8, 4))

        def forward(self, x):
            return self.head(self.b(torch.tanh(self.a(x))))

    torch.manual_seed(0)
    base = Net().double().train()
    config = MissConfig(r=4, target_modules=["a", "b"], inference_mode=True, init_weights=False, miss_dropout=0.5,
                        modules_to_save=["head"])
    ours = miss_ext.apply_miss(copy.deepcopy(base), config)
    assert ours.training and not ours.a.training and not ours.b.training and not ours.head.training
    x = torch.randn(5, 16, dtype=torch.float64)
    with torch.no_grad():
        want = copy.deepcopy(ours).eval()(x)
        torch.testing.assert_close(ours(x), want)  # no dropout anywhere
        if Version(peft.__version__) >= Version("0.22"):
            reference = get_peft_model(copy.deepcopy(base), config)
            for name, layer in miss_ext.miss_layers(ours):
                layer.miss_block.copy_(reference.base_model.model.get_submodule(name).miss_block["default"])
            torch.testing.assert_close(ours(x), reference(x))
            torch.testing.assert_close(ours(x), copy.deepcopy(ours).eval()(x))
        ours.train()  # the next model.train() turns dropout on again, as PEFT's
        assert not torch.allclose(ours(x), ours.eval()(x))
    assert not any(p.requires_grad for p in ours.parameters())


def test_a_later_inference_mode_call_freezes_only_what_it_adds():
    """A second apply_miss with inference_mode=True freezes its own blocks and what it names; the
    head and blocks an earlier training call made trainable and it does not name stay trainable
    (as PEFT's add_adapter with inference_mode freezes only the new adapter's parameters). It used
    to freeze every recorded modules_to_save module. A head it names again follows it (one copy)."""
    model = task_model("SEQ_CLS")
    miss_ext.apply_miss(model, ["q_proj"], r=R, modules_to_save=["score"])
    before = ours_trainable(model)
    assert any(n.startswith("score.") for n in before) and sum("miss_block" in n for n in before) == 2
    miss_ext.apply_miss(model, MissConfig(r=R, target_modules=["v_proj"], inference_mode=True))
    assert ours_trainable(model) == before  # the new v_proj blocks are frozen, score still trains
    assert sum("v_proj.miss_block" in n for n, _ in model.named_parameters()) == 2
    miss_ext.apply_miss(model, MissConfig(r=R, target_modules=["k_proj"], task_type="SEQ_CLS", inference_mode=True))
    assert ours_trainable(model) == {n for n in before if not n.startswith("score.")}  # named again: frozen
    # Two inference_mode calls (two saved PEFT configs): nothing trainable, as PEFT's add_adapter
    # with inference_mode leaves it; the second call made the first one's frozen head trainable.
    model = task_model("SEQ_CLS")
    for targets in (["q_proj"], ["v_proj"]):
        miss_ext.apply_miss(model, MissConfig(r=R, target_modules=targets, task_type="SEQ_CLS", inference_mode=True))
        assert ours_trainable(model) == set()
    miss_ext.apply_miss(model, MissConfig(r=R, target_modules=["k_proj"], inference_mode=True))
    assert ours_trainable(model) == set()


def test_earlier_frozen_heads_stay_frozen_unless_a_later_call_names_them(tmp_path):
    """The requires_grad state of an earlier call's modules_to_save: load_adapter of a file that
    does not list the head kept it frozen too (it made it the only trainable thing); a later
    training call that names the head again trains it; bias="all" trains every bias, the frozen
    head's included."""
    def frozen_head_model():
        model = task_model("SEQ_CLS")
        miss_ext.apply_miss(model, MissConfig(r=R, target_modules=["q_proj"], task_type="SEQ_CLS", inference_mode=True))
        assert ours_trainable(model) == set()
        return model

    reference = get_peft_model(task_model("SEQ_CLS"), MissConfig(r=R, target_modules=["q_proj", "k_proj"]))
    reference.save_pretrained(tmp_path)
    model = frozen_head_model()
    miss_ext.load_adapter(model, tmp_path)
    trainable = ours_trainable(model)
    assert not any(n.startswith("score.") for n in trainable)
    assert any("k_proj.miss_block" in n for n in trainable)

    model = frozen_head_model()
    miss_ext.apply_miss(model, ["v_proj"], r=R, modules_to_save=["score"])
    assert {"score.weight"} <= ours_trainable(model)

    model = frozen_head_model()
    miss_ext.apply_miss(model, ["v_proj"], r=R, bias="all")
    trainable = ours_trainable(model)
    assert "score.weight" not in trainable
    assert all(n in trainable for n, _ in model.named_parameters() if n.endswith(".bias"))


def test_gpt2_conv1d_peft_refuses_and_miss_ext_adapts(recwarn):
    """PEFT's MiSS refuses transformers' Conv1D (TypeError); the spec counts that among the PEFT
    limitations not to copy, so apply_miss adapts the layers each config selects (a Conv1D is a
    linear with its weight stored (in, out)); excluding every Conv1D still leaves nothing."""
    for config in (MissConfig(r=2, target_modules=["c_attn"]),
                   MissConfig(r=2, target_modules="all-linear", exclude_modules=["c_proj"]),
                   MissConfig(r=2, target_modules=["c_fc"], layers_to_transform=1)):
        with pytest.raises(TypeError, match="not supported"):
            get_peft_model(gpt2(), copy.deepcopy(config))
        model = miss_ext.apply_miss(gpt2(), config)
        adapted = [name for name, _ in miss_ext.miss_layers(model)]
        assert adapted and all(n.rpartition(".")[2] in ("c_attn", "c_fc") for n in adapted), adapted
    assert adapted == ["transformer.h.1.mlp.c_fc"]
    # Excluding every Conv1D leaves nothing: both refuse (ValueError).
    config = MissConfig(r=2, target_modules="all-linear", exclude_modules=r".*c_(attn|proj|fc)")
    with pytest.raises(ValueError):
        get_peft_model(gpt2(), copy.deepcopy(config))
    model = gpt2()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="leave no module to adapt"):
        miss_ext.apply_miss(model, config)
    assert_unchanged(model, snap)


def train_one_step(model, lr=0.5):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(tokens(), labels=tokens()).loss
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.sub_(lr * g)
    return model.eval()


@pytest.mark.parametrize("spelling", ["miss_only", "bone_only", "lora_only"])
@pytest.mark.parametrize("peft_type", ["MISS", "BONE"])
def test_folders_with_other_spellings_of_miss_only_load_as_peft_loads_them(bases, tmp_path, spelling, peft_type):
    """model.py, check_bias: PEFT 0.17 wrote bias="miss_only" (its MissModel took no other spelling
    of MiSS_only), BoneModel "bone_only", and PEFT's scripts/convert-bone-to-miss.py keeps the value;
    PEFT 0.21 loads any value ending in "_only" as the adapted layers' biases. So does load_adapter,
    and save_adapter writes it back as "MiSS_only"."""
    from tiny_models import write_bone_copy

    base, ids = bases["qwen2"], tokens()  # biases on q/k/v
    reference = train_one_step(get_peft_model(copy.deepcopy(base), MissConfig(r=R, target_modules=["q_proj", "v_proj"],
                                                                              bias="MiSS_only")))
    reference.save_pretrained(tmp_path / "peft")
    config_file = tmp_path / "peft" / "adapter_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"bias": spelling}))
    folder = tmp_path / "peft"
    if peft_type == "BONE":
        write_bone_copy(tmp_path / "peft", tmp_path / "bone")
        folder = tmp_path / "bone"
    else:  # PEFT 0.21 has no Bone type: only the MiSS folder can be checked against it
        again = PeftModel.from_pretrained(copy.deepcopy(base), folder, is_trainable=True)
        assert peft_trainable(again) == peft_trainable(reference)
    mine = miss_ext.load_adapter(copy.deepcopy(base), folder)
    torch.testing.assert_close(mine(ids).logits, reference(ids).logits, **TOL)
    assert ours_trainable(mine) == peft_trainable(reference)
    assert any(name.endswith("q_proj.base_layer.bias") for name in ours_trainable(mine))
    miss_ext.save_adapter(mine, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["bias"] == "MiSS_only"
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, **TOL)


@pytest.mark.parametrize("arch, kwargs", [
    ("qwen2", dict(target_modules=TARGETS, modules_to_save=["lm_head"], bias="all", init_weights=False,
                   exclude_modules=["k_proj"])),
    ("qwen2", dict(target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1],
                   layers_pattern="layers", bias="MiSS_only", init_weights="mini", mini_r=4)),
    ("llama", dict(target_modules="all-linear", modules_to_save=["norm"], init_weights="bat")),
])
def test_round_trips_with_peft(bases, tmp_path, arch, kwargs):
    base, ids = bases[arch], tokens()
    # Ours -> PEFT: apply_miss(config), one training step, save_adapter, PeftModel.from_pretrained.
    ours = train_one_step(miss_ext.apply_miss(copy.deepcopy(base), MissConfig(r=R, **kwargs)))
    miss_ext.save_adapter(ours, tmp_path / "ours", task_type="CAUSAL_LM")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["bias"] == kwargs.get("bias", "none")
    # PEFT's modules_to_save rule: a plain string suffix before 0.22, whole trailing path parts since.
    old_rule = Version(peft.__version__) < Version("0.22")
    assert (written["modules_to_save"] or []) == sorted(
        n for n, _ in ours.named_modules()
        if any(n.endswith(m) if old_rule else n == m or n.endswith("." + m) for m in kwargs.get("modules_to_save", [])))
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert peft_adapted(loaded) == ours_adapted(ours)
    torch.testing.assert_close(loaded(ids).logits, ours(ids).logits, **TOL)
    assert not torch.allclose(ours(ids).logits, base(ids).logits)

    # PEFT -> ours: get_peft_model(config), one training step, save_pretrained, load_adapter.
    reference = train_one_step(get_peft_model(copy.deepcopy(base), MissConfig(r=R, **kwargs)))
    reference.save_pretrained(tmp_path / "peft")
    mine = miss_ext.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(mine(ids).logits, reference(ids).logits, **TOL)
    assert ours_trainable(mine) == peft_trainable(reference)
    # ... and ours saves it again so that PEFT loads the same model.
    miss_ext.save_adapter(mine, tmp_path / "again")
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again").eval()
    torch.testing.assert_close(again(ids).logits, reference(ids).logits, **TOL)


def test_keyword_signature_is_unchanged(bases):
    model = miss_ext.apply_miss(copy.deepcopy(bases["llama"]), ["q_proj"], R, "mini", 4, 0.0, False, True)
    assert all(layer.mode == "mini" for _, layer in miss_ext.miss_layers(model))
    assert not hasattr(model, "_miss_ext_trainable")


def test_a_later_call_keeps_modules_to_save_and_biases_trainable(bases):
    model = miss_ext.apply_miss(copy.deepcopy(bases["qwen2"]), ["q_proj"], r=R, modules_to_save=["lm_head"],
                                bias="MiSS_only")
    miss_ext.apply_miss(model, ["v_proj"], r=R)
    trainable = ours_trainable(model)
    assert "lm_head.weight" in trainable
    assert {f"model.layers.{i}.self_attn.{p}.base_layer.bias" for i in (0, 1) for p in ("q_proj", "v_proj")} \
        <= trainable


def tied_llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True)).double()


@pytest.mark.parametrize("call, error, match", [
    (dict(target_modules=["q_proj"], r=R, bias="MiSS"), ValueError, r"bias='MiSS'"),
    (dict(target_modules=["q_proj"], r=R, bias=True), ValueError, r"bias=True"),
    (dict(target_modules="all-linear", r=R, layers_to_transform=[0]), ValueError, r"layers_to_transform=\[0\]"),
    (dict(target_modules=r".*q_proj", r=R, layers_pattern="layers"), ValueError, r"layers_pattern='layers'"),
    (dict(target_modules=["q_proj"], r=R, layers_pattern="layers"), ValueError, "only takes effect"),
    (dict(target_modules=["q_proj"], r=R, layers_to_transform="1"), TypeError, "layers_to_transform"),
    (dict(target_modules=["q_proj"], r=R, exclude_modules="("), ValueError, "exclude_modules"),
    (dict(target_modules=["q_proj"], r=R, modules_to_save="lm_head"), TypeError, "modules_to_save"),
    (dict(target_modules=["q_proj"], r=R, exclude_modules=["q_proj"]), ValueError, "leave no module"),
    (dict(target_modules=["q_proj"], r=R, layers_to_transform=[7]), ValueError, "leave no module"),
    (dict(target_modules=["q_proj"], r=R, modules_to_save=["self_attn"]), ValueError, "leave no module"),
    (dict(target_modules=["gate_proj"], r=R, modules_to_save=["self_attn", "layers.0"]), ValueError,
     r"model\.layers\.0\.self_attn: nested inside model\.layers\.0"),
    (dict(target_modules=["q_proj"]), TypeError, "needs r"),
    (dict(target_modules=MissConfig(r=R, target_modules=["q_proj"]), r=R), TypeError, "also given: r"),
    (dict(target_modules=MissConfig(r=R, target_modules=["q_proj"]), bias="all"), TypeError, "also given: bias"),
    (dict(target_modules={"peft_type": "MISS", "r": R, "target_modules": ["q_proj"], "rank_pattern": {"q": 2}}),
     ValueError, "rank_pattern"),
    (dict(target_modules={"peft_type": "MISS", "r": R, "target_modules": ["q_proj"], "init_weights": "lora"}),
     ValueError, "init_weights='lora'"),
    (dict(target_modules={"peft_type": "LORA", "r": R, "target_modules": ["q_proj"]}), ValueError, "'LORA'"),
])
def test_refusals_change_nothing(bases, call, error, match):
    model = copy.deepcopy(bases["llama"])
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        miss_ext.apply_miss(model, **call)
    assert_unchanged(model, snap)
    assert not hasattr(model, "_miss_ext_trainable")


def test_a_file_without_target_modules_loads_peft_s_default_targets(bases, tmp_path):
    """adapter_files.with_default_targets: `target_modules: null` in a folder's config means what
    PEFT's from_pretrained makes of it, the model type's default targets (q_proj, v_proj here)."""
    base, ids = bases["llama"], tokens()
    reference = train_one_step(get_peft_model(copy.deepcopy(base), MissConfig(r=R)))
    reference.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"target_modules": None}))
    peft_loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    mine = miss_ext.load_adapter(copy.deepcopy(base), tmp_path)
    assert ours_adapted(mine) == peft_adapted(peft_loaded) == peft_adapted(reference)
    torch.testing.assert_close(mine(ids).logits, reference(ids).logits, **TOL)
    torch.testing.assert_close(mine(ids).logits, peft_loaded(ids).logits, **TOL)


@pytest.mark.parametrize("how", ["keywords", "config", "dict"])
def test_target_modules_none_without_a_peft_default_is_refused_as_peft_refuses(how):
    """targets.default_targets: a model without a transformers config is PEFT's "custom" type,
    which its table lacks; get_peft_model raises ValueError there, and so does apply_miss."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="Please specify"):
        get_peft_model(copy.deepcopy(model), MissConfig(r=2))
    snap = snapshot(model)
    call = {"keywords": lambda: miss_ext.apply_miss(model, r=2),
            "config": lambda: miss_ext.apply_miss(model, MissConfig(r=2)),
            "dict": lambda: miss_ext.apply_miss(model, {"peft_type": "MISS", "r": 2, "target_modules": None})}[how]
    with pytest.raises(ValueError, match=r"target_modules=None: PEFT has no default target modules for "
                                         r"model_type='custom'"):
        call()
    assert_unchanged(model, snap)


def test_modules_to_save_refusals_on_shared_or_adapted_modules(bases):
    tied = tied_llama()
    snap = snapshot(tied)
    with pytest.raises(ValueError, match=r"lm_head: its parameters or buffers are shared with model\.embed_tokens"):
        miss_ext.apply_miss(tied, ["q_proj"], r=R, modules_to_save=["lm_head"])
    assert_unchanged(tied, snap)

    model = miss_ext.apply_miss(copy.deepcopy(bases["llama"]), ["q_proj"], r=R, bias="all")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"self_attn: it is \(or holds\) a MiSS adapter layer"):
        miss_ext.apply_miss(model, ["gate_proj"], r=R, modules_to_save=["self_attn"])
    with pytest.raises(ValueError, match=r"bias='MiSS_only', but an earlier call .* bias='all'"):
        miss_ext.apply_miss(model, ["gate_proj"], r=R, bias="MiSS_only")
    assert_unchanged(model, snap)

    # Across calls too: an earlier call's modules_to_save is trained and saved whole, so a later
    # call cannot adapt it (or a layer inside it). It used to be adapted, its weight frozen without a
    # word, and save_adapter wrote a config naming it twice, which neither loader took.
    model = miss_ext.apply_miss(copy.deepcopy(bases["llama"]), ["q_proj"], r=R,
                                modules_to_save=["lm_head", "model.layers.1.mlp"])
    snap = snapshot(model)
    for targets in (["lm_head"], ["gate_proj"], r".*\.1\.mlp\.up_proj"):
        with pytest.raises(ValueError, match=r"an earlier apply_miss/load_adapter call recorded "
                                             r"model\.layers\.1\.mlp, lm_head as modules_to_save"):
            miss_ext.apply_miss(model, targets, r=R)
        assert_unchanged(model, snap)
    miss_ext.apply_miss(model, ["model.layers.0.mlp.gate_proj"], r=R)  # outside them: fine


def test_unmatched_exclude_and_modules_to_save_warn(bases):
    with pytest.warns(UserWarning, match=r"exclude_modules=\['nothing'\] matches no module"):
        miss_ext.apply_miss(copy.deepcopy(bases["llama"]), ["q_proj"], r=R, exclude_modules=["nothing"])
    with pytest.warns(UserWarning, match=r"modules_to_save entries \['score'\] match no module"):
        model = miss_ext.apply_miss(copy.deepcopy(bases["llama"]), ["q_proj"], r=R,
                                    modules_to_save=["lm_head", "score"])
    assert "lm_head.weight" in ours_trainable(model)


def test_saved_init_weights_is_what_peft_writes(tmp_path):
    """A default-mode adapter made with init_weights=False: PEFT's config says false, ours said
    true (a spec audit, 2026-12-05); a config reused with get_peft_model / apply_miss then made a
    zero adapter instead of a random one. Now both write what the adapter was made with, and a
    load_adapter + save_adapter round trip keeps it; mini and bat write their mode."""
    from torch import nn

    def written(folder):
        with open(folder / "adapter_config.json") as f:
            return json.load(f)["init_weights"]

    base = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    for init in (False, True):
        get_peft_model(copy.deepcopy(base), MissConfig(r=2, target_modules=["0"], init_weights=init)).save_pretrained(
            str(tmp_path / f"peft{init}"))
        ours = miss_ext.apply_miss(copy.deepcopy(base), ["0"], r=2, init_weights=init)
        miss_ext.save_adapter(ours, str(tmp_path / f"ours{init}"))
        assert written(tmp_path / f"ours{init}") is written(tmp_path / f"peft{init}") is init
        loaded = miss_ext.load_adapter(copy.deepcopy(base), str(tmp_path / f"peft{init}"))
        miss_ext.save_adapter(loaded, str(tmp_path / f"again{init}"))
        assert written(tmp_path / f"again{init}") is init
        # into existing layers made the other way: the file's value, as its dropout
        into = miss_ext.apply_miss(copy.deepcopy(base), ["0"], r=2, init_weights=not init)
        miss_ext.load_adapter(into, str(tmp_path / f"peft{init}"))
        miss_ext.save_adapter(into, str(tmp_path / f"into{init}"))
        assert written(tmp_path / f"into{init}") is init and into[0].init_weights is init
    mini = miss_ext.apply_miss(copy.deepcopy(base), ["0"], r=2, mode="mini", mini_r=2, init_weights=False)
    miss_ext.save_adapter(mini, str(tmp_path / "mini"))
    assert written(tmp_path / "mini") == "mini"


def test_a_loaded_mini_adapter_resets_to_zero_as_a_zero_init_mini_layer(tmp_path):
    """Catches the change (load_adapter setting init_weights = (config's init_weights is True)): a mini
    file says init_weights="mini" (PEFT's zero-initialised mini block), so the loaded layer's
    reset_parameters() zeroes the block, as the layer apply_miss made; only false means random."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8, dtype=torch.float64), nn.Tanh(), nn.Linear(8, 4, dtype=torch.float64))
    model = miss_ext.apply_miss(copy.deepcopy(base), ["0"], r=2, mode="mini", mini_r=2)
    with torch.no_grad():
        model[0].miss_block.normal_()
    miss_ext.save_adapter(model, str(tmp_path / "mini"))
    with open(tmp_path / "mini" / "adapter_config.json") as f:
        assert json.load(f)["init_weights"] == "mini"
    loaded = miss_ext.load_adapter(copy.deepcopy(base), str(tmp_path / "mini"))
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), **TOL)
    loaded[0].reset_parameters()
    model[0].reset_parameters()
    assert torch.count_nonzero(loaded[0].miss_block) == 0 and torch.count_nonzero(model[0].miss_block) == 0


class _Gemma4Like(nn.Module):
    r"""Module names of Gemma 4's text stack, whose PEFT default is the regex
    r".*language_model\..*\.(q_proj|v_proj)" (the only regex default in PEFT 0.21's table)."""

    def __init__(self):
        super().__init__()
        self.config = {"model_type": "gemma4"}
        self.language_model = nn.Module()
        self.language_model.layers = nn.ModuleList([nn.Module(), nn.Module()])
        for layer in self.language_model.layers:
            layer.self_attn = nn.ModuleDict({"q_proj": nn.Linear(8, 8), "k_proj": nn.Linear(8, 8),
                                             "v_proj": nn.Linear(8, 8)})
        self.vision = nn.ModuleDict({"q_proj": nn.Linear(8, 8)})


def test_a_regex_default_adapts_what_peft_adapts_and_a_layer_filter_beside_it_is_refused():
    """targets.default_targets: a regex default is used as PEFT uses it; layers_to_transform beside
    it is refused (PEFT's MissConfig checks before the default is filled in, then ignores the filter
    for a regex and adapts every layer), naming where the regex came from."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_MISS_TARGET_MODULES_MAPPING as table
    if not isinstance(table.get("gemma4"), str):
        pytest.skip("this PEFT's table has no regex default for gemma4")
    model = _Gemma4Like()
    reference = get_peft_model(copy.deepcopy(model), MissConfig(r=2))
    expected = peft_adapted(reference)
    assert expected == ["language_model.layers.0.self_attn.q_proj", "language_model.layers.0.self_attn.v_proj",
                        "language_model.layers.1.self_attn.q_proj", "language_model.layers.1.self_attn.v_proj"]
    assert ours_adapted(miss_ext.apply_miss(copy.deepcopy(model), r=2)) == expected
    ignored = get_peft_model(copy.deepcopy(model), MissConfig(r=2, layers_to_transform=[0]))
    assert peft_adapted(ignored) == expected  # PEFT ignores the filter: why it is refused here
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"layers_to_transform=\[0\] with target_modules=None \(PEFT's default for "
                                         r"model_type 'gemma4': .*\), a regex: PEFT would ignore the layer filter"):
        miss_ext.apply_miss(model, r=2, layers_to_transform=[0])
    assert_unchanged(model, snap)


def test_default_targets_read_the_model_type_as_peft_does(recwarn):
    """targets.default_targets takes the type from PEFT's BaseTuner.get_model_config (the config
    class's model_type through to_dict()): a generic PretrainedConfig naming "llama" has no type
    there, and PEFT refuses it; a config PEFT cannot read a type from is a ValueError here (PEFT:
    TypeError). PEFT's default list names modules of several variants (blip-2's q, v, q_proj,
    v_proj): the ones a model lacks give no unmatched-entry warning."""
    import types

    class Net(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.q_proj, self.v_proj, self.o_proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.config = config

    generic = Net(transformers.PretrainedConfig(model_type="llama"))
    with pytest.raises(ValueError, match="Please specify"):
        get_peft_model(copy.deepcopy(generic), MissConfig(r=2))
    with pytest.raises(ValueError, match=r"no default target modules for model_type=''"):
        miss_ext.apply_miss(generic, r=2)
    with pytest.raises(ValueError, match=r"model\.config's model_type, which this model's config \(SimpleNamespace\)"):
        miss_ext.apply_miss(Net(types.SimpleNamespace(model_type="llama")), r=2)
    blip = Net({"model_type": "blip-2"})
    reference = get_peft_model(copy.deepcopy(blip), MissConfig(r=2))
    recwarn.clear()
    assert ours_adapted(miss_ext.apply_miss(blip, r=2)) == peft_adapted(reference) == ["q_proj", "v_proj"]
    assert not [w for w in recwarn if "match no module" in str(w.message)]

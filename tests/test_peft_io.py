"""minlora.formats.peft against PEFT itself: what PEFT builds from a directory is what load_peft reads,
save_peft writes what PEFT loads, and unsupported variants are refused by name."""
from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch

from minlora.formats import Adapter, LoraWeights
from minlora.formats.peft import UnsupportedAdapterError, load_peft, read_config, save_peft
from minlora.formats.targeting import module_scale, targets_module
from test_patch_fixtures import build_family, make_peft_adapter, rel_err, tiny_model

FAMILIES = ["llama", "qwen2", "gpt2"]


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("peft_io"))
    return {name: build_family(name, root) for name in FAMILIES}


def _peft_model(base, path, adapter_name="default"):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(base), path, adapter_name=adapter_name).eval()


def _peft_layers(peft_model, adapter_name):
    """module name -> PEFT LoRA layer, for the modules that carry `adapter_name`."""
    inner = peft_model.base_model.model
    return {n: m for n, m in inner.named_modules() if hasattr(m, "lora_A") and adapter_name in m.lora_A}


@pytest.mark.parametrize("family", FAMILIES)
def test_load_matches_what_peft_builds(families, family):
    """Module set, factors and final scales (r, alpha, rsLoRA, rank/alpha patterns) equal PEFT's."""
    fam = families[family]
    for aid, path in fam.dirs.items():
        adapter = load_peft(path)
        layers = _peft_layers(_peft_model(fam.model, path), "default")
        assert set(adapter.modules) == set(layers), aid
        for name, w in adapter.modules.items():
            layer = layers[name]
            assert torch.equal(w.a, layer.lora_A["default"].weight), (aid, name)
            assert torch.equal(w.b, layer.lora_B["default"].weight), (aid, name)
            assert w.scale == pytest.approx(layer.scaling["default"], rel=1e-12), (aid, name)
        # targets_module follows PEFT's matching rules on every module of the model.
        config = read_config(path)
        assert {n for n, _ in fam.model.named_modules() if targets_module(config, n)} == set(layers), aid


def test_patterns_and_rslora_scales(families):
    fam = families["llama"]
    a1 = load_peft(fam.dirs["a1"])  # r=8, alpha=16, rsLoRA
    assert a1.modules["model.layers.0.mlp.up_proj"].scale == pytest.approx(16 / 8**0.5)
    a2 = load_peft(fam.dirs["a2"])  # r=2, alpha=5, rank_pattern k_proj: 6 and one full name: 3
    assert a2.modules["model.layers.0.self_attn.k_proj"].rank == 6
    assert a2.modules["model.layers.0.self_attn.k_proj"].scale == pytest.approx(5 / 6)
    assert a2.modules["model.layers.1.self_attn.q_proj"].rank == 3
    assert a2.modules["model.layers.0.self_attn.q_proj"].rank == 2
    assert a2.modules["model.layers.0.mlp.down_proj"].scale == pytest.approx(3 / 2)  # alpha_pattern
    a4 = load_peft(fam.dirs["a4"])  # layers_to_transform=[0], gate_proj excluded
    assert sorted(a4.modules) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj"]
    g = load_peft(families["gpt2"].dirs["a0"])
    assert g.config["fan_in_fan_out"] is True
    w = g.modules["transformer.h.0.attn.c_attn"]
    # Conv1D keeps its weight as [in, out]; the factors are stored as for nn.Linear.
    assert (w.in_features, w.out_features) == (64, 192)
    assert module_scale({"r": 4, "lora_alpha": 8, "use_rslora": True}, "x.q_proj") == pytest.approx(4.0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_round_trip_peft_loads_it(families, family, tmp_path):
    """load -> save -> PEFT loads it and computes the same logits; load again gives the same adapter."""
    fam = families[family]
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    for aid in ("a1", "a2"):  # rsLoRA; rank_pattern + alpha_pattern
        original = load_peft(fam.dirs[aid])
        out = tmp_path / f"{family}-{aid}"
        save_peft(original, out)
        again = load_peft(out)
        assert set(again.modules) == set(original.modules)
        for name, w in original.modules.items():
            assert torch.equal(again.modules[name].a, w.a) and torch.equal(again.modules[name].b, w.b)
            assert again.modules[name].scale == pytest.approx(w.scale, rel=1e-12)
        with torch.no_grad():
            want = _peft_model(fam.model, fam.dirs[aid])(ids).logits
            got = _peft_model(fam.model, str(out))(ids).logits
        assert rel_err(got, want) <= 1e-6


def test_save_mixed_ranks_rslora_from_scratch(tmp_path):
    """An Adapter built in memory, ranks and scales differing per module, rsLoRA: PEFT gets each right."""
    base = tiny_model("llama")
    g = torch.Generator().manual_seed(1)
    mods = {}
    for i, (name, r, scale) in enumerate(
        [("model.layers.0.self_attn.q_proj", 3, 0.7), ("model.layers.1.self_attn.q_proj", 5, 1.25),
         ("model.layers.0.mlp.down_proj", 3, 0.7), ("model.layers.1.mlp.up_proj", 1, 2.0)]
    ):
        layer = base.get_submodule(name)
        mods[name] = LoraWeights(torch.randn(r, layer.in_features, generator=g) * 0.1,
                                 torch.randn(layer.out_features, r, generator=g) * 0.1, scale)
    save_peft(Adapter(mods, {"use_rslora": True}), tmp_path / "ad")
    layers = _peft_layers(_peft_model(base, str(tmp_path / "ad")), "default")
    assert set(layers) == set(mods)
    for name, w in mods.items():
        assert layers[name].r["default"] == w.rank
        assert layers[name].scaling["default"] == pytest.approx(w.scale, rel=1e-9)
        assert torch.equal(layers[name].lora_B["default"].weight, w.b)


@pytest.mark.parametrize(
    "field, spec",
    [
        ("use_dora", dict(target_modules=["q_proj"], use_dora=True)),
        ("lora_bias", dict(target_modules=["q_proj"], lora_bias=True)),
        ("modules_to_save", dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
        ("bias", dict(target_modules=["q_proj"], bias="all")),
        ("bias", dict(target_modules=["q_proj"], bias="lora_only")),
        ("embedding", dict(target_modules=["embed_tokens", "q_proj"])),
    ],
)
def test_unsupported_variants_are_refused_by_name(tmp_path, field, spec):
    base = tiny_model("llama")
    make_peft_adapter(base, dict(r=2, lora_alpha=4, **spec), str(tmp_path / "ad"), seed=0)
    with pytest.raises(UnsupportedAdapterError, match=field):
        load_peft(tmp_path / "ad")


def test_only_safetensors_never_unpickles(tmp_path):
    d = tmp_path / "ad"
    make_peft_adapter(tiny_model("llama"), dict(r=2, lora_alpha=4, target_modules=["q_proj"]), str(d), seed=0)
    os.remove(d / "adapter_model.safetensors")
    # Not a pickle at all: unpickling it would fail differently from the refusal.
    (d / "adapter_model.bin").write_bytes(b"\x80\x04 not a pickle")
    with pytest.raises(ValueError, match="never unpickles"):
        load_peft(d)
    os.remove(d / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_peft(d)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_peft(tmp_path / "nowhere")


def test_config_inconsistent_with_weights_is_refused(families, tmp_path):
    src = families["llama"].dirs["a0"]
    d = tmp_path / "ad"
    d.mkdir()
    weights = open(os.path.join(src, "adapter_model.safetensors"), "rb").read()
    (d / "adapter_model.safetensors").write_bytes(weights)
    config = read_config(src)
    (d / "adapter_config.json").write_text(json.dumps(dict(config, r=5)))
    with pytest.raises(ValueError, match="rank_pattern"):
        load_peft(d)
    (d / "adapter_config.json").write_text(json.dumps(dict(config, target_modules=["q_proj"])))
    with pytest.raises(ValueError, match="target_modules"):
        load_peft(d)
    (d / "adapter_config.json").write_text(json.dumps(dict(config, peft_type="IA3")))
    with pytest.raises(UnsupportedAdapterError, match="peft_type"):
        load_peft(d)


def test_load_dtype(families):
    a = load_peft(families["qwen2"].dirs["a3"], dtype=torch.bfloat16)
    assert all(w.a.dtype == torch.bfloat16 and w.b.dtype == torch.bfloat16 for w in a.modules.values())


@pytest.mark.parametrize(
    "spec",
    [
        dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1], layers_pattern="layers"),
        dict(target_modules=["q_proj", "up_proj"], layers_to_transform=1, layers_pattern=["blocks", "layers"]),
        dict(target_modules=["v_proj", "o_proj"], exclude_modules=r".*layers\.0\.self_attn\.o_proj"),
        dict(target_modules=r".*\.(q|k)_proj", exclude_modules=["layers.1.self_attn.k_proj"]),
    ],
)
def test_targeting_rules_equal_peft(tmp_path, spec):
    """layers_to_transform (list or int) with layers_pattern (str or list), exclude_modules as a
    regex or a list: the modules PEFT adapts are the modules targets_module selects."""
    base = tiny_model("llama")
    make_peft_adapter(base, dict(r=2, lora_alpha=4, **spec), str(tmp_path / "ad"), seed=0)
    layers = _peft_layers(_peft_model(base, str(tmp_path / "ad")), "default")
    config = read_config(tmp_path / "ad")
    assert {n for n, _ in base.named_modules() if targets_module(config, n)} == set(layers)
    assert set(load_peft(tmp_path / "ad").modules) == set(layers)

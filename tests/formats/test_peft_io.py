"""minlora.formats.peft against PEFT itself: what PEFT builds from a directory is what load_peft reads,
save_peft writes what PEFT loads, and unsupported variants are refused by name."""
from __future__ import annotations

import copy
import json
import os
import resource
import subprocess
import sys
import warnings

import pytest
import torch

from minlora.formats import Adapter, LoraWeights
from minlora.formats.peft import UnsupportedAdapterError, load_peft, read_config, save_peft
from minlora.formats.targeting import module_rank, module_scale, targets_module
from helpers.cases import rel_error
from helpers.patching import build_family, make_peft_adapter, tiny_model

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
        assert rel_error(got, want) <= 1e-6


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


# ---------------------------------------------------------------- hostile configs (regexes, values, files)

_EVIL = "(a+)+b"  # exponential on a backtracking engine against "aaa...a"
_STALLS = {
    "target_modules": "targets_module({'target_modules': EVIL}, 'a' * 40) is False",
    "exclude_modules": "targets_module({'target_modules': ['q'], 'exclude_modules': EVIL}, 'a' * 40) is False",
    "rank_pattern": "module_rank({'r': 4, 'rank_pattern': {EVIL: 8}}, 'a' * 40) == 4",
    "alpha_pattern": "module_scale({'r': 4, 'lora_alpha': 8, 'alpha_pattern': {EVIL: 2}}, 'a' * 40) == 2.0",
    "layers_pattern": "targets_module({'target_modules': ['q_proj'], 'layers_to_transform': [0], "
                      "'layers_pattern': EVIL}, 'x.' + 'a' * 40 + '.q_proj') is False",
}


def _run_isolated(code: str, timeout: float = 90, memory_gib: int = 6) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter under a memory cap; a hang past `timeout` fails the test."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_gib << 30, memory_gib << 30))

    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                              preexec_fn=cap, cwd=os.path.dirname(__file__))
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s: {code[-300:]}")


@pytest.mark.parametrize("field", sorted(_STALLS))
def test_catastrophic_backtracking_regex_does_not_stall(field):
    """Every config regex is matched in linear time: a pattern that takes a backtracking engine
    hours on a 40-character name answers (PEFT's answer) at once."""
    code = (
        "from minlora.formats.targeting import module_rank, module_scale, targets_module\n"
        f"EVIL = {_EVIL!r}\n"
        f"assert {_STALLS[field]}\n"
        "print('done')\n"
    )
    done = _run_isolated(code)
    assert done.returncode == 0 and "done" in done.stdout, done.stderr[-2000:]


_UNSAFE_REGEXES = [r"(q)\1_proj", r"q(?=_proj).*", r".*(?<!k)_proj", r"q_proj++", r"(?>q_proj)"]


def _config_with(field: str, pattern: str) -> dict:
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    if field in ("rank_pattern", "alpha_pattern"):
        config[field] = {pattern: 3}
    elif field == "layers_pattern":
        config.update(layers_to_transform=[0], layers_pattern=pattern)
    else:
        config[field] = pattern
    return config


@pytest.mark.parametrize("pattern", _UNSAFE_REGEXES + [r"q_proj{,3}", r"[[:alpha:]]+_proj", "(q_proj", "a" * 20_000])
@pytest.mark.parametrize("field", sorted(_STALLS))
def test_regexes_that_cannot_run_safely_are_refused_naming_the_field(field, pattern):
    """Backreferences, lookarounds, possessive and atomic groups (no linear-time engine runs them),
    syntax Python and RE2 read differently, invalid and oversized patterns: a ValueError that names
    the field, from the config check and from the matchers themselves."""
    from minlora.formats.peft import check_config

    config = _config_with(field, pattern)
    with pytest.raises(ValueError, match=rf"^{field}: the regex .* is refused"):
        check_config(config)
    with pytest.raises(ValueError, match=rf"{field}: the regex"):
        names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"]
        if field in ("rank_pattern", "alpha_pattern"):
            [module_scale(config, n) for n in names]
        else:
            [targets_module(config, n) for n in names]


def test_refused_regex_in_a_peft_directory_names_file_and_field(tmp_path):
    d = tmp_path / "ad"
    make_peft_adapter(tiny_model("llama"), dict(r=2, lora_alpha=4, target_modules=["q_proj"]), str(d), seed=0)
    config = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps(dict(config, target_modules=r"(.*)\1")))
    with pytest.raises(ValueError, match=r"adapter_config\.json'?: target_modules: the regex"):
        load_peft(d)
    from minlora.targets import target_shapes

    with pytest.raises(ValueError, match="target_modules: the regex"):
        target_shapes(tiny_model("llama"), [d])


def test_regex_rules_equal_peft_on_ordinary_patterns():
    """PEFT's own matchers (check_target_module_exists, get_pattern_key) are the oracle for the
    RE2-backed ones, over every module name of two model families."""
    from types import SimpleNamespace

    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    names = [n for fam in ("llama", "gpt2") for n, _ in tiny_model(fam).named_modules() if n]
    regexes = [r".*\.(q|k|v)_proj", r".*layers\.[01]\.mlp\..*", r"model\.layers\.\d+\.self_attn\.o_proj",
               r".*\.h\.\d\.(attn|mlp)\.c_(attn|proj|fc)", r"(?i).*Q_PROJ", r".*_proj", r"lm_head", r".*\.mlp\.c_\w+",
               r"[^.]*\.layers\.1\..*proj", r".*(up|down)_proj$"]
    lists = [["q_proj", "v_proj"], ["c_attn"], ["self_attn.o_proj", "mlp.down_proj"], ["layers.0.mlp.up_proj"]]
    layered = [dict(layers_to_transform=[1], layers_pattern="layers"), dict(layers_to_transform=0),
               dict(layers_to_transform=[0, 1], layers_pattern=["h", "blocks"]), dict(layers_to_transform=[1],
               layers_pattern=r"lay\w+")]
    configs = [dict(target_modules=r) for r in regexes]
    configs += [dict(target_modules=t, **extra) for t in lists for extra in [{}] + layered]
    configs += [dict(target_modules=lists[0], exclude_modules=r) for r in regexes[:4]]
    configs += [dict(target_modules=regexes[0], exclude_modules=["layers.1.self_attn.k_proj"])]
    for config in configs:
        defaults = dict(exclude_modules=None, modules_to_save=None, target_parameters=None,
                        layers_to_transform=None, layers_pattern=None)
        peft_config = SimpleNamespace(**{**defaults, **config})
        for name in names:
            assert targets_module(config, name) == bool(check_target_module_exists(peft_config, name)), (config, name)
    patterns = {r"q_proj": 5, r"layers\.1\.self_attn\.k_proj": 6, r"mlp\..*": 7, r"h\.0\.attn\.c_attn": 3,
                r"(up|gate)_proj": 9, r"c_\w+": 2}
    for name in names:
        key = get_pattern_key(list(patterns), name)
        assert module_rank({"r": 8, "rank_pattern": patterns}, name) == patterns.get(key, 8), name
        alpha = patterns.get(key, 16)
        assert module_scale({"r": 8, "lora_alpha": 16, "alpha_pattern": patterns}, name, rank=8) == alpha / 8, name
    assert {n for n in names if n.endswith("proj") and module_rank({"rank_pattern": patterns}, n) != 8}


_BAD_VALUES = [
    ("r", 0, "r must be a positive integer"),
    ("r", 4.9, "r must be a positive integer"),
    ("r", "abc", "r must be a positive integer"),
    ("r", None, "r must be a positive integer"),
    ("r", [4], "r must be a positive integer"),
    ("r", True, "r must be a positive integer"),
    ("r", -2, "r must be a positive integer"),
    ("lora_alpha", "abc", "lora_alpha must be a finite number"),
    ("lora_alpha", None, "lora_alpha must be a finite number"),
    ("lora_alpha", float("nan"), "lora_alpha must be a finite number"),
    ("lora_alpha", float("inf"), "lora_alpha must be a finite number"),
    ("lora_alpha", False, "lora_alpha must be a finite number"),
    ("rank_pattern", [["q_proj", 4]], "rank_pattern must be a mapping"),
    ("rank_pattern", "q_proj", "rank_pattern must be a mapping"),
    ("rank_pattern", {"q_proj": 0}, r"rank_pattern\['q_proj'\] must be a positive integer"),
    ("rank_pattern", {"q_proj": "4"}, r"rank_pattern\['q_proj'\] must be a positive integer"),
    ("alpha_pattern", {"q_proj": float("nan")}, r"alpha_pattern\['q_proj'\] must be a finite number"),
    ("alpha_pattern", 5, "alpha_pattern must be a mapping"),
    ("use_rslora", "yes", "use_rslora must be true or false"),
    ("target_modules", 5, "target_modules must be a string or a list of strings"),
    ("target_modules", ["q_proj", 3], "target_modules must hold strings only"),
    ("target_modules", "(q_proj", "target_modules: the regex"),
    ("exclude_modules", {"a": 1}, "exclude_modules must be a string or a list of strings"),
    ("layers_to_transform", "0", "layers_to_transform must be a layer number"),
    ("layers_to_transform", [True], "layers_to_transform must be a layer number"),
    ("layers_to_transform", [0, -1], "layers_to_transform must be a layer number"),
    ("layers_pattern", 7, "layers_pattern must be a string or a list of strings"),
    ("peft_type", ["LORA"], "peft_type"),
]


@pytest.fixture(scope="module")
def plain_adapter(tmp_path_factory):
    d = tmp_path_factory.mktemp("plain") / "ad"
    make_peft_adapter(tiny_model("llama"), dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]), str(d), seed=0)
    return d


@pytest.mark.parametrize("field, value, message", _BAD_VALUES, ids=[f"{f}={v!r}" for f, v, _ in _BAD_VALUES])
def test_malformed_config_values_are_refused_naming_the_field(plain_adapter, tmp_path, field, value, message):
    """r a positive integer (not a bool), alpha finite, patterns mappings of regex -> valid value,
    targets and layers of the right types: anything else is a ValueError naming the field, from
    load_peft (naming the file too), from the config check and from target_shapes."""
    from minlora.formats.peft import check_config
    from minlora.targets import target_shapes

    d = tmp_path / "ad"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes((plain_adapter / "adapter_model.safetensors").read_bytes())
    config = dict(read_config(plain_adapter), **{field: value})
    (d / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"adapter_config\.json'?: .*{message}") as info:
        load_peft(d)
    assert type(info.value) in (ValueError, UnsupportedAdapterError)
    with pytest.raises(ValueError, match=message):
        check_config(config)
    with pytest.raises(ValueError, match=message):
        target_shapes(tiny_model("llama"), [config])


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"r": 4, "note": "\xff\xfe"}', "not UTF-8"),
        (b'{"r": 4,', "not valid JSON"),
        (b'{"x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "nests its JSON too deeply"),
        (b"[1, 2]", "must hold a JSON object"),
    ],
    ids=["invalid-utf8", "truncated-json", "absurd-nesting", "not-an-object"],
)
def test_unreadable_config_files_are_refused_naming_the_file(plain_adapter, tmp_path, content, message):
    d = tmp_path / "ad"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes((plain_adapter / "adapter_model.safetensors").read_bytes())
    (d / "adapter_config.json").write_bytes(content)
    for read in (read_config, load_peft):
        with pytest.raises(ValueError, match=rf"adapter_config\.json'? .*{message}") as info:
            read(d)
        assert type(info.value) is ValueError  # not a bare UnicodeDecodeError / JSONDecodeError / RecursionError


def test_config_of_gigabytes_is_refused_before_it_is_read(tmp_path):
    """An 8 GiB (sparse) adapter_config.json is refused from its size, under a 6 GiB memory cap
    that reading it whole would break."""
    d = tmp_path / "ad"
    d.mkdir()
    with open(d / "adapter_config.json", "wb") as f:
        f.truncate(8 << 30)
    code = (
        "from minlora.formats.peft import read_config\n"
        "try:\n"
        f"    read_config({str(d)!r})\n"
        "except ValueError as exc:\n"
        "    print('refused:', exc)\n"
    )
    done = _run_isolated(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused:" in done.stdout and "adapter_config.json" in done.stdout and "8589934592 bytes" in done.stdout


def test_damaged_peft_weights_file_is_a_value_error_naming_it(plain_adapter, tmp_path):
    """A truncated or garbled adapter_model.safetensors, A/B of different dtypes or integer
    factors: ValueError naming the weights file (never a SafetensorError or a TypeError)."""
    from safetensors.torch import load_file, save_file

    good = (plain_adapter / "adapter_model.safetensors").read_bytes()
    tensors = load_file(str(plain_adapter / "adapter_model.safetensors"))
    key_b = next(k for k in tensors if k.endswith("lora_B.weight"))
    mixed = dict(tensors, **{key_b: tensors[key_b].to(torch.float16)})
    ints = {k: (t * 100).to(torch.int32) for k, t in tensors.items()}
    cases = {
        "truncated": good[: len(good) // 2],
        "header-only": good[:8],
        "garbled-header": good[:8] + b"{not json" + good[17:],
        "empty": b"",
    }
    d = tmp_path / "ad"
    d.mkdir()
    (d / "adapter_config.json").write_bytes((plain_adapter / "adapter_config.json").read_bytes())
    for what, data in cases.items():
        (d / "adapter_model.safetensors").write_bytes(data)
        with pytest.raises(ValueError, match=r"adapter_model\.safetensors") as info:
            load_peft(d)
        assert type(info.value) is ValueError, what
    for what, ts, message in (("mixed dtypes", mixed, "torch.float16"), ("integer", ints, "floating point")):
        save_file(ts, str(d / "adapter_model.safetensors"))
        with pytest.raises(ValueError, match=rf"adapter_model\.safetensors'?: .*{message}") as info:
            load_peft(d)
        assert type(info.value) is ValueError, what

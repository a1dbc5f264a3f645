"""minlora.patch against PEFT's mixed-batch forward (the external oracle), on real tiny
HuggingFace models (Llama, Qwen2 with q/k/v bias, GPT-2's Conv1D) and real PEFT adapters."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import minlora
from minlora.patching import PatchedLayer, is_patched
from minlora.pool import AdapterPool
from minlora.targets import target_shapes
from helpers.cases import rel_error
from helpers.patching import VOCAB, build_family, patched_copy, peft_reference

FAMILIES = ["llama", "qwen2", "gpt2"]
# Every adapter, repeats, and rows without one.
ASSIGN = ["a0", None, "a1", "a2", "a3", "a4", "a1", None]
TOL = 1e-5


class Setup:
    def __init__(self, fam, root):
        self.fam = fam
        self.ref = peft_reference(fam)
        self.model, self.pool = patched_copy(fam, capacity_bytes=1 << 24)


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("patch"))
    return {name: Setup(build_family(name, root), root) for name in FAMILIES}


def _ids(batch, length, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _peft_names(assign):
    return [a if a is not None else "__base__" for a in assign]


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_logits_equal_peft(setups, family):
    s = setups[family]
    ids = _ids(len(ASSIGN), 9)
    with torch.no_grad():
        want = s.ref(ids, adapter_names=_peft_names(ASSIGN)).logits
        with minlora.adapters(s.model, ASSIGN):
            got = s.model(ids).logits
        by_keyword = s.model(ids, adapters=ASSIGN).logits
        base = s.fam.model(ids).logits
    for row in range(len(ASSIGN)):
        assert rel_error(got[row], want[row]) <= TOL, (family, row, ASSIGN[row])
        if ASSIGN[row] is not None:  # the adapter really changes the row
            assert rel_error(want[row], base[row]) > 1e-2
    assert torch.equal(by_keyword, got)
    # No-adapter rows are the base model's rows exactly.
    for row in (1, 7):
        assert torch.equal(got[row], base[row])


@pytest.mark.parametrize("family", FAMILIES)
def test_training_mode_gradients_flow(setups, family):
    """With autograd on, the differentiable op is used: same logits, and the gradient reaches x."""
    s = setups[family]
    ids = _ids(len(ASSIGN), 5, seed=1)
    with torch.no_grad(), minlora.adapters(s.model, ASSIGN):
        want = s.model(ids).logits
    with minlora.adapters(s.model, ASSIGN):
        emb = s.model.get_input_embeddings()(ids).detach().requires_grad_(True)
        got = s.model(inputs_embeds=emb).logits
        got.square().mean().backward()
    assert rel_error(got.detach(), want) <= TOL
    assert emb.grad is not None and torch.isfinite(emb.grad).all()


def _padded_prompts(batch, seed):
    """Left-padded prompts of different lengths, with their attention mask."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 8, (batch,), generator=g)
    ids = torch.zeros(batch, int(lengths.max()), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths.tolist()):
        ids[i, -n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, -n:] = 1
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_gives_peft_tokens(setups, family):
    s = setups[family]
    assign = ["a1", None, "a2", "a3", "a0"]
    ids, mask = _padded_prompts(len(assign), seed=2)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = s.ref.generate(input_ids=ids, attention_mask=mask, adapter_names=_peft_names(assign), **gen)
        with minlora.adapters(s.model, assign):
            got = s.model.generate(input_ids=ids, attention_mask=mask, **gen)
        by_keyword = s.model.generate(input_ids=ids, attention_mask=mask, adapters=assign, **gen)
    assert torch.equal(got, want)
    assert torch.equal(by_keyword, want)


def test_beam_search_expands_rows(setups):
    s = setups["llama"]
    assign = ["a2", "a1", None]
    ids, mask = _padded_prompts(len(assign), seed=3)
    gen = dict(max_new_tokens=5, do_sample=False, num_beams=3, pad_token_id=0, eos_token_id=None)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = s.ref.generate(input_ids=ids, attention_mask=mask, adapter_names=_peft_names(assign), **gen)
        with minlora.adapters(s.model, assign):
            got = s.model.generate(input_ids=ids, attention_mask=mask, **gen)
    assert torch.equal(got, want)


def test_compile_fullgraph_equals_eager_without_recompiling(setups):
    s = setups["llama"]
    ids = _ids(4, 6, seed=4)
    compiled = torch.compile(s.model, fullgraph=True)
    # Different numbers of distinct adapters and different ranks per module, same batch shape.
    assignments = [["a0", None, "a1", "a2"], ["a3", "a4", "a1", "a1"], [None, "a2", None, "a2"], ["a0"] * 4]
    with torch.no_grad():
        torch._dynamo.reset()
        for i, assign in enumerate(assignments):
            with minlora.adapters(s.model, assign):
                eager = s.model(ids).logits
                # After the first compilation any recompilation is an error.
                with torch._dynamo.config.patch(error_on_recompile=i > 0):
                    got = compiled(ids).logits
            assert rel_error(got, eager) <= TOL, assign
            want = s.ref(ids, adapter_names=_peft_names(assign)).logits
            assert rel_error(got, want) <= TOL, assign
    torch._dynamo.reset()


def test_unpatch_restores_base_bit_exact(tmp_path):
    fam = build_family("qwen2", str(tmp_path))
    model = fam.model
    ids = _ids(3, 7, seed=5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    classes = {n: type(m) for n, m in model.named_modules()}
    with torch.no_grad():
        base = model(ids).logits
        pool = AdapterPool(target_shapes(model, list(fam.dirs.values())), capacity_bytes=1 << 22)
        for aid, path in fam.dirs.items():
            pool.register(aid, path)
        minlora.patch(model, pool)
        assert is_patched(model)
        assert model.state_dict().keys() == state.keys()  # parameter names are kept while patched
        assert torch.equal(model(ids).logits, base)  # no step chosen: the base model
        with minlora.adapters(model, ["a1", "a2", "a3"]):
            assert not torch.equal(model(ids).logits, base)
        minlora.unpatch(model)
        assert not is_patched(model)
        assert torch.equal(model(ids).logits, base)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_target_modules_subset_and_contexts(setups, tmp_path):
    fam = setups["llama"].fam
    model = copy.deepcopy(fam.model)
    pool = AdapterPool(target_shapes(model, list(fam.dirs.values())), capacity_bytes=1 << 22)
    pool.register("a1", fam.dirs["a1"])
    minlora.patch(model, pool, target_modules=["q_proj", "v_proj"])
    patched = {n for n, m in model.named_modules() if isinstance(m, PatchedLayer)}
    assert patched == {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
    minlora.unpatch(model)
    minlora.patch(model, pool, target_modules=r".*layers\.1\.mlp\..*")
    patched = {n for n, m in model.named_modules() if isinstance(m, PatchedLayer)}
    assert patched == {f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}

    ids = _ids(2, 4, seed=6)
    with torch.no_grad():
        base = model(ids).logits
        with minlora.adapters(model, ["a1", "a1"]):
            inside = model(ids).logits
            assert torch.equal(model(ids, adapters=[None, None]).logits, base)  # keyword overrides
            assert torch.equal(model(ids).logits, inside)  # and the block's choice comes back
            with pytest.raises(ValueError, match="split evenly"):
                model(_ids(3, 4))
            # A forward that raises still closes its keyword step and restores the block's choice.
            with pytest.raises(ValueError, match="split evenly"):
                model(_ids(3, 4), adapters=["a1", None])
            assert pool.stats()["steps_in_flight"] == 1
            assert torch.equal(model(ids).logits, inside)
        assert pool.stats()["steps_in_flight"] == 0
        assert torch.equal(model(ids).logits, base)
    with pytest.raises(RuntimeError, match="already patched"):
        minlora.patch(model, pool)
    minlora.unpatch(model)
    with pytest.raises(RuntimeError, match="not patched"):
        minlora.unpatch(model)
    with pytest.raises(RuntimeError, match="patch"):
        with minlora.adapters(model, ["a1"]):
            pass
    with pytest.raises(ValueError, match="no module"):
        minlora.patch(model.model, pool)  # names are the CausalLM's, not its inner model's
    with pytest.raises(ValueError, match="selects none"):
        minlora.patch(model, pool, target_modules=["nothing"])


def test_plan_built_once_per_step(setups):
    """One build_plan per step and batch shape, shared by every patched layer and by later
    forwards of that shape (counted by the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    s = setups["llama"]
    layers = sum(isinstance(m, PatchedLayer) for m in s.model.modules())
    ids = _ids(4, 5, seed=7)
    with torch.no_grad(), minlora.adapters(s.model, ["a1", None, "a2", "a1"]):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            s.model(ids)
            s.model(ids)
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("minlora::build_plan") == 1
    # Inference accumulates in place into the base layer's output, one planned op per layer
    # (the plan's order, seg_offsets and positions are the op's inputs 9, 10 and 11).
    adds = [e for e in prof.events() if e.name == "minlora::lora_forward_add_"]
    assert len(adds) == 2 * layers
    assert all(e.input_shapes[9] and e.input_shapes[10] and e.input_shapes[11] for e in adds), \
        "a layer ran without the step's plan"
    assert "minlora::lora_forward" not in counts


def test_patch_layer_imports_neither_the_pool_nor_adapter_files():
    """The patch reaches a pool only through its protocol and PEFT only through the targeting
    rules; `minlora.patch` is the function and the module has its own name."""
    import ast
    import pathlib

    import minlora.patching

    allowed = {"minlora.ops", "minlora.plan", "minlora.formats.targeting"}
    for path in pathlib.Path(minlora.patching.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = "minlora" if node.level == 2 else "minlora.patching"
                name = f"{base}.{node.module}" if node.module else base
                names = [name] + [f"{name}.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith("minlora") and not name.startswith("minlora.patching"):
                    ok = name == "minlora" or any(name == a or name.startswith(a + ".") for a in allowed)
                    assert ok, f"{path.name} imports {name}"
    assert callable(minlora.patch) and minlora.patch is minlora.patching.patch
    from minlora.targets import target_shapes

    assert target_shapes is minlora.target_shapes

"""Fixed-capacity step buffers (minlora.plan.StepBuffers) and the patch that reads them: a step
refills the same tensors in place, with work that does not grow with the number of patched
modules, and consecutive steps with different adapters, ranks and slot counts match PEFT."""
from __future__ import annotations

import collections
import copy

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import minlora
from minlora.patching.model import _state_of
from minlora.plan import HostTables, StepBuffers
from helpers.cases import rel_error
from helpers.patching import VOCAB, build_family, patched_copy, peft_reference

TOL = 1e-5


class OpCounter(TorchDispatchMode):
    """Counts every aten / minlora op dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return build_family("llama", str(tmp_path_factory.mktemp("stepbuf")))


@pytest.fixture(scope="module")
def ref(fam):
    return peft_reference(fam)


def _patched(fam, target_modules=None, **caps):
    return patched_copy(fam, poison=True, target_modules=target_modules, **caps)


def _ids(batch, length, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _peft_names(assign):
    return [a if a is not None else "__base__" for a in assign]


def _buffer_ptrs(state):
    b = state.buffers
    return [t.data_ptr() for t in (b.a_pages, b.b_pages, b.ranks, b.scales, b.token_slot, b.order, b.positions,
                                   b.seg_offsets)]


# Different adapters, ranks (a0: 4 on q/v, a1: 8 everywhere, a2: 2..6, a3: 3, a4: 5) and slot
# counts: more slots than the step before, then fewer, rows without an adapter, a base-only step.
STEPS = [
    ["a0", "a0", "a0", "a0"],
    ["a1", None, "a2", "a0"],
    ["a4", "a3", "a2", "a1"],
    [None, None, "a3", None],
    [None, None, None, None],
    ["a2", "a2", "a4", None],
]


def test_consecutive_steps_match_peft_and_reuse_the_buffers(fam, ref):
    model, pool = _patched(fam)
    state = _state_of(model)
    ids = _ids(4, 6, seed=1)
    ptrs = None
    with torch.no_grad():
        base = fam.model(ids).logits
        for k, assign in enumerate(STEPS):
            with minlora.adapters(model, assign) as step:
                got = model(ids).logits
                again = model(ids).logits  # the plan and tables of this step, reused
                decode = model(ids[:, :1]).logits  # another shape in the same step: a plan refill
                assert len(set(a for a in assign if a)) == step.num_slots == state.buffers.num_slots
                # Slots past the step's count are "no adapter" in every module.
                assert (state.buffers.ranks[:, step.num_slots:] == 0).all()
                assert (state.buffers.scales[:, step.num_slots:] == 0).all()
            want = ref(ids, adapter_names=_peft_names(assign)).logits
            want_decode = ref(ids[:, :1], adapter_names=_peft_names(assign)).logits
            assert torch.equal(got, again)
            for row, a in enumerate(assign):
                assert rel_error(got[row], want[row]) <= TOL, (k, row, a)
                assert rel_error(decode[row], want_decode[row]) <= TOL, (k, row, a)
                if a is None:
                    assert torch.equal(got[row], base[row])
            now = _buffer_ptrs(state)
            assert ptrs is None or now == ptrs, "the step buffers were reallocated"
            ptrs = now
    pool.close()


def test_tables_are_the_same_tensors_every_step(fam):
    model, pool = _patched(fam)
    state = _state_of(model)
    with torch.no_grad():
        with minlora.adapters(model, STEPS[0]):
            model(_ids(4, 3))
            first = dict(state.tables)
            first_plan = state.plan
        with minlora.adapters(model, STEPS[2]):
            model(_ids(4, 3))
            assert all(state.tables[n] is t for n, t in first.items())
            # The token views are the same tensors; only the host hint of the plan is new.
            assert state.plan[0] is first_plan[0] and state.plan[1].order is first_plan[1].order
    s = state.buffers
    assert s.a_pages.shape == (len(state.layers), pool.max_slots, s.max_rank)
    pool.close()


def _step_extra_ops(model, ids, assign):
    """Ops beyond the base model's of (entering a step + its first forward) and of a second
    forward of the step, and the base ops the second forward lacks; after a first step has
    made the buffers."""
    with torch.no_grad():
        with minlora.adapters(model, STEPS[1]):
            model(ids)
        base, first, second = OpCounter(), OpCounter(), OpCounter()
        with base:
            model(ids)  # no step: every patched layer returns the base output
        with first:
            with minlora.adapters(model, assign):
                model(ids)
        with minlora.adapters(model, assign):
            model(ids)
            with second:
                model(ids)
    return first.ops - base.ops, second.ops - base.ops, base.ops - second.ops


def test_step_work_does_not_grow_with_the_patched_modules(fam):
    """Refilling a step (its tables, token slots and plan) dispatches the same ops whether 4 or
    14 modules are patched; a later forward of the step adds exactly one op per patched layer."""
    ids = _ids(4, 5, seed=2)
    assign = ["a1", "a2", None, "a1"]
    extra = {}
    for targets in (["q_proj", "v_proj"], None):
        model, pool = _patched(fam, target_modules=targets)
        layers = len(_state_of(model).layers)
        first, second, missing = _step_extra_ops(model, ids, assign)
        assert not missing
        # The second forward: per layer, the in-place op and the two views flattening x and y
        # to [T, in] / [T, out]; no copy, no allocation, no padding of tables.
        assert second == collections.Counter({"minlora.lora_forward_add_": layers, "aten.view": 2 * layers}), second
        assert first["minlora.lora_forward_add_"] == layers and first["aten.view"] >= 2 * layers
        first -= collections.Counter({"minlora.lora_forward_add_": layers, "aten.view": 2 * layers})
        extra[layers] = first
        pool.close()
    (few, few_ops), (many, many_ops) = sorted(extra.items())
    assert few < many == 14
    assert few_ops == many_ops, (few_ops, many_ops)
    assert few_ops["minlora.build_plan"] == 1  # the step's plan, built on the host once


def test_capacities_are_fixed_and_checked(fam):
    model, pool = _patched(fam, max_slots=2, max_rank=6, max_tokens=12)
    ids = _ids(2, 6)
    with torch.no_grad():
        with minlora.adapters(model, ["a0", "a2"]):  # ranks up to 6, 2 slots, 12 tokens
            model(ids)
            with pytest.raises(ValueError, match="max_tokens = 12"):
                model(_ids(2, 7))
        with pytest.raises(ValueError, match="max_rank = 6"):
            with minlora.adapters(model, ["a1", "a0"]):  # a1 has rank 8
                pass
        with pytest.raises(ValueError, match="max_slots = 2"):
            with minlora.adapters(model, ["a0", "a2", "a4"]):
                pass
        assert pool.stats()["steps_in_flight"] == 0
        # A refused step leaves the model usable with the next one.
        with minlora.adapters(model, ["a2", None]):
            got = model(ids).logits
    want = peft_reference(fam)(ids, adapter_names=["a2", "__base__"]).logits
    assert rel_error(got, want) <= TOL
    with pytest.raises(ValueError, match="max_rank"):
        minlora.patch(copy.deepcopy(fam.model), pool, max_rank=0)
    pool.close()


def test_first_step_under_inference_mode_then_no_grad(fam, ref):
    """Buffers made under torch.inference_mode are refilled by later steps outside it."""
    model, pool = _patched(fam)
    ids = _ids(3, 4, seed=3)
    with torch.inference_mode(), minlora.adapters(model, ["a1", None, "a2"]):
        model(ids)
    for assign in (["a3", "a0", None], ["a4", "a4", "a1"]):
        with torch.no_grad(), minlora.adapters(model, assign):
            got = model(ids).logits
        with torch.no_grad():
            want = ref(ids, adapter_names=_peft_names(assign)).logits
        assert rel_error(got, want) <= TOL
    pool.close()


def test_tokens_per_request_refills_the_plan_on_entry(fam):
    model, pool = _patched(fam)
    state = _state_of(model)
    with torch.no_grad(), minlora.adapters(model, ["a1", None, "a3"], tokens_per_request=2):
        assert state.plan_key == (3, 6)
        assert state.plan[0].tolist() == [0, 0, -1, -1, 1, 1]
        assert state.plan[1].max_segment == 2
        counter = OpCounter()
        with counter:
            model(_ids(3, 2))
        assert counter.ops["minlora.build_plan"] == 0  # already in the buffers
    pool.close()


def _host(M, S, R, pages=None, ranks=None, pools=8):
    a = np.zeros((M, S, R), np.int32) if pages is None else pages
    r = np.full((M, S), R, np.int32) if ranks is None else ranks
    pool = (torch.zeros(pools, 4), torch.zeros(pools, 4))
    return HostTables(a, a.copy(), r, np.ones((M, S), np.float32), [pool] * M, np.arange(S, dtype=np.int32))


def test_step_buffers_check_values_on_the_host():
    buf = StepBuffers(2, max_slots=4, max_rank=3, max_tokens=8, device="cpu")
    buf.load_tables(_host(2, 2, 3))
    bad = np.zeros((2, 2, 3), np.int32)
    bad[1, 1, 2] = 8  # outside a pool of 8 pages, within the slot's rank
    with pytest.raises(ValueError, match="a_pages name a page outside"):
        buf.load_tables(_host(2, 2, 3, pages=bad))
    ranks = np.full((2, 2), 2, np.int32)
    buf.load_tables(_host(2, 2, 3, pages=bad, ranks=ranks))  # past the rank: never read
    with pytest.raises(ValueError, match="ranks must be in 0..3"):
        buf.load_tables(_host(2, 2, 3, ranks=np.full((2, 2), 4, np.int32)))
    with pytest.raises(ValueError, match="max_slots = 4"):
        buf.load_tables(_host(2, 5, 1))
    with pytest.raises(ValueError, match="token_slot values"):
        buf.load_tokens(np.array([0, 2], np.int32))  # the last load has 2 slots
    token_slot, plan = buf.load_tokens(np.array([1, -1, 0, 1], np.int32))
    assert token_slot.tolist() == [1, -1, 0, 1] and plan.max_segment == 2
    assert plan.order.tolist() == [2, 0, 3, 1] and plan.seg_offsets.tolist() == [0, 1, 3, 3, 3]
    assert plan.positions.tolist() == [1, 3, 0, 2]
    # Fewer slots than before: the dropped ones are rank 0 again.
    buf.load_tables(_host(2, 1, 2))
    assert buf.ranks.tolist() == [[2, 0, 0, 0], [2, 0, 0, 0]]
    with pytest.raises(ValueError, match="max_slots"):
        StepBuffers(1, max_slots=0, max_rank=1, max_tokens=1, device="cpu")


def test_decode_graph_bench_runs_up_to_the_device_check(fam, ref):
    """`minlora bench model --device cuda`'s decode-graph path on the CPU: the static-cache
    prefill and decode match PEFT, the traffic is counted, and the capture refuses the CPU."""
    from minlora.bench.decode_graph import DecodeStep, bench_decode_graph

    model, pool = _patched(fam)
    assign = ["a1", "a1", None, "a4"]
    dec = DecodeStep(model, len(assign), context=6, vocab=VOCAB, seed=4)
    with torch.no_grad(), minlora.adapters(model, assign) as step:
        dec.prefill()
        got = dec.decode()[:, -1]
        # Warm-ups, the capture and every replay run the decode again: each must write the
        # same cache column and give the same logits (a StaticCache advances its own position).
        for _ in range(3):
            assert torch.equal(dec.decode()[:, -1], got)
        traffic = dec.traffic_bytes(step, dict(pool.modules))
        with pytest.raises(RuntimeError, match="CUDA device"):
            dec.capture()
    with torch.no_grad():
        want = ref(torch.cat([dec.prompt, dec.token], 1), adapter_names=_peft_names(assign)).logits[:, -1]
    assert rel_error(got, want) <= TOL
    # The distinct adapters' pages: a1 (rank 8 on every module) and a4, each counted once.
    elem = 4
    shapes = pool.modules
    a1 = sum(8 * (i + o) for i, o in shapes.values())
    a4 = sum(5 * (i + o) for n, (i, o) in shapes.items() if "layers.0." in n and n.endswith(("o_proj", "down_proj")))
    assert traffic["adapter_pages"] == (a1 + a4) * elem
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert traffic["kv_cache"] == 2 * cfg.num_hidden_layers * 4 * cfg.num_key_value_heads * head_dim * 7 * elem
    assert traffic["total"] == traffic["base_weights"] + traffic["adapter_pages"] + traffic["kv_cache"]
    with pytest.raises(RuntimeError, match="CUDA device"):
        bench_decode_graph(model, dict(pool.modules), [assign], context=6, vocab=VOCAB)
    pool.close()


def test_decode_step_rewinds_every_counter_of_a_sliding_window_cache(monkeypatch):
    """A sliding-window StaticCache keeps a host copy of its write position besides the device
    counter: each repeated decode (warm-ups, replays) must still write the same column and give
    the logits of the whole sequence.  (A plain model: the step's token plan is not needed.)"""
    from transformers import MistralConfig, MistralForCausalLM

    from minlora.bench import decode_graph

    monkeypatch.setattr(decode_graph, "plan_tokens", lambda *args, **kwargs: None)
    torch.manual_seed(0)
    cfg = MistralConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=VOCAB, sliding_window=16)
    model = MistralForCausalLM(cfg).eval()
    dec = decode_graph.DecodeStep(model, 2, context=5, vocab=VOCAB, seed=3)
    with torch.no_grad():
        dec.prefill()
        outs = [dec.decode()[:, -1] for _ in range(4)]
        want = model(torch.cat([dec.prompt, dec.token], 1)).logits[:, -1]
    for got in outs:
        assert rel_error(got, want) <= TOL

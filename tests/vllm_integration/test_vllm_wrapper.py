"""The punica wrapper and the paged layer classes on vLLM's real LoRA layers, without an engine:
every slice of qkv / gate_up / down against a float64 oracle built from the matrices given to
set_lora; NaN in every page past a slot's rank and in the empty slot; rows without an adapter
next to an occupied last slot; unsorted tokens; steps that shrink, repeat or pad x."""
from __future__ import annotations

import tempfile

import pytest
import torch

from vllm_assets import NEEDS_VLLM

pytest.importorskip("vllm", reason=NEEDS_VLLM)

from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.config.lora import LoRAConfig  # noqa: E402
from vllm.distributed import init_distributed_environment, initialize_model_parallel  # noqa: E402
from vllm.lora.layers import (  # noqa: E402
    LoRAMapping,
    MergedColumnParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    RowParallelLinearWithLoRA,
)
from vllm.model_executor.layers.linear import (  # noqa: E402
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)

from minlora.integrations.vllm.layers import PagedStack, paged_class  # noqa: E402
from minlora.integrations.vllm.wrapper import MinloraPunicaWrapper  # noqa: E402

SLOTS, MAX_RANK, HIDDEN, INTER = 5, 16, 128, 96
LORA_IDS = [10, 11, None, 13, 14]  # slot -> vLLM's LoRA int id; slot 2 stays empty
# Per slot, the true rank of each slice (None: the adapter does not target that sub-module).
SLOT_RANKS = {0: [1, None, 1], 1: [16, 16, 16], 3: [3, 7, None], 4: [16, 5, 2]}

LAYERS = {
    # name: (vLLM layer class, base layer factory, packed sub-modules)
    "qkv_proj": (MergedQKVParallelLinearWithLoRA,
                 lambda dt: QKVParallelLinear(HIDDEN, 32, 4, 2, bias=False, params_dtype=dt), ["q", "k", "v"]),
    "gate_up_proj": (MergedColumnParallelLinearWithLoRA,
                     lambda dt: MergedColumnParallelLinear(HIDDEN, [INTER, INTER], bias=False, params_dtype=dt),
                     ["gate", "up"]),
    "down_proj": (RowParallelLinearWithLoRA,
                  lambda dt: RowParallelLinear(INTER, HIDDEN, bias=False, params_dtype=dt), []),
}
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(scope="module", autouse=True)
def vllm_context():
    """A one-process vLLM 'distributed' world (tensor parallel size 1), as vLLM's layers need."""
    with tempfile.TemporaryDirectory() as tmp, set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, distributed_init_method=f"file://{tmp}/init",
                                     local_rank=0, backend="gloo")
        initialize_model_parallel(1, 1)
        yield


def lora_config(dtype: torch.dtype) -> LoRAConfig:
    return LoRAConfig(max_lora_rank=MAX_RANK, max_loras=SLOTS, lora_dtype=dtype)


class Layer:
    """A paged vLLM LoRA layer with adapters in its slots, and the float64 matrices it was given."""

    def __init__(self, name: str, dtype: torch.dtype, seed: int) -> None:
        vllm_cls, make_base, packed = LAYERS[name]
        torch.manual_seed(seed)
        base = make_base(dtype)
        with torch.no_grad():
            base.weight.normal_(0, 0.05)
        self.base_weight = base.weight.detach().double().clone()
        base.quant_method.process_weights_after_loading(base)  # what vLLM's loader does (CPU GEMM set-up)
        cls = paged_class(vllm_cls)
        assert cls.can_replace_layer(source_layer=base, lora_config=lora_config(dtype), packed_modules_list=packed,
                                     model_config=None)
        self.layer = cls(base)
        self.layer.create_lora_weights(SLOTS, lora_config(dtype), None)
        self.in_features = self.layer.input_size
        self.out_slices = list(self.layer.output_slices)
        self.weights: dict[int, list] = {}  # slot -> [(A [r, in], B [out, r]) or None per slice]
        for slot, ranks in SLOT_RANKS.items():
            ranks = ranks[: len(self.out_slices)]
            a = [None if r is None else torch.randn(r, self.in_features) / self.in_features ** 0.5 for r in ranks]
            b = [None if r is None else torch.randn(out, r) for r, out in zip(ranks, self.out_slices)]
            if len(self.out_slices) == 1:  # single-slice layers take tensors, not lists
                self.layer.set_lora(slot, a[0].to(dtype), b[0].to(dtype))
            else:
                self.layer.set_lora(slot, [t if t is None else t.to(dtype) for t in a],
                                    [t if t is None else t.to(dtype) for t in b])
            self.weights[slot] = [None if r is None else (ai.to(dtype).double(), bi.to(dtype).double())
                                  for r, ai, bi in zip(ranks, a, b)]
        self.poison()

    def poison(self) -> None:
        """NaN in every page the op must not read: past each slot's rank, and the whole empty slot."""
        pages = self.layer.minlora_pages
        ranks = pages.slot_ranks()
        with torch.no_grad():
            for i in range(pages.num_slices):
                for slot in range(SLOTS):
                    r = ranks[i][slot]
                    rows = slice(slot * MAX_RANK + r, (slot + 1) * MAX_RANK)
                    pages.a_pools[i][rows] = float("nan")
                    pages.b_pools[i][rows] = float("nan")

    def expected(self, x: torch.Tensor, token_slot: list[int]) -> torch.Tensor:
        """float64 [T, sum(out)]: base output + B_i (A_i x_t) per slice, from set_lora's matrices."""
        y = torch.nn.functional.linear(x.double(), self.base_weight)
        for t, slot in enumerate(token_slot):
            if slot < 0:
                continue
            offset = 0
            for i, out in enumerate(self.out_slices):
                w = self.weights[slot][i]
                if w is not None:
                    y[t, offset:offset + out] += w[1] @ (w[0] @ x[t].double())
                offset += out
        return y


def mapping_for(token_slot: list[int]) -> LoRAMapping:
    ids = tuple(0 if s < 0 else LORA_IDS[s] for s in token_slot)
    return LoRAMapping(ids, ids, is_prefill=True)


def wrapper(dtype: torch.dtype, capacity: int = 64) -> MinloraPunicaWrapper:
    return MinloraPunicaWrapper(capacity, 16, "cpu", lora_config=lora_config(dtype))


def forward(layer, x: torch.Tensor) -> torch.Tensor:
    out = layer(x)
    return out[0] if isinstance(out, tuple) else out


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def random_slots(n: int, generator: torch.Generator) -> list[int]:
    choices = [-1, 0, 1, 3, 4]  # slot 2 is empty; 4 is the last slot
    return [choices[int(i)] for i in torch.randint(len(choices), (n,), generator=generator)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_forward_matches_float64_over_steps(name, dtype):
    layer = Layer(name, dtype, seed=3)
    punica = wrapper(dtype)
    layer.layer.set_mapping(punica)
    gen = torch.Generator().manual_seed(7)
    # Steps of 23 and then 9 tokens: the second leaves the first's tail to be reset.
    for step, n in enumerate([23, 9]):
        slots = random_slots(n, gen)
        slots[0], slots[-1] = -1, 4  # a row without an adapter next to an occupied last slot
        punica.update_metadata(mapping_for(slots), LORA_IDS, SLOTS + 1, 1000)
        x = torch.randn(n, layer.in_features, generator=gen).to(dtype)
        got = forward(layer.layer, x)
        assert torch.isfinite(got).all(), f"step {step}: a page past a slot's rank was read"
        assert rel_error(got, layer.expected(x, slots)) <= TOL[dtype]
        for t in [t for t, s in enumerate(slots) if s < 0]:
            base_row = torch.nn.functional.linear(x[t:t + 1].double(), layer.base_weight)
            assert rel_error(got[t:t + 1], base_row) <= TOL[dtype]
    # vLLM skips update_metadata when a step repeats the mapping: the plan must still hold.
    x = torch.randn(9, layer.in_features, generator=gen).to(dtype)
    assert rel_error(forward(layer.layer, x), layer.expected(x, slots)) <= TOL[dtype]
    # Padded x (more rows than mapped tokens, as CUDA-graph batches are): padded rows get no delta.
    x = torch.randn(12, layer.in_features, generator=gen).to(dtype)
    assert rel_error(forward(layer.layer, x), layer.expected(x, slots + [-1, -1, -1])) <= TOL[dtype]


def test_true_ranks_recorded_per_slot_and_slice():
    layer = Layer("qkv_proj", torch.float32, seed=1)
    pages = layer.layer.minlora_pages
    want = [[0] * SLOTS for _ in range(3)]
    for slot, ranks in SLOT_RANKS.items():
        for i, r in enumerate(ranks):
            want[i][slot] = r or 0
    assert pages.slot_ranks() == want
    assert pages.ranks.tolist() == want
    layer.layer.reset_lora(1)
    assert [row[1] for row in pages.slot_ranks()] == [0, 0, 0]
    assert isinstance(layer.layer.lora_a_stacked, PagedStack) and isinstance(layer.layer.lora_b_stacked, PagedStack)
    # vLLM sees B in its own layout [L, 1, out, R]; the storage is rows of B^T.
    b = layer.layer.lora_b_stacked[0]
    assert b.shape == (SLOTS, 1, 128, MAX_RANK) and b.transpose(2, 3).is_contiguous()
    assert pages.b_pools[0].data_ptr() == b.data_ptr() and pages.a_pools[0].data_ptr() == \
        layer.layer.lora_a_stacked[0].data_ptr()


def test_packed_adapter_shorter_than_the_slices():
    """An adapter with one weight for a whole packed group is expanded as vLLM's set_lora does."""
    layer = Layer("qkv_proj", torch.float32, seed=2)
    a = torch.randn(6, HIDDEN)
    b = torch.randn(sum(layer.out_slices), 6)
    layer.layer.set_lora(3, [a], [b])
    assert [row[3] for row in layer.layer.minlora_pages.slot_ranks()] == [6, 6, 6]


def test_add_inputs_false_writes_the_delta_alone():
    layer = Layer("gate_up_proj", torch.float32, seed=4)
    punica = wrapper(torch.float32)
    slots = [1, -1, 4, 0, 3, -1]
    punica.update_metadata(mapping_for(slots), LORA_IDS, SLOTS + 1, 1000)
    x = torch.randn(len(slots), HIDDEN)
    y = torch.full((len(slots), sum(layer.out_slices)), 7.0)
    punica.add_lora_linear(y, x, layer.layer.lora_a_stacked, layer.layer.lora_b_stacked, 1.0, layer.out_slices,
                           add_inputs=False)
    base = torch.nn.functional.linear(x.double(), layer.base_weight)
    assert rel_error(y, layer.expected(x, slots) - base) <= 1e-5


def test_lora_dtype_other_than_the_activations():
    layer = Layer("down_proj", torch.float32, seed=5)  # fp32 LoRA weights
    punica = wrapper(torch.float32)
    slots = [4, -1, 1, 3]
    punica.update_metadata(mapping_for(slots), LORA_IDS, SLOTS + 1, 1000)
    x = torch.randn(len(slots), INTER).to(torch.bfloat16)
    y = torch.zeros(len(slots), HIDDEN, dtype=torch.bfloat16)
    punica.add_lora_linear(y, x, layer.layer.lora_a_stacked, layer.layer.lora_b_stacked, 1.0, layer.out_slices)
    base = torch.nn.functional.linear(x.double(), layer.base_weight)
    assert rel_error(y, layer.expected(x.float(), slots) - base) <= 1e-2


def test_shrink_then_expand_equals_the_layer_delta():
    """add_shrink / add_expand (vLLM's tensor-parallel path) compose to the same delta."""
    layer = Layer("qkv_proj", torch.float32, seed=6)
    punica = wrapper(torch.float32)
    slots = [0, 4, -1, 3, 1, 1, -1, 4]
    punica.update_metadata(mapping_for(slots), LORA_IDS, SLOTS + 1, 1000)
    x = torch.randn(len(slots), HIDDEN)
    h = torch.zeros(3, len(slots), MAX_RANK)  # vLLM zeroes the buffer; shrink overwrites it
    punica.add_shrink(h, x, layer.layer.lora_a_stacked, 1.0)
    for t, s in enumerate(slots):
        for i in range(3):
            w = layer.weights[s][i] if s >= 0 else None
            want = torch.zeros(MAX_RANK, dtype=torch.float64)
            if w is not None:
                want[: w[0].shape[0]] = w[0] @ x[t].double()
            torch.testing.assert_close(h[i, t].double(), want, rtol=1e-5, atol=1e-5)
    y = torch.zeros(len(slots), sum(layer.out_slices))
    punica.add_expand(y, h, layer.layer.lora_b_stacked, layer.out_slices, add_inputs=True)
    base = torch.nn.functional.linear(x.double(), layer.base_weight)
    assert rel_error(y, layer.expected(x, slots) - base) <= 1e-5


def test_embedding_and_logits_touch_only_rows_with_an_adapter():
    """vLLM's own embedding / lm_head LoRA math, on the rows with an adapter only."""
    punica = wrapper(torch.float32)
    slots = [-1, 4, 0, -1, 4, 1]
    punica.update_metadata(mapping_for(slots), LORA_IDS, SLOTS + 1, 1000)
    gen = torch.Generator().manual_seed(9)
    dim, vocab, hidden = 48, 40, 32
    b_emb = torch.randn(SLOTS, 1, dim, MAX_RANK, generator=gen)
    x_emb = torch.randn(len(slots), MAX_RANK, generator=gen)
    y0 = torch.randn(len(slots), dim, generator=gen)
    y = y0.clone()
    punica.add_lora_embedding(y, x_emb, b_emb, add_inputs=True)
    a_log = torch.randn(SLOTS, 1, MAX_RANK, hidden, generator=gen)
    b_log = torch.randn(SLOTS, 1, vocab, MAX_RANK, generator=gen)
    x_log = torch.randn(len(slots), hidden, generator=gen)
    logits0 = torch.randn(len(slots), vocab + 3, generator=gen)  # vLLM pads the logits past the LoRA vocab
    logits = logits0.clone()
    punica.add_lora_logits(logits, x_log, a_log, b_log, 0.5)
    for t, s in enumerate(slots):
        if s < 0:
            assert torch.equal(y[t], y0[t]) and torch.equal(logits[t], logits0[t])
            continue
        torch.testing.assert_close(y[t].double(), y0[t].double() + b_emb[s, 0].double() @ x_emb[t].double(),
                                   rtol=1e-5, atol=1e-4)
        want = logits0[t].double().clone()
        want[:vocab] += b_log[s, 0].double() @ (0.5 * a_log[s, 0].double() @ x_log[t].double())
        torch.testing.assert_close(logits[t].double(), want, rtol=1e-5, atol=1e-4)


def test_embedding_and_logits_skip_slots_without_weights():
    """With the tracked layers' slot flags: rows whose slot holds no weights for the layer are left alone."""
    from minlora.integrations.vllm.vllm_path import SLOT_FLAGS

    punica = wrapper(torch.float32)
    slots = [0, 4, -1, 1]
    punica.update_metadata(mapping_for(slots), LORA_IDS, SLOTS + 1, 1000)
    b = torch.randn(SLOTS, 1, 8, MAX_RANK)
    setattr(b, SLOT_FLAGS, torch.tensor([False, True, False, False, True]))
    x = torch.randn(len(slots), MAX_RANK)
    y = torch.zeros(len(slots), 8)
    punica.add_lora_embedding(y, x, b)
    assert y[0].abs().sum() == 0 and y[2].abs().sum() == 0
    torch.testing.assert_close(y[1], b[4, 0] @ x[1])
    torch.testing.assert_close(y[3], b[1, 0] @ x[3])
    setattr(b, SLOT_FLAGS, torch.zeros(SLOTS, dtype=torch.bool))  # a step without any: nothing runs
    y = torch.zeros(len(slots), 8)
    punica.add_lora_embedding(y, x, b)
    assert y.abs().sum() == 0


def test_empty_step():
    layer = Layer("down_proj", torch.float32, seed=8)
    punica = wrapper(torch.float32)
    punica.update_metadata(LoRAMapping((), (), is_prefill=True), LORA_IDS, SLOTS + 1, 1000)
    y = torch.zeros(0, HIDDEN)
    punica.add_lora_linear(y, torch.zeros(0, INTER), layer.layer.lora_a_stacked, layer.layer.lora_b_stacked, 1.0,
                           layer.out_slices)
    punica.add_lora_embedding(torch.zeros(0, 8), torch.zeros(0, MAX_RANK), torch.zeros(SLOTS, 1, 8, MAX_RANK))


def test_bad_input_raises_clear_errors():
    layer = Layer("down_proj", torch.float32, seed=10)
    punica = wrapper(torch.float32, capacity=16)
    a, b = layer.layer.lora_a_stacked, layer.layer.lora_b_stacked
    punica.update_metadata(mapping_for([0, 1, 4, -1]), LORA_IDS, SLOTS + 1, 1000)
    with pytest.raises(ValueError, match="x has 3 rows but the step mapped 4 tokens"):
        punica.add_lora_linear(torch.zeros(3, HIDDEN), torch.zeros(3, INTER), a, b, 1.0, [HIDDEN])
    with pytest.raises(TypeError, match="not allocated by minlora's layer classes"):
        punica.add_lora_linear(torch.zeros(4, HIDDEN), torch.zeros(4, INTER), tuple(a), tuple(b), 1.0, [HIDDEN])
    with pytest.raises(ValueError, match="expected \\[4, 128\\]"):
        punica.add_lora_linear(torch.zeros(4, 64), torch.zeros(4, INTER), a, b, 1.0, [HIDDEN])
    with pytest.raises(ValueError, match="LoRA id 12, which holds no slot"):
        punica.update_metadata(LoRAMapping((10, 12), (10,), is_prefill=True), LORA_IDS, SLOTS + 1, 1000)
    with pytest.raises(ValueError, match="more than the capacity of 16"):
        punica.update_metadata(mapping_for([0] * 17), LORA_IDS, SLOTS + 1, 1000)
    with pytest.raises(ValueError, match="slot layout has 4 slots, expected 5"):
        punica.update_metadata(mapping_for([0]), LORA_IDS[:4], SLOTS, 1000)
    with pytest.raises(ValueError, match="rank 17 of slice 0 is outside 0..max_lora_rank"):
        layer.layer.minlora_pages.set_ranks(0, [17])
    with pytest.raises(NotImplementedError, match="fully_sharded_loras"):
        MinloraPunicaWrapper(16, 4, "cpu", lora_config=LoRAConfig(max_lora_rank=8, max_loras=2,
                                                                  fully_sharded_loras=True))

"""The LoRA ops on CPU (and, marked `cuda`, on a GPU) against the float64 reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minlora
from helpers.cases import (
    TOLERANCE, check_autograd, check_no_rank_columns_and_no_in_features, run_forward,
    make_case, mixed_ranks, opcheck_cases, rel_error,
)
from minlora.reference import build_plan_ref, lora_backward_accumulate_ref, lora_backward_ref, lora_forward_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Long and short segments in one batch, so both CPU paths (matrix products, token loop) run.
SLOT_WEIGHTS = [20, 1, 10, 1, 1, 5, 1, 10, 0.5, 1, 3, 1]
VARIANTS = ["functional", "add", "planned", "planned_add"]


def check_forward(case, variant: str) -> None:
    want = lora_forward_ref(*case.args())
    if variant.endswith("add"):
        y0 = torch.randn(want.shape, dtype=torch.float64).to(case.x.dtype).to(case.x.device)
        got = run_forward(case, variant, y0)
        # Rows without an adapter are untouched, bit for bit.
        none = (case.token_slot == -1) | (case.ranks.to(torch.long)[case.token_slot.long().clamp(min=0)] == 0)
        assert torch.equal(got[none], y0[none])
        got = got.double() - y0.double()
        tol = 2 * TOLERANCE[case.x.dtype] + (1e-2 if case.x.dtype == torch.bfloat16 else 0)
    else:
        got = run_forward(case, variant)
        tol = TOLERANCE[case.x.dtype]
        assert torch.all(got[case.token_slot == -1] == 0)
    assert got.shape == want.shape
    assert torch.isfinite(got).all(), "a NaN page (unused) was read"
    assert rel_error(got, want) <= tol


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_forward_mixed_ranks(dtype, variant):
    case = make_case(300, 96, 72, mixed_ranks(), dtype, slot_weights=SLOT_WEIGHTS)
    check_forward(case, variant)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """torch's thread count: with one thread the CPU op runs long segments as matrix products in
    the calling thread; with more, small calls run the token path in the calling thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_forward_every_cpu_path(dtype, variant, threads):
    case = make_case(300, 96, 72, mixed_ranks(), dtype, slot_weights=SLOT_WEIGHTS)
    check_forward(case, variant)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_large_call_runs_in_parallel_region(dtype, variant):
    """Enough work for the parallel region (matrix products and token blocks on its workers)."""
    weights = [30, 1, 20, 1, 10, 0.2, 8]
    case = make_case(2500, 512, 384, [32, 1, 64, 0, 16, 3, 48], dtype, slot_weights=weights)
    check_forward(case, variant)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_every_cpu_path(dtype, threads):
    case = make_case(200, 48, 40, [8, 1, 32, 0, 4, 16, 2], dtype, slot_weights=[10, 1, 5, 1, 1, 8, 0.3])
    case.a_pages[5, :2] = case.a_pages[0, :2]  # a page shared by two slots (one short, one long segment)
    case.a_pool[torch.isnan(case.a_pool)] = 0.5
    grad_y = torch.randn(200, 40, dtype=torch.float64).to(dtype)
    got = minlora.ops.lora_backward(grad_y, *case.args())
    want = lora_backward_ref(grad_y, *case.args())
    for name, g, w in zip(("grad_x", "grad_a_pool", "grad_b_pool"), got, want):
        assert torch.isfinite(g).all(), name
        assert rel_error(g, w) <= 3 * TOLERANCE[dtype], name


def test_backward_large_call_runs_in_parallel_region():
    weights = [30, 1, 20, 1, 10, 0.2]
    case = make_case(2000, 600, 520, [32, 1, 64, 0, 16, 3], torch.float32, slot_weights=weights)
    grad_y = torch.randn(2000, 520)
    for mask in ((True, True, True), (False, True, False), (True, False, True)):
        got = minlora.ops.lora_backward(grad_y, *case.args(), output_mask=mask)
        want = lora_backward_ref(grad_y, *case.args())
        for k, (g, w) in enumerate(zip(got, want)):
            if mask[k]:
                assert rel_error(g, w) <= 3e-5, k
            else:
                assert g is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_decode_one_token_per_adapter(variant):
    ranks = [int(r) for r in torch.randint(1, 33, (40,))]
    case = make_case(40, 64, 48, ranks, torch.float32)
    case.token_slot = torch.randperm(40).to(torch.int32)  # each adapter once, unsorted
    check_forward(case, variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_repeated_slot_same_pages(variant):
    """Two slots may point at the same pages (one adapter resident once, used twice)."""
    case = make_case(50, 40, 30, [4, 4, 2], torch.float32, slot_weights=[1, 5, 1])
    case.a_pages[1] = case.a_pages[0]
    case.b_pages[1] = case.b_pages[0]
    check_forward(case, variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_empty_batch_and_no_slots(variant):
    for case in (make_case(0, 32, 16, [4, 2]), make_case(9, 32, 16, [])):
        got = run_forward(case, variant, torch.ones(case.x.shape[0], 16))
        want = lora_forward_ref(*case.args())
        if variant.endswith("add"):
            want = want + 1
        assert got.shape == (case.x.shape[0], 16)
        assert torch.equal(got.double(), want)


def test_no_rank_columns_and_no_in_features():
    check_no_rank_columns_and_no_in_features("cpu")


def test_all_tokens_without_adapter_give_zero():
    case = make_case(20, 32, 16, [4, 2])
    case.token_slot.fill_(-1)
    assert torch.equal(minlora.lora(*case.args()), torch.zeros(20, 16))


def test_x_need_not_be_contiguous():
    case = make_case(30, 32, 24, [3, 5], torch.float32)
    x_t = case.x.t().contiguous().t()  # same values, column-major
    got = minlora.lora(x_t, *case.args()[1:])
    assert rel_error(got, lora_forward_ref(*case.args())) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_backward_matches_reference(dtype):
    case = make_case(200, 48, 40, [8, 1, 32, 0, 4, 16, 2], dtype, slot_weights=[10, 1, 5, 1, 1, 8, 0.3])
    grad_y = torch.randn(200, 40, dtype=torch.float64).to(dtype)
    got = minlora.ops.lora_backward(grad_y, *case.args())
    want = lora_backward_ref(grad_y, *case.args())
    tol = TOLERANCE[dtype] * (3 if dtype != torch.float64 else 1)
    for name, g, w in zip(("grad_x", "grad_a_pool", "grad_b_pool"), got, want):
        assert g.shape == w.shape and g.dtype == dtype, name
        assert torch.isfinite(g).all(), f"{name}: a NaN page (unused) was read"
        assert rel_error(g, w) <= tol, name
    # Pages the batch does not use get exactly zero gradient.
    assert torch.all(got[1][~case.used_a_pages] == 0)
    assert torch.all(got[2][~case.used_b_pages] == 0)


@pytest.mark.parametrize("weights", [[1, 1, 1], [20, 20, 1]], ids=["short-segments", "long-segments"])
def test_backward_pages_shared_by_slots_and_ranks(weights):
    """Gradients of a page used by two slots, or twice within one slot, accumulate."""
    case = make_case(60, 40, 30, [4, 4, 3], torch.float32, slot_weights=weights)
    case.a_pages[1, :4] = case.a_pages[0, :4]
    case.b_pages[1, :4] = case.b_pages[0, :4]
    case.a_pages[2, 1] = case.a_pages[2, 0]
    case.b_pages[2, 2] = case.b_pages[0, 1]
    case.a_pool[torch.isnan(case.a_pool)] = 0.5  # pages freed by the sharing stay finite
    case.b_pool[torch.isnan(case.b_pool)] = 0.5
    grad_y = torch.randn(60, 30)
    for got, want in zip(minlora.ops.lora_backward(grad_y, *case.args()), lora_backward_ref(grad_y, *case.args())):
        assert rel_error(got, want) <= 3e-5


def test_backward_with_plan_and_mask():
    case = make_case(60, 32, 24, [4, 8, 2], torch.float32, slot_weights=[5, 1, 2])
    grad_y = torch.randn(60, 24)
    plan = minlora.build_plan(case.token_slot, 3)
    gx, ga, gb = minlora.ops.lora_backward(grad_y, *case.args(), plan=plan, output_mask=(False, True, False))
    assert gx is None and gb is None
    want = lora_backward_ref(grad_y, *case.args())
    assert rel_error(ga, want[1]) <= 3e-5


@pytest.mark.parametrize("planned", [False, True])
def test_autograd_matches_reference(planned):
    case = make_case(80, 32, 24, [4, 8, 1, 0], torch.float32, slot_weights=[5, 1, 2, 1])
    check_autograd(case, planned, 3e-5)


def test_gradcheck_float64():
    case = make_case(14, 6, 5, [2, 1, 3, 0], torch.float64, nan_unused=False, slot_weights=[3, 1, 2, 1])
    x, a_pool, b_pool = (t.clone().requires_grad_() for t in case.args()[:3])
    rest = case.args()[3:]
    assert torch.autograd.gradcheck(lambda x, a, b: minlora.lora(x, a, b, *rest), (x, a_pool, b_pool))
    plan = minlora.build_plan(case.token_slot, 4)
    assert torch.autograd.gradcheck(lambda x, a, b: minlora.lora(x, a, b, *rest, plan=plan), (x, a_pool, b_pool))


def test_build_plan_matches_reference():
    for t, s in ((0, 3), (50, 0), (300, 7), (1000, 64)):
        token_slot = torch.randint(-1, max(s, 1), (t,), dtype=torch.int32) if s else torch.full((t,), -1, dtype=torch.int32)
        plan = minlora.build_plan(token_slot, s)
        order, seg = build_plan_ref(token_slot, s)
        assert plan.order.dtype == torch.int32 and plan.seg_offsets.dtype == torch.int32
        assert torch.equal(plan.order, order) and torch.equal(plan.seg_offsets, seg)


@pytest.mark.parametrize("index", range(len(opcheck_cases())))
def test_opcheck(index):
    op, args = opcheck_cases()[index]
    torch.library.opcheck(op, args)


# ---------------------------------------------------------------- the accumulating backward


def check_accumulate(case, *, planned: bool, grad_x: bool, tol: float) -> None:
    """lora_backward_accumulate_ adds exactly the reference's dA / dB rows into float32
    accumulators; pages the batch does not use are neither read nor written (NaN there stays)."""
    T, out = case.x.shape[0], case.b_pool.shape[1]
    grad_y = torch.randn(T, out, dtype=torch.float64).to(case.x.dtype).to(case.x.device)
    acc_a = torch.randn(case.a_pool.shape, device=case.x.device)
    acc_b = torch.randn(case.b_pool.shape, device=case.x.device)
    acc_a[~case.used_a_pages.to(acc_a.device)] = float("nan")
    acc_b[~case.used_b_pages.to(acc_b.device)] = float("nan")
    before = (acc_a.clone(), acc_b.clone())
    plan = minlora.build_plan(case.token_slot, case.ranks.shape[0]) if planned else None
    gx = minlora.ops.lora_backward_accumulate_(acc_a, acc_b, grad_y, *case.args(), plan=plan, grad_x=grad_x)
    want_x, want_a, want_b = lora_backward_accumulate_ref(*before, grad_y, *case.args())
    for name, got, want, used in (("grad_a_acc", acc_a, want_a, case.used_a_pages),
                                  ("grad_b_acc", acc_b, want_b, case.used_b_pages)):
        got, used = got.cpu(), used.cpu()
        assert got.dtype == torch.float32, name
        assert torch.isnan(got[~used]).all(), f"{name}: a page the batch does not use was touched"
        # The accumulated change against the reference's change (the starting values cancel).
        assert rel_error(got[used].double() - before[0 if name == "grad_a_acc" else 1].cpu()[used].double(),
                         want[used] - before[0 if name == "grad_a_acc" else 1].cpu()[used].double()) <= tol, name
    if grad_x:
        assert gx.shape == case.x.shape and gx.dtype == case.x.dtype
        assert rel_error(gx, want_x) <= tol
    else:
        assert gx is None


@pytest.mark.parametrize("planned", [False, True])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_backward_accumulate_matches_reference(dtype, planned):
    case = make_case(300, 96, 72, mixed_ranks(), dtype, slot_weights=SLOT_WEIGHTS)
    check_accumulate(case, planned=planned, grad_x=True, tol=3 * TOLERANCE[dtype] if dtype != torch.float64 else 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_accumulate_every_cpu_path(dtype, threads):
    case = make_case(200, 48, 40, [8, 1, 32, 0, 4, 16, 2], dtype, slot_weights=[10, 1, 5, 1, 1, 8, 0.3])
    check_accumulate(case, planned=True, grad_x=False, tol=3 * TOLERANCE[dtype])


@pytest.mark.parametrize("weights", [[1, 1, 1], [20, 20, 1]], ids=["short-segments", "long-segments"])
def test_backward_accumulate_shared_pages(weights):
    """A page used by two slots, or twice by one, gets every contribution added."""
    case = make_case(60, 40, 32, [4, 4, 3], torch.float32, slot_weights=weights)
    case.a_pages[1, :4] = case.a_pages[0, :4]
    case.b_pages[1, :4] = case.b_pages[0, :4]
    case.a_pages[2, 1] = case.a_pages[2, 0]
    case.b_pages[2, 2] = case.b_pages[0, 1]
    case.a_pool[torch.isnan(case.a_pool)] = 0.5
    case.b_pool[torch.isnan(case.b_pool)] = 0.5
    check_accumulate(case, planned=False, grad_x=True, tol=3e-5)


def test_backward_accumulate_adds_across_calls():
    """Two calls add twice: the accumulators are the caller's, never reset."""
    case = make_case(50, 32, 24, [4, 8, 2], torch.float32, slot_weights=[5, 1, 2], nan_unused=False)
    grad_y = torch.randn(50, 24)
    acc_a, acc_b = torch.zeros(case.a_pool.shape), torch.zeros(case.b_pool.shape)
    for _ in range(2):
        minlora.ops.lora_backward_accumulate_(acc_a, acc_b, grad_y, *case.args(), grad_x=False)
    _, ga, gb = lora_backward_ref(grad_y, *case.args())
    assert rel_error(acc_a, 2 * ga) <= 3e-5 and rel_error(acc_b, 2 * gb) <= 3e-5


def test_backward_accumulate_empty_batch_and_no_slots():
    for case in (make_case(0, 32, 16, [4, 2]), make_case(9, 32, 16, [])):
        acc_a, acc_b = torch.randn(case.a_pool.shape), torch.randn(case.b_pool.shape)
        before = (acc_a.clone(), acc_b.clone())
        gx = minlora.ops.lora_backward_accumulate_(acc_a, acc_b, torch.randn(case.x.shape[0], 16), *case.args())
        assert torch.equal(gx, torch.zeros_like(case.x))
        assert torch.equal(acc_a, before[0]) and torch.equal(acc_b, before[1])


def test_backward_accumulate_bad_accumulators():
    case = make_case(12, 16, 8, [3, 2, 0], torch.float32, slot_weights=[3, 2, 1])
    g = torch.randn(12, 8)
    ok_a, ok_b = torch.zeros(case.a_pool.shape), torch.zeros(case.b_pool.shape)
    bad = {
        "grad_a_acc must be float32": (ok_a.double(), ok_b),
        "grad_b_acc must be float32": (ok_a, ok_b.half()),
        "grad_a_acc must have the shape of its pool": (ok_a[:-1], ok_b),
        "grad_b_acc must be contiguous": (ok_a, ok_b.t().contiguous().t()),
        "grad_a_acc must be on cpu": (ok_a.to("meta"), ok_b),
    }
    for message, (acc_a, acc_b) in bad.items():
        with pytest.raises((RuntimeError, ValueError), match=message):
            minlora.ops.lora_backward_accumulate_(acc_a, acc_b, g, *case.args())


def test_plan_positions_is_the_inverse_of_order():
    token_slot = torch.randint(-1, 7, (500,), dtype=torch.int32)
    plan = minlora.build_plan(token_slot, 7)
    assert torch.equal(plan.positions[plan.order.long()], torch.arange(500, dtype=torch.int32))
    assert plan.max_segment == int(plan.segment_lengths().max())
    with pytest.raises(ValueError, match="order"):
        minlora.plan.plan_positions(torch.tensor([0, 0, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="order"):
        minlora.plan.plan_positions(torch.tensor([0, 5, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="max_segment"):
        minlora.build_plan(token_slot, 7, max_segment=-1)


def test_plan_with_wrong_positions_is_refused():
    case = make_case(40, 16, 8, [3, 2, 4], torch.float32, slot_weights=[3, 2, 1])
    plan = minlora.build_plan(case.token_slot, 3)
    wrong = plan.positions.roll(1)
    for fn in (lambda p: minlora.lora(*case.args(), plan=p),
               lambda p: minlora.ops.lora_backward(torch.randn(40, 8), *case.args(), plan=p)):
        with pytest.raises(ValueError, match="positions"):
            fn(minlora.BatchPlan(plan.order, plan.seg_offsets, wrong))
    with pytest.raises(ValueError, match="positions belong to a plan"):
        torch.ops.minlora.lora_forward(*case.args(), None, None, plan.positions)
    with pytest.raises(ValueError, match="max_segment must be >= 0"):
        torch.ops.minlora.lora_forward(*case.args(), plan.order, plan.seg_offsets, None, -2)


def test_max_segment_is_a_hint_not_a_contract():
    """A wrong (too small) longest-segment hint changes no result on the CPU."""
    case = make_case(120, 32, 24, [4, 8, 2], torch.float32, slot_weights=[5, 1, 2])
    order, seg = torch.ops.minlora.build_plan(case.token_slot, 3)
    plan = minlora.BatchPlan(order, seg, minlora.plan.plan_positions(order), max_segment=1)
    assert rel_error(minlora.lora(*case.args(), plan=plan), lora_forward_ref(*case.args())) <= TOLERANCE[torch.float32]


class _LoraLayer(torch.nn.Module):
    def __init__(self, case):
        super().__init__()
        self.base = torch.nn.Linear(case.x.shape[1], case.b_pool.shape[1])
        self.pools = case.args()[1:3]
        self.tables = case.args()[3:7]

    def forward(self, x, token_slot, plan_order, plan_seg):
        plan = minlora.BatchPlan(plan_order, plan_seg)
        y = self.base(x)
        minlora.ops.lora_add_(y, x, *self.pools, *self.tables, token_slot, plan=plan)
        return y + minlora.lora(x, *self.pools, *self.tables, token_slot)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    case = make_case(40, 32, 24, [4, 8, 2], torch.float32, slot_weights=[5, 1, 2])
    layer = _LoraLayer(case)
    compiled = torch.compile(layer, fullgraph=True)
    for _ in range(2):  # a new assignment of the same shape
        token_slot = torch.randint(-1, 3, (40,), dtype=torch.int32)
        plan = minlora.build_plan(token_slot, 3)
        with torch.no_grad():
            want = layer(case.x, token_slot, plan.order, plan.seg_offsets)
            got = compiled(case.x, token_slot, plan.order, plan.seg_offsets)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    num_tokens=st.integers(0, 40),
    in_features=st.integers(1, 48),
    out_features=st.integers(1, 48),
    ranks=st.lists(st.integers(0, 12), min_size=0, max_size=6),
    extra=st.integers(0, 3),
)
def test_hypothesis_shapes(num_tokens, in_features, out_features, ranks, extra):
    case = make_case(num_tokens, in_features, out_features, ranks, torch.float32, extra_rank_columns=extra)
    want = lora_forward_ref(*case.args())
    got = minlora.lora(*case.args())
    assert got.shape == want.shape
    assert rel_error(got, want) <= TOLERANCE[torch.float32]
    grad_y = torch.randn(num_tokens, out_features)
    for g, w in zip(minlora.ops.lora_backward(grad_y, *case.args()), lora_backward_ref(grad_y, *case.args())):
        assert rel_error(g, w) <= 3e-5


# ---------------------------------------------------------------- CUDA (skipped without a GPU)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_forward_mixed_ranks(dtype, variant):
    case = make_case(300, 96, 72, mixed_ranks(), dtype, slot_weights=SLOT_WEIGHTS).to("cuda")
    check_forward(case, variant)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_backward_matches_reference(dtype):
    case = make_case(200, 48, 40, [8, 1, 32, 0, 4, 16, 2], dtype, slot_weights=[10, 1, 5, 1, 1, 8, 0.3]).to("cuda")
    grad_y = torch.randn(200, 40, device="cuda").to(dtype)
    got = minlora.ops.lora_backward(grad_y, *case.args())
    want = lora_backward_ref(grad_y, *case.args())
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        assert rel_error(g, w) <= 3 * TOLERANCE[dtype]


@pytest.mark.cuda
def test_cuda_empty_and_plan():
    case = make_case(0, 32, 16, [4, 2]).to("cuda")
    assert minlora.lora(*case.args()).shape == (0, 16)
    token_slot = torch.randint(-1, 5, (500,), dtype=torch.int32, device="cuda")
    plan = minlora.build_plan(token_slot, 5)
    order, seg = build_plan_ref(token_slot, 5)
    assert torch.equal(plan.order.cpu(), order) and torch.equal(plan.seg_offsets.cpu(), seg)


@pytest.mark.cuda
def test_cuda_graph_replay_with_new_assignment():
    case = make_case(64, 64, 48, [4, 16, 1, 8], torch.float16, nan_unused=False).to("cuda")
    token_slot = case.token_slot.clone()
    plan = minlora.build_plan(token_slot, 4)
    y = torch.zeros(64, 48, dtype=torch.float16, device="cuda")
    args = list(case.args())
    args[-1] = token_slot
    minlora.ops.lora_add_(y, *args, plan=plan)  # warm-up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y.zero_()
        minlora.ops.lora_add_(y, *args, plan=plan)
    for _ in range(3):
        new_slot = torch.randint(-1, 4, (64,), dtype=torch.int32, device="cuda")
        token_slot.copy_(new_slot)
        plan.copy_(minlora.build_plan(new_slot, 4))
        graph.replay()
        args[-1] = new_slot
        assert rel_error(y, lora_forward_ref(*args)) <= TOLERANCE[torch.float16]

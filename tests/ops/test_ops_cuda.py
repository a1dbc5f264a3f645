"""The LoRA ops on a CUDA GPU against the float64 reference (all marked `cuda`).

Every case of the CPU suite runs here under each kernel choice the dispatcher can make
(MINLORA_CUDA_KERNELS = auto / gather / grouped / fallback), then real shapes: Llama-3-8B's
seven projections with mixed ranks 1..128, decode and prefill, up to 1024 distinct adapters;
backward against the reference; CUDA-graph capture with the plan in fixed buffers replayed
with new assignments; real CUDA streams; and graphs replayed with unchecked bad indices.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minlora
from helpers.cases import (
    TOLERANCE, check_autograd, check_no_rank_columns_and_no_in_features, run_forward,
    LoraCase, make_case, mixed_ranks, opcheck_cases, rel_error,
)
from minlora.reference import build_plan_ref, lora_backward_accumulate_ref, lora_backward_ref, lora_forward_ref

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SLOT_WEIGHTS = [20, 1, 10, 1, 1, 5, 1, 10, 0.5, 1, 3, 1]
VARIANTS = ["functional", "add", "planned", "planned_add"]
MODES = ["auto", "gather", "grouped", "fallback"]
# Llama-3-8B: hidden 4096, kv 1024, intermediate 14336; projection -> (in, out).
LLAMA3_8B = {
    "q": (4096, 4096),
    "k": (4096, 1024),
    "v": (4096, 1024),
    "o": (4096, 4096),
    "gate": (4096, 14336),
    "up": (4096, 14336),
    "down": (14336, 4096),
}


@pytest.fixture(params=MODES)
def mode(request, monkeypatch):
    """The kernel choice, read by the extension on every call."""
    monkeypatch.setenv("MINLORA_CUDA_KERNELS", request.param)
    return request.param


def poison_free_memory(shape, dtype) -> None:
    """Leaves a freed block of NaN of this size in the caching allocator: the functional op's
    output (allocated first, never zero-filled) most likely reuses it, so a row no kernel wrote
    shows as NaN."""
    torch.full(tuple(shape), float("nan"), dtype=dtype, device="cuda")


def check_forward(case, variant: str, want=None, tol=None) -> None:
    want = lora_forward_ref(*case.args()) if want is None else want
    dtype = case.x.dtype
    if variant.endswith("add"):
        y0 = torch.randn(want.shape, dtype=torch.float64).to(dtype).to(case.x.device)
        got = run_forward(case, variant, y0)
        slots = case.token_slot.long()
        none = (slots == -1) | (case.ranks.long()[slots.clamp(min=0)] == 0)
        assert torch.equal(got[none], y0[none]), "a row without an adapter was changed"
        got = got.double() - y0.double()
        tol = tol or 2 * TOLERANCE[dtype] + (1e-2 if dtype == torch.bfloat16 else 0)
    else:
        poison_free_memory(want.shape, dtype)
        got = run_forward(case, variant)
        tol = tol or TOLERANCE[dtype]
        assert torch.all(got[case.token_slot == -1] == 0)
    torch.cuda.synchronize()
    assert got.shape == want.shape and got.device.type == "cuda"
    assert torch.isfinite(got).all(), "a NaN page (unused) or an unwritten row was read"
    err = rel_error(got, want)
    assert err <= tol, f"relative error {err:.3e} > {tol:.1e}"


def check_backward(case, grad_y, plan=None, mask=(True, True, True), tol_factor=3.0, want=None) -> None:
    got = minlora.ops.lora_backward(grad_y, *case.args(), plan=plan, output_mask=mask)
    want = lora_backward_ref(grad_y, *case.args()) if want is None else want
    dtype = case.x.dtype
    used = (case.used_a_pages, case.used_b_pages)
    for k, (name, g, w) in enumerate(zip(("grad_x", "grad_a_pool", "grad_b_pool"), got, want)):
        if not mask[k]:
            assert g is None, name
            continue
        assert g.shape == w.shape and g.dtype == dtype and g.device.type == "cuda", name
        assert torch.isfinite(g).all(), f"{name}: a NaN page (unused) was read"
        err = rel_error(g, w)
        assert err <= tol_factor * TOLERANCE[dtype], f"{name}: relative error {err:.3e}"
        if k > 0:  # pages the batch does not use get exactly zero
            assert torch.all(g[~used[k - 1].to(g.device)] == 0), f"{name}: an unused page was written"


# ---------------------------------------------------------------- the CPU suite's cases, on the GPU


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_mixed_ranks(dtype, variant, mode):
    case = make_case(300, 96, 72, mixed_ranks(), dtype, slot_weights=SLOT_WEIGHTS).to("cuda")
    check_forward(case, variant)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_decode_one_token_per_adapter(dtype, variant, mode):
    ranks = [int(r) for r in torch.randint(1, 33, (40,))]
    case = make_case(40, 64, 48, ranks, dtype)
    case.token_slot = torch.randperm(40).to(torch.int32)
    check_forward(case.to("cuda"), variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_repeated_slot_same_pages(variant, mode):
    case = make_case(50, 40, 32, [4, 4, 2], torch.float16, slot_weights=[1, 5, 1])
    case.a_pages[1] = case.a_pages[0]
    case.b_pages[1] = case.b_pages[0]
    check_forward(case.to("cuda"), variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_empty_batch_and_no_slots(variant, mode):
    for case in (make_case(0, 32, 16, [4, 2]), make_case(9, 32, 16, [])):
        case = case.to("cuda")
        got = run_forward(case, variant, torch.ones(case.x.shape[0], 16, device="cuda"))
        want = lora_forward_ref(*case.args()) + (1 if variant.endswith("add") else 0)
        assert got.shape == (case.x.shape[0], 16)
        assert torch.equal(got.cpu().double(), want)


def test_no_rank_columns_and_no_in_features(mode):
    check_no_rank_columns_and_no_in_features("cuda")


def test_all_tokens_without_adapter_give_zero(mode):
    case = make_case(20, 32, 16, [4, 2]).to("cuda")
    case.token_slot.fill_(-1)
    assert torch.equal(minlora.lora(*case.args()).cpu(), torch.zeros(20, 16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_x_need_not_be_contiguous(dtype, mode):
    case = make_case(64, 32, 24, [3, 5], dtype, slot_weights=[3, 1]).to("cuda")
    x_t = case.x.t().contiguous().t()
    got = minlora.lora(x_t, *case.args()[1:])
    assert rel_error(got, lora_forward_ref(*case.args())) <= TOLERANCE[dtype]


@pytest.mark.parametrize("in_out", [(33, 17), (8, 8), (7, 130), (130, 9)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_rows_fall_back_to_scalar_loads(in_out, dtype, mode):
    """Row lengths that are not 16-byte multiples, and pools whose base is not 16-byte aligned."""
    i, o = in_out
    case = make_case(120, i, o, [5, 1, 16, 3], dtype, slot_weights=[10, 1, 5, 1]).to("cuda")
    check_forward(case, "planned_add")
    # The same pools one element into a larger buffer: base pointers off 16-byte alignment.
    for name in ("a_pool", "b_pool", "x"):
        t = getattr(case, name)
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")
        view = buf[1:].view(t.shape)
        view.copy_(t)
        setattr(case, name, view)
    check_forward(case, "functional")


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_reference(dtype, mode):
    case = make_case(200, 48, 40, [8, 1, 32, 0, 4, 16, 2], dtype, slot_weights=[10, 1, 5, 1, 1, 8, 0.3]).to("cuda")
    grad_y = torch.randn(200, 40, dtype=torch.float64).to(dtype).to("cuda")
    check_backward(case, grad_y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_long_segments_and_shared_pages(dtype, mode):
    """Segments long enough to be split among blocks; two slots share pages (gradients add)."""
    case = make_case(2400, 64, 56, [8, 8, 16, 1], dtype, slot_weights=[10, 5, 3, 0.1])
    case.a_pages[1] = case.a_pages[0]
    case.b_pages[1] = case.b_pages[0]
    case = case.to("cuda")
    grad_y = torch.randn(2400, 56, dtype=torch.float64).to(dtype).to("cuda")
    check_backward(case, grad_y, plan=minlora.build_plan(case.token_slot, 4), tol_factor=4.0)


@pytest.mark.parametrize("mask", [(False, True, False), (True, False, True), (False, False, True)])
def test_backward_with_plan_and_mask(mask, mode):
    case = make_case(60, 32, 24, [4, 8, 2], torch.float32, slot_weights=[5, 1, 2]).to("cuda")
    grad_y = torch.randn(60, 24, device="cuda")
    check_backward(case, grad_y, plan=minlora.build_plan(case.token_slot, 3), mask=mask)


@pytest.mark.parametrize("planned", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_autograd_matches_reference(planned, dtype, mode):
    case = make_case(80, 32, 24, [4, 8, 1, 0], dtype, slot_weights=[5, 1, 2, 1]).to("cuda")
    check_autograd(case, planned, 3 * TOLERANCE[dtype])


def test_build_plan_matches_reference():
    for t, s in ((0, 3), (50, 0), (300, 7), (1000, 64), (5000, 1024)):
        token_slot = torch.randint(-1, max(s, 1), (t,), dtype=torch.int32) if s else torch.full((t,), -1, dtype=torch.int32)
        plan = minlora.build_plan(token_slot.cuda(), s)
        order, seg = build_plan_ref(token_slot, s)
        assert plan.order.dtype == torch.int32 and plan.order.device.type == "cuda"
        assert torch.equal(plan.order.cpu(), order) and torch.equal(plan.seg_offsets.cpu(), seg)


@settings(max_examples=30, deadline=None)
@given(
    num_tokens=st.integers(0, 80),
    in_features=st.integers(1, 48),
    out_features=st.integers(1, 48),
    ranks=st.lists(st.integers(0, 12), min_size=0, max_size=6),
    extra=st.integers(0, 3),
    dtype=st.sampled_from(DTYPES),
    mode=st.sampled_from(MODES),
)
def test_hypothesis_shapes(num_tokens, in_features, out_features, ranks, extra, dtype, mode):
    import os

    os.environ["MINLORA_CUDA_KERNELS"] = mode
    try:
        case = make_case(num_tokens, in_features, out_features, ranks, dtype, extra_rank_columns=extra).to("cuda")
        want = lora_forward_ref(*case.args())
        got = minlora.lora(*case.args())
        assert got.shape == want.shape
        assert rel_error(got, want) <= 2 * TOLERANCE[dtype]
        grad_y = torch.randn(num_tokens, out_features, device="cuda").to(dtype)
        for g, w in zip(minlora.ops.lora_backward(grad_y, *case.args()), lora_backward_ref(grad_y, *case.args())):
            assert rel_error(g, w) <= 4 * TOLERANCE[dtype]
    finally:
        del os.environ["MINLORA_CUDA_KERNELS"]


@pytest.mark.parametrize("index", range(len(opcheck_cases())))
def test_opcheck(index):
    op, args = opcheck_cases("cuda", torch.float16, 40)[index]
    # Atomic accumulation order may differ between runs: compare with a tolerance, not bitwise.
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def _kernel_names(fn) -> set[str]:
    """Names of the CUDA kernels fn launches (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}


@pytest.mark.parametrize(
    "mode_name, tokens_per_slot, dtype, want, unwanted",
    [
        # decode (8 requests): the split gather kernels, no grouped launch
        ("auto", 1, torch.bfloat16, "gather_shrink_kernel", ("lora_grouped_kernel", "gather_fused_kernel")),
        # prefill: the grouped GEMM; the fused gather kernel only zeroes the rows without an adapter
        ("auto", 256, torch.bfloat16, "lora_grouped_kernel", ("gather_shrink_kernel", "gather_expand_kernel")),
        ("auto", 256, torch.float32, "gather_fused_kernel", ("lora_grouped_kernel",)),  # float32: no tensor-op GEMM
        ("gather", 256, torch.float16, "gather_fused_kernel", ("lora_grouped_kernel",)),
        ("grouped", 1, torch.float16, "lora_grouped_kernel", ("gather_shrink_kernel", "gather_fused_kernel")),
        ("fallback", 256, torch.bfloat16, "gather_fused_kernel",
         ("lora_grouped_kernel", "plan_positions_kernel", "gather_shrink_kernel")),
    ],
)
def test_dispatcher_launches_the_chosen_kernels(mode_name, tokens_per_slot, dtype, want, unwanted, monkeypatch):
    monkeypatch.setenv("MINLORA_CUDA_KERNELS", mode_name)
    case = make_gpu_case(256, 128, [16] * 8, [tokens_per_slot] * 8, dtype, seed=3)
    plan = minlora.build_plan(case.token_slot, 8)
    names = _kernel_names(lambda: minlora.lora(*case.args(), plan=plan))
    assert any(want in n for n in names), sorted(names)
    for name in unwanted:
        assert not any(name in n for n in names), (name, sorted(names))
    check_forward(case, "planned", want=forward_ref_gpu(case).cpu())


# ---------------------------------------------------------------- real shapes (Llama-3-8B)


def make_gpu_case(in_features: int, out_features: int, ranks, seg_lens, dtype, *, no_adapter: int = 0,
                  seed: int = 0) -> LoraCase:
    """A case generated on the GPU (real shapes are too big to draw on the CPU quickly).

    seg_lens[s] tokens use slot s, plus `no_adapter` tokens with slot -1, shuffled.  Pages
    no slot uses are NaN; page-table entries past each rank are garbage, some out of range.
    """
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    S = len(ranks)
    total = int(sum(ranks))
    num_a = num_b = total + 7
    width = max([1, *ranks]) + 3
    a_pool = (torch.randn(num_a, in_features, device=dev, generator=g) / math.sqrt(in_features)).to(dtype)
    b_pool = (torch.randn(num_b, out_features, device=dev, generator=g) / math.sqrt(max(1, max(ranks)))).to(dtype)
    garbage = torch.tensor([-7, num_a + 100, 0, -1, 2**30], dtype=torch.int32, device=dev)
    a_pages = garbage[torch.randint(0, 5, (S, width), device=dev, generator=g)]
    b_pages = garbage[torch.randint(0, 5, (S, width), device=dev, generator=g)]
    a_perm = torch.randperm(num_a, device=dev, generator=g).to(torch.int32)
    b_perm = torch.randperm(num_b, device=dev, generator=g).to(torch.int32)
    starts = torch.tensor([0, *ranks], device=dev).cumsum(0)
    rank_t = torch.tensor(ranks, dtype=torch.int32, device=dev)
    cols = torch.arange(width, device=dev)
    mask = cols[None, :] < rank_t[:, None]
    flat = (starts[:-1, None] + cols[None, :]).clamp(max=max(total - 1, 0))
    a_pages = torch.where(mask, a_perm[flat], a_pages)
    b_pages = torch.where(mask, b_perm[flat], b_pages)
    used_a = torch.zeros(num_a, dtype=torch.bool, device=dev)
    used_b = torch.zeros(num_b, dtype=torch.bool, device=dev)
    used_a[a_perm[:total].long()] = True
    used_b[b_perm[:total].long()] = True
    a_pool[~used_a] = float("nan")
    b_pool[~used_b] = float("nan")
    slots = torch.repeat_interleave(torch.arange(S, dtype=torch.int32, device=dev),
                                    torch.tensor(seg_lens, device=dev))
    slots = torch.cat([slots, torch.full((no_adapter,), -1, dtype=torch.int32, device=dev)])
    slots = slots[torch.randperm(slots.shape[0], device=dev, generator=g)]
    T = slots.shape[0]
    x = torch.randn(T, in_features, device=dev, generator=g).to(dtype)
    scales = (torch.rand(S, device=dev, generator=g) * 2 + 0.25).float()
    return LoraCase(x, a_pool, b_pool, a_pages, b_pages, rank_t, scales, slots)


def forward_ref_gpu(case: LoraCase) -> torch.Tensor:
    """The reference's math (float64, one slot at a time) on the GPU, for real shapes."""
    xd = case.x.double()
    y = torch.zeros(case.x.shape[0], case.b_pool.shape[1], dtype=torch.float64, device="cuda")
    order, seg = build_plan_ref(case.token_slot.cpu(), case.ranks.shape[0])
    seg, ranks = seg.tolist(), case.ranks.tolist()
    order = order.to(case.x.device).long()
    a_pages, b_pages = case.a_pages.long(), case.b_pages.long()
    for s, r in enumerate(ranks):
        rows = order[seg[s]:seg[s + 1]]
        if rows.numel() == 0 or r == 0:
            continue
        a = case.a_pool[a_pages[s, :r]].double()  # [r, in]
        b = case.b_pool[b_pages[s, :r]].double()  # [r, out]
        y[rows] = float(case.scales[s]) * (xd[rows] @ a.t()) @ b
    return y


def backward_ref_gpu(grad_y: torch.Tensor, case: LoraCase):
    g, xd = grad_y.double(), case.x.double()
    grad_x = torch.zeros_like(xd)
    grad_a = torch.zeros(case.a_pool.shape, dtype=torch.float64, device="cuda")
    grad_b = torch.zeros(case.b_pool.shape, dtype=torch.float64, device="cuda")
    order, seg = build_plan_ref(case.token_slot.cpu(), case.ranks.shape[0])
    seg, ranks = seg.tolist(), case.ranks.tolist()
    order = order.to(case.x.device).long()
    for s, r in enumerate(ranks):
        rows = order[seg[s]:seg[s + 1]]
        if rows.numel() == 0 or r == 0:
            continue
        ai, bi = case.a_pages[s, :r].long(), case.b_pages[s, :r].long()
        a, b = case.a_pool[ai].double(), case.b_pool[bi].double()
        scale = float(case.scales[s])
        u = g[rows] @ b.t()  # [n, r]
        h = xd[rows] @ a.t()
        grad_x[rows] += scale * u @ a
        grad_a.index_add_(0, ai, scale * u.t() @ xd[rows])
        grad_b.index_add_(0, bi, scale * h.t() @ g[rows])
    return grad_x, grad_a, grad_b


def llama_ranks(n: int, seed: int, high: int = 128) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randint(1, high + 1, (n,), generator=g).tolist()
    ranks[: min(n, 4)] = [1, high, 16, 8][: min(n, 4)]
    return ranks


@pytest.mark.parametrize("proj", list(LLAMA3_8B))
@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_llama3_8b_projections(proj, phase):
    """Mixed ranks 1..128; decode: 256 adapters x 1 token; prefill: 6 adapters x 64..700 tokens."""
    i, o = LLAMA3_8B[proj]
    if phase == "decode":
        ranks, lens = llama_ranks(256, 1), [1] * 256
    else:
        ranks, lens = llama_ranks(6, 2), [64, 700, 128, 1, 300, 33]
    case = make_gpu_case(i, o, ranks, lens, torch.bfloat16, no_adapter=5, seed=list(LLAMA3_8B).index(proj))
    want = forward_ref_gpu(case)
    for variant in ("functional", "planned_add"):
        check_forward(case, variant, want=want.cpu())


@pytest.mark.parametrize("n", [1, 8, 64, 1024])
def test_many_distinct_adapters_decode(n):
    ranks = llama_ranks(n, 3, high=32 if n == 1024 else 128)
    case = make_gpu_case(4096, 1024, ranks, [1] * n, torch.bfloat16, seed=n)
    want = forward_ref_gpu(case).cpu()
    check_forward(case, "planned", want=want)
    check_forward(case, "functional", want=want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode_name", ["auto", "grouped", "gather"])
def test_prefill_paths_agree_on_real_shape(dtype, mode_name, monkeypatch):
    monkeypatch.setenv("MINLORA_CUDA_KERNELS", mode_name)
    case = make_gpu_case(4096, 4096, [16, 64, 128, 8, 1], [512, 64, 200, 2048, 31], dtype, no_adapter=9, seed=7)
    check_forward(case, "planned_add", want=forward_ref_gpu(case).cpu())


@pytest.mark.parametrize("in_features", [256, 4096])  # 4096: the shrink is split along K (float32 partials)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grouped_ranks_not_multiple_of_8_above_32(dtype, in_features, monkeypatch):
    """The grouped expand's K is the rank: ranks above one 32-wide k-tile that are not multiples
    of 8 (33, 36, 47, 100, 127) would make CUTLASS advance hs's 16-byte loads by K % 32 elements
    (misaligned address).  Forward and backward, every segment on the grouped path."""
    monkeypatch.setenv("MINLORA_CUDA_KERNELS", "grouped")
    ranks, lens = [36, 33, 100, 5, 47, 127, 64], [40, 64, 130, 33, 70, 90, 35]
    case = make_gpu_case(in_features, 136, ranks, lens, dtype, no_adapter=6, seed=3)
    want = forward_ref_gpu(case).cpu()
    check_forward(case, "planned", want=want)
    check_forward(case, "planned_add", want=want)
    grad_y = torch.randn(case.x.shape[0], 136, device="cuda").to(dtype)
    want_b = backward_ref_gpu(grad_y, case)
    got = minlora.ops.lora_backward(grad_y, *case.args(), plan=minlora.build_plan(case.token_slot, len(ranks)))
    for name, g, w in zip(("grad_x", "grad_a_pool", "grad_b_pool"), got, want_b):
        assert torch.isfinite(g).all(), name
        assert rel_error(g, w) <= 3 * TOLERANCE[dtype], name


@pytest.mark.parametrize("proj", ["q", "down", "up"])
def test_backward_real_shapes(proj):
    i, o = LLAMA3_8B[proj]
    case = make_gpu_case(i, o, llama_ranks(16, 4), [64] * 15 + [3], torch.bfloat16, no_adapter=4, seed=11)
    grad_y = torch.randn(case.x.shape[0], o, device="cuda").to(torch.bfloat16)
    want = backward_ref_gpu(grad_y, case)
    got = minlora.ops.lora_backward(grad_y, *case.args(), plan=minlora.build_plan(case.token_slot, 16))
    for name, g, w in zip(("grad_x", "grad_a_pool", "grad_b_pool"), got, want):
        assert torch.isfinite(g).all(), name
        assert rel_error(g, w) <= 3 * TOLERANCE[torch.bfloat16], name


# ---------------------------------------------------------------- CUDA graphs and streams


@pytest.mark.parametrize("mode_name", ["auto", "gather", "grouped"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_graph_replay_with_plan_in_fixed_buffers(dtype, mode_name, monkeypatch):
    """Capture one step (plan built inside the graph into fixed buffers, forward into y),
    then replay it with new token-to-adapter assignments copied into the captured inputs."""
    monkeypatch.setenv("MINLORA_CUDA_KERNELS", mode_name)
    T, S = 256, 6
    case = make_case(T, 64, 48, [4, 16, 1, 8, 64, 2], dtype, nan_unused=False, slot_weights=[5, 1, 1, 1, 3, 1])
    case = case.to("cuda")
    token_slot = case.token_slot.clone()  # the graph's input buffer
    args = list(case.args())
    args[-1] = token_slot
    y = torch.zeros(T, 48, dtype=dtype, device="cuda")
    plan = minlora.build_plan(token_slot, S)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (allocations, lazy initialisation) outside the graph
        for _ in range(2):
            plan.copy_(minlora.build_plan(token_slot, S))
            y.zero_()
            minlora.ops.lora_add_(y, *args, plan=plan)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan.copy_(minlora.build_plan(token_slot, S))
        y.zero_()
        minlora.ops.lora_add_(y, *args, plan=plan)
    gen = torch.Generator().manual_seed(5)
    for k in range(4):
        weights = torch.rand(S + 1, generator=gen) ** 3  # a different mix each time, some long segments
        new = (torch.multinomial(weights, T, replacement=True, generator=gen) - 1).to(torch.int32)
        token_slot.copy_(new.cuda())
        graph.replay()
        torch.cuda.synchronize()
        want = lora_forward_ref(*case.args()[:-1], new)
        assert rel_error(y, want) <= TOLERANCE[dtype], f"replay {k}"


def test_graph_capture_of_backward():
    case = make_case(128, 32, 40, [4, 8, 2], torch.bfloat16, nan_unused=False, slot_weights=[5, 1, 2]).to("cuda")
    token_slot = case.token_slot.clone()
    args = list(case.args())
    args[-1] = token_slot
    grad_y = torch.randn(128, 40, device="cuda").to(torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        minlora.ops.lora_backward(grad_y, *args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grads = minlora.ops.lora_backward(grad_y, *args)
    for _ in range(2):
        new = torch.randint(-1, 3, (128,), dtype=torch.int32)
        token_slot.copy_(new.cuda())
        graph.replay()
        torch.cuda.synchronize()
        want = lora_backward_ref(grad_y, *case.args()[:-1], new)
        for g, w in zip(grads, want):
            assert rel_error(g, w) <= 3 * TOLERANCE[torch.bfloat16]


def test_real_streams():
    """Ops on two non-default streams at once, inputs made on those streams."""
    cases = [make_case(300, 64, 48, mixed_ranks(), torch.bfloat16, slot_weights=SLOT_WEIGHTS) for _ in range(2)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    outs = []
    for case, stream in zip(cases, streams):
        with torch.cuda.stream(stream):
            c = case.to("cuda")
            plan = minlora.build_plan(c.token_slot, c.ranks.shape[0])
            y = minlora.lora(*c.args(), plan=plan)
            grads = minlora.ops.lora_backward(torch.ones_like(y), *c.args(), plan=plan)
            outs.append((y, grads, c))
    torch.cuda.synchronize()
    for (y, grads, c), case in zip(outs, cases):
        assert rel_error(y, lora_forward_ref(*case.args())) <= TOLERANCE[torch.bfloat16]
        want = lora_backward_ref(torch.ones(300, 48, dtype=torch.float64), *case.args())
        for g, w in zip(grads, want):
            assert rel_error(g, w) <= 3 * TOLERANCE[torch.bfloat16]


# ---------------------------------------------------------------- write-once outputs, accumulation, dispatch


@pytest.mark.parametrize("planned", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_accumulate_matches_reference(dtype, planned, mode):
    """float32 accumulators get exactly the batch's dA / dB rows; pages it does not use keep
    their NaN (never read, never written); grad_x written once (poisoned memory)."""
    case = make_case(300, 96, 72, mixed_ranks(), dtype, slot_weights=SLOT_WEIGHTS).to("cuda")
    grad_y = torch.randn(300, 72, dtype=torch.float64).to(dtype).cuda()
    acc = [torch.randn(case.a_pool.shape, device="cuda"), torch.randn(case.b_pool.shape, device="cuda")]
    acc[0][~case.used_a_pages.cuda()] = float("nan")
    acc[1][~case.used_b_pages.cuda()] = float("nan")
    before = [a.clone() for a in acc]
    plan = minlora.build_plan(case.token_slot, case.ranks.shape[0]) if planned else None
    poison_free_memory(case.x.shape, dtype)
    gx = minlora.ops.lora_backward_accumulate_(*acc, grad_y, *case.args(), plan=plan)
    torch.cuda.synchronize()
    want_x, want_a, want_b = lora_backward_accumulate_ref(*before, grad_y, *case.args())
    assert torch.isfinite(gx).all(), "a grad_x row was left unwritten"
    assert rel_error(gx, want_x) <= 3 * TOLERANCE[dtype]
    for name, got, prev, want, used in (("grad_a_acc", acc[0], before[0], want_a, case.used_a_pages),
                                        ("grad_b_acc", acc[1], before[1], want_b, case.used_b_pages)):
        got, prev = got.cpu(), prev.cpu()
        assert torch.isnan(got[~used]).all(), f"{name}: a page the batch does not use was touched"
        assert rel_error(got[used].double() - prev[used].double(), want[used] - prev[used].double()) <= 3 * TOLERANCE[dtype], name


@pytest.mark.parametrize("lens", [[1, 1, 1], [300, 200, 3]], ids=["short", "long"])
def test_backward_accumulate_pages_shared_by_slots(lens, mode):
    """Two slots (and two rank indices of one slot) on one page: every contribution is added,
    on the gather path and on the grouped GEMM's atomic epilogue alike."""
    case = make_case(sum(lens), 64, 48, [8, 8, 4], torch.bfloat16, slot_weights=lens, nan_unused=False)
    case.a_pages[1, :8] = case.a_pages[0, :8]
    case.b_pages[1, :8] = case.b_pages[0, :8]
    case.a_pages[2, 1] = case.a_pages[2, 0]
    case = case.to("cuda")
    grad_y = torch.randn(case.x.shape[0], 48, device="cuda").to(torch.bfloat16)
    acc = [torch.zeros(case.a_pool.shape, device="cuda"), torch.zeros(case.b_pool.shape, device="cuda")]
    minlora.ops.lora_backward_accumulate_(*acc, grad_y, *case.args(), grad_x=False)
    _, want_a, want_b = lora_backward_ref(grad_y, *case.args())
    assert rel_error(acc[0], want_a) <= 3 * TOLERANCE[torch.bfloat16]
    assert rel_error(acc[1], want_b) <= 3 * TOLERANCE[torch.bfloat16]


def test_backward_accumulate_empty():
    for case in (make_case(0, 32, 16, [4, 2]).to("cuda"), make_case(9, 32, 16, []).to("cuda")):
        acc = [torch.randn(case.a_pool.shape, device="cuda"), torch.randn(case.b_pool.shape, device="cuda")]
        before = [a.clone() for a in acc]
        gx = minlora.ops.lora_backward_accumulate_(*acc, torch.randn(case.x.shape[0], 16, device="cuda"), *case.args())
        assert torch.equal(gx, torch.zeros_like(case.x))
        assert all(torch.equal(a, b) for a, b in zip(acc, before))


@pytest.mark.parametrize("requests", [8, 32, 132])
def test_decode_splits_k_and_n_across_blocks(requests):
    """Few requests: the shrink's K and the expand's N are split, so every multiprocessor has
    blocks (grid >= 2 per SM); the result is the reference's."""
    case = make_gpu_case(4096, 4096, llama_ranks(requests, 5, high=32), [1] * requests, torch.bfloat16, seed=requests)
    plan = minlora.build_plan(case.token_slot, requests, max_segment=1)
    names = _kernel_names(lambda: minlora.lora(*case.args(), plan=plan))
    assert any("gather_shrink_kernel" in n for n in names) and any("gather_expand_kernel" in n for n in names), names
    assert not any("lora_grouped_kernel" in n or "plan_positions_kernel" in n for n in names), sorted(names)
    want = forward_ref_gpu(case).cpu()
    check_forward(case, "planned", want=want)
    check_forward(case, "planned_add", want=want)


def test_max_segment_hint_selects_kernels_never_results():
    """The step's longest segment decides whether the grouped GEMM is launched; a wrong (too
    small) hint launches only the gather kernels and the result is still right."""
    case = make_gpu_case(512, 512, [16, 64, 8, 32], [300, 2, 1, 120], torch.bfloat16, no_adapter=7, seed=4)
    order, seg = torch.ops.minlora.build_plan(case.token_slot, 4)
    positions = minlora.plan.plan_positions(order)
    want = forward_ref_gpu(case).cpu()
    for hint, grouped in ((300, True), (31, False), (1, False)):
        plan = minlora.BatchPlan(order, seg, positions, max_segment=hint)
        names = _kernel_names(lambda: minlora.lora(*case.args(), plan=plan))
        assert any("lora_grouped_kernel" in n for n in names) == grouped, (hint, sorted(names))
        got = minlora.lora(*case.args(), plan=plan)
        assert rel_error(got, want) <= TOLERANCE[torch.bfloat16], hint


def test_backward_chooses_per_segment():
    """Long and short segments in one backward: the grouped gradient GEMM for the long ones, the
    segment-gradient kernel for the short ones; both sum into the same pools correctly."""
    lens = [512, 3, 1, 700, 2, 40]
    case = make_gpu_case(256, 384, [16, 8, 1, 64, 4, 36], lens, torch.bfloat16, no_adapter=5, seed=6)
    grad_y = torch.randn(case.x.shape[0], 384, device="cuda").to(torch.bfloat16)
    plan = minlora.build_plan(case.token_slot, len(lens))
    names = _kernel_names(lambda: minlora.ops.lora_backward(grad_y, *case.args(), plan=plan))
    assert any("lora_grouped_kernel" in n for n in names) and any("segment_grad_kernel" in n for n in names), names
    want = backward_ref_gpu(grad_y, case)
    got = minlora.ops.lora_backward(grad_y, *case.args(), plan=plan)
    for name, g, w in zip(("grad_x", "grad_a_pool", "grad_b_pool"), got, want):
        assert torch.isfinite(g).all(), name
        assert rel_error(g, w) <= 3 * TOLERANCE[torch.bfloat16], name


@pytest.mark.parametrize("mode_name", ["auto", "gather", "grouped"])
def test_inconsistent_plan_never_adds_a_delta_twice(mode_name, monkeypatch):
    """A hand-made plan whose order repeats a token inside a short and inside a long segment
    (and so misses others), with positions computed from it: the adding forward gives each row
    y0 + its delta or y0, never y0 + 2 * delta; the functional one writes every row (no NaN)."""
    monkeypatch.setenv("MINLORA_CUDA_KERNELS", mode_name)
    monkeypatch.delenv("MINLORA_CHECK_INDICES", raising=False)
    case = make_gpu_case(256, 128, [16, 8, 4], [200, 5, 40], torch.float16, no_adapter=3, seed=8)
    order, seg = torch.ops.minlora.build_plan(case.token_slot, 3)
    bad = order.clone()
    for s in range(3):
        b = int(seg[s])
        bad[b + 1] = bad[b]  # the segment's first token twice
    plan = minlora.BatchPlan(bad, seg, minlora.plan.plan_positions(bad))
    want = forward_ref_gpu(case)
    y0 = torch.randn(want.shape, device="cuda").to(torch.float16)
    y = y0.clone()
    minlora.ops.lora_add_(y, *case.args(), plan=plan)
    delta = y.double() - y0.double()
    once = (delta - want).norm(dim=1) <= 0.05 * want.norm(dim=1) + 1e-3
    never = delta.norm(dim=1) <= 1e-6
    assert bool((once | never).all()), "a row got its delta twice or a wrong one"
    poison_free_memory(want.shape, torch.float16)
    assert torch.isfinite(minlora.lora(*case.args(), plan=plan)).all()


def test_zz_graph_replay_with_bad_indices_does_not_fault(monkeypatch):
    """CUDA ops read no index on the host; replaying with out-of-range slots, ranks and pages
    must neither fault nor read NaN pages nobody points to.  (Last in the file: a
    fault would poison the CUDA context for the tests after it.)"""
    for mode_name in ("auto", "gather", "grouped"):
        monkeypatch.setenv("MINLORA_CUDA_KERNELS", mode_name)
        T, S = 200, 3
        case = make_case(T, 64, 48, [4, 8, 2], torch.float16, nan_unused=False, slot_weights=[5, 1, 2]).to("cuda")
        args = list(case.args())
        y = torch.zeros(T, 48, dtype=torch.float16, device="cuda")
        plan = minlora.build_plan(case.token_slot, S)
        minlora.ops.lora_add_(y, *args, plan=plan)
        minlora.ops.lora_backward(y, *args, plan=plan)  # every kernel loaded before the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            plan.copy_(minlora.build_plan(case.token_slot, S))
            minlora.ops.lora_add_(y, *args, plan=plan)
            grads = minlora.ops.lora_backward(y, *args, plan=plan)
        case.token_slot[::7] = 99  # slot out of range
        case.ranks[1] = 1000  # rank > R
        case.a_pages[0, 0] = 1 << 30  # page out of range
        case.b_pages[2, 1] = -5
        graph.replay()
        torch.cuda.synchronize()
        for g in grads:
            assert g.shape[0] > 0

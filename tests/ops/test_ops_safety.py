"""The ops under hostile use: racing threads, inconsistent plans, wrong devices, wide page
tables, double backward.  Risky cases run in a subprocess with a timeout (and a memory cap),
so a crash, a hang or a runaway allocation fails the test instead of the run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import minlora
from helpers import REPO, pythonpath
from helpers.cases import TOLERANCE, make_case, rel_error
from minlora.reference import lora_backward_ref, lora_forward_ref


def run_script(script: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs `script` in a fresh interpreter (helpers importable); returns the finished process."""
    full_env = {**os.environ, "PYTHONPATH": pythonpath(), **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO)


def assert_clean_exit(done: subprocess.CompletedProcess) -> None:
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        pytest.fail(f"the process died by signal {name}:\n{done.stderr[-3000:]}")
    assert done.returncode == 0, done.stderr[-3000:]


# ---------------------------------------------------------------- another thread rewrites the indices


RACE = """
import resource, threading, time, torch, minlora
from helpers.cases import make_case
# A runaway allocation from a wild index fails the run instead of taking the machine down.
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), vm + (2 << 30)))
torch.manual_seed(0)
c = make_case({T}, 64, 48, [8, 1, 16, 4, 2, 32], torch.float32, slot_weights=[{weights}])
S, R, T = c.ranks.shape[0], c.a_pages.shape[1], c.x.shape[0]
plan = minlora.build_plan(c.token_slot, S)
targets = [c.a_pages, c.b_pages, c.ranks, c.token_slot, plan.order, plan.seg_offsets, plan.positions]
pristine = [t.clone() for t in targets]
stop = threading.Event()

def rewrite():
    g = torch.Generator().manual_seed(1)
    while not stop.is_set():
        for t, p in zip(targets, pristine):
            t.copy_(p)  # valid values most of the time, so the kernels run ...
        # ... then one tensor gets wild values: negative, just past its bounds, or huge.
        t = targets[int(torch.randint(0, len(targets), (), generator=g))]
        high = (T + 5, R + 5, 2**31 - 1)[int(torch.randint(0, 3, (), generator=g))]
        t.copy_(torch.randint(-3, high, t.shape, generator=g, dtype=torch.int64).to(torch.int32))

y = torch.zeros(T, 48)
grad_y = torch.randn(T, 48)
grad_a, grad_b = torch.zeros(c.a_pool.shape), torch.zeros(c.b_pool.shape)
writer = threading.Thread(target=rewrite, daemon=True)
writer.start()
calls = errors = 0
end = time.monotonic() + {seconds}
while time.monotonic() < end:
    for fn in (lambda: minlora.lora(*c.args()),
               lambda: minlora.lora(*c.args(), plan=plan),
               lambda: minlora.ops.lora_add_(y, *c.args(), plan=plan),
               lambda: minlora.ops.lora_backward(grad_y, *c.args()),
               lambda: minlora.ops.lora_backward(grad_y, *c.args(), plan=plan),
               lambda: minlora.ops.lora_backward_accumulate_(grad_a, grad_b, grad_y, *c.args(), plan=plan),
               lambda: minlora.ops.lora_backward_accumulate_(grad_a, grad_b, grad_y, *c.args()),
               lambda: minlora.build_plan(c.token_slot, S),
               lambda: minlora.plan.plan_positions(plan.order)):
        try:
            fn()
        except (ValueError, RuntimeError):
            errors += 1
        calls += 1
stop.set()
writer.join()
print("calls", calls, "errors", errors)
"""


@pytest.mark.parametrize(
    "shape", [(40, "1, 1, 1, 1, 1, 1"), (400, "20, 1, 10, 1, 1, 5")], ids=["token-path", "matrix-path"]
)
def test_index_tensors_rewritten_by_another_thread_never_crash(shape):
    """A thread rewrites page tables, ranks, token slots and the plan (order, segments, positions)
    with random values while every CPU op runs, under a memory cap: wrong answers and
    ValueErrors are allowed, a crash or a runaway allocation is not."""
    T, weights = shape
    done = run_script(RACE.format(T=T, weights=weights, seconds=4), timeout=180)
    assert_clean_exit(done)
    assert "calls" in done.stdout


# ---------------------------------------------------------------- plans that are not permutations


def _case_and_plan():
    c = make_case(40, 16, 8, [3, 2, 4], torch.float32, slot_weights=[3, 2, 1], no_adapter_fraction=0.2)
    # Slot 0 gets at least two tokens, so one can be repeated in place of the other.
    c.token_slot[:2] = 0
    return c, minlora.build_plan(c.token_slot, 3)


def _repeated_token_plan(plan):
    order = plan.order.clone()
    order[1] = order[0]  # slot 0's first token twice, its second token never
    return minlora.BatchPlan(order, plan.seg_offsets)


def _trailing_repeat_plan(plan):
    order = plan.order.clone()
    tail = int(plan.seg_offsets[-1])
    order[-1] = order[tail] if tail < order.shape[0] - 1 else order[0]
    return minlora.BatchPlan(order, plan.seg_offsets)


@pytest.mark.parametrize(
    "make_bad", [_repeated_token_plan, _trailing_repeat_plan], ids=["in-segment", "trailing"]
)
def test_plan_with_repeated_token_is_refused(make_bad):
    c, plan = _case_and_plan()
    if make_bad is _trailing_repeat_plan and int(plan.seg_offsets[-1]) >= c.x.shape[0] - 1:
        c.token_slot[-3:] = -1
        plan = minlora.build_plan(c.token_slot, 3)
    bad = make_bad(plan)
    with pytest.raises(ValueError, match="order"):
        minlora.lora(*c.args(), plan=bad)
    with pytest.raises(ValueError, match="order"):
        minlora.ops.lora_add_(torch.zeros(40, 8), *c.args(), plan=bad)
    with pytest.raises(ValueError, match="order"):
        minlora.ops.lora_backward(torch.randn(40, 8), *c.args(), plan=bad)


def test_consistent_permuted_plan_is_accepted():
    """Any order that is a permutation consistent with token_slot and seg_offsets is valid,
    sorted within its segments or not."""
    c, plan = _case_and_plan()
    order = plan.order.clone()
    seg = plan.seg_offsets.tolist()
    for s in range(3):
        order[seg[s]:seg[s + 1]] = order[seg[s]:seg[s + 1]].flip(0)
    got = minlora.lora(*c.args(), plan=minlora.BatchPlan(order, plan.seg_offsets))
    assert rel_error(got, lora_forward_ref(*c.args())) <= TOLERANCE[torch.float32]


# ---------------------------------------------------------------- devices of every argument


def _device_cases():
    c = make_case(12, 16, 8, [3, 2, 0], torch.float32, slot_weights=[3, 2, 1])
    plan = minlora.build_plan(c.token_slot, 3)
    names = ["x", "a_pool", "b_pool", "a_pages", "b_pages", "ranks", "scales", "token_slot"]
    return c, plan, names


@pytest.mark.parametrize("name", ["x", "a_pool", "b_pool", "a_pages", "b_pages", "ranks", "scales", "token_slot",
                                  "order", "seg_offsets"])
def test_every_argument_on_another_device_is_refused(name):
    c, plan, names = _device_cases()
    args = dict(zip(names, c.args()))
    order, seg = plan.order, plan.seg_offsets
    if name == "order":
        order = order.to("meta")
    elif name == "seg_offsets":
        seg = seg.to("meta")
    else:
        args[name] = args[name].to("meta")
    a = [args[n] for n in names]
    ops = torch.ops.minlora
    calls = {
        "forward": lambda: ops.lora_forward(*a, order, seg),
        "add_": lambda: ops.lora_forward_add_(torch.zeros(12, 8), *a, order, seg),
        "backward": lambda: ops.lora_backward(torch.randn(12, 8), *a, order, seg, [True, True, True]),
    }
    for what, call in calls.items():
        with pytest.raises(RuntimeError, match=f"(?s){name}.*meta|meta.*{name}"):
            call()
            pytest.fail(f"{what} accepted {name} on meta")


def test_grad_y_and_y_on_another_device_are_refused():
    """A meta grad_y once returned uninitialised gradients; an add_ into a meta y did nothing."""
    c, plan, _ = _device_cases()
    with pytest.raises(RuntimeError, match="grad_y.*meta|meta.*grad_y"):
        minlora.ops.lora_backward(torch.randn(12, 8, device="meta"), *c.args())
    with pytest.raises(RuntimeError, match="grad_y.*meta|meta.*grad_y"):
        minlora.ops.lora_backward(torch.randn(12, 8, device="meta"), *c.args(), plan=plan)
    for p in (None, plan):
        with pytest.raises(RuntimeError, match="y must be on cpu.*meta|meta"):
            minlora.ops.lora_add_(torch.zeros(12, 8, device="meta"), *c.args(), plan=p)


def test_fake_kernels_check_devices():
    """Under FakeTensorMode (torch.compile's tracing) the same device errors are raised."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    c, plan, _ = _device_cases()
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(t) for t in c.args()]
        order, seg = mode.from_tensor(plan.order), mode.from_tensor(plan.seg_offsets)
        meta_g = torch.empty(12, 8, device="meta")
        with pytest.raises(RuntimeError, match="grad_y"):
            torch.ops.minlora.lora_backward(meta_g, *args, order, seg, [True, True, True])
        with pytest.raises(RuntimeError, match="seg_offsets"):
            torch.ops.minlora.lora_backward(torch.empty(12, 8), *args, order, seg.to("meta"), [True] * 3)
        with pytest.raises(RuntimeError, match="y must be on"):
            torch.ops.minlora.lora_forward_add_(meta_g, *args, order, seg)


# ---------------------------------------------------------------- wide page tables, narrow ranks


WIDE = """
import resource, torch, minlora
from helpers.cases import rel_error
from minlora.reference import lora_forward_ref, lora_backward_ref
R, T = {R}, {T}
g = torch.Generator().manual_seed(0)
x = torch.randn(T, 32, generator=g)
a_pool, b_pool = torch.randn(6, 32, generator=g), torch.randn(6, 16, generator=g)
a_pages = torch.zeros(2, R, dtype=torch.int32)
b_pages = torch.zeros(2, R, dtype=torch.int32)
a_pages[0, 0], a_pages[1, 0], b_pages[0, 0], b_pages[1, 0] = 1, 4, 2, 5
ranks = torch.tensor([1, 1], dtype=torch.int32)
scales = torch.tensor([0.5, 2.0])
token_slot = (torch.arange(T) % 3 - 1).to(torch.int32)
args = (x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot)
narrow = (a_pages[:, :1].contiguous(), b_pages[:, :1].contiguous())
small = (x, a_pool, b_pool, *narrow, ranks, scales, token_slot)
# Warm up (threads, allocator arenas) on the same ops with a narrow table, then cap the
# address space a little above what the process holds: scratch sized by R cannot fit.
minlora.lora(*small); minlora.ops.lora_backward(torch.randn(T, 16), *small)
vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
cap = vm + {headroom_mib} * 2**20
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
y = minlora.lora(*args)
plan = minlora.build_plan(token_slot, 2)
y2 = minlora.lora(*args, plan=plan)
grad_y = torch.randn(T, 16, generator=g)
grads = minlora.ops.lora_backward(grad_y, *args)
want = lora_forward_ref(*small)
assert rel_error(y, want) < 1e-5 and rel_error(y2, want) < 1e-5
for got, w in zip(grads, lora_backward_ref(grad_y, *small)):
    assert rel_error(got, w) < 1e-5
print("OK")
"""


@pytest.mark.parametrize("T", [8, 300], ids=["token-path", "matrix-path"])
def test_scratch_memory_is_bounded_by_the_ranks_used(T):
    """R = 2^25 page-table columns with rank 1: the op's scratch must not grow with R (the page
    tables themselves are the caller's 256 MiB, allocated before the cap)."""
    done = run_script(WIDE.format(R=2**25, T=T, headroom_mib=400), timeout=300)
    assert_clean_exit(done)
    assert done.stdout.strip().endswith("OK")


# ---------------------------------------------------------------- double backward


def test_double_backward_is_correct():
    c = make_case(14, 6, 5, [2, 1, 3, 0], torch.float64, nan_unused=False, slot_weights=[3, 1, 2, 1])
    x, a_pool, b_pool = (t.clone().requires_grad_() for t in c.args()[:3])
    rest = c.args()[3:]
    plan = minlora.build_plan(c.token_slot, 4)
    for p in (None, plan):
        fn = lambda x, a, b: minlora.lora(x, a, b, *rest, plan=p)  # noqa: E731
        assert torch.autograd.gradgradcheck(fn, (x, a_pool, b_pool))


def test_double_backward_is_not_silently_zero():
    """d/dx of sum(dL/dx) for L = sum(lora(x)^2): a non-zero second derivative, as the reference says."""
    c = make_case(10, 6, 5, [2, 3], torch.float64, nan_unused=False, slot_weights=[1, 1],
                  no_adapter_fraction=0)
    x = c.x.clone().requires_grad_()
    y = minlora.lora(x, *c.args()[1:])
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.sum(), x)
    # L = sum (M x)^2 per token => dL/dx = 2 M^T M x, d(sum dL/dx)/dx = 2 M^T M 1.
    ones = torch.ones_like(c.x)
    want = 2 * lora_backward_ref(lora_forward_ref(ones, *c.args()[1:]), ones, *c.args()[1:])[0]
    assert ggx.abs().sum() > 0
    assert rel_error(ggx, want) <= 1e-10


def test_backward_of_backward_through_lora_backward_op():
    """minlora.ops.lora_backward itself is differentiable (its gradients are ops again)."""
    c = make_case(9, 5, 4, [2, 1], torch.float64, nan_unused=False, slot_weights=[2, 1])
    g = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    x, a_pool, b_pool = (t.clone().requires_grad_() for t in c.args()[:3])
    rest = c.args()[3:]
    assert torch.autograd.gradcheck(
        lambda g, x, a, b: minlora.ops.lora_backward(g, x, a, b, *rest), (g, x, a_pool, b_pool)
    )
    assert torch.autograd.gradcheck(
        lambda g, x, a, b: minlora.ops.lora_backward(g, x, a, b, *rest, output_mask=(False, True, False))[1],
        (g, x, a_pool, b_pool),
    )


# ---------------------------------------------------------------- CUDA (skipped without a GPU)


def _all_ops(case, plan):
    """One call of every op (functional, add_, each with and without a plan; backward; build_plan)."""
    y = torch.zeros(case.x.shape[0], case.b_pool.shape[1], dtype=case.x.dtype, device=case.x.device)
    g = torch.randn_like(y)
    out = [minlora.build_plan(case.token_slot, case.ranks.shape[0]).order, minlora.plan.plan_positions(plan.order)]
    bare = minlora.BatchPlan(plan.order, plan.seg_offsets)  # positions computed by the op
    acc = (torch.zeros(case.a_pool.shape, device=case.x.device), torch.zeros(case.b_pool.shape, device=case.x.device))
    for p in (None, plan, bare):
        out.append(minlora.lora(*case.args(), plan=p))
        out.append(minlora.ops.lora_add_(y, *case.args(), plan=p))
        out.extend(minlora.ops.lora_backward(g, *case.args(), plan=p))
        out.append(minlora.ops.lora_backward_accumulate_(*acc, g, *case.args(), plan=p))
    x, a_pool, b_pool = (t.clone().requires_grad_() for t in case.args()[:3])
    minlora.lora(x, a_pool, b_pool, *case.args()[3:], plan=plan).backward(g)
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("mode_name", ["auto", "gather", "grouped", "fallback"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_ops_never_synchronise_the_host(dtype, mode_name, monkeypatch):
    monkeypatch.setenv("MINLORA_CUDA_KERNELS", mode_name)
    monkeypatch.delenv("MINLORA_CHECK_INDICES", raising=False)
    case = make_case(300, 64, 48, [16, 1, 64, 0, 8, 3], dtype, slot_weights=[20, 1, 10, 1, 1, 5]).to("cuda")
    plan = minlora.build_plan(case.token_slot, 6)
    _all_ops(case, plan)  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _all_ops(case, plan)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.cuda
def test_cuda_bad_indices_raise_under_the_debug_switch(monkeypatch):
    monkeypatch.setenv("MINLORA_CHECK_INDICES", "1")
    case = make_case(30, 32, 16, [4, 2], slot_weights=[1, 1]).to("cuda")
    case.a_pages[0, 1] = 10_000
    with pytest.raises(ValueError, match="a_pages"):
        minlora.lora(*case.args())
    case = make_case(30, 32, 16, [4, 2]).to("cuda")
    case.token_slot[3] = 2
    with pytest.raises(ValueError, match="token_slot"):
        minlora.lora(*case.args())
    with pytest.raises(ValueError, match="token_slot"):
        minlora.build_plan(case.token_slot, 2)
    case = make_case(30, 32, 16, [4, 2], slot_weights=[1, 1], no_adapter_fraction=0).to("cuda")
    case.token_slot[:2] = 0
    plan = minlora.build_plan(case.token_slot, 2)
    with pytest.raises(ValueError, match="order"):
        minlora.lora(*case.args(), plan=_repeated_token_plan(plan))


@pytest.mark.cuda
@pytest.mark.parametrize("mode_name", ["auto", "gather", "grouped", "fallback"])
def test_cuda_out_of_range_indices_mean_no_adapter(mode_name, monkeypatch):
    """Without the debug switch nothing is checked on the host: a slot out of range, a rank
    above R and a page out of range make the rows they touch get nothing (or skip the page),
    never a fault, and the other rows are right."""
    monkeypatch.setenv("MINLORA_CUDA_KERNELS", mode_name)
    monkeypatch.delenv("MINLORA_CHECK_INDICES", raising=False)
    case = make_case(200, 64, 48, [4, 8, 2, 16], torch.float16, nan_unused=False, slot_weights=[5, 1, 2, 3])
    bad = case.token_slot.clone()
    bad[::7] = 99
    ranks = case.ranks.clone()
    ranks[1] = 1000
    dev = case.to("cuda")
    dev.token_slot, dev.ranks = bad.cuda(), ranks.cuda()
    got = minlora.lora(*dev.args())
    torch.cuda.synchronize()
    # The reference: slot 99 and the rank-1000 slot contribute nothing.
    ref_slot = bad.clone()
    ref_slot[(bad == 99) | (bad == 1)] = -1
    want = lora_forward_ref(*case.args()[:-1], ref_slot)
    assert torch.isfinite(got).all()
    assert rel_error(got, want) <= TOLERANCE[torch.float16]

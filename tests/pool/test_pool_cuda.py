"""AdapterPool on CUDA: device pages, side-stream loads overlapping compute, churn."""
from __future__ import annotations

import time

import pytest
import torch

from helpers.cases import rel_error
from helpers.pool import MODULES, adapter_bytes, assert_bit_exact, check_step_against_reference, make_adapter
from minlora.pool import AdapterPool

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_pool_matches_reference_after_churn(dtype):
    ads = {f"a{i}": make_adapter(200 + i) for i in range(24)}
    one = max(adapter_bytes(a, dtype) for a in ads.values())
    pool = AdapterPool(MODULES, dtype=dtype, device="cuda", capacity_bytes=6 * one, host_capacity_bytes=4 * one,
                       poison=True)
    for k, v in ads.items():
        pool.register(k, v if int(k[1:]) % 2 else (lambda v=v: v))
    assert pool.pool_tensor(24).device.type == "cuda"
    names = list(ads)
    for it in range(40):
        ids = [names[(it * 5 + j * 7) % len(names)] for j in range(3)] + [None]
        with pool.prepare(ids, wait=True) as step:
            assert all(step.ready)
            assert step.request_slot.device.type == "cuda"
            t = step.tables("layers.0.q")
            assert t.a_pages.device.type == "cuda" and t.scales.dtype == torch.float32
            for a in step.adapter_ids:
                assert_bit_exact(pool, a, ads[a])
            check_step_against_reference(pool, step, ids, ads, tokens_per_request=2, seed=it)
    s = pool.stats()
    assert s["evictions"] > 0 and s["bytes_host_to_fast"] > 0
    pool.check_invariants()
    pool.close()


def test_cuda_loads_overlap_compute():
    """prepare(wait=False) returns at once while the GPU is busy, and the side-stream copies
    finish while the compute stream is still running (they do not queue behind it)."""
    ads = {f"a{i}": make_adapter(300 + i, subset=False) for i in range(16)}
    pool = AdapterPool(MODULES, device="cuda", capacity_bytes=1 << 22)
    for k, v in ads.items():
        pool.register(k, v)
    ids = list(ads)
    # Warm the host tier (fetch only), then free the fast tier again.
    with pool.prepare(ids, wait=True):
        pass
    for k in ids:
        pool.unregister(k)
        pool.register(k, ads[k])
    with pool.prepare(ids[:1], wait=True):
        pass
    x = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    done = torch.cuda.Event()
    for _ in range(60):  # ~ tens of ms of matmuls on the current stream
        x = torch.tanh(x @ x * 1e-3)
    done.record()
    t0 = time.perf_counter()
    step = pool.prepare(ids[1:])  # misses: fetched by the worker, then copied on the side stream
    assert time.perf_counter() - t0 < 0.05, "prepare(wait=False) blocked"
    step.release()
    deadline = time.monotonic() + 30
    overlapped = False
    while time.monotonic() < deadline:
        step = pool.prepare(ids[1:])
        ready = all(step.ready)
        step.release()
        if ready:
            overlapped = not done.query()
            break
        time.sleep(0.001)
    assert ready, "loads never finished"
    assert overlapped, "the loads finished only after the compute stream drained (no overlap)"
    torch.cuda.synchronize()
    with pool.prepare(ids, wait=True) as step:
        check_step_against_reference(pool, step, ids, ads)
    pool.close()


def test_cuda_released_pages_reused_only_after_queued_kernels():
    """A step's kernels queued on the current stream still read its adapter's weights even if
    the adapter is evicted and its pages reused right after release."""
    ads = {f"a{i}": make_adapter(400 + i, subset=False) for i in range(8)}
    one = max(adapter_bytes(a, torch.float32) for a in ads.values())
    pool = AdapterPool(MODULES, device="cuda", capacity_bytes=2 * one, poison=True)
    for k, v in ads.items():
        pool.register(k, v)
    import minlora

    fin, fout = MODULES["layers.0.q"]
    xs = torch.randn(64, fin, device="cuda")
    busy = torch.randn(4096, 4096, device="cuda")
    outs = []
    for k in ids_cycle(list(ads), 12):
        step = pool.prepare([k], wait=True)
        for _ in range(5):
            busy = torch.tanh(busy @ busy * 1e-3)  # keep the stream busy so the op runs late
        t = step.tables("layers.0.q")
        ts, plan = step.plan(64)
        outs.append((k, minlora.ops.lora(xs, t.a_pool, t.b_pool, t.a_pages, t.b_pages, t.ranks, t.scales, ts, plan=plan)))
        step.release()  # the next prepare may evict k and load into its pages at once
    torch.cuda.synchronize()
    for k, y in outs:
        w = ads[k].modules["layers.0.q"]
        ref = w.scale * (xs.double().cpu() @ w.a.double().t()) @ w.b.double().t()
        err = rel_error(y, ref)
        assert torch.isfinite(y).all() and err < 1e-5, (k, err)
    pool.close()


def ids_cycle(ids, n):
    return [ids[i % len(ids)] for i in range(n)]

"""Adapters and step checks shared by the pool tests (tests/pool/, helpers/pool_scenarios.py)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

import minlora
from helpers.cases import TOLERANCE
from minlora.formats import Adapter, LoraWeights
from minlora.pool import AdapterPool, Step
from minlora.reference import lora_forward_ref

MODULES = {
    "layers.0.q": (24, 32),
    "layers.0.v": (24, 8),
    "layers.1.q": (24, 32),
    "layers.1.down": (40, 24),
}


def make_adapter(
    seed: int,
    modules: dict[str, tuple[int, int]] = MODULES,
    max_rank: int = 6,
    subset: bool = True,
) -> Adapter:
    """Random weights (never zeros), ranks 1..max_rank, on a random subset of the modules."""
    g = torch.Generator().manual_seed(seed)
    names = list(modules)
    if subset:
        keep = [n for n in names if torch.rand((), generator=g) < 0.7] or names[:1]
    else:
        keep = names
    mods = {}
    for n in keep:
        fin, fout = modules[n]
        r = int(torch.randint(1, max_rank + 1, (), generator=g))
        a = torch.randn(r, fin, generator=g)
        b = torch.randn(fout, r, generator=g)
        mods[n] = LoraWeights(a, b, float(torch.rand((), generator=g)) + 0.25)
    return Adapter(mods)


def check_step_against_reference(
    pool: AdapterPool,
    step: Step,
    ids: Sequence[Optional[str]],
    adapters: dict[str, Adapter],
    tokens_per_request: int = 2,
    seed: int = 0,
) -> None:
    """The op reading the step's pool pages equals the float64 reference on each request's
    dense weights (the adapter's own tensors, rounded to the pool dtype)."""
    g = torch.Generator().manual_seed(seed)
    L = tokens_per_request
    token_slot, plan = step.plan(L)
    assert token_slot.shape == (len(ids) * L,)
    for m, (fin, fout) in pool.modules.items():
        x = torch.randn(len(ids) * L, fin, generator=g).to(pool.dtype)
        t = step.tables(m)
        args = (t.a_pool, t.b_pool, t.a_pages, t.b_pages, t.ranks, t.scales, token_slot)
        y = minlora.ops.lora(x.to(pool.device), *args, plan=plan).cpu()
        # The accumulating variant (what a patched layer calls) leaves rows without an adapter
        # exactly as they were.
        base = torch.randn(len(ids) * L, fout, generator=g).to(pool.dtype)
        acc = minlora.ops.lora_add_(base.clone().to(pool.device), x.to(pool.device), *args, plan=plan).cpu()
        ref = torch.zeros(len(ids) * L, fout, dtype=torch.float64)
        mag = torch.zeros(len(ids) * L, fout, dtype=torch.float64)  # the same on |x|, |A|, |B|
        for i, a in enumerate(ids):
            if a is None or not step.ready[i]:
                continue
            w = adapters[a].modules.get(m)
            if w is None:
                continue
            xa = x[i * L : (i + 1) * L].double()
            ad = w.a.to(pool.dtype).double()
            bd = w.b.to(pool.dtype).double()
            ref[i * L : (i + 1) * L] = w.scale * (xa @ ad.t()) @ bd.t()
            mag[i * L : (i + 1) * L] = abs(w.scale) * (xa.abs() @ ad.abs().t()) @ bd.abs().t()
        assert torch.isfinite(y).all(), f"{m}: non-finite output (a poisoned page was read)"
        # Rows of requests without a usable adapter must be exactly 0.
        for i, a in enumerate(ids):
            if a is None or not step.ready[i] or m not in adapters[a].modules:
                assert (y[i * L : (i + 1) * L] == 0).all()
                assert torch.equal(acc[i * L : (i + 1) * L], base[i * L : (i + 1) * L])
        # Norm-wise relative error; the denominator is the magnitude without cancellation, so a
        # single short row whose terms cancel does not fail fp32 while a wrong page still does.
        denom = max(ref.norm().item(), mag.norm().item())
        err = (y.double() - ref).norm().item() / (denom if denom > 0 else 1.0)
        assert err <= TOLERANCE[pool.dtype], f"{m}: relative error {err} (dtype {pool.dtype})"
        # Same through the op's own float64 oracle on the step's tables.
        ref2 = lora_forward_ref(x, t.a_pool, t.b_pool, t.a_pages, t.b_pages, t.ranks, t.scales, token_slot)
        assert torch.allclose(ref2, ref, rtol=1e-6, atol=1e-6)  # scales are float32 in the tables


def assert_bit_exact(pool: AdapterPool, adapter_id: str, adapter: Adapter) -> None:
    """The fast tier's pages hold exactly the adapter's weights in the pool dtype."""
    got = pool.read_adapter(adapter_id)
    want = {n: w for n, w in adapter.modules.items() if w.rank > 0}
    assert set(got) == set(want), (sorted(got), sorted(want))
    for n, w in want.items():
        assert torch.equal(got[n].a, w.a.to(pool.dtype)), f"{adapter_id}/{n}: A differs"
        assert torch.equal(got[n].b, w.b.to(pool.dtype)), f"{adapter_id}/{n}: B differs"
        assert got[n].scale == w.scale


def adapter_bytes(adapter: Adapter, dtype: torch.dtype) -> int:
    es = torch.empty((), dtype=dtype).element_size()
    return sum(w.rank * (w.in_features + w.out_features) * es for w in adapter.modules.values())

"""AdapterPool(optimizer_state=True): trainable adapters' weights and float32 companion state
(gradient accumulator, Adam moments) change in the fast tier, move with the adapter through the
tiers (evicted to the host tier, spilled to disk, reloaded) bit for bit, and are never reloaded
from a stale copy."""
from __future__ import annotations

import os

import pytest
import torch

from minlora.formats import AdapterState
from minlora.pool import AdapterPool
from minlora.pool.layout import STATE_KINDS
from helpers.pool import MODULES, adapter_bytes, make_adapter


def random_state(adapter, seed, kinds=STATE_KINDS):
    g = torch.Generator().manual_seed(seed)
    return AdapterState(
        {
            n: {k: (torch.randn(w.a.shape, generator=g), torch.randn(w.b.shape, generator=g)) for k in kinds}
            for n, w in adapter.modules.items()
        }
    )


def train_in_place(pool, ids, seed):
    """What an optimizer does: change every page of the adapters and of their state, in place."""
    g = torch.Generator().manual_seed(seed)
    with pool.prepare(ids, wait=True) as step:
        for d, (pages, _) in step.slot_pages().items():
            w = pool.pool_tensor(d)
            w[pages] += torch.randn(pages.shape[0], d, generator=g)
            for kind in STATE_KINDS:
                s = pool.state_tensor(kind, d)
                s[pages] = s[pages] * 0.5 + torch.randn(pages.shape[0], d, generator=g)


def read(pool, a):
    with pool.prepare([a], wait=True):
        return pool.read_adapter(a), pool.read_state(a)


def assert_same(got, want):
    (gw, gs), (ww, ws) = got, want
    assert set(gw) == set(ww) and set(gs.modules) == set(ws.modules)
    for n in ww:
        assert torch.equal(gw[n].a, ww[n].a) and torch.equal(gw[n].b, ww[n].b), n
        assert gw[n].scale == ww[n].scale
        for k in STATE_KINDS:
            assert torch.equal(gs.modules[n][k][0], ws.modules[n][k][0]), (n, k)
            assert torch.equal(gs.modules[n][k][1], ws.modules[n][k][1]), (n, k)


TIERS = {
    "host": dict(host_capacity_bytes=None),  # evicted copies stay in the host tier
    "host+disk": dict(host_capacity_bytes="one"),  # the host tier holds one: the rest spill
    "disk": dict(host_capacity_bytes=0),  # no host tier: eviction spills at once
    "memory": dict(host_capacity_bytes=0, disk_dir=None),  # nowhere to spill: kept in memory
}


@pytest.mark.parametrize("tiers", list(TIERS))
def test_state_moves_with_the_adapter_bit_exact(tmp_path, tiers):
    ads = {f"t{i}": make_adapter(10 + i, subset=False) for i in range(6)}
    one = max(adapter_bytes(a, torch.float32) for a in ads.values())
    kw = dict(TIERS[tiers])
    if kw.get("host_capacity_bytes") == "one":
        kw["host_capacity_bytes"] = 4 * one  # weights + three float32 companions of one adapter
    kw.setdefault("disk_dir", str(tmp_path / "spill"))
    pool = AdapterPool(MODULES, capacity_bytes=2 * one, optimizer_state=True, poison=True, **kw)
    for i, (a, ad) in enumerate(ads.items()):
        pool.register(a, ad, trainable=True, state=random_state(ad, i) if i % 2 else None)
    want = {}
    for rnd in range(3):  # each round trains every adapter; only two fit: constant eviction
        for i, a in enumerate(ads):
            if rnd:
                assert_same(read(pool, a), want[a])  # what the last round left
            train_in_place(pool, [a], seed=100 * rnd + i)
            want[a] = read(pool, a)
            pool.check_invariants()
    s = pool.stats()
    assert s["evictions"] > 0 and s["trainable"] == len(ads)
    if tiers in ("host+disk", "disk"):
        assert s["spills"] > 0 and "disk" in {pool.residency(a) for a in ads}
    if tiers == "memory":
        assert s["spills"] == 0
    for a in ads:
        assert_same(read(pool, a), want[a])
    for a in ads:
        pool.unregister(a)
    spill = tmp_path / "spill"
    assert not spill.exists() or os.listdir(spill) == []  # spill files (and state files) go with them
    pool.check_invariants()


def test_fresh_state_is_zero_and_as_small_as_the_adapter():
    ad = make_adapter(3, subset=False, max_rank=1)  # rank 1 on every module
    pool = AdapterPool(MODULES, capacity_bytes=1 << 16, optimizer_state=True, poison=True)
    pool.register("r1", ad, trainable=True)
    with pool.prepare(["r1"], wait=True) as step:
        pages = step.slot_pages()
        # One page per module per factor: the state is exactly the adapter's pages.
        assert sum(p.numel() for p, _ in pages.values()) == 2 * len(ad.modules)
        st = pool.read_state("r1")
    for n, w in ad.modules.items():
        for k in STATE_KINDS:
            a, b = st.modules[n][k]
            assert a.shape == w.a.shape and b.shape == w.b.shape
            assert not a.any() and not b.any()  # zero (the arena was NaN-poisoned)
    assert pool.stats()["state_bytes"] == 3 * pool.pool_tensor(24).untyped_storage().nbytes()


def test_partial_state_kinds_are_zero_filled():
    ad = make_adapter(4, subset=False)
    pool = AdapterPool(MODULES, capacity_bytes=1 << 16, optimizer_state=True, poison=True)
    given = random_state(ad, 1, kinds=("exp_avg",))
    pool.register("a", ad, trainable=True, state=given)
    _, st = read(pool, "a")
    for n in ad.modules:
        assert torch.equal(st.modules[n]["exp_avg"][0], given.modules[n]["exp_avg"][0])
        assert torch.equal(st.modules[n]["exp_avg"][1], given.modules[n]["exp_avg"][1])
        assert not st.modules[n]["exp_avg_sq"][0].any() and not st.modules[n]["grad"][1].any()


def test_trainable_registration_errors(tmp_path):
    ad = make_adapter(5, subset=False)
    plain = AdapterPool(MODULES, capacity_bytes=1 << 16)
    with pytest.raises(ValueError, match="optimizer_state"):
        plain.register("a", ad, trainable=True)
    with pytest.raises(ValueError, match="no optimizer state"):
        plain.state_tensor("grad", 24)
    pool = AdapterPool(MODULES, capacity_bytes=1 << 16, optimizer_state=True)
    with pytest.raises(TypeError, match="source must be an Adapter"):
        pool.register("a", str(tmp_path), trainable=True)
    with pytest.raises(ValueError, match="trainable=True"):
        pool.register("a", ad, state=random_state(ad, 0))
    n0 = next(iter(ad.modules))
    bad = random_state(ad, 0)
    bad.modules[n0]["exp_avg"] = (torch.zeros(1, 1), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="exp_avg"):
        pool.register("a", ad, trainable=True, state=bad)
    odd = AdapterState({n0: {"momentum": (torch.zeros_like(ad.modules[n0].a), torch.zeros_like(ad.modules[n0].b))}})
    with pytest.raises(ValueError, match="momentum"):
        pool.register("a", ad, trainable=True, state=odd)
    stranger = AdapterState({"nope": {"grad": (torch.zeros(1, 24), torch.zeros(32, 1))}})
    with pytest.raises(ValueError, match="nope"):
        pool.register("a", ad, trainable=True, state=stranger)
    half = AdapterState({n0: {"grad": (ad.modules[n0].a.half(), ad.modules[n0].b.half())}})
    with pytest.raises(ValueError, match="float32"):
        pool.register("a", ad, trainable=True, state=half)
    with pytest.raises(ValueError, match="kind"):
        pool.state_tensor("momentum", 24)
    assert "a" not in pool and len(pool) == 0  # nothing was registered
    pool.register("a", ad)  # not trainable
    with pool.prepare(["a"], wait=True):
        with pytest.raises(ValueError, match="not trainable"):
            pool.read_state("a")
    with pytest.raises(ValueError, match="optimizer_state must be a bool"):
        AdapterPool(MODULES, capacity_bytes=1 << 16, optimizer_state=1)


def test_trainable_and_plain_adapters_share_a_pool(tmp_path):
    """Plain adapters keep the plain tier behaviour (reload from their source) next to
    trainable ones that are written back."""
    ads = {f"p{i}": make_adapter(20 + i, subset=False) for i in range(3)}
    tr = {f"t{i}": make_adapter(30 + i, subset=False) for i in range(3)}
    one = max(adapter_bytes(a, torch.float32) for a in [*ads.values(), *tr.values()])
    pool = AdapterPool(MODULES, capacity_bytes=2 * one, host_capacity_bytes=0, optimizer_state=True,
                       disk_dir=str(tmp_path))
    for a, ad in ads.items():
        pool.register(a, ad)
    for a, ad in tr.items():
        pool.register(a, ad, trainable=True)
    want = {}
    for rnd in range(2):
        for i, a in enumerate(list(ads) + list(tr)):
            with pool.prepare([a], wait=True):
                got = pool.read_adapter(a)
            if a in ads:
                for n, w in ads[a].modules.items():
                    assert torch.equal(got[n].a, w.a) and torch.equal(got[n].b, w.b)
            else:
                if rnd:
                    assert_same(read(pool, a), want[a])
                train_in_place(pool, [a], seed=10 * rnd + i)
                want[a] = read(pool, a)
    pool.check_invariants()
    assert pool.snapshot().trainable == frozenset(tr)

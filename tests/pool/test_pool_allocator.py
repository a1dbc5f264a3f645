"""The C++ page allocator (minlora._C.PageAllocator): accounting, sharing, plans, threads."""
from __future__ import annotations

import random
import threading

import pytest
import torch
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from minlora import _C


def pages(*xs: int) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.int32)


def snapshot(a) -> tuple:
    return (
        a.free_chunks(),
        a.used_bytes(),
        tuple(tuple(sorted(a.pool_info(p).items())) for p in range(a.num_pools)),
        tuple(tuple(a.used_pages(p).tolist()) for p in range(a.num_pools)),
    )


def byte_ranges(a) -> list[tuple[int, int]]:
    out = []
    for p in range(a.num_pools):
        rb = a.pool_info(p)["row_bytes"]
        out += [(q * rb, (q + 1) * rb) for q in a.used_pages(p).tolist()]
    return sorted(out)


def assert_disjoint(a) -> None:
    """No byte of the arena belongs to two allocated pages (of any pools)."""
    r = byte_ranges(a)
    for (s0, e0), (s1, e1) in zip(r, r[1:]):
        assert e0 <= s1, f"pages overlap: [{s0},{e0}) and [{s1},{e1})"
    if r:
        assert r[-1][1] <= a.arena_bytes


def test_basic_alloc_free_and_sharing():
    a = _C.PageAllocator(16 * 4096, 4096)
    p1, p2 = a.add_pool(1024), a.add_pool(1000)
    got = a.alloc([(p1, 5), (p2, 3)])
    assert [g.dtype for g in got] == [torch.int32, torch.int32]
    assert [g.numel() for g in got] == [5, 3]
    assert a.used_bytes() == 5 * 1024 + 3 * 1000
    a.check_invariants()
    assert_disjoint(a)
    # Fill the whole budget with pool 1, free it, then pool 2 can use all of it: one budget.
    a.free(p1, got[0])
    a.free(p2, got[1])
    assert a.free_chunks() == 16 and a.used_bytes() == 0
    full = a.alloc([(p1, 64)])
    assert full is not None and a.free_chunks() == 0
    assert a.alloc([(p2, 1)]) is None
    a.free(p1, full[0])
    # Rows of 1000 bytes lying wholly inside each 4096-byte chunk (3 or 4 of them).
    fit = sum((k + 1) * 4096 // 1000 - -(-k * 4096 // 1000) for k in range(16))
    assert a.alloc([(p2, fit + 1)]) is None
    big = a.alloc([(p2, fit)])
    assert big is not None and a.free_chunks() == 0
    a.check_invariants()


def test_exhaustion_changes_nothing():
    a = _C.PageAllocator(8 * 2048, 2048)
    p1, p2 = a.add_pool(512), a.add_pool(256)
    a.alloc([(p1, 9), (p2, 3)])
    before = snapshot(a)
    assert a.alloc([(p1, 4), (p2, 1000)]) is None
    assert snapshot(a) == before
    a.check_invariants()


def test_bad_calls_raise_and_change_nothing():
    a = _C.PageAllocator(4 * 4096, 4096)
    p = a.add_pool(1024)
    got = a.alloc([(p, 3)])[0]
    before = snapshot(a)
    with pytest.raises(ValueError, match="not allocated"):
        a.free(p, pages(got[0].item(), 15))
    with pytest.raises(ValueError, match="twice"):
        a.free(p, pages(got[0].item(), got[0].item()))
    with pytest.raises(ValueError, match="outside"):
        a.free(p, pages(99))
    with pytest.raises(ValueError, match="unknown pool"):
        a.free(7, pages(0))
    with pytest.raises(ValueError, match="negative"):
        a.alloc([(p, -1)])
    with pytest.raises(ValueError, match="unknown pool"):
        a.alloc([(3, 1)])
    with pytest.raises(ValueError, match="int32"):
        a.free(p, torch.tensor([0], dtype=torch.int64))
    with pytest.raises(ValueError, match="not allocated"):
        a.plan_evictions([(p, 100)], [[(p, pages(3))]])
    assert snapshot(a) == before
    with pytest.raises(ValueError, match="row_bytes"):
        a.add_pool(3000)  # neither divides 4096 nor fits twice
    with pytest.raises(ValueError, match="multiple"):
        _C.PageAllocator(5000, 4096)
    with pytest.raises(ValueError):
        _C.PageAllocator(4096, 0)


def test_zero_pages_and_empty_requests():
    a = _C.PageAllocator(4096, 4096)
    p = a.add_pool(64)
    got = a.alloc([(p, 0)])
    assert got[0].numel() == 0
    assert a.alloc([]) == []
    a.free(p, pages())
    assert a.plan_evictions([], []) == 0


class AllocatorMachine(RuleBasedStateMachine):
    """Random alloc / free / plan sequences against a model of who owns which pages."""

    def __init__(self) -> None:
        super().__init__()
        self.chunk = 2048
        self.rows = [512, 256, 768, 2048]
        self.a = _C.PageAllocator(12 * self.chunk, self.chunk)
        self.log: list[tuple] = []
        for rb in self.rows:
            self.a.add_pool(rb)
        self.owned: list[tuple[int, torch.Tensor]] = []  # allocations alive: (pool, pages)

    def replay(self):
        b = _C.PageAllocator(12 * self.chunk, self.chunk)
        for rb in self.rows:
            b.add_pool(rb)
        for op in self.log:
            if op[0] == "alloc":
                b.alloc(op[1])
            else:
                b.free(op[1], op[2])
        return b

    @rule(reqs=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 12)), min_size=1, max_size=4))
    def alloc(self, reqs):
        before = snapshot(self.a)
        got = self.a.alloc(reqs)
        if got is None:
            assert snapshot(self.a) == before
            return
        self.log.append(("alloc", reqs))
        for (p, n), g in zip(reqs, got):
            assert g.numel() == n
            self.owned.append((p, g))

    @precondition(lambda self: self.owned)
    @rule(data=st.data())
    def free(self, data):
        i = data.draw(st.integers(0, len(self.owned) - 1))
        p, g = self.owned.pop(i)
        self.a.free(p, g)
        self.log.append(("free", p, g))

    @precondition(lambda self: self.owned)
    @rule(reqs=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 20)), min_size=1, max_size=3), data=st.data())
    def plan(self, reqs, data):
        order = data.draw(st.permutations(range(len(self.owned))))
        cands = [[self.owned[i]] for i in order]
        before = snapshot(self.a)
        k = self.a.plan_evictions(reqs, cands)
        assert snapshot(self.a) == before
        # Check k against a replayed copy: freeing k candidates makes it fit, k - 1 do not.
        b = self.replay()
        if k < 0:
            for (p, g), in cands:
                b.free(p, g)
            assert b.alloc(reqs) is None
            return
        for (p, g), in cands[: max(k - 1, 0)]:
            b.free(p, g)
        if k > 0:
            assert b.alloc(reqs) is None
            (p, g), = cands[k - 1]
            b.free(p, g)
        assert b.alloc(reqs) is not None
        b.check_invariants()

    @invariant()
    def consistent(self):
        self.a.check_invariants()
        assert_disjoint(self.a)
        model = {}
        for p, g in self.owned:
            model.setdefault(p, []).extend(g.tolist())
        for p in range(len(self.rows)):
            assert self.a.used_pages(p).tolist() == sorted(model.get(p, [])), "leak or double ownership"
        assert self.a.used_bytes() == sum(self.rows[p] * g.numel() for p, g in self.owned)


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


def test_threads_alloc_free():
    a = _C.PageAllocator(64 * 4096, 4096)
    pools = [a.add_pool(rb) for rb in (512, 1024, 2048, 1536)]
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        mine = []
        try:
            for _ in range(400):
                if mine and rng.random() < 0.5:
                    p, g = mine.pop(rng.randrange(len(mine)))
                    a.free(p, g)
                else:
                    p = rng.choice(pools)
                    got = a.alloc([(p, rng.randint(1, 6))])
                    if got is not None:
                        mine.append((p, got[0]))
            for p, g in mine:
                a.free(p, g)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()
    assert not errors, errors
    a.check_invariants()
    assert a.used_bytes() == 0 and a.free_chunks() == 64

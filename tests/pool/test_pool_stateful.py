"""AdapterPool invariants under random operation sequences (hypothesis) and real threads."""
from __future__ import annotations

import random
import threading
import time

import torch
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from minlora.formats import Adapter
from minlora.pool import AdapterPool, PoolExhaustedError
from helpers.pool import MODULES, assert_bit_exact, check_step_against_reference, make_adapter


def fast_snapshot(pool: AdapterPool) -> tuple:
    """What a refused prepare must leave as it was: fast-tier pages, references, LRU order."""
    snap = pool.snapshot()
    return (
        tuple(sorted((a, r.ready, r.refs) for a, r in snap.residents.items())),
        snap.used_pages,
        snap.lru,
        tuple(sorted(snap.pinned)),
        pool.stats()["steps_in_flight"],
    )


# Totals over all examples, to see that the machine reaches evictions and exhaustion.
COVERAGE = dict.fromkeys(("evictions", "host_evictions", "promotions", "exhausted"), 0)


class PoolMachine(RuleBasedStateMachine):
    """Registers, prepares (waiting or not), releases, pins, unpins and unregisters at random
    on a fast tier that holds only a few adapters, checking after every step that no page is
    owned twice or leaked, that referenced and pinned adapters stay, that every resident
    adapter reads back bit-exact, and that the op on the step's tables equals the reference."""

    dtype = torch.float32

    def __init__(self) -> None:
        super().__init__()
        self.pool = AdapterPool(
            MODULES, dtype=self.dtype, capacity_bytes=8_000, host_capacity_bytes=6_000, max_slots=6, poison=True
        )
        self.adapters: dict[str, Adapter] = {}
        self.steps: list[tuple[object, list]] = []
        self.kept_pinned: set[str] = set()  # pinned and seen resident: must stay resident
        self.in_memory: set[str] = set()  # registered with an Adapter (not a loader): sizes known
        self.n = 0

    @initialize(seeds=st.lists(st.integers(0, 10_000), min_size=3, max_size=8))
    def start(self, seeds):
        for seed in seeds:
            self.register(seed, lazy=seed % 2 == 0)

    def teardown(self) -> None:
        for s, _ in self.steps:
            s.release()
        for k in COVERAGE:
            COVERAGE[k] += self.pool.stats()[k] if k in self.pool.stats() else 0
        self.pool.check_invariants()
        self.pool.close()

    def referenced(self) -> set[str]:
        return {a for s, _ in self.steps for a in s.adapter_ids}

    @rule(seed=st.integers(0, 10_000), lazy=st.booleans())
    def register(self, seed, lazy):
        aid = f"ad{self.n}"
        self.n += 1
        ad = make_adapter(seed)
        self.adapters[aid] = ad
        self.pool.register(aid, (lambda ad=ad: ad) if lazy else ad)
        if not lazy:
            self.in_memory.add(aid)
        assert self.pool.residency(aid) == "disk"

    @precondition(lambda self: self.adapters)
    @rule(data=st.data())
    def unregister(self, data):
        aid = data.draw(st.sampled_from(sorted(self.adapters)))
        self.settle()
        if aid in self.referenced():
            try:
                self.pool.unregister(aid)
            except ValueError:
                return
            raise AssertionError("unregister of a referenced adapter must be refused")
        self.pool.unregister(aid)
        del self.adapters[aid]
        self.kept_pinned.discard(aid)
        self.in_memory.discard(aid)
        assert self.pool.residency(aid) == "unregistered"

    @precondition(lambda self: self.adapters)
    @rule(data=st.data(), wait=st.booleans())
    def prepare(self, data, wait):
        names = sorted(self.adapters)
        ids = data.draw(st.lists(st.one_of(st.none(), st.sampled_from(names)), min_size=0, max_size=6))
        distinct = {a for a in ids if a is not None}
        self.settle()
        before = fast_snapshot(self.pool)
        residency = {a: self.pool.residency(a) for a in self.adapters}
        try:
            step = self.pool.prepare(ids, wait=wait)
        except PoolExhaustedError:
            COVERAGE["exhausted"] += 1
            assert fast_snapshot(self.pool) == before, "a refused prepare changed the fast tier"
            # The pool has no disk_dir, so a source registered as an Adapter stays one.
            if wait and distinct <= self.in_memory:
                assert {a: self.pool.residency(a) for a in self.adapters} == residency
            return
        except ValueError as e:  # more distinct adapters than max_slots
            assert len(distinct) > self.pool.max_slots, e
            return
        if wait:
            assert all(step.ready)
        for i, a in enumerate(ids):
            assert step.ready[i] == (a is None or a in step.adapter_ids)
        check_step_against_reference(self.pool, step, ids, self.adapters, tokens_per_request=1, seed=len(self.steps))
        self.steps.append((step, ids))

    @precondition(lambda self: self.steps)
    @rule(data=st.data())
    def release(self, data):
        i = data.draw(st.integers(0, len(self.steps) - 1))
        step, ids = self.steps.pop(i)
        # Still valid until released: recheck after whatever happened since.
        check_step_against_reference(self.pool, step, ids, self.adapters, tokens_per_request=2, seed=i)
        step.release()
        step.release()

    @precondition(lambda self: self.adapters)
    @rule(data=st.data())
    def pin(self, data):
        aid = data.draw(st.sampled_from(sorted(self.adapters)))
        self.pool.pin(aid)

    @precondition(lambda self: self.pool.snapshot().pinned)
    @rule(data=st.data())
    def unpin(self, data):
        aid = data.draw(st.sampled_from(sorted(self.pool.snapshot().pinned)))
        self.pool.unpin(aid)
        self.kept_pinned.discard(aid)

    def settle(self):
        """Lets the asynchronous loads finish, so what the machine draws next does not depend
        on timing (hypothesis replays examples; concurrency is the threads test's job)."""
        end = time.monotonic() + 10
        while (self.pool.stats()["loading"] or self.pool.stats()["fetching"]) and time.monotonic() < end:
            time.sleep(0.0005)

    @invariant()
    def invariants(self):
        pool = self.pool
        pool.check_invariants()
        for a in self.referenced():
            assert pool.residency(a) == "gpu", f"{a} is referenced by a step but was evicted"
        for a in self.kept_pinned:
            assert pool.residency(a) == "gpu", f"{a} is pinned but was evicted"
        for a in pool.snapshot().pinned:
            if pool.residency(a) == "gpu":
                self.kept_pinned.add(a)
        for a, ad in self.adapters.items():
            if pool.residency(a) == "gpu":
                assert_bit_exact(pool, a, ad)
        assert pool.stats()["steps_in_flight"] == len(self.steps)


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


class PoolMachineBF16(PoolMachine):
    dtype = torch.bfloat16


TestPoolMachineBF16 = PoolMachineBF16.TestCase
TestPoolMachineBF16.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def test_threads_register_prepare_release():
    """Real threads registering, preparing (waiting or not), checking and releasing at once."""
    pool = AdapterPool(MODULES, capacity_bytes=60_000, host_capacity_bytes=30_000, max_slots=8, poison=True)
    shared = {f"s{i}": make_adapter(1000 + i) for i in range(6)}
    for k, v in shared.items():
        pool.register(k, v)
    errors: list[BaseException] = []
    exhausted = [0]

    def work(t: int) -> None:
        rng = random.Random(t)
        mine: dict[str, Adapter] = {}
        try:
            for it in range(60):
                aid = f"t{t}_{it}"
                ad = make_adapter(t * 100 + it)
                mine[aid] = ad
                pool.register(aid, ad if it % 2 else (lambda ad=ad: ad))
                known = {**shared, **mine}
                ids = [rng.choice(list(known)) if rng.random() < 0.85 else None for _ in range(rng.randint(1, 5))]
                try:
                    step = pool.prepare(ids, wait=rng.random() < 0.7)
                except PoolExhaustedError:
                    exhausted[0] += 1
                    continue
                try:
                    for a in step.adapter_ids:
                        assert_bit_exact(pool, a, known[a])
                    if it % 5 == 0:
                        check_step_against_reference(pool, step, ids, known, seed=it)
                    time.sleep(rng.random() * 0.002)
                finally:
                    step.release()
                if len(mine) > 4:
                    victim = rng.choice(sorted(mine))
                    pool.unregister(victim)
                    del mine[victim]
        except BaseException as e:  # surfaced by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
        assert not th.is_alive(), "a thread hung"
    assert not errors, errors
    pool.check_invariants()
    s = pool.stats()
    assert s["steps_in_flight"] == 0
    assert s["steps"] + exhausted[0] == 4 * 60
    pool.close()

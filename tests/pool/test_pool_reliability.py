"""AdapterPool under slow and hostile sources, shared spill directories, broken disks,
misused steps and bad arguments.  Scenarios that could hang or exhaust memory run in their own
process (helpers/pool_scenarios.py) under a timeout and a memory cap."""
from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys

import pytest
import torch

from minlora.pool import AdapterPool
from helpers import pythonpath
from helpers.pool import (
    MODULES,
    adapter_bytes,
    assert_bit_exact,
    check_step_against_reference,
    make_adapter,
)



def run_scenario(name: str, tmp_path, timeout: float = 120) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = pythonpath()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "helpers.pool_scenarios", name, str(tmp_path)],
            capture_output=True, text=True, timeout=timeout, env=env,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"scenario {name} hung (killed after {timeout} s):\n{exc.stdout}\n{exc.stderr}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), f"scenario {name}:\n{out}"


# ------------------------------------------------------------------ slow sources


def test_stuck_load_does_not_freeze_the_pool(tmp_path):
    run_scenario("stuck_load_does_not_freeze", tmp_path)


def test_prepare_wait_times_out_and_changes_nothing(tmp_path):
    run_scenario("prepare_timeout", tmp_path)


def test_stuck_load_does_not_queue_other_loads(tmp_path):
    run_scenario("stuck_load_does_not_queue_others", tmp_path)


def test_close_returns_with_a_stuck_loader(tmp_path):
    run_scenario("close_with_stuck_loader", tmp_path)


def test_exit_while_a_load_finishes_does_not_abort(tmp_path):
    run_scenario("exit_while_a_load_finishes", tmp_path)


def test_prepare_timeout_argument_is_checked():
    pool = AdapterPool(MODULES, capacity_bytes=40_000)
    pool.register("a", make_adapter(1))
    for bad in (-1, float("nan"), "1", True):
        with pytest.raises(ValueError, match="timeout"):
            pool.prepare(["a"], wait=True, timeout=bad)
    with pytest.raises(ValueError, match="wait=True"):
        pool.prepare(["a"], timeout=1.0)
    with pool.prepare(["a"], wait=True, timeout=30) as step:
        assert step.ready == [True]


# ------------------------------------------------------------------ hostile files


def test_file_declaring_huge_tensors_is_refused_from_its_header(tmp_path):
    run_scenario("huge_declared_tensors", tmp_path)


# ------------------------------------------------------------------ spill files


def _spilling_pool(disk_dir, ads: dict, callables: bool = True) -> AdapterPool:
    one = max(adapter_bytes(a, torch.float32) for a in ads.values())
    pool = AdapterPool(
        MODULES, capacity_bytes=2 * one, host_capacity_bytes=one, disk_dir=disk_dir, poison=True
    )
    for k, v in ads.items():
        pool.register(k, (lambda v=v: v) if callables else v)
    return pool


def _cycle(pool: AdapterPool, ads: dict, rounds: int = 2) -> None:
    """Every adapter through the fast tier `rounds` times (more than fit: host evictions spill)."""
    for _ in range(rounds):
        for k in ads:
            with pool.prepare([k], wait=True) as step:
                assert_bit_exact(pool, k, ads[k])
                check_step_against_reference(pool, step, [k], ads)


def test_pools_sharing_a_disk_dir_keep_their_own_spills(tmp_path):
    spill = tmp_path / "spill"
    mine = {f"a{i}": make_adapter(500 + i, subset=False) for i in range(6)}
    theirs = {f"a{i}": make_adapter(600 + i, subset=False) for i in range(6)}  # the same ids
    p1, p2 = _spilling_pool(spill, mine, callables=False), _spilling_pool(spill, theirs, callables=False)
    _cycle(p1, mine)
    _cycle(p2, theirs)
    assert p1.stats()["spills"] > 0 and p2.stats()["spills"] > 0
    _cycle(p1, mine)  # p1 reads back its own spills, not p2's
    for k in mine:
        p1.unregister(k)  # deletes p1's spill files only
    _cycle(p2, theirs)
    p2.check_invariants()
    p1.close()
    _cycle(p2, theirs)
    files = [f for _, _, fs in os.walk(spill) for f in fs]
    assert files, "p2's spill files are gone"
    p2.close()
    assert [f for _, _, fs in os.walk(spill) for f in fs] == []


@pytest.mark.parametrize("callables", [True, False])
def test_unusable_disk_dir_does_not_break_prepare(tmp_path, callables):
    """With disk_dir replaced by a file, spills fail: prepare does not raise OSError, the
    failures are counted, and every adapter still reloads bit-exact from its source."""
    spill = tmp_path / "spill"
    ads = {f"a{i}": make_adapter(700 + i, subset=False) for i in range(6)}
    pool = _spilling_pool(spill, ads, callables=callables)
    if callables:
        # Some spill files are written, then lost with the directory: their loaders stand in.
        _cycle(pool, {k: ads[k] for k in ("a0", "a1", "a2", "a3")}, rounds=1)
        assert pool.stats()["spills"] > 0
    shutil.rmtree(spill)
    spill.write_text("not a directory")
    _cycle(pool, ads)
    s = pool.stats()
    assert s["spill_errors"] > 0 and s["host_evictions"] > 0
    pool.check_invariants()


# ------------------------------------------------------------------ steps


def test_released_step_refuses_tables_and_plan():
    pool = AdapterPool(MODULES, capacity_bytes=40_000, poison=True)
    pool.register("a", make_adapter(1))
    step = pool.prepare(["a", None], wait=True)
    step.tables("layers.0.q")  # cached before release
    step.plan(2)
    step.release()
    for use in (lambda: step.tables("layers.0.q"), lambda: step.tables("layers.0.v"), lambda: step.plan(2),
                lambda: step.plan(1)):
        with pytest.raises(RuntimeError, match="released"):
            use()
    assert step.released and step.adapter_ids == ["a"] and step.ready == [True, True] and step.num_slots == 1


def test_dropped_step_gives_its_references_back():
    pool = AdapterPool(MODULES, capacity_bytes=40_000, poison=True)
    pool.register("a", make_adapter(1))
    pool.register("b", make_adapter(2))
    step = pool.prepare(["a", "b"], wait=True)
    assert pool.snapshot().residents["a"].refs == 1
    del step
    gc.collect()
    snap = pool.snapshot()
    assert snap.steps_in_flight == 0 and snap.residents["a"].refs == 0 and snap.residents["b"].refs == 0
    assert set(snap.lru) == {"a", "b"}
    pool.check_invariants()
    pool.unregister("a")  # no longer "used by an unreleased step"
    with pool.prepare(["b"], wait=True) as s2:
        assert s2.ready == [True]
    assert pool.stats()["steps_in_flight"] == 0


# ------------------------------------------------------------------ constructor arguments

BAD_ARGUMENTS = [
    ("chunk_bytes", 0), ("chunk_bytes", -4096), ("chunk_bytes", 4096.0), ("chunk_bytes", "4096"),
    ("chunk_bytes", True), ("load_workers", 0), ("load_workers", -1), ("load_workers", 1.5),
    ("load_workers", True), ("capacity_bytes", True), ("capacity_bytes", 1e6), ("max_slots", True),
    ("max_slots", -1), ("host_capacity_bytes", -1), ("host_capacity_bytes", 1.0), ("poison", "yes"),
    ("disk_dir", 5), ("device", 3), ("device", "not-a-device"),
]


@pytest.mark.parametrize("name,value", BAD_ARGUMENTS)
def test_bad_constructor_arguments_name_the_argument(name, value):
    kw = {"capacity_bytes": 1 << 16, name: value}
    with pytest.raises(ValueError, match=name):
        AdapterPool(MODULES, **kw)

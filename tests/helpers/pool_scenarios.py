"""Pool scenarios that can hang or blow up memory when the pool is wrong; each runs in its
own process (started by tests/pool/test_pool_reliability.py, under a timeout and a memory cap).

    PYTHONPATH=.:tests python -m helpers.pool_scenarios NAME TMPDIR [EXTRA_MEMORY_BYTES]

prints "ok" and exits 0 when the scenario holds; anything else is a failure.
"""
from __future__ import annotations

import json
import os
import resource
import struct
import sys
import threading
import time
import traceback

import torch  # noqa: F401  (loaded before the memory cap is set)

from minlora.pool import AdapterLoadError, AdapterPool
from helpers.pool import MODULES, assert_bit_exact, make_adapter

PROMPT_S = 30.0  # generous: a call that takes this long while a load is stuck is frozen


def promptly(fn, what: str):
    """fn() on a daemon thread; fails if it has not returned within PROMPT_S."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(PROMPT_S)
    assert not t.is_alive(), f"{what} did not return while a load was stuck"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def stuck_source(gate: threading.Event, entered: threading.Event, seed: int):
    def load():
        entered.set()
        gate.wait()
        return make_adapter(seed)

    return load


def pool_with_stuck_source() -> tuple[AdapterPool, threading.Event, threading.Event]:
    """A pool with "ok" (ready in the fast tier) and "stuck" (a loader that sets `entered`,
    then blocks until `gate` is set): (pool, gate, entered)."""
    gate, entered = threading.Event(), threading.Event()
    pool = AdapterPool(MODULES, capacity_bytes=40_000, poison=True)
    pool.register("ok", make_adapter(2))
    pool.register("stuck", stuck_source(gate, entered, 1))
    with pool.prepare(["ok"], wait=True):
        pass
    return pool, gate, entered


def scenario_stuck_load_does_not_freeze(tmp: str) -> None:
    """While prepare(wait=True) waits for a source that blocks, other threads' residency,
    stats, prepare of a ready adapter and Step.release return."""
    pool, gate, entered = pool_with_stuck_source()
    waiter = threading.Thread(target=lambda: pool.prepare(["stuck"], wait=True).release(), daemon=True)
    waiter.start()
    try:
        assert entered.wait(PROMPT_S), "the stuck source was never called"
        assert promptly(lambda: pool.residency("stuck"), "residency") in ("disk", "host")
        assert promptly(pool.stats, "stats")["registered"] == 2
        step = promptly(lambda: pool.prepare(["ok"], wait=True), "prepare of a ready adapter")
        assert step.ready == [True]
        assert_bit_exact(pool, "ok", make_adapter(2))
        promptly(step.release, "Step.release")
    finally:
        gate.set()
    waiter.join(PROMPT_S)
    assert not waiter.is_alive()
    assert pool.residency("stuck") == "gpu"
    pool.check_invariants()


def scenario_prepare_timeout(tmp: str) -> None:
    """prepare(wait=True, timeout=...) gives up on a stuck source with a TimeoutError naming
    it, and changes nothing: no reference, no step, the ready adapter untouched."""
    from minlora.pool import LoadTimeoutError

    pool, gate, entered = pool_with_stuck_source()
    before = pool.snapshot()
    try:
        try:
            promptly(
                lambda: pool.prepare(["ok", "stuck", None], wait=True, timeout=0.2), "prepare with a timeout"
            )
        except LoadTimeoutError as exc:
            assert isinstance(exc, TimeoutError)
            assert exc.adapter_ids == ["stuck"] and "'stuck'" in str(exc), exc
        else:
            raise AssertionError("prepare(wait=True, timeout=0.2) returned with a source stuck")
        after = pool.snapshot()
        assert after.residents == before.residents and after.lru == before.lru, (before, after)
        assert after.used_pages == before.used_pages and after.steps_in_flight == 0
        assert after.fetching == frozenset({"stuck"})
        pool.check_invariants()
    finally:
        gate.set()
    with pool.prepare(["stuck", "ok"], wait=True, timeout=PROMPT_S) as step:
        assert step.ready == [True, True]
        assert_bit_exact(pool, "stuck", make_adapter(1))
    pool.check_invariants()


def scenario_stuck_load_does_not_queue_others(tmp: str) -> None:
    """With one source stuck, another adapter's load (wait=False) still finishes."""
    gate, entered = threading.Event(), threading.Event()
    pool = AdapterPool(MODULES, capacity_bytes=40_000, poison=True)
    pool.register("stuck", stuck_source(gate, entered, 1))
    pool.register("other", lambda: make_adapter(3))
    try:
        pool.prepare(["stuck"]).release()
        assert entered.wait(PROMPT_S)

        def other_ready() -> None:
            while True:
                with pool.prepare(["other"]) as step:
                    if step.ready == [True]:
                        return

        promptly(other_ready, "the load of another adapter")
        assert_bit_exact(pool, "other", make_adapter(3))
        assert pool.residency("stuck") == "disk"
    finally:
        gate.set()
    # Let the released source finish on its worker thread: a daemon thread still running torch
    # code while the interpreter exits can abort the process ("terminate called ...").
    pool.prepare(["stuck"], wait=True, timeout=PROMPT_S).release()


def scenario_close_with_stuck_loader(tmp: str) -> None:
    """close() returns while a source is stuck, and the process then exits normally (its worker
    threads do not hold up the interpreter's exit): the gate is never opened."""
    gate, entered = threading.Event(), threading.Event()
    pool = AdapterPool(MODULES, capacity_bytes=40_000)
    pool.register("stuck", stuck_source(gate, entered, 1))
    pool.prepare(["stuck"]).release()
    assert entered.wait(PROMPT_S)
    promptly(pool.close, "close")
    try:
        pool.prepare(["stuck"])
    except RuntimeError as exc:
        assert "closed" in str(exc)
    else:
        raise AssertionError("prepare on a closed pool")


def scenario_exit_while_a_load_finishes(tmp: str) -> None:
    """The interpreter exits while a loader, released just before, still runs torch code on a
    worker thread: the exit waits for it (within workers.EXIT_WAIT_S) instead of unwinding the
    thread through torch's frames, which aborts the process."""
    gate, entered = threading.Event(), threading.Event()

    def load():
        entered.set()
        gate.wait()
        x, t0 = torch.randn(128, 128), time.monotonic()
        while time.monotonic() - t0 < 2.0:
            x = (x @ x).tanh()
        return make_adapter(1)

    pool = AdapterPool(MODULES, capacity_bytes=40_000)
    pool.register("slow", load)
    pool.prepare(["slow"]).release()
    assert entered.wait(PROMPT_S)
    gate.set()  # the scenario returns, "ok" is printed and the interpreter exits at once


def _sparse_safetensors(path: str, tensors: dict, metadata: dict) -> int:
    """A safetensors file whose header declares `tensors` (name -> shape, float32) and whose
    data is a hole: a few KB on disk, the declared size long.  Returns the declared bytes."""
    header, offset = {"__metadata__": metadata}, 0
    for name, shape in tensors.items():
        n = 4
        for d in shape:
            n *= d
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return offset


def scenario_huge_declared_tensors(tmp: str) -> None:
    """Files of a few KB declaring GiBs of tensors are refused from their header, naming the
    adapter and the sizes, before anything large is read (the memory cap would show it)."""
    r = 1 << 25  # [r, 24] and [32, r] float32: 7 GiB declared
    native = os.path.join(tmp, "huge.safetensors")
    meta = {"format": "minlora-adapter-v1", "config": "{}", "scales": json.dumps({"layers.0.q": 1.0})}
    declared = _sparse_safetensors(native, {"layers.0.q.lora_A": (r, 24), "layers.0.q.lora_B": (32, r)}, meta)
    peft = os.path.join(tmp, "huge-peft")
    os.makedirs(peft)
    with open(os.path.join(peft, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["q"]}, f)
    prefix = "base_model.model.layers.0.q"
    _sparse_safetensors(
        os.path.join(peft, "adapter_model.safetensors"),
        {f"{prefix}.lora_A.weight": (r, 24), f"{prefix}.lora_B.weight": (32, r)},
        {"format": "pt"},
    )
    pool = AdapterPool(MODULES, capacity_bytes=1 << 20)
    for name, path in (("native", native), ("peft", peft)):
        pool.register(name, path)
        for wait in (True, False):
            try:
                if wait:
                    pool.prepare([name], wait=True)
                else:
                    pool.prepare([name]).release()
                    while pool.stats()["fetching"]:
                        time.sleep(0.01)
                    pool.prepare([name])
            except AdapterLoadError as exc:
                msg = str(exc)
                assert isinstance(exc.__cause__, ValueError), repr(exc.__cause__)
                assert f"'{name}'" in msg and str(declared) in msg and "fast tier" in msg, msg
            else:
                raise AssertionError(f"{name}: an adapter declaring {declared} bytes was accepted")
    assert pool.stats()["fast_used_bytes"] == 0 and pool.stats()["load_errors"] == 4
    pool.check_invariants()


def main() -> None:
    name, tmp = sys.argv[1], sys.argv[2]
    extra = int(sys.argv[3]) if len(sys.argv) > 3 else 2 << 30
    # The cap: what the interpreter, torch and the extension take, plus `extra`.
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra, resource.RLIM_INFINITY))
    try:
        globals()["scenario_" + name](tmp)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # a stuck thread must not keep a failed scenario alive
    print("ok", flush=True)


if __name__ == "__main__":
    main()

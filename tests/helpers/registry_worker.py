"""Code that runs in the separate processes of the registry's crash and concurrency tests
(started through multiprocessing's forkserver by tests/registry/test_registry_reliability.py)."""

from __future__ import annotations

import random

import torch

from minlora.formats import Adapter, LoraWeights
from minlora.registry import Registry


def _weights(rng: random.Random, *, features: int = 256, rank: int = 8, modules: int = 4) -> Adapter:
    g = torch.Generator().manual_seed(rng.getrandbits(62))
    mods = {
        f"layers.{i}.q_proj": LoraWeights(
            torch.randn(rank, features, generator=g), torch.randn(features, rank, generator=g), 0.25
        )
        for i in range(modules)
    }
    return Adapter(modules=mods, config={"r": rank, "lora_alpha": 2 * rank})


def crash_loop(url: str, blobs: str, seed: int, ready, committed) -> None:
    """Commit forever (single commits, bulk batches, evaluations, promotions) until killed.
    `committed` counts the revisions whose commit call returned: each must survive."""
    rng = random.Random(seed)
    reg = Registry(url, blobs)
    ready.set()
    batch_no = 0
    while True:
        op = rng.random()
        adapter_id = f"crash-{rng.randrange(4)}"
        if op < 0.6:
            rev = reg.commit(adapter_id, _weights(rng), message=f"seed {seed}", author="crash-test")
            with committed.get_lock():
                committed.value += 1
            if rng.random() < 0.3:
                reg.record_evaluation(adapter_id, rev.number, "smoke", {"score": rng.random()})
                reg.promote(adapter_id, rev.number, force=True, by="crash-test")
        else:
            batch_no += 1
            size = rng.randrange(2, 12)
            items = [
                (f"bulk-{rng.randrange(50)}", _weights(rng, features=64, modules=2)) for _ in range(size)
            ]
            # Every revision of one batch carries the batch's size, so the test can check that a
            # killed batch is either entirely present or entirely absent.
            n = reg.commit_many(items, message=f"batch {seed}-{batch_no} of {size}", batch_size=1000)
            with committed.get_lock():
                committed.value += n


def concurrent_committer(url: str, blobs: str, name: str, n: int, barrier, results) -> None:
    """Commit `n` revisions to the shared adapter and `n` to our own, interleaved, starting
    together with the other process; report (adapter_id, number, content_hash) of each."""
    rng = random.Random(name)
    reg = Registry(url, blobs)
    out = []
    barrier.wait()
    for i in range(n):
        for adapter_id in ("shared", f"own-{name}"):
            rev = reg.commit(
                adapter_id, _weights(rng, features=32, modules=2), message=f"{name} {i}", author=name
            )
            out.append((rev.adapter_id, rev.number, rev.content_hash, rev.parent))
        if i % 5 == 0:
            reg.tag("shared", f"{name}-{i}", "head")  # tags race with the other writer's commits
    out.append(
        (
            "bulk",
            reg.commit_many(
                [(f"bulk-{name}-{j % 7}", _weights(rng, features=8, modules=1)) for j in range(30)],
                batch_size=8,
            ),
            "",
            None,
        )
    )
    results.put((name, out))
    reg.close()


def stall_commit(url: str, blobs: str, moment: str, ready) -> None:
    """Start a commit and freeze at `moment` ("blob": the blob's temporary file is written
    but not yet renamed; "row": the revision row is inserted but the transaction not
    committed), tell the test, and wait there to be killed."""
    import os
    import time

    def freeze(*_args, **_kwargs):
        ready.set()
        time.sleep(600)

    reg = Registry(url, blobs)
    if moment == "blob":
        os.replace = freeze  # this process only: the rename that publishes the blob
    elif moment == "row":
        from minlora.registry.store import Store

        Store.revision = freeze  # called inside the commit's transaction, after the INSERTs
    else:
        raise ValueError(moment)
    reg.commit("stall", _weights(random.Random(moment)), message="never committed")


def race_weights(seed: int) -> Adapter:
    """The content both sides of a gc / commit race use (the test builds it too)."""
    return _weights(random.Random(seed), features=32, modules=2)


def _pause_once(cls, name: str, paused, go, *, after: bool) -> None:
    """Make `cls.name` (this process only) stop once, before or after its real work, tell the
    test (`paused`) and wait for `go`."""
    real = getattr(cls, name)
    state = {"armed": True}

    def hooked(*args, **kwargs):
        def pause() -> None:
            if state["armed"]:
                state["armed"] = False
                paused.set()
                go.wait(120)

        if not after:
            pause()
        out = real(*args, **kwargs)
        if after:
            pause()
        return out

    setattr(cls, name, hooked)


def race_commit(url: str, blobs: str, seed: int, adapter_id: str, paused, go, results) -> None:
    """Commit race_weights(seed).  With `paused` given, stop right after the blob file is
    written (before any row exists) until the test says `go`."""
    from minlora.registry.blobs import BlobStore

    if paused is not None:
        _pause_once(BlobStore, "put", paused, go, after=True)
    with Registry(url, blobs) as reg:
        rev = reg.commit(adapter_id, race_weights(seed), message="racing gc")
    results.put(("commit", rev.number, rev.content_hash))


def race_gc(url: str, blobs: str, paused, go, results) -> None:
    """gc(min_age_s=0).  With `paused` given, stop just before the first file is deleted
    (gc has decided it is unreferenced) until the test says `go`."""
    from minlora.registry.blobs import BlobStore

    if paused is not None:
        _pause_once(BlobStore, "delete", paused, go, after=False)
    with Registry(url, blobs) as reg:
        report = reg.gc(min_age_s=0)
    results.put(("gc", report.deleted))


def open_fresh_and_commit(url: str, blobs: str, name: str, barrier, results) -> None:
    """Open a registry that does not exist yet, together with other processes, and commit."""
    barrier.wait()
    with Registry(url, blobs) as reg:
        rev = reg.commit(name, _weights(random.Random(name), features=8, modules=1))
    results.put((name, rev.number))

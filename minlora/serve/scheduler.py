"""The training scheduler: requests of many training clients, coalesced into shared Trainer calls.

Each training client's requests reach the scheduler one at a time and in seq_id order (its
`SeqOrder` dispatches the next when the previous finished).  The scheduler's thread takes
what is ready, groups it, and runs each group as one call with the model's lock held:

* forward_backward / forward requests with the same loss function (and config) of different
  clients -> one batch, each row its own adapter (train_batch.stack);
* optim_step requests with the same Adam parameters -> one optimizer step over their adapters;
* anything else (create, save, load, unload) alone.

While one group runs, the others' next requests arrive and wait, so concurrent clients fall
into step and share every call.  `linger_s` waits that long for more arrivals before a group
starts (a few milliseconds cost nothing next to a step).  A group's work is bounded by
`max_batch_tokens` (forward requests) so one giant batch cannot hold the model forever.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .errors import ServerError
from .fairlock import FairLock
from .work_queue import WorkQueue

__all__ = ["COALESCED", "TrainingScheduler", "Work"]

log = logging.getLogger("minlora.serve")

COALESCED = ("forward_backward", "forward", "optim_step")


@dataclass(eq=False)
class Work:
    """One request of one training client, ready to run."""

    kind: str  # forward_backward | forward | optim_step | anything else runs alone
    client: Any  # the owner of the request's order (gets finished(work) when done)
    key: tuple = ()  # works of one kind with equal keys may share a call
    payload: Any = None
    tokens: int = 0  # forward work: its tokens (for max_batch_tokens)
    on_done: Callable[[Any, Optional[BaseException]], None] = field(default=lambda r, e: None)


# execute(kind, works) -> one result (or exception) per work, in order
Execute = Callable[[str, list[Work]], list[Any]]


class TrainingScheduler:
    def __init__(self, lock: FairLock, execute: Execute, *, linger_s: float = 0.002,
                 max_batch_tokens: int = 65536) -> None:
        self._lock = lock
        self._execute = execute
        self.linger_s = linger_s
        self.max_batch_tokens = max_batch_tokens
        self._ready: WorkQueue[Work] = WorkQueue("minlora-serve-train", self._loop)
        self.calls = collections.Counter()  # kind -> Trainer calls made
        self.works = collections.Counter()  # kind -> requests served
        self.seconds = collections.Counter()  # kind -> seconds spent in its calls (model lock held)
        self._ready.start()

    def ready(self, work: Work) -> None:
        """`work`'s turn has come (called by its client's SeqOrder)."""
        if not self._ready.put(work):
            self._complete(work, None, ServerError("the server is shutting down"))

    def close(self, timeout: float = 5.0) -> None:
        for work in self._ready.stop(timeout):
            self._complete(work, None, ServerError("the server is shutting down"))

    def stats(self) -> dict[str, Any]:
        with self._ready.cond:
            return {"calls": dict(self.calls), "requests": dict(self.works), "ready": len(self._ready.items),
                    "seconds": {k: round(v, 4) for k, v in self.seconds.items()}}

    def _loop(self) -> None:
        ready = self._ready
        while True:
            with ready.cond:
                while not ready.stopping and not ready.items:
                    ready.cond.wait()
                if ready.stopping:
                    return
                if ready.items[0].kind in COALESCED and self.linger_s > 0:
                    ready.cond.wait(self.linger_s)  # let concurrent clients' requests arrive
                group = self._take_group()
            self._run(group)

    def _take_group(self) -> list[Work]:
        """The first ready work and every later one that can share its call (condition held)."""
        first = self._ready.items.popleft()
        if first.kind not in COALESCED:
            return [first]
        budget = self.max_batch_tokens - first.tokens

        def joins(w: Work) -> bool:
            nonlocal budget
            if w.kind == first.kind and w.key == first.key and w.tokens <= budget:
                budget -= w.tokens
                return True
            return False

        return [first] + self._ready.take(joins)

    def _run(self, group: list[Work]) -> None:
        kind = group[0].kind
        try:
            with self._lock:
                t0 = time.perf_counter()
                results = self._execute(kind, group)
                self.seconds[kind] += time.perf_counter() - t0
            if len(results) != len(group):
                raise RuntimeError(f"{kind}: {len(results)} results for {len(group)} requests")
        except Exception as exc:  # noqa: BLE001  (the group's requests fail; the scheduler goes on)
            results = [exc] * len(group)
        self.calls[kind] += 1
        self.works[kind] += len(group)
        for work, result in zip(group, results):
            if isinstance(result, BaseException):
                self._complete(work, None, result)
            else:
                self._complete(work, result, None)

    @staticmethod
    def _complete(work: Work, result: Any, exc: Optional[BaseException]) -> None:
        try:
            work.on_done(result, exc)
        except Exception:
            log.exception("a training request's completion failed")

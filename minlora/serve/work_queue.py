"""WorkQueue: a queue of work items under one condition, served by one daemon thread."""
from __future__ import annotations

import collections
import threading
from typing import Callable, Generic, TypeVar

__all__ = ["WorkQueue"]

T = TypeVar("T")


class WorkQueue(Generic[T]):
    """The items waiting for a worker thread, the condition that guards them, and the thread.

    The owner's loop (`serve`) waits on `cond`, reads `items` and `stopping` with it held, and
    returns once `stopping` is set; `stop` hands back what it never took.
    """

    def __init__(self, name: str, serve: Callable[[], None]) -> None:
        self.cond = threading.Condition()
        self.items: collections.deque[T] = collections.deque()
        self.stopping = False
        self._thread = threading.Thread(target=serve, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, item: T) -> bool:
        """Queues `item` and wakes the thread; False (nothing queued) once stopping."""
        with self.cond:
            if self.stopping:
                return False
            self.items.append(item)
            self.cond.notify()
            return True

    def take(self, accept: Callable[[T], bool]) -> list[T]:
        """The items `accept` takes (asked in order, once each), removed; the rest keep their
        order (condition held)."""
        taken: list[T] = []
        kept: collections.deque[T] = collections.deque()
        while self.items:
            item = self.items.popleft()
            (taken if accept(item) else kept).append(item)
        self.items = kept
        return taken

    def stop(self, timeout: float) -> list[T]:
        """Stops the thread (waiting up to `timeout` s for it) and returns the items it left."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self._thread.join(timeout)
        with self.cond:
            left, self.items = list(self.items), collections.deque()
        return left

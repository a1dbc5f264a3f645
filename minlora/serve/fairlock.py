"""A first-come, first-served lock: the decode engine and the training scheduler take turns on
the model (one forward at a time), and neither can starve the other the way a plain
`threading.Lock` allows (its waiters are woken in no particular order)."""
from __future__ import annotations

import collections
import threading

__all__ = ["FairLock"]


class FairLock:
    """`with lock:` blocks; waiters get the lock in the order they asked for it."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held = False
        self._queue: collections.deque[threading.Event] = collections.deque()

    def acquire(self) -> None:
        with self._mutex:
            if not self._held and not self._queue:
                self._held = True
                return
            turn = threading.Event()
            self._queue.append(turn)
        turn.wait()  # release() hands the lock over directly: _held stays True

    def release(self) -> None:
        with self._mutex:
            if not self._held:
                raise RuntimeError("FairLock released while not held")
            if self._queue:
                self._queue.popleft().set()
            else:
                self._held = False

    def __enter__(self) -> "FairLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

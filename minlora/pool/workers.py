"""Worker threads for the pool's loads and copies that never hold up the interpreter's exit."""
from __future__ import annotations

import concurrent.futures as cf
import queue
import threading
import weakref
from typing import Any, Callable

__all__ = ["Workers"]


def _work(tasks: "queue.SimpleQueue", idle: threading.Semaphore) -> None:
    while True:
        item = tasks.get()
        if item is None:
            return
        future, fn, args = item
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)
        del item, future, fn, args
        idle.release()


def _stop(tasks: "queue.SimpleQueue", threads: list) -> None:
    for _ in threads:
        tasks.put(None)


class Workers:
    """Up to `count` daemon threads, started as work arrives, taking tasks in order.

    Unlike concurrent.futures' executors, nothing joins these threads: a task that never
    returns (a source that blocks) holds its thread and no more; close() and the interpreter's
    exit do not wait for it.  The threads end after close() or when the Workers object is
    collected, once their current task returns.
    """

    def __init__(self, count: int, name: str) -> None:
        self._count = count
        self._name = name
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stop = weakref.finalize(self, _stop, self._tasks, self._threads)

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future:
        future: cf.Future = cf.Future()
        self._tasks.put((future, fn, args))
        if not self._idle.acquire(blocking=False):
            with self._lock:
                if len(self._threads) < self._count:
                    t = threading.Thread(
                        target=_work, args=(self._tasks, self._idle), daemon=True,
                        name=f"{self._name}-{len(self._threads)}",
                    )
                    self._threads.append(t)
                    t.start()
        return future

    def close(self) -> None:
        """Stops the threads once their current task (if any) returns; does not wait."""
        self._stop()

"""Worker threads for the pool's loads and copies that never hold up the interpreter's exit
for long."""
from __future__ import annotations

import atexit
import concurrent.futures as cf
import queue
import threading
import time
import weakref
from typing import Any, Callable

__all__ = ["Workers"]

# At exit, how long the interpreter waits (in all) for tasks still running on worker threads.
# A daemon thread still inside torch's C++ code when the interpreter finalises is unwound by
# pthread_exit through frames that must not unwind, which aborts the process ("terminate called
# without an active exception"); a task that finishes within this bound exits cleanly, and one
# that blocks longer (a source that never returns) is abandoned as before.
EXIT_WAIT_S = 5.0
_LIVE: "weakref.WeakSet[Workers]" = weakref.WeakSet()


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
        _LIVE.add(self)

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


@atexit.register
def _drain_at_exit() -> None:
    deadline = time.monotonic() + EXIT_WAIT_S
    live = list(_LIVE)
    for workers in live:
        workers.close()
    for workers in live:
        for t in list(workers._threads):
            t.join(max(0.0, deadline - time.monotonic()))

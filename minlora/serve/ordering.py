"""One training client's requests, run in `seq_id` order, one at a time.

The SDK numbers a training client's requests 1, 2, 3, ... and submits them without waiting
(forward_backward and optim_step are usually in flight together; a chunked forward_backward
sends its first chunk last), so the server must run them in seq_id order.  Gaps happen (a
submit the SDK gave up on never arrives): when the next seq_id is missing while later ones
wait, the order waits `gap_timeout_s` and then goes on with the lowest one waiting.  A
request without a seq_id, or with one already passed, runs next in arrival order.

`SeqOrder` only decides what runs when: it hands each item to `dispatch(item)` and is told
`finished(item)` when that item is done; at most one item of the client is dispatched at once.
"""
from __future__ import annotations

import collections
import threading
from typing import Any, Callable, Optional

__all__ = ["SeqOrder"]


class SeqOrder:
    """The queue of one training client (thread-safe)."""

    def __init__(self, dispatch: Callable[[Any], None], *, first_seq: int = 1, gap_timeout_s: float = 5.0) -> None:
        self._dispatch = dispatch
        self._gap_timeout_s = gap_timeout_s
        self._lock = threading.Lock()
        self._next = first_seq
        self._waiting: dict[int, Any] = {}
        self._unordered: collections.deque = collections.deque()
        self._running: Optional[Any] = None
        self._gap_timer: Optional[threading.Timer] = None
        self._closed = False

    def has_seq(self, seq_id: int) -> bool:
        """Whether `seq_id` is waiting (a retried submit must not run twice)."""
        with self._lock:
            return seq_id in self._waiting

    def submit(self, seq_id: Optional[int], item: Any) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("this training client is closed")
            if seq_id is None or seq_id < self._next:
                self._unordered.append(item)
            else:
                self._waiting[seq_id] = item
            start = self._take()
        if start is not None:
            self._dispatch(start)

    def finished(self, item: Any) -> None:
        """`item` (the dispatched one) is done: dispatch the next."""
        with self._lock:
            if self._running is item:
                self._running = None
            start = self._take()
        if start is not None:
            self._dispatch(start)

    def close(self) -> list[Any]:
        """Stops the order; returns the items that never ran (for the caller to fail them)."""
        with self._lock:
            self._closed = True
            left = list(self._unordered) + [self._waiting[k] for k in sorted(self._waiting)]
            self._unordered.clear()
            self._waiting.clear()
            self._cancel_timer()
        return left

    def pending(self) -> int:
        with self._lock:
            return len(self._waiting) + len(self._unordered) + (self._running is not None)

    # ------------------------------------------------------------------ (lock held)

    def _take(self) -> Optional[Any]:
        if self._running is not None or self._closed:
            return None
        item = None
        if self._unordered:
            item = self._unordered.popleft()
        elif self._next in self._waiting:
            item = self._waiting.pop(self._next)
            self._next += 1
        elif self._waiting and self._gap_timer is None:
            timer = threading.Timer(self._gap_timeout_s, self._skip_gap, args=(self._next,))
            timer.daemon = True
            self._gap_timer = timer
            timer.start()
        if item is not None:
            self._cancel_timer()
            self._running = item
        return item

    def _cancel_timer(self) -> None:
        if self._gap_timer is not None:
            self._gap_timer.cancel()
            self._gap_timer = None

    def _skip_gap(self, missing: int) -> None:
        with self._lock:
            self._gap_timer = None
            if self._next == missing and self._waiting and missing not in self._waiting:
                self._next = min(self._waiting)
            start = self._take()
        if start is not None:
            self._dispatch(start)

"""Futures: the request ids every long call answers with, and the long-poll that retrieves them.

A submit creates an entry and answers `{"request_id": ...}` at once; the work runs elsewhere
and completes the entry (from any thread) with a result or a failure.  `retrieve_future`
waits on the entry for at most `long_poll_s` and answers the result, the failure
(`{"error", "category"}`, HTTP 200) or `try_again` (the SDK re-polls at once, so the server
must hold the request rather than answer try_again immediately).

Request ids are `req-<boot>-<uuid>`.  An id of an earlier boot of this server (its boot is
in the state store) answers a failure saying the request was lost in a restart; an id never
issued, or issued to another owner, answers 404 (the same message: nobody learns whether
someone else's id exists).  Finished entries are kept `ttl_s` seconds.

Idempotent submits: the SDK sends `X-Idempotency-Key` on every submit and reuses it for its
own HTTP retries; a key seen before (per owner, within the TTL) answers the first submit's
request id instead of doing the work twice.
"""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .errors import ApiError, failure_body, not_found

__all__ = ["FutureEntry", "FutureTable", "LOST_IN_RESTART"]

LOST_IN_RESTART = (
    "the server restarted while this request was in flight, so it was lost; saved checkpoints are "
    "kept: create the client again (from a checkpoint for training) and resubmit"
)


@dataclass
class FutureEntry:
    request_id: str
    owner: str
    kind: str
    model_id: Optional[str]
    created_at: float
    result: Optional[dict[str, Any]] = None
    done_at: Optional[float] = None
    event: asyncio.Event = field(default_factory=asyncio.Event)


class FutureTable:
    """The futures of one boot; thread-safe (completion may come from any thread)."""

    def __init__(self, boot_id: str, is_earlier_boot: Callable[[str], bool], *, ttl_s: float = 900.0,
                 max_pending_per_owner: int = 10_000) -> None:
        self.boot_id = boot_id
        self._is_earlier_boot = is_earlier_boot
        self.ttl_s = ttl_s
        self.max_pending_per_owner = max_pending_per_owner
        self._lock = threading.Lock()
        self._entries: dict[str, FutureEntry] = {}
        self._pending: dict[str, int] = {}
        self._idempotent: dict[tuple[str, str], tuple[dict[str, Any], float]] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._last_sweep = time.monotonic()

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop whose handlers wait on entries (set at server start)."""
        self._loop = loop

    # ------------------------------------------------------------------ submit side

    def create(self, owner: str, kind: str, model_id: Optional[str] = None) -> FutureEntry:
        """A new pending entry; 429 when the owner already has too many pending."""
        self._sweep()
        with self._lock:
            if self._pending.get(owner, 0) >= self.max_pending_per_owner:
                raise ApiError(429, f"too many requests in flight ({self.max_pending_per_owner}); wait for some to finish")
            rid = f"req-{self.boot_id}-{uuid.uuid4()}"
            entry = FutureEntry(rid, owner, kind, model_id, time.time())
            self._entries[rid] = entry
            self._pending[owner] = self._pending.get(owner, 0) + 1
        return entry

    def remembered(self, owner: str, key: Optional[str]) -> Optional[dict[str, Any]]:
        """The submit answer given earlier for this idempotency key, if any."""
        if not key:
            return None
        with self._lock:
            hit = self._idempotent.get((owner, key))
        return None if hit is None else hit[0]

    def remember(self, owner: str, key: Optional[str], answer: dict[str, Any]) -> None:
        if key:
            with self._lock:
                self._idempotent[(owner, key[:200])] = (answer, time.monotonic())

    def complete(self, entry: FutureEntry, result: dict[str, Any]) -> None:
        """Finishes an entry with its result (the first completion wins)."""
        self._finish(entry, result)

    def fail(self, entry: FutureEntry, exc: BaseException) -> None:
        """Finishes an entry with the failure `exc` stands for (see errors.failure_body)."""
        self._finish(entry, failure_body(exc))

    def _finish(self, entry: FutureEntry, body: dict[str, Any]) -> None:
        with self._lock:
            if entry.result is not None:
                return
            entry.result = body
            entry.done_at = time.time()
            self._pending[entry.owner] = max(0, self._pending.get(entry.owner, 1) - 1)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(entry.event.set)
            except RuntimeError:  # the loop closed meanwhile: nobody waits any more
                pass

    # ------------------------------------------------------------------ retrieve side

    def lookup(self, owner: str, request_id: str) -> Optional[FutureEntry]:
        """The owner's entry; None for an id of an earlier boot; 404 otherwise."""
        with self._lock:
            entry = self._entries.get(request_id)
        if entry is not None and entry.owner == owner:
            return entry
        if entry is None and self._earlier_boot(request_id):
            return None
        raise not_found(f"unknown request_id {request_id!r} (never issued to this key, or expired)")

    async def wait(self, owner: str, request_id: str, timeout_s: float) -> tuple[Optional[dict[str, Any]], str]:
        """(the result body, or None when the entry did not finish within `timeout_s`; its kind)."""
        entry = self.lookup(owner, request_id)
        if entry is None:
            return {"error": LOST_IN_RESTART, "category": "server"}, "lost"
        if entry.result is None:
            try:
                await asyncio.wait_for(entry.event.wait(), timeout=timeout_s)
            except asyncio.TimeoutError:
                pass
        return entry.result, entry.kind

    def _earlier_boot(self, request_id: str) -> bool:
        parts = request_id.split("-", 2)
        if len(parts) != 3 or parts[0] != "req" or parts[1] == self.boot_id or len(parts[1]) != 12:
            return False
        return self._is_earlier_boot(parts[1])

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"futures": len(self._entries), "pending": sum(self._pending.values())}

    def _sweep(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep < 10.0:
            return
        self._last_sweep = now
        cutoff = time.time() - self.ttl_s
        with self._lock:
            for rid in [r for r, e in self._entries.items() if e.done_at is not None and e.done_at < cutoff]:
                del self._entries[rid]
            for key in [k for k, (_, t) in self._idempotent.items() if t < now - self.ttl_s]:
                del self._idempotent[key]

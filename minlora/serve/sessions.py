"""Sessions: one per SDK `ServiceClient`, kept alive by its heartbeats.

The SDK heartbeats every 10 s and never recreates a session, so the server decides when a
client is gone: a session with no heartbeat (or other request naming it) for `timeout_s`
ends, and whatever it held is released by `on_end(session_id, reason)` (training clients'
adapters leave the pool, sampling sessions drop their pool registrations).  Requests on an
ended session answer 404 with the reason.

Sessions are rows of the state store, so a restarted server adopts the sessions of clients
that keep heartbeating; their sampling sessions go on, their training clients do not (the
training state was in memory).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from .errors import not_found
from .paths import new_session_id
from .state import SessionRecord, StateStore

__all__ = ["SessionTable"]

log = logging.getLogger("minlora.serve")


class SessionTable:
    """Live sessions (last-seen times in memory, records in the store) and their expiry."""

    def __init__(self, store: StateStore, timeout_s: float, on_end: Callable[[str, str], None]) -> None:
        self.store = store
        self.timeout_s = timeout_s
        self._on_end = on_end
        self._lock = threading.Lock()
        self._live: dict[str, tuple[str, float]] = {}  # session id -> (owner, last sign of life, monotonic)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._expire_loop, name="minlora-serve-sessions", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def create(self, owner: str, tags: list[str], user_metadata: dict, sdk_version: Optional[str]) -> str:
        sid = new_session_id()
        self.store.add_session(SessionRecord(sid, owner, time.time(), tags=list(tags)[:64],
                                             user_metadata=dict(user_metadata), sdk_version=sdk_version))
        with self._lock:
            self._live[sid] = (owner, time.monotonic())
        return sid

    def check(self, owner: str, session_id: str) -> None:
        """The session is the owner's and live (adopted if a restart left it behind); 404 otherwise.
        Counts as a sign of life."""
        with self._lock:
            live = self._live.get(session_id)
            if live is not None and live[0] == owner:
                self._live[session_id] = (owner, time.monotonic())
                return
        rec = self.store.session(session_id) if isinstance(session_id, str) and len(session_id) <= 64 else None
        if rec is None or rec.owner != owner:
            raise not_found(f"unknown session {session_id!r}")
        if rec.ended_at is not None:
            raise not_found(f"session {session_id!r} has ended ({rec.end_reason}); create a new ServiceClient")
        with self._lock:
            self._live[session_id] = (owner, time.monotonic())

    def is_live(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self._live

    def end(self, session_id: str, reason: str) -> None:
        """Ends a session now (idempotent) and releases what it held."""
        with self._lock:
            was_live = self._live.pop(session_id, None) is not None
        self.store.end_session(session_id, reason)
        if was_live:
            log.info("session %s ended: %s", session_id, reason)
            self._on_end(session_id, reason)

    def _expire_loop(self) -> None:
        period = max(0.05, min(5.0, self.timeout_s / 4))
        while not self._stop.wait(period):
            cutoff = time.monotonic() - self.timeout_s
            with self._lock:
                gone = [s for s, (_, seen) in self._live.items() if seen < cutoff]
            for sid in gone:
                try:
                    self.end(sid, f"no heartbeat for {self.timeout_s:g} s")
                except Exception:  # keep expiring the others; the store may be briefly unavailable
                    log.exception("ending session %s failed", sid)

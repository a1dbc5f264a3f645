"""The pool registrations of sampling weights, counted by the samplers that hold them.

Sampling weights enter the pool under names of their own: `revision/<content hash>` for a
registry revision (two samplers of the same weights share one registration and its pages)
and `snapshot/<sampler>` for weights a training client handed over without saving them.
A registration lives while a sampler holds it; the last release unregisters it, which frees
its pages and any in-memory copy.  When the weights are still in use by a running request
(the pool refuses to unregister them), the release is retried until they are not.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

from ..pool import AdapterPool

__all__ = ["Registrations"]

log = logging.getLogger("minlora.serve")
_RETRY_S = 0.5


class Registrations:
    """Counted pool registrations (thread-safe)."""

    def __init__(self, pool: AdapterPool) -> None:
        self.pool = pool
        self._lock = threading.Lock()
        self._count: dict[str, int] = {}

    def acquire(self, pool_id: str, source: Any) -> None:
        """One more holder of `pool_id`; registers it (with `source`) for the first."""
        with self._lock:
            n = self._count.get(pool_id, 0)
            if n == 0 and pool_id not in self.pool:
                self.pool.register(pool_id, source)
            self._count[pool_id] = n + 1

    def release(self, pool_id: str) -> None:
        """One holder fewer; the last one unregisters the weights (now or once no request uses them)."""
        with self._lock:
            n = self._count.get(pool_id, 0) - 1
            if n > 0:
                self._count[pool_id] = n
                return
            self._count.pop(pool_id, None)
        self._unregister(pool_id)

    def holders(self, pool_id: str) -> int:
        with self._lock:
            return self._count.get(pool_id, 0)

    def _unregister(self, pool_id: str) -> None:
        with self._lock:
            if self._count.get(pool_id, 0) > 0 or pool_id not in self.pool:
                return  # acquired again meanwhile, or already gone
            try:
                self.pool.unregister(pool_id)
                return
            except ValueError:  # a running request still uses it: try again shortly
                pass
            except KeyError:
                return
        timer = threading.Timer(_RETRY_S, self._unregister, args=(pool_id,))
        timer.daemon = True
        timer.start()

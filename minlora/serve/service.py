"""The service: every part of `minlora serve`, built from a ServeConfig and wired together.

    registry      adapters' revisions (minlora.registry)            catalog.py: tinker paths -> revisions
    state store   sessions, runs, checkpoints, samplers, boots      state.py
    keys / auth   who is calling                                    keys.py, auth.py, tokens.py
    hosted model  the patched base model over one AdapterPool       model_host.py
    decode engine mixed-adapter continuous batching                 engine.py, kv_cache.py, sampler.py
    sampling      sampling sessions and sample requests             sampling.py, registrations.py
    training      training clients, coalesced Trainer calls         runs.py, scheduler.py, ordering.py, training.py
    sessions      heartbeats and expiry                             sessions.py
    futures       request ids and long-poll                         futures.py
"""
from __future__ import annotations

import logging
from typing import Optional

from ..registry import Registry
from .archive import ArchiveLinks
from .auth import Authenticator
from .catalog import Catalog
from .config import ServeConfig
from .engine import DecodeEngine
from .futures import FutureTable
from .keys import KeyRing, ensure_keys_file
from .model_host import HostedModel, load_hosted_model
from .runs import TrainingService
from .sampling import SamplingService
from .sessions import SessionTable
from .state import StateStore
from .tokens import Signer
from .training import POOL_OPTIONS, TrainingBackend

__all__ = ["Service"]

log = logging.getLogger("minlora.serve")


class Service:
    """Owns every part; `close()` stops the threads and closes the stores."""

    def __init__(self, config: ServeConfig, *, host: Optional[HostedModel] = None) -> None:
        """host: an already loaded model (tests share one between services); loaded from
        config.model_dir otherwise."""
        self.config = config.check()
        self.new_key: Optional[str] = None
        if config.api_keys is not None:
            self.keys = KeyRing(keys=config.api_keys)
        else:
            if config.api_keys_file is None:  # the default file is made on first use; a named one must exist
                self.new_key = ensure_keys_file(config.resolved_keys_file)
            self.keys = KeyRing(config.resolved_keys_file)
        if config.registry_url:
            self.registry = Registry(config.registry_url, config.blobs_url)
        else:
            self.registry = Registry(root=config.resolved_root, blobs=config.blobs_url)
        self.store = StateStore(config.resolved_state_url)
        self.boot_id = self.store.start_boot()
        self.signer = Signer(self.store.secret())
        self.auth = Authenticator(self.keys, self.signer, config.jwt_ttl_s)
        self.archives = ArchiveLinks(self.signer, config.archive_ttl_s)
        self.host = host or load_hosted_model(
            config.model_dir, name=config.model_name, device=config.device, dtype=config.dtype,
            pool_bytes=config.pool_bytes, max_slots=config.max_adapters_per_step, max_rank=config.max_lora_rank,
            pool_options=POOL_OPTIONS,
        )
        self.registry.attach_pool(self.host.pool, key=lambda aid, rev: f"revision/{rev.content_hash}" if rev else aid)
        self.futures = FutureTable(self.boot_id, self.store.is_boot)
        self.catalog = Catalog(self.store, self.registry)
        self.engine = DecodeEngine(self.host, max_rows=config.max_batch_rows,
                                   max_prefill_tokens=config.max_prefill_tokens,
                                   max_batch_adapters=config.max_batch_adapters)
        self.sessions = SessionTable(self.store, config.session_timeout_s, self._session_ended)
        check = self.sessions.check
        self.sampling = SamplingService(self.host, self.engine, self.catalog, self.store, self.futures, check,
                                        max_new_tokens=config.max_new_tokens, load_timeout_s=config.load_timeout_s)
        self.backend = TrainingBackend(self.host, self.registry, lora_alpha=config.lora_alpha,
                                       max_rank=config.max_lora_rank)
        self.training = TrainingService(self.host, self.backend, self.store, self.catalog, self.futures, check,
                                        self.sampling.create_snapshot, boot_id=self.boot_id,
                                        max_request_tokens=config.max_request_tokens,
                                        gap_timeout_s=config.gap_timeout_s, linger_s=config.coalesce_linger_s)

    def _session_ended(self, session_id: str, reason: str) -> None:
        self.training.end_session(session_id)
        self.sampling.end_session(session_id)

    def stats(self) -> dict:
        """Counters for operators and tests: engine, training scheduler, futures, pool."""
        return {"engine": self.engine.stats(), "training": self.training.scheduler.stats(),
                "futures": self.futures.stats(), "pool": self.host.pool.stats()}

    def close(self) -> None:
        self.sessions.close()
        self.engine.close()
        self.training.close()
        self.sampling.close()
        self.store.close()
        self.registry.close()

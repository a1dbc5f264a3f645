"""Sampling sessions and sample requests: from a sampler id to a decode-engine job.

A sampling session (`<session>:sample:<n>`) samples one of:

* the base model (`base_model`);
* a registry revision: a sampler checkpoint `tinker://<run>/sampler_weights/<name>`, or
  `tinker://<adapter>/sampler_weights/<ref>` of a registry adapter;
* an adapter's serving revision (`.../sampler_weights/serving`): resolved again for every
  request, so `minlora adapters promote` / `rollback` move what the session samples;
* a snapshot of a training client's weights (save_weights_and_get_sampling_client), held in
  memory only.

Sessions are persisted (a restarted server goes on serving them, except snapshots); the pool
registration a sampler holds is dropped when its session ends (registrations.py).

A sample request is checked at submit (prompt, parameters, lengths), answered with a future,
and then, off the request thread, its adapter is loaded and held (a pool Step: the lease) and
the job handed to the decode engine, whose answer completes the future.
"""
from __future__ import annotations

import concurrent.futures as cf
import math
import secrets
import threading
import time
from typing import Any, Callable, Optional

import numpy as np

from ..pool import AdapterLoadError, LoadTimeoutError, PoolExhaustedError
from ..registry.errors import RegistryError
from .catalog import Catalog, Weights
from .engine import DecodeEngine, SampleJob
from .errors import ServerError, UserError, bad_request, not_found
from .futures import FutureEntry, FutureTable
from .model_host import HostedModel
from .paths import sampler_id as make_sampler_id
from .registrations import Registrations
from .request_service import RequestService
from .sampler import RowSampling, StopRule
from .state import SamplerRecord, StateStore
from .wire import CreateSamplingSessionRequest, SampleRequest, SamplingParams

__all__ = ["SamplingService"]


class SamplingService(RequestService):
    def __init__(self, host: HostedModel, engine: DecodeEngine, catalog: Catalog, store: StateStore,
                 futures: FutureTable, check_session: Callable[[str, str], None], *, max_new_tokens: int,
                 load_timeout_s: float = 60.0, workers: int = 8) -> None:
        super().__init__(host, catalog, store, futures, check_session)
        self.engine = engine
        self.max_new_tokens = max_new_tokens
        self.load_timeout_s = load_timeout_s
        self.registrations = Registrations(host.pool)
        self._lock = threading.Lock()
        self._records: dict[str, SamplerRecord] = {}
        self._held: dict[str, str] = {}  # sampler id -> the pool id it holds
        self._snapshots: dict[str, Any] = {}  # sampler id -> in-memory Adapter
        self._executor = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="minlora-serve-lease")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ sessions

    def create(self, owner: str, req: CreateSamplingSessionRequest) -> str:
        self.check_session(owner, req.session_id)
        if req.sampling_session_seq_id < 0:
            raise bad_request("sampling_session_seq_id must be >= 0")
        sid = make_sampler_id(req.session_id, req.sampling_session_seq_id)
        if req.model_path:
            weights = self.catalog.resolve(owner, req.model_path, "model_path")
            kind, adapter, rev = ("serving" if weights.follows_serving else "revision"), weights.adapter_id, weights.revision
        elif self.host.accepts_name(req.base_model):
            kind, adapter, rev = "base", None, None
        else:
            raise bad_request(f"base_model {req.base_model!r} is not served here (this server serves {self.host.name!r})")
        rec = SamplerRecord(sid, owner, req.session_id, kind, adapter, rev, req.model_path, time.time())
        return self._add(rec)

    def create_snapshot(self, owner: str, session_id: str, seq_id: int, adapter: Any, source_path: str) -> str:
        """A sampler over in-memory weights (a training client's, unsaved)."""
        sid = make_sampler_id(session_id, seq_id)
        rec = SamplerRecord(sid, owner, session_id, "snapshot", None, None, source_path, time.time())
        with self._lock:
            self._snapshots[sid] = adapter
        return self._add(rec)

    def _add(self, rec: SamplerRecord) -> str:
        existing = self._record(rec.sampler_id)
        if existing is not None:
            same = (existing.owner, existing.kind, existing.adapter_id, existing.revision) == \
                   (rec.owner, rec.kind, rec.adapter_id, rec.revision)
            if not same:  # a retried create is fine; reusing a seq id for other weights is not
                raise bad_request(f"sampling session {rec.sampler_id!r} exists with other weights; "
                                  "use a new sampling_session_seq_id")
            return rec.sampler_id
        self.store.add_sampler(rec)
        with self._lock:
            self._records[rec.sampler_id] = rec
        return rec.sampler_id

    def _record(self, sid: str) -> Optional[SamplerRecord]:
        with self._lock:
            rec = self._records.get(sid)
        if rec is None and isinstance(sid, str) and len(sid) <= 128:
            rec = self.store.sampler(sid)
            if rec is not None:
                with self._lock:
                    self._records[sid] = rec
        return rec

    def sampler(self, owner: str, sid: str) -> SamplerRecord:
        rec = self._record(sid)
        if rec is None or rec.owner != owner:
            raise not_found(f"unknown sampling session {sid!r}")
        return rec

    def describe(self, owner: str, sid: str) -> dict[str, Any]:
        rec = self.sampler(owner, sid)
        return {"sampler_id": sid, "base_model": self.host.name, "model_path": rec.model_path}

    def end_session(self, session_id: str) -> None:
        """Drops the pool registrations of the session's samplers."""
        with self._lock:
            gone = [s for s, r in self._records.items() if r.session_id == session_id]
            held = [(s, self._held.pop(s)) for s in gone if s in self._held]
            for s in gone:
                self._snapshots.pop(s, None)
                self._records.pop(s, None)
        for _, pool_id in held:
            self.registrations.release(pool_id)

    # ------------------------------------------------------------------ sampling

    def submit(self, owner: str, req: SampleRequest) -> dict[str, Any]:
        if not req.sampling_session_id:
            raise bad_request("asample needs a sampling_session_id (create a sampling client first)")
        rec = self.sampler(owner, req.sampling_session_id)
        self.check_session(owner, rec.session_id)
        job = self._job(req)
        entry = self.futures.create(owner, "sample")
        self._executor.submit(self._start, rec, job, entry)
        return {"request_id": entry.request_id,
                "sample_sequence_ids": [f"{entry.request_id}:{i}" for i in range(job.num_samples)]}

    def _job(self, req: SampleRequest) -> SampleJob:
        host = self.host
        prompt = req.prompt.token_ids("prompt")
        if not prompt:
            raise bad_request("prompt: no tokens")
        if min(prompt) < 0 or max(prompt) >= host.vocab_size:
            raise bad_request(f"prompt: token ids must be in [0, {host.vocab_size})")
        room = host.max_context - len(prompt)
        if room < 0:
            raise bad_request(f"prompt: {len(prompt)} tokens, more than the model's context of {host.max_context}")
        p = req.sampling_params
        max_tokens = min(room, self.max_new_tokens) if p.max_tokens is None else p.max_tokens
        if max_tokens < 0 or max_tokens > room:
            raise bad_request(f"sampling_params.max_tokens must be in 0..{room} (context {host.max_context} "
                              f"minus the prompt's {len(prompt)} tokens)")
        if max_tokens > self.max_new_tokens:
            raise bad_request(f"sampling_params.max_tokens: at most {self.max_new_tokens} on this server")
        if not 1 <= req.num_samples <= self.engine.max_rows:
            raise bad_request(f"num_samples must be in 1..{self.engine.max_rows}")
        if not 0 <= req.topk_prompt_logprobs <= 100:
            raise bad_request("topk_prompt_logprobs must be in 0..100")
        sampling = self._row_sampling(p, req.num_samples)
        return SampleJob(prompt=prompt, adapter=None, sampling=sampling, stop=self._stop_rule(p, max_tokens),
                         done=lambda r, e: None, want_prompt_logprobs=bool(req.prompt_logprobs),
                         topk_prompt_logprobs=req.topk_prompt_logprobs)

    @staticmethod
    def _row_sampling(p: SamplingParams, n: int) -> list[RowSampling]:
        t, top_p = float(p.temperature), float(p.top_p)
        if not (math.isfinite(t) and t >= 0):
            raise bad_request("sampling_params.temperature must be a finite number >= 0 (0 = greedy)")
        if not (0 < top_p <= 1):
            raise bad_request("sampling_params.top_p must be in (0, 1]")
        if p.top_k < -1:
            raise bad_request("sampling_params.top_k must be -1 (all tokens) or >= 1")
        seed = p.seed if p.seed is not None else secrets.randbits(63)
        return [RowSampling(t, p.top_k if p.top_k > 0 else -1, top_p, np.random.default_rng([seed % 2**63, i]))
                for i in range(n)]

    def _stop_rule(self, p: SamplingParams, max_tokens: int) -> StopRule:
        host, stop = self.host, p.stop
        if stop is None:
            return StopRule(max_tokens, stop_tokens=host.eos_token_ids)
        items = [stop] if isinstance(stop, str) else list(stop)
        strings = tuple(s for s in items if isinstance(s, str))
        tokens = frozenset(int(s) for s in items if not isinstance(s, str))
        if strings and host.tokenizer is None:
            raise bad_request("sampling_params.stop: stop strings need a tokenizer, and this model directory has "
                              "none; give stop token ids")
        if any(not s for s in strings):
            raise bad_request("sampling_params.stop: empty stop string")
        # An explicit empty list turns off the end-of-sequence stop too (as in newer tinker).
        eos = host.eos_token_ids if items else frozenset()
        return StopRule(max_tokens, stop_tokens=tokens | eos, stop_strings=strings, tokenizer=host.tokenizer)

    def _start(self, rec: SamplerRecord, job: SampleJob, entry: FutureEntry) -> None:
        """Off the request thread: resolve and hold the weights, then queue the job."""
        try:
            job.adapter = self._pool_id(rec)
            if job.adapter is not None:
                job.lease = self._lease(job.adapter)
            job.done = lambda result, exc: self._done(entry, result, exc)
            self.engine.submit(job)
        except Exception as exc:  # noqa: BLE001  (every failure answers the future)
            if job.lease is not None:
                job.lease.release()
            self.futures.fail(entry, exc)

    def _done(self, entry: FutureEntry, result: Optional[dict], exc: Optional[BaseException]) -> None:
        if exc is not None:
            self.futures.fail(entry, exc)
        else:
            self.futures.complete(entry, result or {})

    def _pool_id(self, rec: SamplerRecord) -> Optional[str]:
        """The pool id of the weights `rec` samples now (registered and held by the sampler)."""
        if rec.kind == "base":
            return None
        if rec.kind == "snapshot":
            with self._lock:
                adapter = self._snapshots.get(rec.sampler_id)
            if adapter is None:
                raise UserError("this sampling client's weights were held in memory only and the server restarted; "
                                "save them with save_weights_for_sampler to keep them")
            pool_id, source = f"snapshot/{rec.sampler_id}", adapter
        else:
            with self._lock:
                held = self._held.get(rec.sampler_id)
            if rec.kind == "revision" and held is not None:
                return held  # a fixed revision: what it resolved to once, it resolves to forever
            weights = Weights(rec.model_path or "", rec.adapter_id or "", rec.revision)
            try:
                rev = self.catalog.revision(weights)
            except Exception as exc:
                raise UserError(f"the weights of {rec.model_path!r} are gone: {exc}") from None
            pool_id = f"revision/{rev.content_hash}"
            source = self.catalog.registry.pool_source(rev.adapter_id, rev.number)
        with self._lock:  # held while registering, so a concurrent request finds it registered
            if rec.sampler_id not in self._records:
                raise UserError("this sampling session has ended")
            old = self._held.get(rec.sampler_id)
            if old == pool_id:
                return pool_id
            self.registrations.acquire(pool_id, source)
            self._held[rec.sampler_id] = pool_id
        if old is not None:
            self.registrations.release(old)
        return pool_id

    def _lease(self, pool_id: str) -> Any:
        """A pool Step holding `pool_id` resident; waits (bounded) while the memory is full."""
        deadline = time.monotonic() + self.load_timeout_s
        delay = 0.01
        while True:
            left = deadline - time.monotonic()
            try:
                return self.host.pool.prepare([pool_id], wait=True, timeout=max(0.0, left))
            except PoolExhaustedError as exc:
                if time.monotonic() + delay > deadline:
                    raise ServerError(f"the adapter memory is full ({exc}); try again later") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
            except LoadTimeoutError:
                raise ServerError(f"loading the adapter took more than {self.load_timeout_s:g} s") from None
            except (AdapterLoadError, RegistryError) as exc:
                raise ServerError(f"the adapter's weights could not be loaded: {exc}") from None

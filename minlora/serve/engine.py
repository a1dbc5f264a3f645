"""The decode engine: every client's sample requests decoded together, in mixed-adapter batches.

One thread runs the loop.  Each turn it

1. admits waiting requests (up to `max_rows` running rows and `max_prefill_tokens` of prompt
   per turn) and prefills them in one forward (right-padded, each row its own adapter), which
   also gives prompt logprobs; the first token of every sample is chosen from it, and the
   newcomers' KV cache joins the running batch (kv_cache.BatchCache);
2. runs one decode step over all running rows (one token each, each row its own adapter);
3. retires rows that stopped, and answers a request when all its samples are done.

So a request joins between two decode steps and rows of different adapters, lengths and
sampling parameters share every forward.  The model's lock is taken per forward, so training
steps interleave with decoding.  `max_batch_adapters` limits how many distinct adapters one
batch may hold (1 = serve one adapter at a time, the baseline `minlora bench serve` compares with).

A request arrives with its adapter already resident and held (`lease`, a pool Step taken by
the caller), so a step never waits for a load and nothing is evicted under a running row.
"""
from __future__ import annotations

import collections
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..patching import adapters as use_adapters
from .errors import ServerError
from .kv_cache import BatchCache, new_hf_cache
from .model_host import HostedModel
from .sampler import RowSampling, StopRule, choose_tokens, prompt_logprobs
from .work_queue import WorkQueue

__all__ = ["DecodeEngine", "SampleJob"]

log = logging.getLogger("minlora.serve")

Done = Callable[[Optional[dict], Optional[BaseException]], None]


@dataclass
class SampleJob:
    """One sample request: a prompt, n samples, their parameters, and where the answer goes."""

    prompt: list[int]
    adapter: Optional[str]  # the pool id of its weights; None = the base model
    sampling: list[RowSampling]  # one per sample
    stop: StopRule
    done: Done  # done(result, None) or done(None, exc), called once, from the engine's thread
    want_prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    lease: Any = None  # released when the job is answered
    results: list = field(default_factory=list)  # per sample: (tokens, logprobs, stop_reason)
    prompt_lp: Optional[list] = None
    topk_lp: Optional[list] = None

    @property
    def num_samples(self) -> int:
        return len(self.sampling)


@dataclass
class _Row:
    job: SampleJob
    sample: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


class DecodeEngine:
    """Continuous batching over the hosted (patched) model; see the module docstring."""

    def __init__(self, host: HostedModel, *, max_rows: int = 64, max_prefill_tokens: int = 4096,
                 max_batch_adapters: Optional[int] = None, admit_linger_s: float = 0.003) -> None:
        if max_rows < 1 or max_prefill_tokens < 1 or (max_batch_adapters is not None and max_batch_adapters < 1):
            raise ValueError("max_rows, max_prefill_tokens and max_batch_adapters must be >= 1")
        self.host = host
        self.max_rows = max_rows
        self.max_prefill_tokens = max_prefill_tokens
        self.max_batch_adapters = max_batch_adapters
        # When idle, wait this long after a request arrives for the ones sent with it (clients
        # often send together), so they share one prefill and fill the first steps.
        self.admit_linger_s = admit_linger_s
        params = inspect.signature(host.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._work: WorkQueue[SampleJob] = WorkQueue("minlora-serve-decode", self._loop)
        self._rows: list[_Row] = []
        self._cache: Optional[BatchCache] = None
        self.counters = collections.Counter()
        self._work.start()

    # ------------------------------------------------------------------ public

    def submit(self, job: SampleJob) -> None:
        if job.num_samples > self.max_rows:
            raise ValueError(f"num_samples {job.num_samples} is more than this server's batch of {self.max_rows} rows")
        if not self._work.put(job):
            raise RuntimeError("the decode engine is stopped")

    def stats(self) -> dict[str, Any]:
        with self._work.cond:
            return dict(self.counters, queued=len(self._work.items), running_rows=len(self._rows))

    def close(self, timeout: float = 5.0) -> None:
        for job in self._work.stop(timeout):
            self._finish(job, None, ServerError("the server is shutting down"))

    # ------------------------------------------------------------------ loop

    def _loop(self) -> None:
        work = self._work
        while True:
            with work.cond:
                while not work.stopping and not work.items and not self._rows:
                    work.cond.wait()
                if work.stopping:
                    break
                if not self._rows and self.admit_linger_s > 0:
                    deadline = time.monotonic() + self.admit_linger_s
                    while not work.stopping and (left := deadline - time.monotonic()) > 0:
                        work.cond.wait(left)
                newcomers = self._admit()
            t0 = time.perf_counter()
            try:
                if newcomers:
                    self._prefill(newcomers)
                    self.counters["prefill_s_x1000"] += int(1000 * (time.perf_counter() - t0))
                if self._rows:
                    self._decode_step()
                self.counters["busy_s_x1000"] += int(1000 * (time.perf_counter() - t0))
            except Exception as exc:  # a failed forward fails the requests it carried, not the server
                log.exception("decode step failed")
                failed = {id(r.job): r.job for r in self._rows}
                failed.update({id(j): j for j in newcomers})
                self._rows, self._cache = [], None
                for job in failed.values():
                    if job.results is not None:
                        self._finish(job, None, ServerError(f"sampling failed: {type(exc).__name__}: {exc}"))
        rows, self._rows, self._cache = self._rows, [], None
        for job in {id(r.job): r.job for r in rows}.values():
            self._finish(job, None, ServerError("the server is shutting down"))

    def _admit(self) -> list[SampleJob]:
        """The waiting jobs that fit now, in arrival order (condition held)."""
        rows = len(self._rows)
        adapters = {r.job.adapter for r in self._rows}
        taken, tokens = 0, 0

        def fits(job: SampleJob) -> bool:
            nonlocal rows, taken, tokens
            ok = rows + job.num_samples <= self.max_rows
            ok = ok and (not taken or tokens + len(job.prompt) <= self.max_prefill_tokens)
            if self.max_batch_adapters is not None and job.adapter not in adapters:
                ok = ok and len(adapters) < self.max_batch_adapters
            if ok:
                taken += 1
                rows += job.num_samples
                tokens += len(job.prompt)
                adapters.add(job.adapter)
            return ok

        return self._work.take(fits)

    def _forward(self, ids: list[Optional[str]], **inputs: Any) -> torch.Tensor:
        """One forward of the patched model with each row's adapter; returns float logits."""
        host = self.host
        with host.lock, torch.no_grad(), use_adapters(host.model, ids, wait=False) as step:
            if not all(step.ready):  # leases keep every adapter resident; this would be a bug
                raise RuntimeError("an adapter of the batch is not resident")
            out = host.model(**inputs, use_cache=True)
        return out.logits

    def _prefill(self, jobs: list[SampleJob]) -> None:
        device = self.host.device
        lengths = [len(j.prompt) for j in jobs]
        L, n = max(lengths), len(jobs)
        ids = torch.zeros(n, L, dtype=torch.int64)
        mask = torch.zeros(n, L, dtype=torch.bool)
        for i, job in enumerate(jobs):
            ids[i, : lengths[i]] = torch.tensor(job.prompt, dtype=torch.int64)
            mask[i, : lengths[i]] = True
        positions = torch.arange(L).expand(n, L)
        want_all = any(j.want_prompt_logprobs or j.topk_prompt_logprobs > 0 for j in jobs)
        last = torch.tensor([x - 1 for x in lengths])
        keep = None if want_all else torch.unique(last)
        hf = new_hf_cache()
        inputs = dict(input_ids=ids.to(device), attention_mask=mask.to(device, torch.int64),
                      position_ids=positions.to(device), **{self._cache_kw: hf})
        if keep is not None:
            inputs["logits_to_keep"] = keep.to(device)
        logits = self._forward([j.adapter for j in jobs], **inputs)
        column = last if keep is None else torch.searchsorted(keep, last)
        final = logits[torch.arange(n, device=logits.device), column.to(logits.device)]  # [n, V]
        self.counters["prefill_tokens"] += sum(lengths)
        self.counters["prefills"] += 1
        for i, job in enumerate(jobs):
            if job.want_prompt_logprobs or job.topk_prompt_logprobs > 0:
                values, top = prompt_logprobs(logits[i, : lengths[i]], job.prompt, job.topk_prompt_logprobs)
                job.prompt_lp = values if job.want_prompt_logprobs else None
                job.topk_lp = top
            job.results = [None] * job.num_samples
        cache = BatchCache(hf, mask.to(device), torch.tensor(lengths, device=device))
        counts = [j.num_samples if j.stop.max_tokens > 0 else 0 for j in jobs]
        rows = [_Row(job, s) for job, c in zip(jobs, counts) for s in range(c)]
        for job, c in zip(jobs, counts):
            if c == 0:
                self._finish(job, self._result(job), None)
        if not rows:
            return
        cache = cache.repeat_rows(counts)
        row_logits = final.index_select(0, torch.repeat_interleave(torch.arange(n), torch.tensor(counts))
                                        .to(final.device))
        alive = self._choose(rows, row_logits)
        if len(alive) != len(rows):
            cache = cache.keep(alive)
            rows = [rows[i] for i in alive]
        if rows:
            self._cache = BatchCache.join(self._cache, cache)
            self._rows.extend(rows)

    def _decode_step(self) -> None:
        cache, rows = self._cache, self._rows
        assert cache is not None and cache.rows == len(rows)
        device = self.host.device
        mask = cache.step_mask()
        inputs = dict(input_ids=torch.tensor([[r.tokens[-1]] for r in rows], dtype=torch.int64, device=device),
                      attention_mask=mask.to(torch.int64), position_ids=cache.positions[:, None],
                      **{self._cache_kw: cache.hf})
        t0 = time.perf_counter()
        logits = self._forward([r.job.adapter for r in rows], **inputs)[:, -1]
        self.counters["decode_s_x1000"] += int(1000 * (time.perf_counter() - t0))
        cache.stepped(mask)
        self.counters["steps"] += 1
        self.counters["row_steps"] += len(rows)
        adapters = len({r.job.adapter for r in rows})
        self.counters["max_step_rows"] = max(self.counters["max_step_rows"], len(rows))
        self.counters["max_step_adapters"] = max(self.counters["max_step_adapters"], adapters)
        alive = self._choose(rows, logits)
        if len(alive) != len(rows):
            self._rows = [rows[i] for i in alive]
            self._cache = cache.keep(alive) if alive else None

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """Chooses every row's next token; retires rows that stop; returns the rows still going."""
        tokens, logprobs = choose_tokens(logits, [r.job.sampling[r.sample] for r in rows])
        self.counters["tokens"] += len(rows)
        alive = []
        for i, (row, tok, lp) in enumerate(zip(rows, tokens.tolist(), logprobs.tolist())):
            row.tokens.append(tok)
            row.logprobs.append(lp)
            reason = row.job.stop.stop_reason(row.tokens)
            if reason is None:
                alive.append(i)
                continue
            job = row.job
            job.results[row.sample] = (row.tokens, row.logprobs, reason)
            if all(r is not None for r in job.results):
                self._finish(job, self._result(job), None)
        return alive

    @staticmethod
    def _result(job: SampleJob) -> dict[str, Any]:
        sequences = [{"tokens": t, "logprobs": lp, "stop_reason": reason} for t, lp, reason in
                     (r if r is not None else ([], [], "length") for r in job.results)]
        return {"type": "sample", "sequences": sequences, "prompt_logprobs": job.prompt_lp,
                "topk_prompt_logprobs": job.topk_lp}

    def _finish(self, job: SampleJob, result: Optional[dict], exc: Optional[BaseException]) -> None:
        job.results = None  # answered: never again
        if job.lease is not None:
            job.lease.release()
            job.lease = None
        try:
            job.done(result, exc)
        except Exception:
            log.exception("a sample request's completion callback failed")

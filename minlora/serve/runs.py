"""Training clients (training runs): their lifecycle and every training request, as futures.

A training client is a run `<session>:train:<n>` with one trainable adapter in the pool.  Its
registry adapter (what its checkpoints are revisions of) is `<owner>:<run id>`, or
`<owner>:<name>` when create_model's user_metadata names one with `"adapter": "<name>"` (a
user's long-lived adapter, trained across runs; one live run at a time).

Every request is checked when it arrives (400 on bad input), answered with a future, queued
in the client's SeqOrder (seq_id order) and run by the TrainingScheduler, which coalesces
the clients' forward_backward / forward / optim_step into shared Trainer calls
(training.py holds the Trainer side).  Saves commit registry revisions with provenance (the
run, its step and loss history, the client's metadata, the base-model fingerprint) and a
checkpoint row naming them.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..registry import normalize_adapter_id
from ..registry.errors import InvalidIdError
from .catalog import Catalog, owned_adapter_id
from .errors import ApiError, ServerError, UserError, bad_request, not_found
from .futures import FutureTable
from .model_host import HostedModel
from .ordering import SeqOrder
from .request_service import RequestService
from .paths import FOLDERS, check_checkpoint_name, model_id as make_model_id, tinker_path
from .scheduler import TrainingScheduler, Work
from .state import CheckpointRecord, RunRecord, StateStore
from .train_batch import TrainData, parse_train_data, stack
from .training import TrainingBackend
from .wire import AdamParams, CreateModelRequest, ForwardBackwardInput, LoadWeightsRequest, LoraConfig

__all__ = ["LiveRun", "TrainingService"]

DEFAULT_RANK = 32
MAX_REMEMBERED_SEQ = 256


@dataclass(eq=False)
class LiveRun:
    record: RunRecord
    order: SeqOrder
    steps: int = 0
    answers: dict[int, dict] = field(default_factory=dict)  # seq_id -> submit answer (retries)
    created: bool = False

    @property
    def adapter_id(self) -> str:
        return self.record.adapter_id


class TrainingService(RequestService):
    def __init__(self, host: HostedModel, backend: TrainingBackend, store: StateStore, catalog: Catalog,
                 futures: FutureTable, check_session: Callable[[str, str], None], snapshot: Callable[..., str], *,
                 boot_id: str, max_request_tokens: int, gap_timeout_s: float, linger_s: float) -> None:
        super().__init__(host, catalog, store, futures, check_session)
        self.backend = backend
        self._snapshot = snapshot  # SamplingService.create_snapshot
        self.boot_id = boot_id
        self.max_request_tokens = max_request_tokens
        self.gap_timeout_s = gap_timeout_s
        self.scheduler = TrainingScheduler(host.lock, self._execute, linger_s=linger_s,
                                           max_batch_tokens=max(max_request_tokens, 1))
        self._lock = threading.Lock()
        self._runs: dict[str, LiveRun] = {}

    def close(self) -> None:
        self.scheduler.close()

    # ------------------------------------------------------------------ lookup

    def live(self, owner: str, model_id: str) -> LiveRun:
        """The owner's live training client; 404 (not the owner's / unknown) or 400 (not live)."""
        with self._lock:
            run = self._runs.get(model_id)
        if run is not None and run.record.owner == owner:
            self.check_session(owner, run.record.session_id)
            return run
        rec = self.store.run(model_id) if isinstance(model_id, str) and len(model_id) <= 128 else None
        if rec is None or rec.owner != owner:
            raise not_found(f"unknown model_id {model_id!r}")
        why = {"lost": "the server restarted", "ended": "it was unloaded or its session ended"}.get(rec.state, rec.state)
        raise bad_request(f"training client {model_id!r} is no longer live ({why}); its saved checkpoints are kept: "
                          "create a training client from one of them")

    def info(self, owner: str, model_id: str) -> dict[str, Any]:
        run = self.live(owner, model_id)
        lora = run.record.lora_config
        tokenizer_id = self.host.directory if self.host.tokenizer is not None else self.host.name
        return {"type": "get_info", "model_id": model_id,
                "model_data": {"arch": self.host.arch, "model_name": self.host.name, "tokenizer_id": tokenizer_id},
                "is_lora": True, "lora_rank": lora["rank"], "model_name": self.host.name}

    def weights_info(self, owner: str, path: str) -> dict[str, Any]:
        """What a training client needs to start from `path`: rank and trained module groups."""
        weights = self.catalog.resolve(owner, path, "tinker_path")
        run = self.store.run(weights.checkpoint.run_id) if weights.checkpoint is not None else None
        if run is not None:
            lora = run.lora_config
            return {"base_model": self.host.name, "is_lora": True, "lora_rank": lora["rank"],
                    "train_unembed": lora["train_unembed"], "train_mlp": lora["train_mlp"],
                    "train_attn": lora["train_attn"]}
        rev = self.catalog.revision(weights)
        adapter = self.catalog.registry.load(rev.adapter_id, rev.number)
        groups = {self.host.module_groups.get(m) for m in adapter.modules}
        return {"base_model": self.host.name, "is_lora": True,
                "lora_rank": max(w.rank for w in adapter.modules.values()),
                "train_unembed": "unembed" in groups, "train_mlp": "mlp" in groups, "train_attn": "attn" in groups}

    # ------------------------------------------------------------------ submit

    def _submit(self, run: LiveRun, owner: str, seq_id: Optional[int], kind: str, *, key: tuple = (),
                payload: Any = None, tokens: int = 0, finish: Optional[Callable[[Any], dict]] = None) -> dict:
        """Queues one request of `run`; answers {"request_id", "model_id"} (the first answer again
        for a retried seq_id)."""
        if seq_id is not None:
            with self._lock:
                seen = run.answers.get(seq_id)
            if seen is not None:
                return seen
        entry = self.futures.create(owner, kind, run.record.run_id)

        def on_done(result: Any, exc: Optional[BaseException]) -> None:
            try:
                if exc is None:
                    self.futures.complete(entry, finish(result) if finish is not None else result)
                else:
                    self.futures.fail(entry, exc)
            except Exception as e:  # noqa: BLE001  (a failed follow-up fails the future, not the order)
                self.futures.fail(entry, e)
            finally:
                run.order.finished(work)

        work = Work(kind, run, key=key, payload=payload, tokens=tokens, on_done=on_done)
        answer = {"request_id": entry.request_id, "model_id": run.record.run_id}
        if seq_id is not None:
            with self._lock:
                run.answers[seq_id] = answer
                if len(run.answers) > MAX_REMEMBERED_SEQ:  # retries come soon after: keep the newest
                    for old in sorted(run.answers)[: len(run.answers) - MAX_REMEMBERED_SEQ]:
                        del run.answers[old]
        try:
            run.order.submit(seq_id, work)
        except RuntimeError as exc:
            self.futures.fail(entry, UserError(str(exc)))
        return answer

    def create_model(self, owner: str, req: CreateModelRequest) -> dict:
        self.check_session(owner, req.session_id)
        if not self.host.accepts_name(req.base_model):
            raise bad_request(f"base_model {req.base_model!r} is not served here (this server serves {self.host.name!r})")
        lora = req.lora_config or LoraConfig(rank=DEFAULT_RANK)
        self.backend.check_lora_config(lora)
        if req.model_seq_id < 0:
            raise bad_request("model_seq_id must be >= 0")
        run_id = make_model_id(req.session_id, req.model_seq_id)
        meta = dict(req.user_metadata or {})
        name = meta.get("adapter", run_id)
        try:
            adapter_id = normalize_adapter_id(owned_adapter_id(owner, str(name)))
        except InvalidIdError as exc:
            raise bad_request(f"user_metadata.adapter: {exc}") from None
        # (a 400, not a 409: the SDK retries 409s for minutes, and these do not go away)
        taken = self.store.run(run_id) is not None
        busy = self.store.live_run_of_adapter(adapter_id) is not None
        now = time.time()
        rec = RunRecord(run_id, owner, req.session_id, adapter_id, self.host.name, lora.model_dump(), meta,
                        now, now, boot_id=self.boot_id)
        run = LiveRun(rec, SeqOrder(self.scheduler.ready, gap_timeout_s=self.gap_timeout_s))
        with self._lock:  # checked and claimed at once, so two concurrent creates cannot both win
            existing = self._runs.get(run_id)
            if existing is not None and existing.record.owner == owner:
                retry = existing
            elif existing is not None or taken:
                raise bad_request(f"model_seq_id {req.model_seq_id} of this session is taken; use the next one")
            elif busy or any(r.adapter_id == adapter_id for r in self._runs.values()):
                raise bad_request(f"adapter {adapter_id!r} is being trained by another live training client")
            else:
                retry = None
                self._runs[run_id] = run
        if retry is not None:  # the same create again (a retried submit): answer it again
            return self._submit(retry, owner, None, "create_model", payload=lambda: None,
                                finish=lambda _: {"model_id": run_id, "type": "create_model"})

        def create() -> None:
            try:
                self.backend.create(adapter_id, lora)
                self.store.add_run(rec)
            except BaseException:
                self._drop(run, "creation failed")
                raise
            run.created = True

        def finish(_: Any) -> dict:
            return {"model_id": run_id, "type": "create_model"}

        answer = self._submit(run, owner, None, "create_model", payload=create, finish=finish)
        return answer

    def _live_runs(self) -> list[LiveRun]:
        with self._lock:
            return list(self._runs.values())

    def forward(self, owner: str, model_id: str, seq_id: Optional[int], fbi: ForwardBackwardInput,
                backward: bool) -> dict:
        run = self.live(owner, model_id)
        what = "forward_backward_input" if backward else "forward_input"
        data = parse_train_data(fbi, what, vocab_size=self.host.vocab_size, max_context=self.host.max_context,
                                max_tokens=self.max_request_tokens)
        kind = "forward_backward" if backward else "forward"

        def finish(result: dict) -> dict:
            if backward:
                self.store.update_run(model_id, losses=[[run.steps, result["metrics"]["loss:sum"]]])
            return result

        return self._submit(run, owner, seq_id, kind, key=data.group_key(), payload=(run.adapter_id, data),
                            tokens=data.num_tokens, finish=finish)

    def optim_step(self, owner: str, model_id: str, seq_id: Optional[int], params: AdamParams) -> dict:
        run = self.live(owner, model_id)
        values = [float(getattr(params, k)) for k in ("learning_rate", "beta1", "beta2", "eps", "weight_decay",
                                                        "grad_clip_norm")]
        lr, b1, b2, eps, wd, clip = values
        if not (lr > 0 and 0 <= b1 < 1 and 0 <= b2 < 1 and eps >= 0 and wd >= 0 and clip >= 0) or \
                any(v != v or v in (float("inf"), float("-inf")) for v in values):
            raise bad_request("adam_params: need learning_rate > 0, 0 <= beta1, beta2 < 1, eps, weight_decay and "
                              "grad_clip_norm >= 0, all finite")

        def finish(result: dict) -> dict:
            if result.get("metrics"):
                run.steps += 1
                self.store.update_run(model_id, steps=run.steps)
            return result

        return self._submit(run, owner, seq_id, "optim_step", key=tuple(values), payload=params, finish=finish)

    def save(self, owner: str, req: Any, folder: str) -> dict:
        """save_weights (folder "weights": with optimizer state), save_weights_for_sampler
        ("sampler_weights"; without a path: an in-memory snapshot for a sampling session) and
        save_weights_external ("external_weights": for download)."""
        run = self.live(owner, req.model_id)
        ttl = req.ttl_seconds
        if ttl is not None and ttl <= 0:
            raise bad_request("ttl_seconds must be > 0 (or omitted: never expires)")
        if getattr(req, "age_encryption_recipients", None):
            raise bad_request("age_encryption_recipients: encrypted exports are not supported")
        ephemeral = folder == "sampler_weights" and not req.path
        seq = getattr(req, "sampling_session_seq_id", None)
        if ephemeral and seq is None:
            raise bad_request("save_weights_for_sampler needs a path, or a sampling_session_seq_id")
        name = check_checkpoint_name(req.path) if req.path else f"{int(time.time() * 1000):015d}"
        path = tinker_path(run.record.run_id, folder, name)
        kind = FOLDERS[folder]
        overwrite = bool(getattr(req, "overwrite", True))
        meta = dict(getattr(req, "user_metadata", None) or {})

        def work() -> dict:
            if ephemeral:
                weights = self.backend.export(run.adapter_id)
                sid = self._snapshot(owner, run.record.session_id, seq, weights, path)
                return {"path": None, "sampling_session_id": sid, "type": "save_weights_for_sampler"}
            if not overwrite and self.store.checkpoint(run.record.run_id, kind, name) is not None:
                raise UserError(f"checkpoint {path} exists (pass overwrite=True to replace it)")
            rev = self.backend.save(run.adapter_id, message=path, with_optimizer=kind == "training",
                                    provenance=self._provenance(run, path, meta))
            rec = CheckpointRecord(run.record.run_id, kind, name, owner, run.adapter_id, rev.number, rev.size,
                                   time.time(), expires_at=None if ttl is None else time.time() + ttl, step=run.steps)
            self.store.put_checkpoint(rec, overwrite=True)
            if kind == "sampler":
                return {"path": path, "sampling_session_id": None, "type": "save_weights_for_sampler"}
            if kind == "external":
                return {"path": path, "size_bytes": rev.size, "type": "save_weights_external"}
            return {"path": path, "type": "save_weights"}

        return self._submit(run, owner, req.seq_id, f"save_{folder}", payload=work)

    def _provenance(self, run: LiveRun, path: str, meta: dict) -> dict[str, Any]:
        rec = self.store.run(run.record.run_id) or run.record
        return {
            "base_model": self.host.fingerprint,
            "training_data": f"tinker-run:{rec.run_id}",
            "tinker_run": rec.run_id,
            "tinker_path": path,
            "owner": rec.owner,
            "step": run.steps,
            "loss_history": rec.loss_history,
            "lora_config": rec.lora_config,
            "user_metadata": {**rec.user_metadata, **meta},
        }

    def load(self, owner: str, req: LoadWeightsRequest) -> dict:
        if req.model_id is None:  # newer SDKs create a training client from a checkpoint in one request
            if req.session_id is None or req.model_seq_id is None:
                raise bad_request("load_weights needs a model_id, or a session_id and model_seq_id")
            info = self.weights_info(owner, req.path)
            lora = LoraConfig(rank=info["lora_rank"], train_unembed=info["train_unembed"],
                              train_mlp=info["train_mlp"], train_attn=info["train_attn"])
            self.create_model(owner, CreateModelRequest(
                session_id=req.session_id, model_seq_id=req.model_seq_id, base_model=req.base_model or self.host.name,
                user_metadata=req.user_metadata, lora_config=lora))
            req = req.model_copy(update={"model_id": make_model_id(req.session_id, req.model_seq_id)})
        run = self.live(owner, req.model_id)
        weights = self.catalog.resolve(owner, req.path, "path")

        def work() -> dict:
            rev = self.catalog.revision(weights)
            self.backend.load(run.adapter_id, rev, with_optimizer=req.optimizer, exists=True)
            run.steps = self.backend.steps(run.adapter_id)
            return {"path": req.path, "model_id": req.model_id, "type": "load_weights"}

        return self._submit(run, owner, req.seq_id, "load_weights", payload=work)

    def unload(self, owner: str, model_id: str) -> dict:
        run = self.live(owner, model_id)

        def work() -> dict:
            self._drop(run, "unloaded")
            return {"model_id": model_id, "type": "unload_model"}

        return self._submit(run, owner, None, "unload_model", payload=work)

    # ------------------------------------------------------------------ endings

    def end_session(self, session_id: str) -> None:
        """The session is gone: its training clients' adapters leave the pool."""
        for run in [r for r in self._live_runs() if r.record.session_id == session_id]:
            self._fail_waiting(run, "the session ended before this request ran")
            self.scheduler.ready(Work("remove", run, payload=lambda run=run: self._drop(run, "session ended")))

    def _fail_waiting(self, run: LiveRun, why: str) -> None:
        for work in run.order.close():
            work.on_done(None, UserError(why))

    def _drop(self, run: LiveRun, why: str) -> None:
        """Forgets a training client and frees its adapter (scheduler thread, model lock held)."""
        with self._lock:
            self._runs.pop(run.record.run_id, None)
        self._fail_waiting(run, f"the training client was closed ({why}) before this request ran")
        self.backend.remove(run.adapter_id)
        if run.created:
            self.store.update_run(run.record.run_id, state="ended")

    # ------------------------------------------------------------------ the scheduler's calls

    def _execute(self, kind: str, works: list[Work]) -> list[Any]:
        if kind in ("forward_backward", "forward"):
            requests: list[tuple[str, TrainData]] = [w.payload for w in works]
            return self.backend.forward(stack(requests, self.host.device), backward=kind == "forward_backward")
        if kind == "optim_step":
            by_adapter = self.backend.optim_step([w.client.adapter_id for w in works], works[0].payload)
            return [by_adapter[w.client.adapter_id] for w in works]
        out = []
        for w in works:  # run alone (one work)
            try:
                out.append(w.payload())
            except (ApiError, UserError, ServerError) as exc:
                out.append(exc)
        return out

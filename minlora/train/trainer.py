"""Trainer: many users' adapters trained together on one frozen base, each batch row its own
adapter (or none), with Tinker's training-client semantics (the API: minlora/train/__init__.py).

The trainer owns the per-adapter bookkeeping (state.py); the weights, gradient accumulators and
Adam moments are pages of the pool (AdapterPool(optimizer_state=True)), so they move through
the pool's tiers with the adapter.  One forward and one backward per call cover every row:
the patched model's layers accumulate each adapter's dA / dB into its gradient pages
(grads.py); optim_step updates all stepping adapters' pages at once (adamw.py).
"""
from __future__ import annotations

import math
import threading
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from ..formats.adapter import Adapter, LoraWeights
from ..formats.peft import load_peft as read_peft_dir
from ..formats.peft import save_peft as write_peft_dir
from ..formats.state import AdapterState
from ..formats.targeting import TargetModules, select_modules
from ..patching import is_patched, linear_shape, patch, patched_modules, patched_pool, use_step
from ..pool import STATE_KINDS, PoolExhaustedError
from .adamw import AdamParams, paged_adamw_step
from .batch import Batch, check_batch, check_known
from .checkpoint import MOMENTS, commit_checkpoint, read_checkpoint, registry_key
from .grads import GradientStep
from .init import peft_default_init
from .losses import row_losses, token_logprobs
from .results import ForwardResult, OptimStepResult
from .state import AdapterTraining, Origin

__all__ = ["Trainer"]


def _vocab_size(model: nn.Module) -> int:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is not None:
        return int(out.weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(size, int):
        raise ValueError("model: cannot tell its vocabulary size (no output embeddings, no config.vocab_size)")
    return size


class Trainer:
    """Trainer(model, pool): `model` an HF causal LM (patched with `pool` here unless it already
    is), `pool` an AdapterPool made with optimizer_state=True.  The base model is frozen
    (requires_grad off on every parameter) and put in eval mode (no dropout).  One caller at a
    time (calls are serialised by a lock)."""

    def __init__(self, model: nn.Module, pool: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch nn.Module (an HF causal LM), got {type(model).__name__}")
        if not getattr(pool, "optimizer_state", False):
            raise ValueError("pool must be an AdapterPool made with optimizer_state=True (it keeps the Adam moments)")
        if is_patched(model):
            if patched_pool(model) is not pool:
                raise ValueError("model is patched with another pool; unpatch it or pass that pool")
        else:
            patch(model, pool)
        patched = set(patched_modules(model))
        self._shapes: dict[str, tuple[int, int]] = {}
        self._conv1d = False
        for name, module in model.named_modules():
            if name in patched:
                self._shapes[name] = linear_shape(module)  # type: ignore[assignment]
                self._conv1d = self._conv1d or not isinstance(module, nn.Linear)
        param = next(model.parameters(), None)
        if param is not None and param.device != pool.device:
            raise ValueError(f"model is on {param.device} but the pool's fast tier is on {pool.device}")
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.pool = pool
        self.vocab_size = _vocab_size(model)
        self._fingerprint: Optional[str] = None
        self._adapters: dict[str, AdapterTraining] = {}
        self._lock = threading.RLock()

    @property
    def fingerprint(self) -> str:
        """The base model's fingerprint (minlora.registry.fingerprint_base_model), as revisions record it."""
        if self._fingerprint is None:
            from ..registry.fingerprint import fingerprint_base_model  # the registry is imported on first use

            self._fingerprint = fingerprint_base_model(self.model)
        return self._fingerprint

    # ------------------------------------------------------------------ adapters

    def adapters(self) -> list[str]:
        """The trainable adapter ids."""
        with self._lock:
            return list(self._adapters)

    def info(self, adapter_id: str) -> dict[str, Any]:
        """rank, alpha, use_rslora, target_modules, steps (optimizer steps taken), pending
        (rows accumulated since the last step)."""
        with self._lock:
            return self._get(adapter_id).info()

    def create(
        self,
        adapter_id: str,
        rank: int,
        alpha: float,
        target_modules: TargetModules = None,
        use_rslora: bool = False,
        seed: int = 0,
    ) -> None:
        """A new trainable adapter with PEFT's default init (A Kaiming-uniform drawn as PEFT draws
        it from `seed`, B zero) on the patched modules `target_modules` selects (PEFT's rules;
        None = all of them)."""
        with self._lock:
            self._check_new(adapter_id)
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"rank must be an int >= 1, got {rank!r}")
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
                raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
            if not isinstance(use_rslora, bool):
                raise ValueError(f"use_rslora must be a bool, got {use_rslora!r}")
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
                raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
            try:
                names = select_modules(list(self._shapes), target_modules)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"target_modules={target_modules!r}: {exc}") from None
            if not names:
                raise ValueError(f"target_modules={target_modules!r} selects none of the patched modules "
                                 f"(e.g. {list(self._shapes)[:3]})")
            scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
            init = peft_default_init([(n, *self._shapes[n]) for n in names], rank, seed)
            adapter = Adapter({n: LoraWeights(a, b, scale) for n, (a, b) in init.items()})
            self._add(adapter_id, adapter, None, rank, alpha, use_rslora, {})

    def load_peft(self, adapter_id: str, directory: str) -> None:
        """A trainable adapter starting from a PEFT adapter directory (moments zero, step 0)."""
        with self._lock:
            self._check_new(adapter_id)
            adapter = read_peft_dir(directory)
            c = adapter.config
            self._add(adapter_id, adapter, None, int(c.get("r", 8)), float(c.get("lora_alpha", 8)),
                      bool(c.get("use_rslora", False)), c)

    def load_revision(self, adapter_id: str, registry: Any, rev: Any = "head", source_adapter: Optional[str] = None) -> None:
        """A trainable adapter starting from revision `rev` of `source_adapter or adapter_id` in
        the registry: its weights and, when the revision has them, its Adam moments and step
        count (a bit-exact resume)."""
        with self._lock:
            self._check_new(adapter_id)
            info, weights, moments, steps = read_checkpoint(registry, source_adapter or adapter_id, rev)
            c = weights.config
            rank = int(c.get("r", next(iter(weights.modules.values())).rank))
            alpha = float(c.get("lora_alpha", rank))
            self._add(adapter_id, weights, moments, rank, alpha, bool(c.get("use_rslora", False)), c,
                      steps=steps, origin=Origin(registry_key(registry), info.adapter_id, info.number))

    def remove(self, adapter_id: str) -> None:
        """Forgets a trainable adapter and frees its pages."""
        with self._lock:
            self._get(adapter_id)
            self.pool.unregister(adapter_id)
            del self._adapters[adapter_id]

    def _check_new(self, adapter_id: Any) -> None:
        if not isinstance(adapter_id, str) or not adapter_id:
            raise ValueError(f"adapter_id must be a non-empty str, got {adapter_id!r}")
        if adapter_id in self._adapters or adapter_id in self.pool:
            raise ValueError(f"adapter_id {adapter_id!r} exists already (remove it first)")

    def _add(self, adapter_id: str, adapter: Adapter, moments: Optional[AdapterState], rank: int, alpha: float,
             use_rslora: bool, config: Mapping[str, Any], steps: int = 0, origin: Optional[Origin] = None) -> None:
        """Registers the adapter's pages with the pool and starts its bookkeeping."""
        unknown = [n for n in adapter.modules if n not in self._shapes]
        if unknown:
            raise ValueError(f"the adapter targets {unknown[:3]!r}, which are not patched modules of the model "
                             f"({len(unknown)} in all)")
        names = [n for n in self._shapes if n in adapter.modules]
        cfg = {k: v for k, v in config.items() if k not in ("target_modules", "rank_pattern", "alpha_pattern")}
        cfg.update(peft_type="LORA", r=rank, lora_alpha=alpha, use_rslora=use_rslora, target_modules=names,
                   task_type=cfg.get("task_type", "CAUSAL_LM"), fan_in_fan_out=self._conv1d)
        name = getattr(getattr(self.model, "config", None), "_name_or_path", None)
        if name and "base_model_name_or_path" not in cfg:
            cfg["base_model_name_or_path"] = name
        self.pool.register(adapter_id, Adapter(adapter.modules, cfg), trainable=True, state=moments)
        self._adapters[adapter_id] = AdapterTraining(adapter_id, rank, alpha, use_rslora, names, cfg, steps=steps,
                                                     origin=origin)

    def _get(self, adapter_id: Any) -> AdapterTraining:
        t = self._adapters.get(adapter_id) if isinstance(adapter_id, str) else None
        if t is None:
            raise KeyError(f"unknown adapter id {adapter_id!r} (create or load it first)")
        return t

    # ------------------------------------------------------------------ forward / backward

    def forward_backward(
        self, adapters: Sequence[Optional[str]], input_ids: torch.Tensor, target_tokens: torch.Tensor,
        weights: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor] = None,
        loss_fn: str = "cross_entropy", loss_fn_inputs: Optional[Mapping[str, torch.Tensor]] = None,
        loss_fn_config: Optional[Mapping[str, float]] = None,
    ) -> ForwardResult:
        """One forward and one backward over every row; each adapter's gradient of the sum of
        its rows' losses accumulates in its gradient pages until its optim_step.  weights None
        means ones."""
        with self._lock:
            batch = self._batch(adapters, input_ids, target_tokens, weights, attention_mask, loss_fn,
                                loss_fn_inputs, loss_fn_config)
            result = self._run(batch, backward=True)
            losses = result.loss
            for a, rows in batch.rows_of().items():
                bad = not bool(torch.isfinite(losses[rows]).all())
                self._adapters[a].accumulated(len(rows), batch.loss_fn, bad)
            return result

    def forward(
        self, adapters: Sequence[Optional[str]], input_ids: torch.Tensor, target_tokens: torch.Tensor,
        weights: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
        loss_fn: str = "cross_entropy", loss_fn_inputs: Optional[Mapping[str, torch.Tensor]] = None,
        loss_fn_config: Optional[Mapping[str, float]] = None,
    ) -> ForwardResult:
        """The same losses and logprobs as forward_backward, with no gradients."""
        with self._lock:
            batch = self._batch(adapters, input_ids, target_tokens, weights, attention_mask, loss_fn,
                                loss_fn_inputs, loss_fn_config)
            return self._run(batch, backward=False)

    def _batch(self, *args: Any) -> Batch:
        return check_batch(self._adapters, self.vocab_size, *args)

    def _run(self, batch: Batch, backward: bool) -> ForwardResult:
        device = self.pool.device
        ids = batch.input_ids.to(device)
        mask = batch.attention_mask.to(device) if batch.attention_mask is not None else None
        weights = batch.weights.to(device)
        with self.pool.prepare(batch.adapters, wait=True) as step:
            train_step = GradientStep(step, lambda d: self.pool.state_tensor("grad", d)) if backward else step
            with use_step(self.model, train_step), torch.set_grad_enabled(backward):
                logits = self.model(input_ids=ids, attention_mask=mask).logits
                logprobs = token_logprobs(logits, batch.targets.to(device))
                del logits
                losses = row_losses(batch.loss_fn, logprobs, weights, batch.loss_inputs, batch.loss_config)
                rows = [i for i, a in enumerate(batch.adapters) if a is not None]
                if backward and rows:
                    losses[rows].sum().backward()
        losses, logprobs = losses.detach().float().cpu(), logprobs.detach().float().cpu()
        metrics = {
            "loss:sum": float(losses.sum()),
            "tokens:sum": float((batch.weights != 0).sum()),
            "rows:sum": float(len(batch.adapters)),
            "rows_with_adapter:sum": float(sum(a is not None for a in batch.adapters)),
        }
        return ForwardResult(losses, logprobs, metrics)

    # ------------------------------------------------------------------ optimizer

    def optim_step(
        self,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        grad_clip_norm: Optional[float] = None,
        adapters: Optional[Sequence[str]] = None,
    ) -> OptimStepResult:
        """torch.optim.AdamW's update of every adapter with accumulated gradients (or of the
        named ones), each with its own step count; their gradients are cleared after.  An adapter
        with a NaN/Inf loss or gradient is skipped (weights and moments unchanged, gradients
        cleared); nothing accumulated anywhere is a no-op (status "no-op")."""
        params = AdamParams(lr, tuple(betas) if isinstance(betas, (list, tuple)) else betas, eps, weight_decay,
                            grad_clip_norm).checked()
        with self._lock:
            if adapters is None:
                names = [a for a, t in self._adapters.items() if t.pending]
            else:
                names = list(dict.fromkeys(check_known(adapters, self._adapters)))
                if None in names:
                    raise ValueError("adapters: optim_step takes adapter ids, not None")
            out = OptimStepResult()
            for a in names:
                if not self._adapters[a].pending:
                    out.skipped[a] = "no gradients accumulated"
            todo = [a for a in names if a not in out.skipped]
            if todo:
                self._step_fitting(todo, params, out)
            out.status = "no-op" if not out.stepped else ("partial" if out.skipped else "ok")
            return out

    def _step_fitting(self, ids: list[str], params: AdamParams, out: OptimStepResult) -> None:
        """Steps `ids` together when the fast tier holds them all at once, else in halves."""
        try:
            step = self.pool.prepare(ids, wait=True)
        except PoolExhaustedError:
            if len(ids) == 1:
                raise
            self._step_fitting(ids[: len(ids) // 2], params, out)
            self._step_fitting(ids[len(ids) // 2 :], params, out)
            return
        with step:
            order = step.adapter_ids
            groups = step.slot_pages()
            weights = {d: self.pool.pool_tensor(d) for d in groups}
            state = {d: tuple(self.pool.state_tensor(k, d) for k in STATE_KINDS) for d in groups}
            training = [self._adapters[a] for a in order]
            norms = paged_adamw_step(weights, state, groups, [t.steps + 1 for t in training],
                                     [t.nonfinite for t in training], params)
        hyper = params.to_dict()
        for a, t, norm in zip(order, training, norms):
            if t.nonfinite:
                out.skipped[a] = "non-finite loss (NaN/Inf) since the last step; gradients cleared"
                t.cleared()
            elif not math.isfinite(norm):
                out.skipped[a] = "non-finite gradient (NaN/Inf); gradients cleared"
                t.cleared()
            else:
                t.stepped(hyper)
                out.stepped.append(a)
                out.grad_norms[a] = norm

    # ------------------------------------------------------------------ weights and checkpoints

    def export(self, adapter_id: str) -> Adapter:
        """The adapter's current weights (a copy) with its PEFT config."""
        with self._lock:
            t = self._get(adapter_id)
            with self.pool.prepare([adapter_id], wait=True):
                modules = self.pool.read_adapter(adapter_id)
            return Adapter(modules, dict(t.config))

    def save_peft(self, adapter_id: str, directory: str) -> None:
        """Writes the adapter's current weights as a PEFT adapter directory."""
        write_peft_dir(self.export(adapter_id), directory)

    def save(
        self, adapter_id: str, registry: Any, message: str = "", with_optimizer: bool = True,
        provenance: Optional[Mapping[str, Any]] = None, data_ref: Optional[str] = None,
        tags: Sequence[str] = (),
    ) -> Any:
        """Commits the adapter as a registry revision (the weights; with_optimizer: also the Adam
        moments and step count as the revision's state blob) with provenance: parent revision,
        base-model fingerprint, data_ref, the training config since the parent (loss fns,
        optimizer hyperparameters, steps), plus `provenance`'s keys.  Returns the Revision.
        Gradients accumulated and not yet stepped are not part of it."""
        with self._lock:
            t = self._get(adapter_id)
            if not isinstance(message, str):
                raise ValueError(f"message must be a str, got {type(message).__name__}")
            if not isinstance(with_optimizer, bool):
                raise ValueError(f"with_optimizer must be a bool, got {with_optimizer!r}")
            if data_ref is not None and not isinstance(data_ref, str):
                raise ValueError(f"data_ref must be None or a str, got {type(data_ref).__name__}")
            if isinstance(tags, str) or not all(isinstance(x, str) for x in tags):
                raise ValueError(f"tags must be a list of str, got {tags!r}")
            with self.pool.prepare([adapter_id], wait=True):
                adapter = Adapter(self.pool.read_adapter(adapter_id), dict(t.config))
                moments = None
                if with_optimizer:
                    full = self.pool.read_state(adapter_id)
                    moments = AdapterState({n: {k: kinds[k] for k in MOMENTS} for n, kinds in full.modules.items()})
            return commit_checkpoint(registry, t, adapter, moments, self.fingerprint, message=message,
                                     provenance=provenance, data_ref=data_ref, tags=list(tags))

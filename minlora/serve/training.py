"""The service's one door to training: tinker requests -> `minlora.train.Trainer` calls -> results.

Everything else in the service talks to a `TrainingBackend`; only this file knows the
Trainer's API (minlora/train/__init__.py).  Calls arrive from the training scheduler's thread
with the model's lock held, one at a time.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
from typing import Any

import torch

from ..registry import Registry, Revision
from ..train import Trainer, TrainingError
from .errors import ServerError, UserError, bad_request
from .model_host import HostedModel
from .train_batch import TrainBatch
from .wire import AdamParams, LoraConfig

__all__ = ["POOL_OPTIONS", "TrainingBackend"]

log = logging.getLogger("minlora.serve")

# Extra AdapterPool arguments training needs: optimizer-state pages beside the weights.
POOL_OPTIONS: dict[str, Any] = {"optimizer_state": True}


def _tensor_data(values: torch.Tensor) -> dict[str, Any]:
    v = values.detach().to("cpu", torch.float32)
    return {"data": v.tolist(), "dtype": "float32", "shape": [int(v.numel())]}


class TrainingBackend:
    """Owns the Trainer on the hosted model and its pool; maps requests to it."""

    def __init__(self, host: HostedModel, registry: Registry, *, lora_alpha: float, max_rank: int) -> None:
        self.host = host
        self.registry = registry
        self.lora_alpha = float(lora_alpha)
        self.max_rank = int(max_rank)
        self._trainer: Any = None

    @property
    def trainer(self) -> Any:
        if self._trainer is None:
            self._trainer = Trainer(self.host.model, self.host.pool)
        return self._trainer

    # ------------------------------------------------------------------ configuration

    def check_lora_config(self, lora: LoraConfig) -> None:
        """400 for a rank or module choice this server cannot train."""
        if not 1 <= lora.rank <= self.max_rank:
            raise bad_request(f"lora_config.rank must be in 1..{self.max_rank}, got {lora.rank}")
        if not self.target_modules(lora):
            raise bad_request("lora_config selects no module of this model (train_mlp / train_attn / train_unembed)")

    def target_modules(self, lora: LoraConfig) -> list[str]:
        """The pool modules the client's train_attn / train_mlp / train_unembed select."""
        want = {"attn"} if lora.train_attn else set()
        if lora.train_mlp:
            want.add("mlp")
        if lora.train_unembed:
            want.add("unembed")
        return [m for m, group in self.host.module_groups.items() if group in want]

    # ------------------------------------------------------------------ adapters

    def create(self, adapter_id: str, lora: LoraConfig) -> None:
        self._call(self.trainer.create, adapter_id, lora.rank, self.lora_alpha,
                   target_modules=self.target_modules(lora), use_rslora=False, seed=int(lora.seed or 0))

    def load(self, adapter_id: str, rev: Revision, *, with_optimizer: bool, exists: bool) -> None:
        """Replaces the adapter's weights by a registry revision's (and its optimizer state, when
        asked and the revision has it; else the moments start at zero)."""
        trainer = self.trainer
        if exists:
            self._call(trainer.remove, adapter_id)
        if with_optimizer:
            self._call(trainer.load_revision, adapter_id, self.registry, rev=rev.number, source_adapter=rev.adapter_id)
            return
        with tempfile.TemporaryDirectory(prefix="minlora-serve-load-") as tmp:
            path = os.path.join(tmp, "adapter")
            self.registry.export_peft(rev.adapter_id, path, rev.number)
            self._call(trainer.load_peft, adapter_id, path)

    def remove(self, adapter_id: str) -> None:
        if self._trainer is not None and adapter_id in self._trainer.adapters():
            self._call(self._trainer.remove, adapter_id)

    def steps(self, adapter_id: str) -> int:
        return int(self._call(self.trainer.info, adapter_id).get("steps", 0))

    def export(self, adapter_id: str) -> Any:
        """The adapter's current weights (a copy: a minlora.formats.Adapter)."""
        return self._call(self.trainer.export, adapter_id)

    def save(self, adapter_id: str, *, message: str, with_optimizer: bool, provenance: dict[str, Any]) -> Revision:
        return self._call(self.trainer.save, adapter_id, self.registry, message=message,
                          with_optimizer=with_optimizer, provenance=provenance)

    # ------------------------------------------------------------------ steps

    def forward(self, batch: TrainBatch, *, backward: bool) -> list[dict[str, Any]]:
        """One Trainer.forward[_backward] over the whole batch; one ForwardBackwardOutput per request."""
        trainer = self.trainer
        fn = trainer.forward_backward if backward else trainer.forward
        kwargs: dict[str, Any] = dict(attention_mask=batch.attention_mask, loss_fn=batch.loss_fn,
                                      loss_fn_inputs=batch.loss_fn_inputs)
        if batch.loss_fn_config:
            kwargs["loss_fn_config"] = batch.loss_fn_config
        res = self._call(fn, batch.adapters, batch.input_ids, batch.target_tokens, batch.weights, **kwargs)
        loss = res.loss.detach().to("cpu", torch.float32)
        logprobs = res.logprobs.detach().to("cpu", torch.float32)
        out = []
        for first, count in batch.rows:
            outputs, total = [], 0.0
            for b in range(first, first + count):
                n = batch.lengths[b]
                lp = logprobs[b, :n]
                entry = {"logprobs": _tensor_data(lp)}
                if batch.loss_fn == "cross_entropy":
                    entry["elementwise_loss"] = _tensor_data(-lp * batch.weights[b, :n].to("cpu"))
                outputs.append(entry)
                total += float(loss[b])
            out.append({"loss_fn_output_type": "TorchLossReturn", "loss_fn_outputs": outputs,
                        "metrics": {"loss:sum": total}})
        return out

    def optim_step(self, adapter_ids: list[str], params: AdamParams) -> dict[str, Any]:
        """One Trainer.optim_step for adapters sharing these Adam parameters; per adapter, its
        OptimStepResponse body or the UserError of a refused step."""
        clip = float(params.grad_clip_norm)
        out = self._call(
            self.trainer.optim_step, float(params.learning_rate), betas=(float(params.beta1), float(params.beta2)),
            eps=float(params.eps), weight_decay=float(params.weight_decay),
            grad_clip_norm=clip if clip > 0 else None, adapters=list(adapter_ids),
        )
        results: dict[str, Any] = {}
        for aid in adapter_ids:
            if aid in out.stepped:
                norm = float(out.grad_norms.get(aid, math.nan))
                metrics = {"learning_rate:mean": float(params.learning_rate)}
                if math.isfinite(norm):
                    metrics["grad_norm:mean"] = norm
                results[aid] = {"metrics": metrics, "type": "optim_step"}
            else:
                reason = out.skipped.get(aid, "not stepped")
                if "no gradients" in reason:  # Tinker: a step without gradients changes nothing
                    results[aid] = {"metrics": {}, "type": "optim_step"}
                else:
                    results[aid] = UserError(f"optimizer step refused: {reason}")
        return results

    @staticmethod
    def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
        """A Trainer call; its documented errors become the future's user / server errors."""
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError, TrainingError) as exc:
            raise UserError(str(exc)) from exc
        except KeyError as exc:
            raise ServerError(f"the trainer lost an adapter: {exc}") from exc

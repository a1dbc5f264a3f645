"""Multi-tenant training: many users' LoRA adapters trained together, one batch row each, on
one frozen base model, with Tinker's training-client semantics.

    from minlora.train import Trainer
    pool = AdapterPool(shapes, capacity_bytes=..., optimizer_state=True)
    trainer = Trainer(model, pool)                       # patches the model with the pool
    trainer.create("alice", rank=8, alpha=16)            # PEFT's default init, seeded
    res = trainer.forward_backward(["alice", None, "bob"], input_ids, target_tokens, weights)
    out = trainer.optim_step(lr=1e-4)                    # AdamW, each adapter its own step count
    rev = trainer.save("alice", registry, message="...")  # a registry revision (+ moments)

The public API (the contract the HTTP service builds on):

* ``Trainer(model, pool)``: an HF causal LM (patched with `pool` unless it is already; its
  parameters are frozen and it is put in eval mode) and an AdapterPool made with
  optimizer_state=True (ValueError otherwise).
* ``create(adapter_id, rank, alpha, target_modules=None, use_rslora=False, seed=0)``: PEFT's
  default init (A Kaiming-uniform drawn exactly as PEFT draws it after torch.manual_seed(seed),
  B zero) on the patched modules `target_modules` selects (None = all).  ValueError if it exists.
* ``load_peft(adapter_id, directory)``; ``load_revision(adapter_id, registry, rev="head",
  source_adapter=None)`` (weights and, when the revision has them, moments and step count).
* ``adapters()``, ``info(adapter_id)`` (rank, alpha, use_rslora, target_modules, steps,
  pending), ``remove(adapter_id)``, ``export(adapter_id) -> Adapter``, ``save_peft(id, dir)``.
* ``forward_backward(adapters, input_ids, target_tokens, weights, attention_mask=None,
  loss_fn="cross_entropy", loss_fn_inputs=None, loss_fn_config=None) -> ForwardResult``:
  adapters [B] ids or None (None rows contribute no gradient); input_ids, target_tokens [B, L]
  integers; weights [B, L] float (0 = ignore; None = ones); attention_mask [B, L] 0/1;
  loss_fn "cross_entropy" | "importance_sampling" | "ppo" (losses.py: Tinker's definitions,
  sums over tokens, the RL ones with loss_fn_inputs "logprobs" and "advantages", ppo's clip
  [0.8, 1.2] overridable by loss_fn_config clip_low_threshold / clip_high_threshold).
  ForwardResult: loss [B] float32, logprobs [B, L] float32, metrics.  ``forward(...)``: the
  same without gradients (weights optional).
* ``optim_step(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, grad_clip_norm=None,
  adapters=None) -> OptimStepResult`` (stepped, skipped: id -> reason, grad_norms, status
  "ok" | "partial" | "no-op").  grad_clip_norm clips each adapter's own gradient norm.
* ``save(adapter_id, registry, message="", with_optimizer=True, provenance=None,
  data_ref=None, tags=()) -> Revision``.

Errors: unknown ids KeyError; bad shapes / dtypes, out-of-vocabulary tokens, lr <= 0, bad
betas / eps, unknown loss_fn, missing loss_fn_inputs ValueError naming the argument; nothing
changes on an error.  A NaN/Inf loss or gradient refuses only that adapter's step.

Files: trainer.py (the facade), batch.py (input checks), losses.py, grads.py (the gradient
path), adamw.py (the paged optimizer), init.py (PEFT's init), checkpoint.py (registry
revisions), state.py (per-adapter training state), results.py.
"""
from __future__ import annotations

from .adamw import AdamParams
from .results import ForwardResult, OptimStepResult, TrainingError
from .trainer import Trainer

__all__ = ["AdamParams", "ForwardResult", "OptimStepResult", "Trainer", "TrainingError"]

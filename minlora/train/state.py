"""What the trainer knows about each trainable adapter besides its pages: its LoRA config, its
optimizer step count, what was accumulated since the last step, and its history since the
revision it came from (for the provenance of the next checkpoint)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["AdapterTraining", "Origin"]


@dataclass(frozen=True)
class Origin:
    """The registry revision an adapter was loaded from or last saved as."""

    registry: tuple[str, str]  # (database URL, blob URL): which registry
    adapter_id: str
    revision: int


@dataclass
class AdapterTraining:
    """One trainable adapter's training state (its weights and moments are pool pages).

    config: the adapter's LoRA config as PEFT spells it (r, lora_alpha, use_rslora,
        target_modules, ...), written with its weights.
    steps: optimizer steps taken (AdamW's t; restored from a checkpoint with its moments).
    pending: rows accumulated since the last optim_step.
    nonfinite: a row of this adapter had a NaN/Inf loss since the last optim_step.
    """

    adapter_id: str
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: list[str]
    config: dict[str, Any]
    steps: int = 0
    pending: int = 0
    nonfinite: bool = False
    origin: Optional[Origin] = None
    # Since `origin` (or creation): for the next revision's training config.
    steps_since_origin: int = 0
    loss_fns: set[str] = field(default_factory=set)
    hyperparameters: list[dict[str, Any]] = field(default_factory=list)

    def info(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "use_rslora": self.use_rslora,
            "target_modules": list(self.target_modules),
            "steps": self.steps,
            "pending": self.pending,
        }

    def accumulated(self, rows: int, loss_fn: str, nonfinite: bool) -> None:
        self.pending += rows
        self.loss_fns.add(loss_fn)
        self.nonfinite = self.nonfinite or nonfinite

    def stepped(self, hyperparameters: dict[str, Any]) -> None:
        self.steps += 1
        self.steps_since_origin += 1
        if hyperparameters not in self.hyperparameters:
            self.hyperparameters.append(hyperparameters)
        self.cleared()

    def cleared(self) -> None:
        self.pending = 0
        self.nonfinite = False

    def training_config(self) -> dict[str, Any]:
        """The `training_config` provenance of a revision saved now."""
        return {
            "optimizer": "adamw",
            "loss_fns": sorted(self.loss_fns),
            "hyperparameters": list(self.hyperparameters),
            "steps": self.steps,
            "steps_since_parent": self.steps_since_origin,
            "rank": self.rank,
            "lora_alpha": self.alpha,
            "use_rslora": self.use_rslora,
        }

    def saved_as(self, origin: Origin) -> None:
        self.origin = origin
        self.steps_since_origin = 0
        self.loss_fns = set()
        self.hyperparameters = []

"""Checkpoints are registry revisions: the weights, optionally the optimizer state (Adam moments
and the step count, as an `AdapterState` blob), and the provenance of the training since the
parent revision."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from ..formats.adapter import Adapter
from ..formats.state import AdapterState
from .results import TrainingError
from .state import AdapterTraining, Origin

__all__ = ["MOMENTS", "commit_checkpoint", "read_checkpoint", "registry_key"]

# The optimizer state a checkpoint keeps (gradient accumulators are not part of it).
MOMENTS = ("exp_avg", "exp_avg_sq")
_FORMAT = "minlora-train-adamw-v1"


def registry_key(registry: Any) -> tuple[str, str]:
    """Which registry this is: (database URL, blob URL)."""
    return (str(registry.url), str(registry.blobs.url))


def commit_checkpoint(
    registry: Any,
    training: AdapterTraining,
    adapter: Adapter,
    moments: Optional[AdapterState],
    fingerprint: str,
    *,
    message: str,
    provenance: Optional[Mapping[str, Any]],
    data_ref: Optional[str],
    tags: Sequence[str],
) -> Any:
    """Commits `adapter` (with `moments`, whose meta gains the step count) as the next revision
    of training.adapter_id; returns the Revision.  The parent is the revision the adapter came
    from when that is a revision of the same adapter in this registry, else none (a fork from
    another adapter or registry is named in the provenance's `forked_from`)."""
    key = registry_key(registry)
    origin = training.origin
    parent = None
    prov: dict[str, Any] = {
        "base_model": fingerprint,
        "training_data": data_ref,
        "training_config": training.training_config(),
    }
    if origin is not None:
        if origin.registry == key and origin.adapter_id == training.adapter_id:
            parent = origin.revision
        else:
            prov["forked_from"] = {"adapter_id": origin.adapter_id, "revision": origin.revision,
                                   "registry": origin.registry[0]}
    prov.update(provenance or {})
    state = None
    if moments is not None:
        state = AdapterState(moments.modules, {"format": _FORMAT, "steps": training.steps})
    rev = registry.commit(training.adapter_id, adapter, parent=parent, message=message,
                          provenance=prov, optimizer_state=state)
    for tag in tags:
        registry.tag(training.adapter_id, tag, rev.number)
    training.saved_as(Origin(key, training.adapter_id, rev.number))
    return registry.show(training.adapter_id, rev.number) if tags else rev


def read_checkpoint(registry: Any, adapter_id: str, rev: Any) -> tuple[Any, Adapter, Optional[AdapterState], int]:
    """(revision, weights, moments or None, step count) of a revision (verified)."""
    info = registry.show(adapter_id, rev)
    weights = registry.load(info.adapter_id, info.number)
    state = registry.load_optimizer_state(info.adapter_id, info.number)
    if state is None:
        return info, weights, None, 0
    fmt = state.meta.get("format")
    steps = state.meta.get("steps")
    if fmt != _FORMAT or not isinstance(steps, int) or steps < 0:
        raise TrainingError(
            f"revision {info.number} of {info.adapter_id!r} has an optimizer state this trainer does not "
            f"read (format {fmt!r}, steps {steps!r}); load it without one, or with the trainer that wrote it"
        )
    extra = state.kinds() - set(MOMENTS)
    if extra:
        raise TrainingError(f"revision {info.number} of {info.adapter_id!r}: unexpected optimizer state {sorted(extra)}")
    return info, weights, AdapterState(state.modules), steps

"""Response bodies the SDK validates strictly (its pydantic types), built in one place.

Times are ISO-8601 with a timezone; `TrainingRun.user_metadata` is `dict[str, str]` on the SDK
side, so values are stringified.
"""
from __future__ import annotations

import datetime as dt
from typing import Any, Optional

from ..registry import Revision
from .paths import FOLDER_OF_TYPE, tinker_path
from .state import CheckpointRecord, RunRecord

__all__ = ["checkpoint_json", "iso", "revision_checkpoint_json", "training_run_json"]


def iso(t: Optional[float]) -> Optional[str]:
    if t is None:
        return None
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat()


def checkpoint_json(ck: CheckpointRecord) -> dict[str, Any]:
    folder = FOLDER_OF_TYPE[ck.checkpoint_type]
    return {
        "checkpoint_id": f"{folder}/{ck.name}",
        "checkpoint_type": ck.checkpoint_type,
        "time": iso(ck.created_at),
        "tinker_path": tinker_path(ck.run_id, folder, ck.name),
        "size_bytes": ck.size_bytes,
        "public": bool(ck.public),
        "expires_at": iso(ck.expires_at),
    }


def revision_checkpoint_json(rev: Revision) -> dict[str, Any]:
    """A registry revision listed as a sampler checkpoint of its adapter."""
    return {
        "checkpoint_id": f"sampler_weights/{rev.number}",
        "checkpoint_type": "sampler",
        "time": rev.created_at.replace(tzinfo=rev.created_at.tzinfo or dt.timezone.utc).isoformat(),
        "tinker_path": tinker_path(rev.adapter_id, "sampler_weights", str(rev.number)),
        "size_bytes": rev.size,
        "public": False,
        "expires_at": None,
    }


def training_run_json(run: RunRecord, base_model: str, last_training: Optional[CheckpointRecord],
                      last_sampler: Optional[CheckpointRecord]) -> dict[str, Any]:
    meta = {str(k): v if isinstance(v, str) else str(v) for k, v in (run.user_metadata or {}).items()}
    return {
        "training_run_id": run.run_id,
        "base_model": base_model,
        "model_owner": run.owner,
        "is_lora": True,
        "corrupted": False,
        "lora_rank": int(run.lora_config.get("rank", 0)) or None,
        "last_request_time": iso(run.last_request_at),
        "last_checkpoint": checkpoint_json(last_training) if last_training else None,
        "last_sampler_checkpoint": checkpoint_json(last_sampler) if last_sampler else None,
        "user_metadata": meta or None,
    }

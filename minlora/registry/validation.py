"""Checks of what callers hand the registry (besides ids and tag names, see ids.py):
provenance, evaluation metrics, gates and actors.  Each returns the clean value or raises
ValueError naming what is wrong, before any database work starts."""

from __future__ import annotations

import getpass
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from .adapter_io import AdapterState, canonical_config
from .fingerprint import fingerprint_base_model
from .types import Gate

__all__ = ["actor", "default_actor", "evaluation_input", "gate", "optimizer_state", "provenance"]

_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")
MAX_NAME_LENGTH = 128  # suites and metrics (the schema's column width)


def default_actor() -> str:
    """Who is acting, for authorship and promotion records: $MINLORA_USER, else the OS user."""
    env = os.environ.get("MINLORA_USER")
    if env:
        return env
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (some containers)
        return f"uid:{os.getuid()}"


def actor(by: str | None) -> str:
    """`by` (or the default actor), stripped; refuses an empty name."""
    who = (by or default_actor()).strip()
    if not who:
        raise ValueError("`by` must name who acts")
    return who


def provenance(prov: Mapping[str, Any] | None) -> dict[str, Any]:
    """The provenance columns of a revision: base_model (a fingerprint, or an nn.Module to
    fingerprint), training_data (a reference string), training_config (JSON) and `extra`
    (every other key, JSON)."""
    rest = dict(prov or {})
    base = rest.pop("base_model", None)
    if isinstance(base, torch.nn.Module):
        base = fingerprint_base_model(base)
    if base is not None:
        if not isinstance(base, str) or not _FINGERPRINT.match(base.lower()):
            raise ValueError(
                "provenance['base_model'] must be a base-model fingerprint (64 hex digits, "
                "see minlora.registry.fingerprint_base_model) or an nn.Module"
            )
        base = base.lower()
    training_data = rest.pop("training_data", None)
    if training_data is not None and not isinstance(training_data, str):
        raise ValueError(
            "provenance['training_data'] must be a string (a dataset reference: URL, path, name@version)"
        )
    training_config = rest.pop("training_config", None)
    if training_config is not None:
        training_config = canonical_config(training_config)
    return {
        "base_model": base,
        "training_data": training_data,
        "training_config": training_config,
        "extra": canonical_config(rest) if rest else None,
    }


def optimizer_state(state: Any) -> AdapterState | None:
    """The optimizer state of a commit (None, or an AdapterState whose meta is JSON)."""
    if state is None:
        return None
    if not isinstance(state, AdapterState):
        raise TypeError(f"optimizer_state must be a minlora.formats.AdapterState, got {type(state).__name__}")
    canonical_config(state.meta)  # ValueError when meta is not JSON
    return state


def evaluation_input(
    suite: Any, metrics: Mapping[str, Any], details: Mapping[str, Any] | None
) -> tuple[str, dict[str, float], dict[str, Any] | None]:
    """(suite, {metric: finite float}, canonical details) of one evaluation record."""
    if not isinstance(suite, str) or not suite or len(suite) > MAX_NAME_LENGTH:
        raise ValueError(f"suite must be a non-empty string of at most {MAX_NAME_LENGTH} characters")
    clean: dict[str, float] = {}
    for metric, value in metrics.items():
        if not isinstance(metric, str) or not metric or len(metric) > MAX_NAME_LENGTH:
            raise ValueError(
                f"metric names must be non-empty strings of at most {MAX_NAME_LENGTH} characters, "
                f"got {metric!r}"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            raise ValueError(f"metric {metric!r}: value must be a finite number, got {value!r}")
        clean[metric] = float(value)
    if not clean:
        raise ValueError("no metrics given")
    return suite, clean, canonical_config(details) if details else None


def _name(kind: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME_LENGTH:
        raise ValueError(
            f"gate {kind} must be a non-empty string of at most {MAX_NAME_LENGTH} characters, got {value!r}"
        )


def gate(g: Gate) -> Gate:
    """A gate that can be stored: suite and metric names, a bool direction, a finite
    tolerance >= 0."""
    if not isinstance(g, Gate):
        raise TypeError(f"a gate is a minlora.registry.Gate, got {type(g).__name__}")
    _name("suite", g.suite)
    _name("metric", g.metric)
    if not isinstance(g.higher_is_better, bool):
        raise ValueError(f"gate higher_is_better must be True or False, got {g.higher_is_better!r}")
    tol = g.tolerance
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"gate tolerance must be a finite number >= 0, got {tol!r}")
    return g

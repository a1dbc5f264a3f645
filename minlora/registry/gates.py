"""Promotion gates: does a candidate's evaluation pass each gate against the serving
revision's?  Pure functions over metric values; serving.py fetches the values."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .types import Gate

__all__ = ["failures", "gate_report", "refusal"]

# (suite, metric) -> the revision's latest value, or None when it has none
MetricLookup = Callable[[str, str], "float | None"]


def _outcome(gate: Gate, cand: float | None, cur: float | None) -> tuple[str, str]:
    if cand is None:
        return "missing", f"the candidate has no {gate.suite}/{gate.metric} evaluation"
    if cur is None:
        return "pass", "nothing to compare against (no serving revision or it lacks the metric)"
    worse_by = (cur - cand) if gate.higher_is_better else (cand - cur)
    if worse_by > gate.tolerance:
        return "regressed", (
            f"{gate.suite}/{gate.metric} is worse by {worse_by:.6g} (tolerance {gate.tolerance:.6g})"
        )
    return "pass", f"within tolerance ({-worse_by:+.6g})"


def gate_report(
    gates: Sequence[Gate], candidate: MetricLookup, serving: MetricLookup | None
) -> list[dict[str, Any]]:
    """One entry per gate: the gate's fields, the candidate's and the serving revision's
    values, `status` ("pass" | "missing" | "regressed") and `why`.  `serving` is None when
    no revision is serving."""
    report = []
    for gate in gates:
        cand = candidate(gate.suite, gate.metric)
        cur = serving(gate.suite, gate.metric) if serving is not None else None
        status, why = _outcome(gate, cand, cur)
        report.append({**gate.to_dict(), "candidate": cand, "serving": cur, "status": status, "why": why})
    return report


def failures(report: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [g for g in report if g["status"] != "pass"]


def refusal(adapter_id: str, number: int, failed: Sequence[dict[str, Any]]) -> str:
    """The message of a refused promotion."""
    return f"{adapter_id}: promotion of revision {number} refused: " + "; ".join(g["why"] for g in failed)

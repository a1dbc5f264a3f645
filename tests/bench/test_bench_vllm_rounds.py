"""`minlora bench vllm`'s end-to-end rounds: each mode's figure is its fastest generate over
every round (the engines run one after another on a machine whose load drifts)."""
from __future__ import annotations

from minlora.bench.vllm import _faster_run


def _run(seconds: list[float], startup: float) -> dict:
    return {"mode": "minlora", "tokens": 1024, "seconds": min(seconds), "tokens_per_s": 1024 / min(seconds),
            "all_seconds": seconds, "startup_s": startup}


def test_the_fastest_generate_of_every_round_is_kept():
    first = _faster_run(None, _run([2.5, 2.4], 20.0))
    assert first["rounds"] == 1 and first["seconds"] == 2.4
    second = _faster_run(first, _run([2.2, 2.3], 21.0))
    assert second["seconds"] == 2.2 and second["tokens_per_s"] == 1024 / 2.2
    assert second["all_seconds"] == [2.5, 2.4, 2.2, 2.3] and second["rounds"] == 2 and second["startup_s"] == 20.0
    third = _faster_run(second, _run([3.0, 2.9], 19.0))
    assert third["seconds"] == 2.2 and third["rounds"] == 3 and len(third["all_seconds"]) == 6
    assert third["startup_s"] == 19.0

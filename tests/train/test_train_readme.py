"""The README's "Train many users' adapters together" snippet runs as written: the users whose
held-out loss improved are promoted, the others refused by the gate, and the mixed batch
serves each user's serving revision."""
from __future__ import annotations

import warnings

import torch

from helpers.readme import readme_snippet

HEADING = "## Train many users' adapters together"


def test_readme_training_example(tmp_path, monkeypatch, capsys):
    code = readme_snippet(HEADING)
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "__readme__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "README.md", "exec"), ns)
    reg, trainer, users = ns["reg"], ns["trainer"], ns["users"]
    printed = capsys.readouterr().out
    # Held-out evaluations were recorded for both revisions of every user.
    for u in users:
        before, after = (reg.evaluations(u, r)[0].value for r in (1, 2))
        improved = u in ("alice", "bob")
        assert (after < before) == improved, (u, before, after)
        assert reg.serving(u).number == (2 if improved else 1)
        assert (f"{u}: " in printed) == (not improved)  # the refusals were reported
        prov = reg.show(u, 2).provenance
        assert prov["parent"] == 1 and prov["training_config"]["steps"] == 10
        assert prov["training_data"].startswith("tokens/")
    # The mixed batch: promoted users get their trained weights (what the trainer computes
    # now), refused ones their first revision (B = 0: the base model's output), the last row none.
    logits, x = ns["logits"], ns["x"]
    want = trainer.forward(list(users) + [None], x, x).logprobs
    got = torch.log_softmax(logits, -1).gather(-1, x[..., None])[..., 0]
    with torch.no_grad():
        base_logits = ns["base"](x).logits  # outside any step: the base model alone
    for i, u in enumerate(users):
        if u in ("alice", "bob"):
            assert torch.allclose(got[i], want[i], rtol=1e-5, atol=1e-5), u
            assert not torch.allclose(logits[i], base_logits[i], rtol=1e-3, atol=1e-3), u
        else:
            assert torch.allclose(logits[i], base_logits[i], rtol=1e-6, atol=1e-6), u
    assert torch.allclose(logits[-1], base_logits[-1], rtol=1e-6, atol=1e-6)

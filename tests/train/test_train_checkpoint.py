"""Checkpoints are registry revisions: save commits weights + optimizer state with provenance;
resuming from a revision restores weights, moments and step counts bit for bit."""
from __future__ import annotations

import pytest
import torch

from minlora.registry import Registry, fingerprint_base_model
from minlora.train import TrainingError
from helpers.train import (
    adapter_specs,
    assert_same_state,
    create_all,
    make_batch,
    new_trainer,
    trainer_state,
)

HYPER = dict(lr=1e-2, weight_decay=0.1)


def train(trainer, assigns, seed, **hyper):
    for i, assign in enumerate(assigns):
        b = make_batch(assign, seed=seed + i)
        trainer.forward_backward(b.adapters, b.input_ids, b.targets, b.weights, attention_mask=b.mask)
        trainer.optim_step(**{**HYPER, **hyper})


def test_resume_from_a_revision_is_bit_exact(base, tmp_path):
    reg = Registry(root=str(tmp_path / "reg"))
    specs = adapter_specs("llama")
    first = new_trainer(base, "llama")
    create_all(first, specs)
    schedule = [["r1", "rs", None, "big"], ["sub", "r1"], ["rs", "big", "sub"]]
    train(first, schedule, seed=0)
    revs = {aid: first.save(aid, reg, message="after 3", data_ref="s3://data/users@1") for aid in specs}
    later = [["r1", "sub", "big"], [None, "rs", "r1"], ["big", "sub", "rs"]]
    train(first, later, seed=50, weight_decay=0.0)

    second = new_trainer(base, "llama")
    for aid in specs:
        second.load_revision(aid, reg)
        assert second.info(aid)["steps"] == first.info(aid)["steps"] - sum(aid in s for s in later)
    train(second, later, seed=50, weight_decay=0.0)
    assert_same_state(trainer_state(first), trainer_state(second))

    # Provenance of the first revision.
    rev = reg.show("big", revs["big"].number)
    prov = rev.provenance
    assert rev.parent is None and rev.state_hash is not None
    assert prov["base_model"] == fingerprint_base_model(base) == first.fingerprint
    assert prov["training_data"] == "s3://data/users@1"
    cfg = prov["training_config"]
    assert cfg["steps"] == 2 and cfg["steps_since_parent"] == 2 and cfg["loss_fns"] == ["cross_entropy"]
    assert cfg["hyperparameters"] == [{"lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1,
                                       "grad_clip_norm": None}]
    assert cfg["rank"] == 128 and cfg["optimizer"] == "adamw"
    # The next save's parent is the revision it resumed from; tags are attached.
    nxt = second.save("big", reg, message="after 5", tags=["v2"], provenance={"team": "x"})
    assert nxt.parent == revs["big"].number and nxt.tags == ["v2"]
    assert nxt.provenance["extra"] == {"team": "x"}
    assert nxt.provenance["training_config"]["steps_since_parent"] == 2
    assert nxt.provenance["training_config"]["steps"] == 4
    again = first.save("big", reg)  # `first` saved revs["big"] and never loaded the newer one
    assert again.parent == revs["big"].number
    assert reg.verify().ok


def test_a_revision_without_optimizer_state_restarts_the_optimizer(base, tmp_path):
    reg = Registry(root=str(tmp_path / "reg"))
    t = new_trainer(base, "llama")
    t.create("u", rank=4, alpha=8)
    train(t, [["u"], ["u", None]], seed=3)
    rev = t.save("u", reg, with_optimizer=False)
    assert rev.state_hash is None
    u2 = new_trainer(base, "llama")
    u2.load_revision("copy", reg, source_adapter="u")
    assert u2.info("copy")["steps"] == 0 and u2.info("copy")["rank"] == 4
    st = trainer_state(u2)["copy"][2]
    assert all(not a.any() and not b.any() for kinds in st.modules.values() for a, b in kinds.values())
    w1, w2 = t.export("u").modules, u2.export("copy").modules
    assert all(torch.equal(w1[n].a, w2[n].a) and torch.equal(w1[n].b, w2[n].b) for n in w1)
    # A fork into another adapter id records where it came from, and has no parent.
    fork = u2.save("copy", reg)
    assert fork.parent is None and fork.provenance["extra"]["forked_from"]["adapter_id"] == "u"


def test_loading_a_foreign_state_blob_is_refused(base, tmp_path):
    from minlora.formats import AdapterState

    reg = Registry(root=str(tmp_path / "reg"))
    t = new_trainer(base, "llama")
    t.create("u", rank=2, alpha=2)
    adapter = t.export("u")
    odd = AdapterState({n: {"momentum": (torch.zeros_like(w.a), torch.zeros_like(w.b))}
                        for n, w in adapter.modules.items()}, {"format": "someone-else"})
    reg.commit("v", adapter, optimizer_state=odd)
    with pytest.raises(TrainingError, match="someone-else"):
        t.load_revision("v", reg)
    assert t.adapters() == ["u"] and "v" not in t.pool

"""Bad input to the trainer: a clear error naming the argument, and no state changed; a NaN
loss for one adapter refuses only that adapter's step; an optim_step with nothing accumulated
is a no-op with a clear status."""
from __future__ import annotations

import copy

import pytest
import torch

import minlora
from minlora.pool import AdapterPool
from minlora.targets import target_shapes
from minlora.train import Trainer
from helpers.patching import VOCAB
from helpers.train import (
    adapter_specs,
    assert_same_state,
    create_all,
    make_batch,
    new_trainer,
    trainer_state,
)


@pytest.fixture
def trainer(base):
    t = new_trainer(base, "llama")
    create_all(t, adapter_specs("llama"))
    b = make_batch(["r1", "sub"], seed=1)
    t.forward_backward(b.adapters, b.input_ids, b.targets, b.weights, attention_mask=b.mask)
    t.optim_step(lr=1e-2)
    b = make_batch(["rs", None], seed=2)
    t.forward_backward(b.adapters, b.input_ids, b.targets, b.weights, attention_mask=b.mask)  # pending
    return t


def fb(t, b, **kw):
    args = dict(adapters=b.adapters, input_ids=b.input_ids, target_tokens=b.targets, weights=b.weights,
                attention_mask=b.mask)
    args.update(kw)
    return t.forward_backward(**args)


def refused(t, exc, match, call):
    before = trainer_state(t)
    with pytest.raises(exc, match=match):
        call()
    assert_same_state(before, trainer_state(t))
    t.pool.check_invariants()


def test_bad_forward_backward_input_changes_nothing(trainer):
    t = trainer
    b = make_batch(["r1", None, "sub"], seed=3)
    B, L = b.input_ids.shape
    cases = [
        (KeyError, "unknown adapter id.*'nobody'", dict(adapters=["r1", "nobody", "sub"])),
        (ValueError, "adapters has 2 entries", dict(adapters=["r1", None])),
        (ValueError, "adapters must be a list", dict(adapters="r1")),
        (ValueError, "target_tokens has token ids outside the vocabulary", dict(target_tokens=b.targets + VOCAB)),
        (ValueError, "target_tokens has token ids outside", dict(target_tokens=b.targets - 100)),
        (ValueError, "input_ids has token ids outside", dict(input_ids=b.input_ids + VOCAB)),
        (ValueError, "target_tokens must have shape", dict(target_tokens=b.targets[:, :-1])),
        (ValueError, "weights must be a tensor of shape", dict(weights=b.weights[:2])),
        (ValueError, "attention_mask must be a tensor of shape", dict(attention_mask=b.mask[:, 1:])),
        (ValueError, "attention_mask must hold only 0 and 1", dict(attention_mask=b.mask * 2)),
        (ValueError, "input_ids must be an integer tensor", dict(input_ids=b.input_ids.float())),
        (ValueError, "input_ids must have shape", dict(input_ids=b.input_ids[0])),
        (ValueError, "loss_fn must be one of", dict(loss_fn="mse")),
        (ValueError, r"loss_fn_inputs\['logprobs'\]", dict(loss_fn="ppo")),
        (ValueError, r"loss_fn_inputs\['advantages'\]", dict(loss_fn="importance_sampling",
                                                            loss_fn_inputs={"logprobs": torch.zeros(B, L)})),
        (ValueError, r"loss_fn_inputs\['advantages'\] must be a float tensor of shape",
         dict(loss_fn="importance_sampling",
              loss_fn_inputs={"logprobs": torch.zeros(B, L), "advantages": torch.zeros(B, L + 1)})),
        (ValueError, "loss_fn_config keys", dict(loss_fn_config={"clip_low_threshold": 0.5})),
        (ValueError, "clip_low_threshold <= clip_high_threshold",
         dict(loss_fn="ppo", loss_fn_inputs={"logprobs": torch.zeros(B, L), "advantages": torch.zeros(B, L)},
              loss_fn_config={"clip_low_threshold": 1.5})),
        (ValueError, "loss_fn_inputs has keys", dict(loss_fn_inputs={"advantages": torch.zeros(B, L)})),
    ]
    for exc, match, kw in cases:
        refused(t, exc, match, lambda kw=kw: fb(t, b, **kw))
        refused(t, exc, match, lambda kw=kw: t.forward(**{
            **dict(adapters=b.adapters, input_ids=b.input_ids, target_tokens=b.targets, attention_mask=b.mask), **kw}))


def test_bad_optimizer_arguments_change_nothing(trainer):
    t = trainer
    for kw, match in [
        (dict(lr=0.0), "lr must be > 0"),
        (dict(lr=-1e-3), "lr must be > 0"),
        (dict(lr=float("nan")), "lr must be a finite number"),
        (dict(lr=1e-3, betas=(0.9,)), "betas must be a pair"),
        (dict(lr=1e-3, betas=(1.0, 0.9)), r"betas must each be in \[0, 1\)"),
        (dict(lr=1e-3, eps=0.0), "eps must be > 0"),
        (dict(lr=1e-3, weight_decay=-0.1), "weight_decay must be >= 0"),
        (dict(lr=1e-3, grad_clip_norm=0.0), "grad_clip_norm must be None or > 0"),
        (dict(lr=1e-3, adapters=["rs", "ghost"]), "ghost"),
        (dict(lr=1e-3, adapters=[None]), "not None"),
    ]:
        refused(t, KeyError if "ghost" in match else ValueError, match, lambda kw=kw: t.optim_step(**kw))
    assert t.info("rs")["pending"] == 2 - 1  # the pending row is still there


def test_nothing_accumulated_is_a_clear_no_op(trainer):
    t = trainer
    out = t.optim_step(lr=1e-2)
    assert out.stepped == ["rs"]
    before = trainer_state(t)
    out = t.optim_step(lr=1e-2)
    assert out.status == "no-op" and out.stepped == [] and out.skipped == {} and out.grad_norms == {}
    out = t.optim_step(lr=1e-2, adapters=["r1", "big"])
    assert out.status == "no-op" and out.skipped == {"r1": "no gradients accumulated", "big": "no gradients accumulated"}
    assert_same_state(before, trainer_state(t))


def test_a_nan_loss_refuses_only_that_adapters_step(trainer):
    t = trainer
    b = make_batch(["r1", "sub", None, "big", "sub"], seed=4)
    b.weights[1, 0] = float("nan")  # one token of one of "sub"'s rows
    b.weights[2, 0] = float("nan")  # a row without an adapter: no gradient, no step to refuse
    before = trainer_state(t)
    res = fb(t, b)
    assert torch.isnan(res.loss[1]) and torch.isnan(res.loss[2])
    assert torch.isfinite(res.loss[[0, 3, 4]]).all()
    out = t.optim_step(lr=1e-2)
    assert sorted(out.stepped) == ["big", "r1", "rs"] and out.status == "partial"
    assert "non-finite loss" in out.skipped["sub"]
    after = trainer_state(t)
    info, weights, state = after["sub"]
    _, w0, s0 = before["sub"]
    assert info["steps"] == before["sub"][0]["steps"] and info["pending"] == 0
    for n in weights:
        assert torch.equal(weights[n][0], w0[n][0]) and torch.equal(weights[n][1], w0[n][1])
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state.modules[n][k][0], s0.modules[n][k][0])
        assert not state.modules[n]["grad"][0].any() and not state.modules[n]["grad"][1].any()  # cleared
    for aid in ("r1", "big"):
        assert after[aid][0]["steps"] == before[aid][0]["steps"] + 1
        assert all(torch.isfinite(w[0]).all() for w in after[aid][1].values())
    # "sub" trains normally afterwards.
    c = make_batch(["sub"], seed=5)
    fb(t, c)
    assert t.optim_step(lr=1e-2).stepped == ["sub"]


def test_a_non_finite_gradient_refuses_the_step(trainer):
    t = trainer
    t.optim_step(lr=1e-2)
    b = make_batch(["r1", "sub"], seed=6)
    fb(t, b)
    with t.pool.prepare(["r1"], wait=True) as step:  # as if a backward had overflowed
        d, (pages, _) = next(iter(step.slot_pages().items()))
        t.pool.state_tensor("grad", d)[pages[0], 0] = float("inf")
    out = t.optim_step(lr=1e-2)
    assert out.stepped == ["sub"] and "non-finite gradient" in out.skipped["r1"]


def test_create_and_load_errors(trainer, tmp_path):
    t = trainer
    for call, exc, match in [
        (lambda: t.create("r1", 2, 4), ValueError, "exists already"),
        (lambda: t.create("", 2, 4), ValueError, "adapter_id must be a non-empty str"),
        (lambda: t.create("n", 0, 4), ValueError, "rank must be an int >= 1"),
        (lambda: t.create("n", 2.5, 4), ValueError, "rank must be an int"),
        (lambda: t.create("n", 2, float("inf")), ValueError, "alpha must be a finite number"),
        (lambda: t.create("n", 2, 4, target_modules=["nothing_like_this"]), ValueError, "selects none"),
        (lambda: t.create("n", 2, 4, seed=-1), ValueError, "seed must be an int"),
        (lambda: t.create("n", 2, 4, use_rslora="yes"), ValueError, "use_rslora must be a bool"),
        (lambda: t.load_peft("n", str(tmp_path / "missing")), FileNotFoundError, "missing"),
        (lambda: t.info("ghost"), KeyError, "ghost"),
        (lambda: t.remove("ghost"), KeyError, "ghost"),
        (lambda: t.export("ghost"), KeyError, "ghost"),
        (lambda: t.save("ghost", None), KeyError, "ghost"),
    ]:
        refused(t, exc, match, call)
    assert sorted(t.adapters()) == sorted(adapter_specs("llama"))
    t.remove("big")
    assert "big" not in t.adapters() and "big" not in t.pool
    t.create("big", 2, 4)  # the id is free again


def test_trainer_needs_a_pool_with_optimizer_state_and_its_own_patch(base):
    model = copy.deepcopy(base)
    shapes = target_shapes(model, [{"target_modules": ["q_proj"]}])
    with pytest.raises(ValueError, match="optimizer_state=True"):
        Trainer(model, AdapterPool(shapes, capacity_bytes=1 << 20))
    pool = AdapterPool(shapes, capacity_bytes=1 << 20, optimizer_state=True)
    other = AdapterPool(shapes, capacity_bytes=1 << 20, optimizer_state=True)
    minlora.patch(model, other)
    with pytest.raises(ValueError, match="patched with another pool"):
        Trainer(model, pool)
    t = Trainer(model, other)  # its own pool: fine, not patched twice
    assert t.pool is other and all(not p.requires_grad for p in model.parameters())
    with pytest.raises(TypeError, match="nn.Module"):
        Trainer("model", pool)


def test_rows_without_adapters_accumulate_nothing(trainer):
    t = trainer
    t.optim_step(lr=1e-2)
    before = trainer_state(t)
    b = make_batch([None, None], seed=7)
    res = fb(t, b)
    assert res.metrics["rows_with_adapter:sum"] == 0 and torch.isfinite(res.loss).all()
    assert_same_state(before, trainer_state(t))
    assert t.optim_step(lr=1e-2).status == "no-op"

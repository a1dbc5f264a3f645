"""minlora.train against its external oracle, PEFT training each adapter alone with
torch.optim.AdamW, on tiny Llama, Qwen2 (q/k/v with bias) and GPT-2 (Conv1D) models."""
from __future__ import annotations

import copy

import pytest
import torch

from helpers.train import (
    SCHEDULE,
    adapter_specs,
    base_model,
    create_all,
    make_batch,
    new_trainer,
    peft_loss,
    peft_step,
    peft_twin,
    rel_update_error,
    trainer_state,
    assert_same_state,
)

FAMILIES = ["llama", "qwen2", "gpt2"]
HYPER = dict(lr=5e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)


@pytest.fixture(scope="module")
def bases():
    return {f: base_model(f) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_init_is_peft_seeded_init(bases, family):
    """create(seed=s) draws exactly what torch.manual_seed(s); get_peft_model(...) draws."""
    trainer = new_trainer(bases[family], family)
    specs = adapter_specs(family)
    create_all(trainer, specs)
    for aid, spec in specs.items():
        twin = peft_twin(bases[family], trainer, aid, seed=spec["seed"])
        got = trainer.export(aid).modules
        assert len(got) == len(twin.params) // 2
        for name, w in got.items():
            assert torch.equal(w.a, twin.params[f"{name}.lora_A"].detach()), (aid, name)
            assert torch.equal(w.b, twin.params[f"{name}.lora_B"].detach()), (aid, name)
            assert not w.b.any() and w.a.abs().max() > 0


@pytest.mark.parametrize("family,clip", [("llama", None), ("llama", 0.5), ("qwen2", None), ("gpt2", 0.5)])
def test_training_together_equals_peft_training_each_alone(bases, family, clip):
    """Four adapters (rank 1, rsLoRA, a subset of modules, rank 128) trained together for six
    steps on mixed batches with no-adapter rows and padding equal PEFT training each adapter
    alone on its own rows with torch.optim.AdamW (weight decay on; clipping per adapter)."""
    base = bases[family]
    trainer = new_trainer(base, family)
    specs = adapter_specs(family)
    create_all(trainer, specs)
    twins = {aid: peft_twin(base, trainer, aid) for aid in specs}
    for i, assign in enumerate(SCHEDULE):
        batch = make_batch(assign, seed=100 + i)
        res = trainer.forward_backward(batch.adapters, batch.input_ids, batch.targets, batch.weights,
                                       attention_mask=batch.mask)
        out = trainer.optim_step(grad_clip_norm=clip, **HYPER)
        present = {a for a in assign if a is not None}
        assert set(out.stepped) == present and out.status == "ok"
        for aid in present:
            rows = batch.rows(aid)
            want, _ = peft_loss(twins[aid], batch, rows)
            assert torch.allclose(res.loss[rows], want.detach(), rtol=1e-5, atol=1e-5)
            peft_step(twins[aid], batch, rows, grad_clip_norm=clip, **HYPER)
    steps = {aid: sum(aid in s for s in SCHEDULE) for aid in specs}
    for aid in specs:
        assert trainer.info(aid)["steps"] == steps[aid] >= 5
        err = rel_update_error(trainer, aid, twins[aid])
        assert err <= 1e-4, (family, aid, err)


def test_two_calls_then_one_step_equal_one_concatenated_call(bases):
    base = bases["llama"]
    specs = adapter_specs("llama")
    one, two = new_trainer(base, "llama"), new_trainer(base, "llama")
    create_all(one, specs)
    create_all(two, specs)
    b1 = make_batch(["r1", "rs", None, "sub"], seed=1)
    b2 = make_batch(["big", "r1", "sub"], seed=2)
    for t in (one, two):
        for b in (b1, b2):
            t.forward_backward(b.adapters, b.input_ids, b.targets, b.weights, attention_mask=b.mask)
    both = make_batch([], seed=0)
    cat = lambda f: torch.cat([f(b1), f(b2)])  # noqa: E731
    both.adapters = b1.adapters + b2.adapters
    both.input_ids, both.targets = cat(lambda b: b.input_ids), cat(lambda b: b.targets)
    both.weights, both.mask = cat(lambda b: b.weights), cat(lambda b: b.mask)
    single = new_trainer(base, "llama")
    create_all(single, specs)
    single.forward_backward(both.adapters, both.input_ids, both.targets, both.weights, attention_mask=both.mask)
    assert one.info("r1")["pending"] == single.info("r1")["pending"] == 2
    out_a, out_b = one.optim_step(**HYPER), single.optim_step(**HYPER)
    assert out_a.stepped == out_b.stepped
    for aid in specs:
        assert out_a.grad_norms[aid] == pytest.approx(out_b.grad_norms[aid], rel=1e-5)
        wa, wb = one.export(aid).modules, single.export(aid).modules
        for n in wa:
            assert torch.allclose(wa[n].a, wb[n].a, rtol=0, atol=1e-6) and torch.allclose(wa[n].b, wb[n].b, atol=1e-6)


def test_absent_adapter_keeps_moments_and_step_count(bases):
    trainer = new_trainer(bases["llama"], "llama")
    create_all(trainer, adapter_specs("llama"))
    b = make_batch(["r1", "sub", "big"], seed=3)
    trainer.forward_backward(b.adapters, b.input_ids, b.targets, b.weights, attention_mask=b.mask)
    trainer.optim_step(**HYPER)
    before = trainer_state(trainer)["big"]
    for i in range(3):
        b = make_batch(["r1", "sub", None, "rs"], seed=10 + i)
        trainer.forward_backward(b.adapters, b.input_ids, b.targets, b.weights, attention_mask=b.mask)
        assert "big" not in trainer.optim_step(**HYPER).stepped
    after = trainer_state(trainer)["big"]
    assert_same_state({"big": before}, {"big": after})
    assert after[0]["steps"] == 1 and trainer.info("r1")["steps"] == 4


def test_spill_to_disk_and_reload_mid_training_changes_nothing(bases, tmp_path):
    """A pool that holds two of the four adapters at a time, no host tier: every batch evicts
    the others to disk (weights + state) and reloads them; the result is bit for bit that of a
    pool holding all four."""
    base = bases["llama"]
    specs = {"r1": dict(rank=1, alpha=2.0, seed=1), "rs": dict(rank=8, alpha=4.0, use_rslora=True, seed=2),
             "a8": dict(rank=8, alpha=3.0, seed=3), "b8": dict(rank=8, alpha=20.0, seed=4)}
    roomy = new_trainer(base, "llama")
    for aid, spec in specs.items():
        roomy.create(aid, **spec)
    rank8 = 8 * sum(i + o for i, o in roomy.pool.modules.values()) * 4  # bytes of a rank-8 adapter
    tight = new_trainer(base, "llama", capacity=int(2.4 * rank8), host_capacity_bytes=0, disk_dir=str(tmp_path))
    for aid, spec in specs.items():
        tight.create(aid, **spec)
    schedule = [["r1", None, "rs"], ["a8", "b8"], ["rs", "a8"], ["r1", "b8", None], ["a8", "rs"], ["b8", "r1"]]
    for i, assign in enumerate(schedule):
        b = make_batch(assign, seed=200 + i)
        for t in (roomy, tight):
            t.forward_backward(b.adapters, b.input_ids, b.targets, b.weights, attention_mask=b.mask)
            if i % 2:  # accumulate over two batches sometimes: gradients in flight are spilled too
                t.optim_step(**HYPER)
        losses = [roomy.forward(b.adapters, b.input_ids, b.targets, b.weights, attention_mask=b.mask).loss,
                  tight.forward(b.adapters, b.input_ids, b.targets, b.weights, attention_mask=b.mask).loss]
        assert torch.equal(*losses)
    for t in (roomy, tight):
        t.optim_step(**HYPER)
    s = tight.pool.stats()
    assert s["spills"] > 0 and s["evictions"] > 0
    assert roomy.pool.stats()["evictions"] == 0
    assert_same_state(trainer_state(roomy), trainer_state(tight))
    tight.pool.check_invariants()


@pytest.mark.parametrize("loss_fn", ["cross_entropy", "importance_sampling", "ppo"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_losses_and_gradients_match_plain_torch_on_peft(bases, family, loss_fn):
    """Each adapter's accumulated gradient pages equal the gradients of PEFT's LoRA parameters
    under the same loss computed with plain torch (Adam hides a uniform gradient scale, this
    does not)."""
    base = bases[family]
    trainer = new_trainer(base, family)
    specs = adapter_specs(family)
    create_all(trainer, specs)
    warm = make_batch(["r1", "sub", "rs", "big"], seed=5)  # one step first, so B != 0 and dA != 0
    trainer.forward_backward(warm.adapters, warm.input_ids, warm.targets, warm.weights, attention_mask=warm.mask)
    trainer.optim_step(lr=2e-2)
    b = make_batch(["sub", None, "r1", "sub", "big"], seed=6)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        lp = trainer.forward(b.adapters, b.input_ids, b.targets, attention_mask=b.mask).logprobs
    sampling = lp + 0.3 * torch.randn(lp.shape, generator=g)  # ratios well outside [0.8, 1.2]
    sampling[b.weights == 0] = float("-inf")  # masked tokens may hold anything
    inputs = {"logprobs": sampling, "advantages": torch.randn(lp.shape, generator=g)}
    config = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1} if loss_fn == "ppo" else None
    if loss_fn == "cross_entropy":
        inputs = None
    res = trainer.forward_backward(b.adapters, b.input_ids, b.targets, b.weights, attention_mask=b.mask,
                                   loss_fn=loss_fn, loss_fn_inputs=inputs, loss_fn_config=config)
    assert torch.isfinite(res.loss).all()
    for aid in ("sub", "r1", "big"):
        twin = peft_twin(base, trainer, aid)
        rows = b.rows(aid)
        want, want_lp = peft_loss(twin, b, rows, loss_fn, inputs, config)
        assert torch.allclose(res.loss[rows], want.detach(), rtol=1e-5, atol=1e-5)
        assert torch.allclose(res.logprobs[rows], want_lp.detach(), rtol=1e-5, atol=1e-5)
        want.sum().backward()
        with trainer.pool.prepare([aid], wait=True):
            grads = trainer.pool.read_state(aid).modules
        num = den = 0.0
        for name, kinds in grads.items():
            ga, gb = kinds["grad"]
            pa, pb = twin.params[f"{name}.lora_A"].grad, twin.params[f"{name}.lora_B"].grad
            num += float((ga - pa).square().sum() + (gb - pb).square().sum())
            den += float(pa.square().sum() + pb.square().sum())
        assert den > 0 and (num / den) ** 0.5 <= 1e-4, (aid, (num / den) ** 0.5)
    if loss_fn == "ppo":  # the clip really mattered
        ratio = (res.logprobs - sampling).exp()[b.weights != 0]
        assert ((ratio < 0.9) | (ratio > 1.1)).any()


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_logprobs_equal_peft_and_change_nothing(bases, family):
    base = bases[family]
    trainer = new_trainer(base, family)
    create_all(trainer, adapter_specs(family))
    warm = make_batch(["r1", "sub", "rs", "big"], seed=8)
    trainer.forward_backward(warm.adapters, warm.input_ids, warm.targets, warm.weights, attention_mask=warm.mask)
    trainer.optim_step(lr=2e-2)
    b = make_batch(["big", None, "rs", "r1", "sub", None], seed=9)
    before = trainer_state(trainer)
    res = trainer.forward(b.adapters, b.input_ids, b.targets, b.weights, attention_mask=b.mask)
    assert_same_state(before, trainer_state(trainer))
    with torch.no_grad():
        base_lp = peft_loss_base(base, b)
        for aid in ("big", "rs", "r1", "sub"):
            rows = b.rows(aid)
            _, want = peft_loss(peft_twin(base, trainer, aid), b, rows)
            assert torch.allclose(res.logprobs[rows], want, rtol=1e-5, atol=1e-5), aid
        none = [i for i, a in enumerate(b.adapters) if a is None]
        assert torch.allclose(res.logprobs[none], base_lp[none], rtol=1e-6, atol=1e-6)


def peft_loss_base(base, b):
    from minlora.train.losses import token_logprobs

    return token_logprobs(base(input_ids=b.input_ids, attention_mask=b.mask).logits, b.targets)


def test_save_peft_is_read_by_peft(bases, tmp_path):
    import warnings

    from peft import PeftModel

    base = bases["gpt2"]
    trainer = new_trainer(base, "gpt2")
    create_all(trainer, adapter_specs("gpt2"))
    b = make_batch(["rs", "big"], seed=4)
    trainer.forward_backward(b.adapters, b.input_ids, b.targets, b.weights, attention_mask=b.mask)
    trainer.optim_step(lr=2e-2)
    trainer.save_peft("rs", str(tmp_path / "rs"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "rs")).eval()
    c = make_batch(["rs", "rs"], seed=5)
    with torch.no_grad():
        want = peft_loss_base(peft, c)
    got = trainer.forward(c.adapters, c.input_ids, c.targets, attention_mask=c.mask).logprobs
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    again = new_trainer(base, "gpt2")
    again.load_peft("rs", str(tmp_path / "rs"))
    assert again.info("rs")["rank"] == 8 and again.info("rs")["use_rslora"] is True
    assert torch.equal(again.forward(c.adapters, c.input_ids, c.targets, attention_mask=c.mask).logprobs, got)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_pools_train(bases, dtype):
    """A half-precision model and pool: float32 gradient pages and moments, the update computed
    in float32 and rounded into the weights; the loss goes down."""
    base = copy.deepcopy(bases["llama"]).to(dtype)
    trainer = new_trainer(base, "llama", dtype=dtype)
    trainer.create("h", rank=4, alpha=8)
    b = make_batch(["h", None, "h"], seed=21)
    losses = []
    for _ in range(4):
        res = trainer.forward_backward(b.adapters, b.input_ids, b.targets, b.weights, attention_mask=b.mask)
        losses.append(float(res.loss[[0, 2]].sum()))
        assert trainer.optim_step(lr=1e-2).stepped == ["h"]
    assert losses[-1] < losses[0]
    w = trainer.export("h").modules
    assert all(x.a.dtype == dtype and torch.isfinite(x.b).all() and x.b.any() for x in w.values())
    with trainer.pool.prepare(["h"], wait=True):
        st = trainer.pool.read_state("h")
    assert all(a.dtype == torch.float32 and a.any() for kinds in st.modules.values() for a, _ in [kinds["exp_avg_sq"]])

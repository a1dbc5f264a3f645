"""Helpers of the training tests (no tests here): a Trainer on a tiny HF model, mixed batches,
and the external oracle, PEFT training one adapter alone with torch.optim.AdamW."""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

from minlora.pool import AdapterPool
from minlora.targets import target_shapes
from minlora.train import Trainer
from minlora.train.losses import row_losses, token_logprobs
from helpers.patching import ALL_LLAMA, VOCAB, tiny_model

GPT2 = ["c_attn", "c_proj", "c_fc"]


def family_targets(family: str) -> list[str]:
    return GPT2 if family == "gpt2" else ALL_LLAMA


# Four adapters: rank 1, rsLoRA, a subset of modules, rank 128 (ranks 1..128 in one batch).
def adapter_specs(family: str) -> dict[str, dict]:
    subset = ["c_attn"] if family == "gpt2" else ["q_proj", "v_proj"]
    mlp = ["c_fc"] if family == "gpt2" else ["gate_proj", "up_proj", "down_proj"]
    return {
        "r1": dict(rank=1, alpha=2.0, seed=11),
        "rs": dict(rank=8, alpha=4.0, use_rslora=True, seed=12),
        "sub": dict(rank=4, alpha=12.0, target_modules=subset, seed=13),
        "big": dict(rank=128, alpha=64.0, target_modules=mlp, seed=14),
    }


def new_trainer(base: torch.nn.Module, family: str, capacity: int = 1 << 24, **pool_kw) -> Trainer:
    model = copy.deepcopy(base)
    shapes = target_shapes(model, [{"target_modules": family_targets(family)}])
    pool_kw.setdefault("poison", True)
    pool = AdapterPool(shapes, capacity_bytes=capacity, optimizer_state=True, **pool_kw)
    return Trainer(model, pool)


def create_all(trainer: Trainer, specs: dict[str, dict]) -> None:
    for aid, spec in specs.items():
        trainer.create(aid, **spec)


@dataclass
class Batch:
    adapters: list[Optional[str]]
    input_ids: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    mask: torch.Tensor

    def rows(self, aid: str) -> list[int]:
        return [i for i, a in enumerate(self.adapters) if a == aid]


def make_batch(adapters: list[Optional[str]], seed: int, length: int = 10) -> Batch:
    """Random tokens, right-padded rows of random lengths (mask 0 and weight 0 past the end),
    some in-row tokens of weight 0 and weights other than 1."""
    g = torch.Generator().manual_seed(seed)
    B = len(adapters)
    ids = torch.randint(3, VOCAB, (B, length), generator=g)
    targets = torch.randint(3, VOCAB, (B, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (B,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    weights = torch.rand(B, length, generator=g) + 0.5
    weights[torch.rand(B, length, generator=g) < 0.2] = 0.0
    weights = weights * mask
    ids = ids * mask  # pad token 0
    return Batch(list(adapters), ids, targets, weights, mask)


# Mixed batches: every adapter in several, rows without an adapter, repeats, one batch without "big".
SCHEDULE = [
    ["r1", None, "rs", "sub", "big", "r1"],
    ["sub", "rs", None, "big", "sub", None, "r1"],
    ["big", "r1", "rs", "rs", None],
    ["rs", "sub", "r1", None, "sub"],  # no "big": it keeps its moments and step count
    [None, "big", "r1", "sub", "rs", "big"],
    ["r1", "rs", "sub", "big"],
]


# ---------------------------------------------------------------------- the PEFT oracle


@dataclass
class PeftTwin:
    """One adapter trained alone by PEFT + torch.optim.AdamW."""

    model: torch.nn.Module
    params: dict[str, torch.nn.Parameter]  # "<module>.lora_A" / ".lora_B" -> parameter
    opt: Optional[torch.optim.Optimizer] = None
    start: dict[str, torch.Tensor] = field(default_factory=dict)


def peft_twin(base: torch.nn.Module, trainer: Trainer, aid: str, seed: Optional[int] = None) -> PeftTwin:
    """PEFT on a copy of `base` with the adapter's config; its weights are drawn by PEFT itself
    after torch.manual_seed(seed) when `seed` is given (else copied from the trainer)."""
    from peft import LoraConfig, get_peft_model

    info = trainer.info(aid)
    cfg = LoraConfig(r=info["rank"], lora_alpha=info["alpha"], use_rslora=info["use_rslora"],
                     target_modules=info["target_modules"], lora_dropout=0.0,
                     fan_in_fan_out=family_of(base) == "gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if seed is not None:
            torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(base), cfg)
    model.eval()
    params = {}
    for n, p in model.named_parameters():
        if ".lora_A.default." in n or ".lora_B.default." in n:
            module = n.removeprefix("base_model.model.").split(".lora_")[0]
            params[f"{module}.lora_{'A' if '.lora_A.' in n else 'B'}"] = p
    if seed is None:
        weights = trainer.export(aid).modules
        with torch.no_grad():
            for name, w in weights.items():
                params[f"{name}.lora_A"].copy_(w.a)
                params[f"{name}.lora_B"].copy_(w.b)
    twin = PeftTwin(model, params)
    twin.start = {k: p.detach().clone() for k, p in params.items()}
    return twin


def family_of(model: torch.nn.Module) -> str:
    return {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "GPT2LMHeadModel": "gpt2"}[type(model).__name__]


def peft_loss(twin: PeftTwin, batch: Batch, rows: list[int], loss_fn: str = "cross_entropy",
              inputs: Optional[dict] = None, config: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row losses [n], logprobs [n, L]) of the twin on `rows`, with autograd, computed with
    plain torch from PEFT's logits (the same definitions as the trainer's)."""
    logits = twin.model(input_ids=batch.input_ids[rows], attention_mask=batch.mask[rows]).logits
    lp = token_logprobs(logits, batch.targets[rows])
    sub = {k: v[rows] for k, v in (inputs or {}).items()}
    cfg = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2, **(config or {})}
    return row_losses(loss_fn, lp, batch.weights[rows], sub, cfg), lp


def peft_step(twin: PeftTwin, batch: Batch, rows: list[int], *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
              weight_decay: float = 0.0, grad_clip_norm: Optional[float] = None) -> None:
    """One training step of the twin on its own rows: sum of row losses, backward, optional
    clip_grad_norm_, torch.optim.AdamW."""
    if twin.opt is None:
        twin.opt = torch.optim.AdamW(list(twin.params.values()), lr=lr, betas=betas, eps=eps,
                                     weight_decay=weight_decay)
    for group in twin.opt.param_groups:
        group.update(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    twin.opt.zero_grad(set_to_none=False)
    loss, _ = peft_loss(twin, batch, rows)
    loss.sum().backward()
    if grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(list(twin.params.values()), grad_clip_norm)
    twin.opt.step()


def rel_update_error(trainer: Trainer, aid: str, twin: PeftTwin) -> float:
    """||minlora - PEFT|| / ||PEFT - start|| over all of the adapter's factors."""
    got = trainer.export(aid).modules
    num = den = 0.0
    for name, w in got.items():
        for suffix, t in (("lora_A", w.a), ("lora_B", w.b)):
            want = twin.params[f"{name}.{suffix}"].detach()
            num += float((t.double() - want.double()).square().sum())
            den += float((want.double() - twin.start[f"{name}.{suffix}"].double()).square().sum())
    return (num ** 0.5) / max(den ** 0.5, 1e-30)


def trainer_state(trainer: Trainer) -> dict:
    """Everything a call could change: per adapter its info, weights and all state pages."""
    out = {}
    pool = trainer.pool
    for aid in trainer.adapters():
        with pool.prepare([aid], wait=True):
            w = pool.read_adapter(aid)
            st = pool.read_state(aid)
        out[aid] = (trainer.info(aid), {n: (x.a.clone(), x.b.clone()) for n, x in w.items()}, st)
    return out


def assert_same_state(x: dict, y: dict) -> None:
    assert set(x) == set(y)
    for aid in x:
        (ix, wx, sx), (iy, wy, sy) = x[aid], y[aid]
        assert ix == iy, aid
        for n in wx:
            assert torch.equal(wx[n][0], wy[n][0]) and torch.equal(wx[n][1], wy[n][1]), (aid, n)
            for k, (a, b) in sx.modules[n].items():
                a2, b2 = sy.modules[n][k]
                assert torch.equal(a, a2) or (a.isnan().all() and a2.isnan().all()), (aid, n, k)
                assert torch.equal(b, b2) or (b.isnan().all() and b2.isnan().all()), (aid, n, k)


def base_model(family: str) -> torch.nn.Module:
    return tiny_model(family)

"""The training losses as Tinker defines them, per row and summed over tokens (not averaged).

With lp_t the model's logprob of target token t, w_t the token's weight (0 = ignore), and for
the RL losses q_t the sampling logprob and A_t the advantage:

    cross_entropy         loss = sum_t w_t * -lp_t
    importance_sampling   loss = -sum_t w_t * exp(lp_t - q_t) * A_t
    ppo                   loss = -sum_t w_t * min(r_t * A_t, clip(r_t, lo, hi) * A_t),  r_t = exp(lp_t - q_t)

Tinker's importance_sampling and ppo take no weights; here w_t multiplies each token's term, so
weights of ones give Tinker's loss exactly and 0 masks a token (padding).  ppo clips to
[0.8, 1.2] unless loss_fn_config gives clip_low_threshold / clip_high_threshold.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F

__all__ = ["LOSS_FNS", "check_loss_inputs", "row_losses", "token_logprobs"]

LOSS_FNS = ("cross_entropy", "importance_sampling", "ppo")
_RL_INPUTS = ("logprobs", "advantages")
_PPO_CONFIG = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B, L] float32: log softmax(logits[b, t])[targets[b, t]] (logits [B, L, V])."""
    B, L, V = logits.shape
    flat = logits.reshape(B * L, V).float()
    return -F.cross_entropy(flat, targets.reshape(B * L), reduction="none").view(B, L)


def check_loss_inputs(
    loss_fn: Any, inputs: Optional[Mapping[str, Any]], config: Optional[Mapping[str, Any]], shape: tuple[int, int]
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(the loss's [B, L] float32 inputs, its config) checked; ValueError naming the argument."""
    if loss_fn not in LOSS_FNS:
        raise ValueError(f"loss_fn must be one of {LOSS_FNS}, got {loss_fn!r}")
    if inputs is not None and not isinstance(inputs, Mapping):
        raise ValueError(f"loss_fn_inputs must be a dict of [B, L] tensors, got {type(inputs).__name__}")
    if config is not None and not isinstance(config, Mapping):
        raise ValueError(f"loss_fn_config must be a dict, got {type(config).__name__}")
    inputs, config = dict(inputs or {}), dict(config or {})
    out: dict[str, torch.Tensor] = {}
    if loss_fn != "cross_entropy":
        for key in _RL_INPUTS:
            if key not in inputs:
                raise ValueError(f"loss_fn={loss_fn!r} needs loss_fn_inputs[{key!r}] ([B, L] float)")
            t = inputs[key]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or not t.is_floating_point():
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"loss_fn_inputs[{key!r}] must be a float tensor of shape {shape}, got {got}")
            out[key] = t.detach().to("cpu", torch.float32)
    unknown = set(inputs) - set(out) - ({"target_tokens", "weights"})
    if unknown:
        raise ValueError(f"loss_fn_inputs has keys {sorted(unknown)} that loss_fn={loss_fn!r} does not use")
    allowed = _PPO_CONFIG if loss_fn == "ppo" else {}
    bad = set(config) - set(allowed)
    if bad:
        raise ValueError(f"loss_fn_config keys {sorted(bad)} are not used by loss_fn={loss_fn!r}")
    cfg = dict(allowed)
    for key, value in config.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"loss_fn_config[{key!r}] must be a finite number, got {value!r}")
        cfg[key] = float(value)
    if loss_fn == "ppo" and not 0 <= cfg["clip_low_threshold"] <= cfg["clip_high_threshold"]:
        raise ValueError(f"loss_fn_config: need 0 <= clip_low_threshold <= clip_high_threshold, got {cfg}")
    return out, cfg


def row_losses(
    loss_fn: str,
    logprobs: torch.Tensor,
    weights: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, float],
) -> torch.Tensor:
    """[B] float32: each row's loss (a sum over its tokens) from logprobs [B, L] (differentiable)."""
    if loss_fn == "cross_entropy":
        return (weights * -logprobs).sum(1)
    # Tokens of weight 0 get q = 0 and A = 0, so a -inf sampling logprob at a padded position
    # gives neither an inf loss term nor a NaN gradient (0 * inf).
    kept = weights != 0
    q = inputs["logprobs"].to(logprobs.device).where(kept, 0.0)
    adv = inputs["advantages"].to(logprobs.device).where(kept, 0.0)
    ratio = torch.exp(logprobs - q)
    if loss_fn == "importance_sampling":
        objective = ratio * adv
    else:
        clipped = torch.clamp(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
        objective = torch.min(ratio * adv, clipped * adv)
    return -(weights * objective).sum(1)

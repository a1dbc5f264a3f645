"""forward / forward_backward data: from the wire's datums to the padded tensors a Trainer takes.

A datum is a ModelInput of N tokens and loss_fn_inputs of N values each (position i of the
input predicts target_tokens[i]; the SDK does no shifting).  Requests of several training
clients that use the same loss function are stacked into one batch, each row its own
adapter, right-padded to the longest row:

    input_ids, target_tokens   [B, L] int64 (padding: token 0)
    weights                    [B, L] float32 (padding: 0, so padded positions add no loss)
    attention_mask             [B, L] int64 (1 = real token)
    loss_fn_inputs             {"logprobs", "advantages"}: [B, L] float32 (importance_sampling, ppo)

Everything is checked when the request arrives (not when its turn comes), so a bad request
fails alone and at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .errors import bad_request
from .wire import Datum, ForwardBackwardInput

__all__ = ["LOSS_FUNCTIONS", "ParsedDatum", "TrainBatch", "TrainData", "parse_train_data", "stack"]

# loss_fn -> (required loss_fn_inputs, optional ones)
LOSS_FUNCTIONS: dict[str, tuple[frozenset, frozenset]] = {
    "cross_entropy": (frozenset({"target_tokens"}), frozenset({"weights"})),
    "importance_sampling": (frozenset({"target_tokens", "logprobs", "advantages"}), frozenset({"weights"})),
    "ppo": (frozenset({"target_tokens", "logprobs", "advantages"}), frozenset({"weights"})),
}
PPO_CONFIG_KEYS = frozenset({"clip_low_threshold", "clip_high_threshold"})


@dataclass
class ParsedDatum:
    tokens: torch.Tensor  # [N] int64
    target_tokens: torch.Tensor  # [N] int64
    weights: torch.Tensor  # [N] float32
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # "logprobs", "advantages": [N] float32

    @property
    def length(self) -> int:
        return int(self.tokens.numel())


@dataclass
class TrainData:
    """One request's checked data."""

    loss_fn: str
    loss_fn_config: Optional[dict[str, float]]
    datums: list[ParsedDatum]

    @property
    def num_tokens(self) -> int:
        return sum(d.length for d in self.datums)

    def group_key(self) -> tuple:
        """Requests with equal keys can share one Trainer call."""
        cfg = tuple(sorted(self.loss_fn_config.items())) if self.loss_fn_config else ()
        return (self.loss_fn, cfg)


def _vector(datum: Datum, name: str, n: int, where: str, dtype: torch.dtype) -> torch.Tensor:
    t = datum.loss_fn_inputs[name].to_tensor(f"{where}.loss_fn_inputs.{name}")
    if t.dim() != 1 or t.numel() != n:
        raise bad_request(f"{where}.loss_fn_inputs.{name}: expected {n} values (the model_input's length), "
                          f"got shape {list(t.shape)}")
    t = t.to(dtype)
    if dtype.is_floating_point and not torch.isfinite(t).all():
        raise bad_request(f"{where}.loss_fn_inputs.{name}: holds NaN or infinity")
    return t


def parse_train_data(fbi: ForwardBackwardInput, what: str, *, vocab_size: int, max_context: int,
                     max_tokens: int) -> TrainData:
    """Checks a ForwardBackwardInput: loss function, inputs, lengths, token ids; 400 on anything wrong."""
    if fbi.loss_fn not in LOSS_FUNCTIONS:
        raise bad_request(f"{what}: loss_fn {fbi.loss_fn!r} is not supported; supported: {sorted(LOSS_FUNCTIONS)}")
    config = None
    if fbi.loss_fn_config:
        unknown = set(fbi.loss_fn_config) - (PPO_CONFIG_KEYS if fbi.loss_fn == "ppo" else set())
        if unknown:
            raise bad_request(f"{what}: loss_fn_config keys {sorted(unknown)} are not supported for {fbi.loss_fn!r}")
        config = {k: float(v) for k, v in fbi.loss_fn_config.items()}
        if not all(math.isfinite(v) for v in config.values()):
            raise bad_request(f"{what}: loss_fn_config values must be finite")
    if not fbi.data:
        raise bad_request(f"{what}: data is empty")
    required, optional = LOSS_FUNCTIONS[fbi.loss_fn]
    datums: list[ParsedDatum] = []
    total = 0
    for i, datum in enumerate(fbi.data):
        where = f"{what}.data[{i}]"
        tokens = datum.model_input.token_ids(f"{where}.model_input")
        n = len(tokens)
        if n == 0:
            raise bad_request(f"{where}.model_input: no tokens")
        if n > max_context:
            raise bad_request(f"{where}.model_input: {n} tokens, more than the model's context of {max_context}")
        if min(tokens) < 0 or max(tokens) >= vocab_size:
            raise bad_request(f"{where}.model_input: token ids must be in [0, {vocab_size})")
        names = set(datum.loss_fn_inputs)
        missing = required - names
        if missing:
            raise bad_request(f"{where}: loss_fn {fbi.loss_fn!r} needs loss_fn_inputs {sorted(missing)}")
        unexpected = names - required - optional
        if unexpected:
            raise bad_request(f"{where}: loss_fn_inputs {sorted(unexpected)} are not used by {fbi.loss_fn!r}")
        targets = _vector(datum, "target_tokens", n, where, torch.int64)
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab_size):
            raise bad_request(f"{where}.loss_fn_inputs.target_tokens: ids must be in [0, {vocab_size})")
        weights = (_vector(datum, "weights", n, where, torch.float32) if "weights" in names
                   else torch.ones(n, dtype=torch.float32))
        extra = {k: _vector(datum, k, n, where, torch.float32) for k in sorted(required - {"target_tokens"})}
        datums.append(ParsedDatum(torch.tensor(tokens, dtype=torch.int64), targets, weights, extra))
        total += n
        if total > max_tokens:
            raise bad_request(f"{what}: more than {max_tokens} tokens in one request; send smaller batches")
    return TrainData(fbi.loss_fn, config, datums)


@dataclass
class TrainBatch:
    """Several requests' datums stacked (see the module docstring for the shapes)."""

    adapters: list[str]  # [B]: the adapter of each row
    input_ids: torch.Tensor
    target_tokens: torch.Tensor
    weights: torch.Tensor
    attention_mask: torch.Tensor
    loss_fn: str
    loss_fn_inputs: Optional[dict[str, torch.Tensor]]
    loss_fn_config: Optional[dict[str, float]]
    rows: list[tuple[int, int]]  # per request: (first row, number of rows)
    lengths: list[int]  # [B]: real tokens per row


def stack(requests: Sequence[tuple[str, TrainData]], device: torch.device) -> TrainBatch:
    """Stacks (adapter, data) requests that share a group_key into one batch."""
    if not requests:
        raise ValueError("no requests to stack")
    first = requests[0][1]
    datums = [(aid, d) for aid, data in requests for d in data.datums]
    L = max(d.length for _, d in datums)
    B = len(datums)
    input_ids = torch.zeros(B, L, dtype=torch.int64)
    target_tokens = torch.zeros(B, L, dtype=torch.int64)
    weights = torch.zeros(B, L, dtype=torch.float32)
    mask = torch.zeros(B, L, dtype=torch.int64)
    extra_names = sorted(first.datums[0].extra)
    extra = {k: torch.zeros(B, L, dtype=torch.float32) for k in extra_names}
    for b, (_, d) in enumerate(datums):
        n = d.length
        input_ids[b, :n] = d.tokens
        target_tokens[b, :n] = d.target_tokens
        weights[b, :n] = d.weights
        mask[b, :n] = 1
        for k in extra_names:
            extra[k][b, :n] = d.extra[k]
    rows, at = [], 0
    for _, data in requests:
        rows.append((at, len(data.datums)))
        at += len(data.datums)
    return TrainBatch(
        adapters=[aid for aid, _ in datums],
        input_ids=input_ids.to(device), target_tokens=target_tokens.to(device), weights=weights.to(device),
        attention_mask=mask.to(device), loss_fn=first.loss_fn,
        loss_fn_inputs={k: v.to(device) for k, v in extra.items()} or None,
        loss_fn_config=first.loss_fn_config, rows=rows, lengths=[d.length for _, d in datums],
    )

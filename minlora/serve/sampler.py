"""Choosing the next token of every row from its logits, and deciding when a row stops.

Per row: temperature (0 = greedy), top_k (-1 = all), top_p (1 = all) and its own random
stream (seeded per request and sample, so a seed reproduces its samples whatever else is in
the batch).  All rows are chosen at once: one uniform draw per row, inverse-CDF over the
kept tokens.  The logprob reported for a token is its log-probability under the
temperature-scaled distribution before top-k / top-p truncation (at temperature 1 and 0:
the model's own log-softmax).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

__all__ = ["RowSampling", "StopRule", "choose_tokens", "prompt_logprobs"]


@dataclass
class RowSampling:
    """One row's sampling parameters and random stream."""

    temperature: float
    top_k: int
    top_p: float
    rng: np.random.Generator


def choose_tokens(logits: torch.Tensor, rows: Sequence[RowSampling]) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (tokens [B] int64, logprobs [B] float32)."""
    logits = logits.float()
    B, V = logits.shape
    device = logits.device
    temps = torch.tensor([r.temperature for r in rows], dtype=torch.float32, device=device)
    greedy = temps <= 0
    logp = torch.log_softmax(logits / torch.where(greedy, torch.ones_like(temps), temps)[:, None], dim=-1)
    u = torch.tensor([r.rng.random() for r in rows], dtype=torch.float32, device=device)
    truncated = any((0 < r.top_k < V) or r.top_p < 1.0 for r in rows)
    if truncated:
        sorted_lp, order = torch.sort(logp, dim=-1, descending=True)
        probs = sorted_lp.exp()
        k = torch.tensor([r.top_k if 0 < r.top_k < V else V for r in rows], device=device)
        p = torch.tensor([r.top_p for r in rows], dtype=torch.float32, device=device)
        keep = torch.arange(V, device=device)[None, :] < k[:, None]
        keep &= (torch.cumsum(probs, dim=-1) - probs) < p[:, None]  # the first token always stays
        probs = probs * keep
    else:
        probs, order = logp.exp(), None
    cdf = torch.cumsum(probs, dim=-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1).clamp_(max=V - 1)
    if order is not None:
        tokens = order.gather(1, pick[:, None]).squeeze(1)
        first = order[:, 0]
    else:
        tokens = pick
        first = logp.argmax(dim=-1)
    tokens = torch.where(greedy, first, tokens)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


def prompt_logprobs(logits: torch.Tensor, prompt: Sequence[int], topk: int) -> tuple[list, Optional[list]]:
    """From a prompt's prefill logits [N, V]: ([None, logp(prompt[1] | prompt[:1]), ...], and
    for topk > 0 the per-position top-k [(token, logp), ...] (None at position 0))."""
    n = len(prompt)
    if n < 2:
        return [None] * n, ([None] * n if topk > 0 else None)
    lp = torch.log_softmax(logits[: n - 1].float(), dim=-1).clamp_(min=-1e30)
    targets = torch.tensor(list(prompt[1:]), dtype=torch.int64, device=logits.device)
    values: list[Optional[float]] = [None] + lp.gather(1, targets[:, None]).squeeze(1).tolist()
    top: Optional[list] = None
    if topk > 0:
        tv, ti = lp.topk(min(topk, lp.shape[-1]), dim=-1)
        top = [None] + [list(zip(i, v)) for i, v in zip(ti.tolist(), tv.tolist())]
    return values, top


@dataclass
class StopRule:
    """When a row stops: a stop token (or, with no stop given, an end-of-sequence token), a
    stop string (with a tokenizer), or max_tokens."""

    max_tokens: int
    stop_tokens: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    tokenizer: Any = None
    _longest: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._longest = max((len(s) for s in self.stop_strings), default=0)

    def stop_reason(self, tokens: Sequence[int]) -> Optional[str]:
        """'stop', 'length' or None (go on) after `tokens` were generated."""
        if tokens and tokens[-1] in self.stop_tokens:
            return "stop"
        if self.stop_strings and tokens:
            # Decode a tail long enough to hold any stop string (a token is at least one character
            # of text or none at all), so the check stays cheap on long generations.
            tail = tokens[-max(8, 4 * self._longest):]
            text = self.tokenizer.decode(tail, skip_special_tokens=False)
            if any(s in text for s in self.stop_strings):
                return "stop"
        if len(tokens) >= self.max_tokens:
            return "length"
        return None


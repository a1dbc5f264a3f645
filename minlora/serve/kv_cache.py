"""The KV cache of the rows the decode engine is running, as one batch that rows join and leave.

Each row's keys and values sit at its own columns of a [B, H, T, D] cache per layer; `valid`
[B, T] says which columns hold the row's real tokens (the rest is padding, masked out of
attention), and `positions` [B] is the position (RoPE) of the row's next token, which need
not be its column.  So rows of different lengths share one cache:

* a newcomer's prefill (several newcomers right-padded together) gives its own cache; `join`
  left-pads whichever side is shorter and stacks the rows;
* a decode step appends one column (the step's token of every row, valid everywhere);
* `keep(rows)` drops finished rows, then leading columns no remaining row uses.

The attention mask of a step is `valid` plus the new column; HF builds the causal and padding
mask from it and from the cache's length (the column index), and RoPE from `position_ids`.
Only full-attention decoders (Llama, Qwen2, Mistral without a sliding window, ...): the layers
are plain DynamicLayers.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["BatchCache", "new_hf_cache"]


def new_hf_cache() -> Any:
    """An empty HF DynamicCache of plain (full attention) layers."""
    from transformers import DynamicCache

    return DynamicCache()


def _kv(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _from_kv(kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    cache = new_hf_cache()
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


class BatchCache:
    """The running rows' cache: `hf` (the DynamicCache the model reads and extends), `valid`
    [B, T] bool and `positions` [B] int64."""

    def __init__(self, hf: Any, valid: torch.Tensor, positions: torch.Tensor) -> None:
        self.hf = hf
        self.valid = valid
        self.positions = positions

    @property
    def rows(self) -> int:
        return int(self.valid.shape[0])

    @property
    def length(self) -> int:
        return int(self.valid.shape[1])

    def step_mask(self) -> torch.Tensor:
        """[B, T+1]: the attention mask of a decode step (every row's new token is real)."""
        return torch.cat([self.valid, self.valid.new_ones(self.rows, 1)], dim=1)

    def stepped(self, mask: torch.Tensor) -> None:
        """After a decode step with `mask` (from step_mask): one more column, positions + 1."""
        self.valid = mask
        self.positions = self.positions + 1

    def repeat_rows(self, counts: Sequence[int]) -> "BatchCache":
        """Row i repeated counts[i] times (several samples of one prompt share its prefill)."""
        index = torch.repeat_interleave(torch.arange(self.rows, device=self.valid.device),
                                        torch.tensor(list(counts), device=self.valid.device))
        return self.keep(index.tolist(), trim=False)

    def keep(self, rows: Sequence[int], *, trim: bool = True) -> "BatchCache":
        """The cache of `rows` only (in that order); leading all-padding columns dropped."""
        index = torch.tensor(list(rows), dtype=torch.int64, device=self.valid.device)
        valid = self.valid.index_select(0, index)
        start = 0
        if trim and valid.numel():
            used = valid.any(dim=0)
            start = int(torch.nonzero(used)[0]) if bool(used.any()) else valid.shape[1]
        kv = [(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:]) for k, v in _kv(self.hf)]
        return BatchCache(_from_kv(kv), valid[:, start:], self.positions.index_select(0, index))

    @staticmethod
    def join(a: Optional["BatchCache"], b: "BatchCache") -> "BatchCache":
        """Rows of `a` then rows of `b`, left-padded to a common length."""
        if a is None or a.rows == 0:
            return b
        T = max(a.length, b.length)

        def pad(t: torch.Tensor, by: int) -> torch.Tensor:  # [B, H, T, D]: pad T on the left
            return F.pad(t, (0, 0, by, 0)) if by else t

        pa, pb = T - a.length, T - b.length
        kv = [(torch.cat([pad(ka, pa), pad(kb, pb)]), torch.cat([pad(va, pa), pad(vb, pb)]))
              for (ka, va), (kb, vb) in zip(_kv(a.hf), _kv(b.hf))]
        valid = torch.cat([F.pad(a.valid, (pa, 0)), F.pad(b.valid, (pb, 0))])
        return BatchCache(_from_kv(kv), valid, torch.cat([a.positions, b.positions]))

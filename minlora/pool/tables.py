"""The op's arguments for one target module of one step."""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ModuleTables"]


@dataclass(frozen=True)
class ModuleTables:
    """The op arguments of one target module for one step (DESIGN.md, "The op contract").

    a_pool:  [Pa, in]  the shared pool of row length `in` (A rows)
    b_pool:  [Pb, out] the shared pool of row length `out` (B columns)
    a_pages: [S, R] int32, b_pages: [S, R] int32 (entries past ranks[s] are 0 and ignored)
    ranks:   [S] int32, 0 for a slot whose adapter does not target this module
    scales:  [S] float32
    """

    a_pool: torch.Tensor
    b_pool: torch.Tensor
    a_pages: torch.Tensor
    b_pages: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor

"""The pool's constructor arguments, checked."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .layout import DTYPES

__all__ = ["PoolOptions"]


@dataclass(frozen=True)
class PoolOptions:
    """AdapterPool's keyword arguments after checking (see AdapterPool.__init__)."""

    dtype: torch.dtype
    device: torch.device
    capacity_bytes: int
    host_capacity_bytes: Optional[int]
    max_slots: int
    disk_dir: Optional[str]
    chunk_bytes: Optional[int]
    poison: bool
    load_workers: int

    @classmethod
    def check(
        cls,
        *,
        dtype: torch.dtype,
        device: Union[str, torch.device],
        capacity_bytes: int,
        host_capacity_bytes: Optional[int],
        max_slots: int,
        disk_dir: Union[str, "os.PathLike[str]", None],
        chunk_bytes: Optional[int],
        poison: bool,
        load_workers: int,
    ) -> "PoolOptions":
        """Raises TypeError (dtype) or ValueError naming the argument that is wrong."""
        if dtype not in DTYPES:
            raise TypeError(f"dtype must be one of float16, bfloat16, float32; got {dtype}")
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be a positive int, got {capacity_bytes!r}")
        if host_capacity_bytes is not None and (not isinstance(host_capacity_bytes, int) or host_capacity_bytes < 0):
            raise ValueError(f"host_capacity_bytes must be None or an int >= 0, got {host_capacity_bytes!r}")
        if not isinstance(max_slots, int) or max_slots <= 0:
            raise ValueError(f"max_slots must be a positive int, got {max_slots!r}")
        device = torch.device(device)
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {device}")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return cls(
            dtype=dtype,
            device=device,
            capacity_bytes=capacity_bytes,
            host_capacity_bytes=host_capacity_bytes,
            max_slots=max_slots,
            disk_dir=os.fspath(disk_dir) if disk_dir is not None else None,
            chunk_bytes=chunk_bytes,
            poison=poison,
            load_workers=max(1, load_workers),
        )

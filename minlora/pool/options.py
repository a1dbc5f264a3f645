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
    optimizer_state: bool = False

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
        optimizer_state: bool = False,
    ) -> "PoolOptions":
        """Raises TypeError (dtype) or ValueError naming the argument that is wrong."""
        if dtype not in DTYPES:
            raise TypeError(f"dtype must be one of float16, bfloat16, float32; got {dtype}")
        _check_int("capacity_bytes", capacity_bytes, 1)
        if host_capacity_bytes is not None:
            _check_int("host_capacity_bytes", host_capacity_bytes, 0, "None or ")
        _check_int("max_slots", max_slots, 1)
        if chunk_bytes is not None:
            _check_int("chunk_bytes", chunk_bytes, 1, "None or ")
        _check_int("load_workers", load_workers, 1)
        if not isinstance(poison, bool):
            raise ValueError(f"poison must be a bool, got {poison!r}")
        if not isinstance(optimizer_state, bool):
            raise ValueError(f"optimizer_state must be a bool, got {optimizer_state!r}")
        if disk_dir is not None and not isinstance(disk_dir, (str, os.PathLike)):
            raise ValueError(f"disk_dir must be None or a path, got {disk_dir!r}")
        if not isinstance(device, (str, torch.device)):
            raise ValueError(f"device must be a str or torch.device, got {device!r}")
        try:
            device = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"device {device!r} is not a device: {exc}") from None
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
            load_workers=load_workers,
            optimizer_state=optimizer_state,
        )


def _check_int(name: str, value: object, least: int, also: str = "") -> None:
    """ValueError naming `name` unless value is an int (not a bool) >= least."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be {also}an int >= {least}, got {value!r}")

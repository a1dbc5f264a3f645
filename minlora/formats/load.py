"""One entry point for an adapter named by a path: minlora's own file, or a PEFT directory."""
from __future__ import annotations

import os
from typing import Union

from .adapter import Adapter
from .native import load_adapter_file
from .peft import load_peft

__all__ = ["load_adapter"]


def load_adapter(path: Union[str, "os.PathLike[str]"]) -> Adapter:
    """The adapter at `path`: a directory is read as a PEFT adapter (adapter_config.json +
    adapter_model.safetensors), a file as minlora's own safetensors file.

    Raises FileNotFoundError when nothing is there, ValueError (or UnsupportedAdapterError)
    naming the file and the problem when it is not a readable adapter.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return load_peft(path)
    if os.path.isfile(path):
        return load_adapter_file(path)
    raise FileNotFoundError(f"no adapter file or PEFT adapter directory at {path!r}")

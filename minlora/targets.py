"""Which layers of a model a set of PEFT adapters targets, and their shapes: what an AdapterPool
needs to be built for those adapters on that model.

This joins the two sides the lower layers keep apart: the model's layers (what the patch can
patch: nn.Linear and transformers' Conv1D) and the adapters' configs (PEFT's targeting rules,
in minlora.formats).  The patch knows no adapter files and the formats know no nn.Modules, so
the join lives here, above both.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence, Union

from torch import nn

from .formats.peft import check_config, read_config
from .formats.targeting import targets_module
from .patching.layers import linear_shape

__all__ = ["target_shapes"]

PeftSource = Union[str, "os.PathLike[str]", Mapping[str, Any]]


def target_shapes(model: nn.Module, peft_dirs_or_configs: Sequence[PeftSource]) -> dict[str, tuple[int, int]]:
    """The `modules` mapping an AdapterPool needs for these PEFT adapters on this model:
    module name -> (in_features, out_features), for every linear / Conv1D layer any adapter targets
    (PEFT's rules: target_modules, exclude_modules, layers_to_transform / layers_pattern).

    peft_dirs_or_configs: PEFT adapter directories, or their adapter_config.json contents as dicts.
    """
    configs = []
    for c in peft_dirs_or_configs:
        config = dict(c) if isinstance(c, Mapping) else read_config(c)
        check_config(config)
        configs.append(config)
    shapes: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        shape = linear_shape(module)
        if shape is not None and any(targets_module(c, name) for c in configs):
            shapes[name] = shape
    return shapes

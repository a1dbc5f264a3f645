"""The one home of adapter I/O: the in-memory adapter, minlora's own file, PEFT read/write and
PEFT's targeting rules.

    adapter.py    Adapter, LoraWeights and check_adapter (the one validation of an adapter)
    native.py     minlora's safetensors file: serialize / deserialize / save / load, content hash
    peft.py       PEFT LoRA directories: load_peft, save_peft
    peft_config.py  adapter_config.json: read_config (bounded), check_config, check_supported
    targeting.py  PEFT's rules on module names (on RE2): target_modules, exclude_modules, layers, patterns
    load.py       load_adapter(path): a file or a PEFT directory, whichever `path` is
    atomic.py     write_atomic: the file writer every format (and the registry's blobs) uses
    state.py      AdapterState (optimizer moments beside an adapter's weights) and its file, content hash

Names are imported on first use (PEP 562), so `from minlora.formats.targeting import ...`
loads neither safetensors nor the file readers.
"""
from __future__ import annotations

from ..lazy import lazy_names

_NAMES = {
    "Adapter": "adapter",
    "LoraWeights": "adapter",
    "check_adapter": "adapter",
    "FORMAT": "native",
    "canonical_config": "native",
    "canonical_json": "native",
    "content_hash": "native",
    "deserialize": "native",
    "load_adapter_file": "native",
    "save_adapter_file": "native",
    "serialize": "native",
    "CONFIG_NAME": "peft",
    "WEIGHTS_NAME": "peft",
    "MAX_CONFIG_BYTES": "peft_config",
    "UnsupportedAdapterError": "peft_config",
    "check_config": "peft_config",
    "check_supported": "peft_config",
    "load_peft": "peft",
    "read_config": "peft_config",
    "save_peft": "peft",
    "check_targeting": "targeting",
    "module_rank": "targeting",
    "module_scale": "targeting",
    "select_modules": "targeting",
    "targets_module": "targeting",
    "load_adapter": "load",
    "write_atomic": "atomic",
    "AdapterState": "state",
    "check_state": "state",
    "deserialize_state": "state",
    "load_state_file": "state",
    "save_state_file": "state",
    "serialize_state": "state",
    "state_hash": "state",
}

__all__ = sorted(_NAMES)


__getattr__, __dir__ = lazy_names(__name__, globals(), _NAMES)

"""`minlora serve`: the tinker SDK's HTTP API (tinker 0.22, mint 0.2) over minlora's batched kernels.

    from minlora.serve import ServeConfig, Service, Server
    service = Service(ServeConfig(model_dir="base", root="~/.minlora", api_keys={"tml-...": "alice"}))
    with Server(service, "127.0.0.1", 8000) as server:
        ...   # tinker.ServiceClient(base_url=server.url, api_key="tml-...")

What is supported, and how it maps onto minlora: README.md beside this file.  How the parts
fit: service.py.  Names are imported on first use.
"""
from __future__ import annotations

from ..lazy import lazy_names

_NAMES = {"ServeConfig": "config", "Service": "service", "Server": "server", "create_app": "app"}

__all__ = sorted(_NAMES)


__getattr__, __dir__ = lazy_names(__name__, globals(), _NAMES)

"""The server's settings (what `minlora serve` options set), checked in one place."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from ..registry import default_root

__all__ = ["ServeConfig"]


@dataclass
class ServeConfig:
    """Every knob of the service; defaults suit one machine.  `check()` raises ValueError."""

    model_dir: str
    model_name: Optional[str] = None  # what clients call the base model (default: the directory's name)
    # where adapters live: the registry under `root`, or at registry_url + blobs_url
    root: Optional[str] = None
    registry_url: Optional[str] = None
    blobs_url: Optional[str] = None
    state_url: Optional[str] = None  # the service's own tables (default: <root>/serve.db)
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys_file: Optional[str] = None  # default: <root>/api-keys (made with one key if missing)
    api_keys: Optional[dict[str, Optional[str]]] = None  # key -> owner, instead of a file (embedding, tests)
    device: str = "cpu"
    dtype: str = "float32"
    pool_bytes: int = 1 << 30
    max_adapters_per_step: int = 256
    session_timeout_s: float = 120.0
    long_poll_s: float = 10.0
    max_request_bytes: int = 64 << 20
    max_request_tokens: int = 262_144
    max_new_tokens: int = 4096
    max_batch_rows: int = 64
    max_prefill_tokens: int = 4096
    max_batch_adapters: Optional[int] = None  # None: any number of adapters in one decode batch
    lora_alpha: float = 32.0
    max_lora_rank: int = 128
    jwt_ttl_s: int = 3600
    archive_ttl_s: int = 900
    gap_timeout_s: float = 5.0
    coalesce_linger_s: float = 0.002
    load_timeout_s: float = 60.0
    public_url: Optional[str] = None  # the base URL clients reach (for download links); default: the request's
    extra: dict = field(default_factory=dict)

    @property
    def resolved_root(self) -> str:
        return os.path.abspath(self.root or default_root())

    @property
    def resolved_state_url(self) -> str:
        return self.state_url or "sqlite:///" + os.path.join(self.resolved_root, "serve.db")

    @property
    def resolved_keys_file(self) -> str:
        return os.path.abspath(self.api_keys_file or os.path.join(self.resolved_root, "api-keys"))

    def check(self) -> "ServeConfig":
        if not os.path.isdir(self.model_dir):
            raise ValueError(f"--model {self.model_dir}: not a directory")
        if self.registry_url and not self.blobs_url and not self.root:
            u = self.registry_url
            if not u.startswith("sqlite:"):
                raise ValueError("--registry URL needs --blobs URL (where the adapters' weights are stored)")
        if self.root and self.registry_url:
            raise ValueError("give --root, or --registry (with --blobs), not both")
        positive = {
            "pool_bytes": self.pool_bytes, "max_adapters_per_step": self.max_adapters_per_step,
            "session_timeout_s": self.session_timeout_s, "long_poll_s": self.long_poll_s,
            "max_request_bytes": self.max_request_bytes, "max_request_tokens": self.max_request_tokens,
            "max_new_tokens": self.max_new_tokens, "max_batch_rows": self.max_batch_rows,
            "max_prefill_tokens": self.max_prefill_tokens, "lora_alpha": self.lora_alpha,
            "max_lora_rank": self.max_lora_rank, "jwt_ttl_s": self.jwt_ttl_s, "archive_ttl_s": self.archive_ttl_s,
            "gap_timeout_s": self.gap_timeout_s, "load_timeout_s": self.load_timeout_s,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if self.max_batch_adapters is not None and self.max_batch_adapters < 1:
            raise ValueError("max_batch_adapters must be >= 1 (or None: no limit)")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.coalesce_linger_s < 0:
            raise ValueError("coalesce_linger_s must be >= 0")
        return self

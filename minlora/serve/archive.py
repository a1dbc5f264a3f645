"""Checkpoint archives: a tar of the checkpoint as a PEFT adapter directory, behind a signed link.

`GET .../checkpoints/<id>/archive` answers 302 to `/api/v1/archives/<token>`, a link that
carries its own authorization (the SDK's download uses plain urllib, without the API key):
the token is signed by the server, names one registry revision and expires (15 minutes by
default).  The tar holds `adapter_config.json`, `adapter_model.safetensors` and the empty
`checkpoint_complete` marker tinker's tools look for; `PeftModel.from_pretrained(base, dir)`
loads the extracted directory.  Newer SDKs download an `external_weights` checkpoint file by
file instead: `.../external_weights_urls` gives one such link per file.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import time
from typing import Any, Optional

from ..registry import Registry
from .errors import not_found
from .tokens import Signer, TokenError

__all__ = ["FILES", "ArchiveLinks", "build_archive", "peft_files"]

MARKER = "checkpoint_complete"
FILES = ("adapter_config.json", "adapter_model.safetensors", MARKER)


def peft_files(registry: Registry, adapter_id: str, revision: int, base_model: str) -> dict[str, bytes]:
    """The revision as the files of a PEFT adapter directory, plus the empty completion marker
    (the weights verified on the way)."""
    with tempfile.TemporaryDirectory(prefix="minlora-serve-archive-") as tmp:
        path = os.path.join(tmp, "adapter")
        registry.export_peft(adapter_id, path, revision)
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
            config = json.load(f)
        config.setdefault("base_model_name_or_path", base_model)
        config.setdefault("task_type", "CAUSAL_LM")
        with open(os.path.join(path, "adapter_model.safetensors"), "rb") as f:
            weights = f.read()
    return {"adapter_config.json": json.dumps(config, indent=2, sort_keys=True).encode(),
            "adapter_model.safetensors": weights, MARKER: b""}


def build_archive(registry: Registry, adapter_id: str, revision: int, base_model: str) -> bytes:
    """The revision's PEFT adapter directory (peft_files) as a tar."""
    files = peft_files(registry, adapter_id, revision, base_model)
    buf = io.BytesIO()
    now = int(time.time())
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in FILES:
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mtime = now
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(files[name]))
    return buf.getvalue()


class ArchiveLinks:
    """Signed, expiring download links for registry revisions."""

    def __init__(self, signer: Signer, ttl_s: int = 900) -> None:
        self.signer = signer
        self.ttl_s = ttl_s

    def token(self, owner: str, adapter_id: str, revision: int, name: str,
              file: Optional[str] = None) -> tuple[str, float]:
        """(token, expiry time) for one revision's archive, or for one of its files."""
        expires = time.time() + self.ttl_s
        payload = {"o": owner, "a": adapter_id, "r": int(revision), "n": name}
        if file is not None:
            payload["f"] = file
        return self.signer.url_token(payload, self.ttl_s), expires

    def open(self, token: str) -> dict[str, Any]:
        """The link's payload ({"o", "a", "r", "n"}); 404 for a bad or expired link."""
        try:
            payload = self.signer.open_url_token(token)
        except TokenError as exc:
            raise not_found(f"this download link is not valid ({exc})") from None
        if not isinstance(payload.get("a"), str) or not isinstance(payload.get("r"), int):
            raise not_found("this download link is not valid")
        return payload

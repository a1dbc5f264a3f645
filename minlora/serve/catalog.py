"""Weights behind `tinker://` paths: checkpoint rows and registry revisions, with access checks.

A training run's checkpoint (`tinker://<run>/<folder>/<name>`) is a row of the state store
naming a registry revision; a registry adapter's path (`tinker://<adapter>/<folder>/<ref>`)
names the revision directly.  Who may use what:

* a checkpoint: its owner, and everyone once it is published;
* a registry adapter: the owner whose name prefixes its id (`<owner>:<name>`); operators
  give a user an adapter by naming it so (`minlora adapters import DIR alice:assistant`).

Anything a caller may not use answers 404, the same as what does not exist.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

from ..registry import Registry, Revision
from ..registry.errors import RegistryError
from .errors import not_found
from .paths import WeightsPath, parse_path
from .state import CheckpointRecord, StateStore

__all__ = ["Catalog", "Weights", "adapter_owner", "owned_adapter_id"]

OWNER_SEP = ":"


def owned_adapter_id(owner: str, name: str) -> str:
    """The registry id of the owner's adapter `name`."""
    return f"{owner}{OWNER_SEP}{name}"


def adapter_owner(adapter_id: str) -> Optional[str]:
    owner, sep, rest = adapter_id.partition(OWNER_SEP)
    return owner if sep and owner and rest else None


@dataclass(frozen=True)
class Weights:
    """What a path resolved to: a registry revision, or an adapter's serving pointer."""

    path: str
    adapter_id: str
    revision: Optional[int]  # None: follow the serving revision
    checkpoint: Optional[CheckpointRecord] = None

    @property
    def follows_serving(self) -> bool:
        return self.revision is None


class Catalog:
    """Resolves paths for a caller; reads checkpoint rows and registry revisions."""

    def __init__(self, store: StateStore, registry: Registry) -> None:
        self.store = store
        self.registry = registry

    def checkpoint_visible(self, ck: CheckpointRecord, owner: str) -> bool:
        if ck.expires_at is not None and ck.expires_at <= time.time():
            return False
        return ck.owner == owner or ck.public

    def resolve(self, owner: str, path: object, what: str = "path", *, allow_serving: bool = True) -> Weights:
        """The weights `path` names for `owner`; 400 for a malformed path, 404 when not visible."""
        p = parse_path(path, what)
        run = self.store.run(p.source)
        if run is not None:
            ck = self.store.checkpoint(run.run_id, p.checkpoint_type, p.name)
            if ck is None or not self.checkpoint_visible(ck, owner):
                raise not_found(f"checkpoint {str(p)!r} not found")
            return Weights(str(p), ck.adapter_id, ck.revision, ck)
        return self._registry_weights(owner, p, allow_serving)

    def _registry_weights(self, owner: str, p: WeightsPath, allow_serving: bool) -> Weights:
        if adapter_owner(p.source) != owner:
            raise not_found(f"{str(p)!r} not found (no training run or registry adapter of yours has that id)")
        try:
            if not self.registry.exists(p.source):
                raise not_found(f"{str(p)!r} not found (no such registry adapter)")
            if p.name == "serving" and allow_serving:
                if self.registry.serving(p.source) is None:
                    raise not_found(f"{str(p)!r}: adapter {p.source!r} has no serving revision (promote one)")
                return Weights(str(p), p.source, None)
            rev = self.registry.show(p.source, p.name)
        except RegistryError as exc:
            raise not_found(f"{str(p)!r} not found ({exc})") from None
        return Weights(str(p), p.source, rev.number)

    def revision(self, weights: Weights) -> Revision:
        """The revision to use now (for a serving pointer: the one serving at this moment)."""
        try:
            return self.registry.show(weights.adapter_id, "serving" if weights.follows_serving else weights.revision)
        except RegistryError as exc:
            raise not_found(f"{weights.path!r}: {exc}") from None

    def adapter_revisions(self, owner: str, adapter_id: str) -> list[Revision]:
        """The revisions of a registry adapter the owner has (newest first); 404 otherwise."""
        if adapter_owner(adapter_id) != owner:
            raise not_found(f"training run {adapter_id!r} not found")
        try:
            return self.registry.log(adapter_id)
        except RegistryError:
            raise not_found(f"training run {adapter_id!r} not found") from None

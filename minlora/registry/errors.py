"""The registry's exceptions: one base class so callers (and the CLI) can catch them all."""

from __future__ import annotations

__all__ = [
    "AdapterNotFoundError",
    "AmbiguousRevisionError",
    "CorruptBlobError",
    "DamagedDatabaseError",
    "InvalidIdError",
    "PromotionRefusedError",
    "RegistryError",
    "RevisionNotFoundError",
    "TagExistsError",
]


class RegistryError(Exception):
    """Base class of every error the registry raises on purpose."""


class InvalidIdError(RegistryError, ValueError):
    """An adapter id or tag name that the registry refuses (see minlora.registry.ids)."""


class AdapterNotFoundError(RegistryError, KeyError):
    """No adapter with that id is registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "adapter not found"


class RevisionNotFoundError(RegistryError, KeyError):
    """The adapter exists but the revision reference matches nothing."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "revision not found"


class AmbiguousRevisionError(RegistryError, ValueError):
    """A hash prefix that matches revisions with different contents."""


class CorruptBlobError(RegistryError):
    """A revision's stored weights are missing, unreadable, or do not hash to the recorded value."""

    def __init__(self, message: str, *, adapter_id: str, revision: int, content_hash: str) -> None:
        super().__init__(message)
        self.adapter_id = adapter_id
        self.revision = revision
        self.content_hash = content_hash


class DamagedDatabaseError(RegistryError):
    """The registry's database is empty, truncated, malformed or not a registry database.
    The registry refuses to use it (and never re-initialises it), so nothing is lost that
    a restore from a backup could still bring back."""

    def __init__(self, message: str, *, database: str) -> None:
        super().__init__(message)
        self.database = database


class PromotionRefusedError(RegistryError):
    """`promote` refused because an evaluation gate failed; `report` lists every gate's outcome."""

    def __init__(self, message: str, report: list[dict]) -> None:
        super().__init__(message)
        self.report = report


class TagExistsError(RegistryError):
    """A tag of that name already points elsewhere (pass force=True to move it)."""

"""API keys: the keys file and who each key belongs to.

The file holds one key per line, optionally followed by the owner's name; `#` starts a comment:

    # key                                  owner
    tml-3c1f9e0b7a5d4c2e8f6a1b0d9e7c5a3f   alice
    sk-8d2b6f4a1c9e7b5d3f0a2c4e6b8d1f3a    alice     # the same user through mint
    tml-0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d   bob

Keys are shaped as the SDKs check them client-side: `tml-...` (tinker) or `sk-...` (mint), at
least 16 characters, no whitespace.  Several keys may name one owner; everything a client
creates (sessions, runs, checkpoints, futures) belongs to the owner, so those keys share it.
An owner named by no key in the file is `key-<12 hex digits of the key's sha256>`.  Owner
names are 1-32 characters of letters, digits, `_`, `.` and `-`: they prefix the registry ids
of the owner's adapters (`<owner>:<name>`).

The file is re-read when it changes (checked at most once a second), so a key can be added
or revoked without restarting the server.  Keys are held only as sha256 digests.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Optional

__all__ = ["KEY_PREFIXES", "KeyRing", "Principal", "ensure_keys_file", "key_id", "parse_keys_file", "valid_owner"]

KEY_PREFIXES = ("tml-", "sk-")
_MIN_KEY_LENGTH = 16
_OWNER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_RECHECK_S = 1.0


def key_id(key: str) -> str:
    """The id of a key (what tokens and logs name it by): 16 hex digits of its sha256."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def valid_owner(name: str) -> bool:
    return bool(_OWNER.match(name))


@dataclass(frozen=True)
class Principal:
    """Who is calling: the owner name and the id of the key used."""

    owner: str
    key_id: str


class KeyRing:
    """The accepted keys, from a keys file (reloaded when it changes) or given directly."""

    def __init__(self, path: Optional[str] = None, keys: Optional[dict[str, Optional[str]]] = None) -> None:
        """path: the keys file; keys: key -> owner (None: derived), for embedding and tests."""
        if (path is None) == (keys is None):
            raise ValueError("give the keys file path or a keys mapping (one of them)")
        self.path = os.path.abspath(path) if path is not None else None
        self._lock = threading.Lock()
        self._by_digest: dict[str, Principal] = {}
        self._stamp: Optional[tuple[float, int]] = None
        self._checked = 0.0
        if keys is not None:
            self._by_digest = _index([(k, o, f"key {i + 1}") for i, (k, o) in enumerate(keys.items())])
        else:
            self._reload(force=True)
        if not self._by_digest:
            raise ValueError(f"no API keys in {self.path or 'the keys given'}: the server would refuse everyone")

    def __len__(self) -> int:
        return len(self._by_digest)

    def owners(self) -> set[str]:
        return {p.owner for p in self._by_digest.values()}

    def lookup(self, key: str) -> Optional[Principal]:
        """The principal of `key`, or None when the key is not (or no longer) accepted."""
        self._reload()
        return self._by_digest.get(hashlib.sha256(key.encode()).hexdigest())

    def by_key_id(self, kid: str) -> Optional[Principal]:
        """The principal of the key with this id (tokens name keys by id), or None."""
        self._reload()
        for p in self._by_digest.values():
            if p.key_id == kid:
                return p
        return None

    def _reload(self, force: bool = False) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if not force and now - self._checked < _RECHECK_S:
            return
        with self._lock:
            self._checked = now
            try:
                st = os.stat(self.path)
            except OSError as exc:
                if force:
                    raise ValueError(f"cannot read the API keys file {self.path}: {exc.strerror}") from None
                return  # keep the keys we have; a file being replaced reappears
            stamp = (st.st_mtime, st.st_size)
            if stamp == self._stamp and not force:
                return
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
            try:
                entries = parse_keys_file(text, self.path)
                index = _index(entries)
            except ValueError:
                if force:
                    raise
                return  # a half-written or broken edit: keep the previous keys
            self._by_digest, self._stamp = index, stamp


def parse_keys_file(text: str, where: str) -> list[tuple[str, Optional[str], str]]:
    """(key, owner or None, 'file:line') for each key line; ValueError naming the line."""
    entries = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) > 2:
            raise ValueError(f"{where}:{n}: expected 'KEY [OWNER]', got {len(parts)} words")
        entries.append((parts[0], parts[1] if len(parts) == 2 else None, f"{where}:{n}"))
    return entries


def _index(entries: list[tuple[str, Optional[str], str]]) -> dict[str, Principal]:
    out: dict[str, Principal] = {}
    for key, owner, where in entries:
        if not isinstance(key, str) or not key.startswith(KEY_PREFIXES):
            raise ValueError(f"{where}: a key must start with {' or '.join(KEY_PREFIXES)} (what the SDKs accept)")
        if len(key) < _MIN_KEY_LENGTH or any(c.isspace() for c in key):
            raise ValueError(f"{where}: a key must be at least {_MIN_KEY_LENGTH} characters with no whitespace")
        kid = key_id(key)
        name = owner if owner is not None else f"key-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        if not valid_owner(name):
            raise ValueError(f"{where}: owner {name!r} must be 1-32 letters, digits, '_', '.' or '-'")
        digest = hashlib.sha256(key.encode()).hexdigest()
        if digest in out:
            raise ValueError(f"{where}: this key is listed twice")
        out[digest] = Principal(owner=name, key_id=kid)
    return out


def ensure_keys_file(path: str) -> Optional[str]:
    """Creates `path` (mode 0600) with one new `tml-` key for owner "local" when it is missing;
    returns the new key, or None when the file was there."""
    if os.path.exists(path):
        return None
    import secrets

    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    key = "tml-" + secrets.token_hex(16)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("# minlora serve API keys: one per line, KEY [OWNER]; tml-... for tinker, sk-... for mint\n")
        f.write(f"{key} local\n")
    return key

"""Validation of the names users choose: adapter ids and tag names.

Ids are compared byte-for-byte in the database, so they are NFC-normalised first: the same
visible name typed on two systems (composed vs decomposed accents) must be one adapter.
"""

from __future__ import annotations

import re
import unicodedata

from .errors import InvalidIdError

__all__ = ["MAX_ID_LENGTH", "MAX_TAG_LENGTH", "RESERVED_REFS", "normalize_adapter_id", "normalize_tag"]

MAX_ID_LENGTH = 128
MAX_TAG_LENGTH = 64
# Words that name a revision by position, so they cannot be tag names.
RESERVED_REFS = frozenset({"head", "latest", "serving"})


def _check_common(kind: str, value: object, max_len: int) -> str:
    if not isinstance(value, str):
        raise InvalidIdError(f"{kind} must be a string, got {type(value).__name__}")
    text = unicodedata.normalize("NFC", value)
    if not text or not text.strip():
        raise InvalidIdError(f"{kind} must not be empty")
    if text != text.strip():
        raise InvalidIdError(f"{kind} {text!r} has leading or trailing whitespace")
    if len(text) > max_len:
        raise InvalidIdError(f"{kind} is {len(text)} characters long; the limit is {max_len}")
    for ch in text:
        # Cc: control characters (NUL, newline, DEL, ...); Cf/Zl/Zp: invisible format and
        # line/paragraph separators that would make two ids look identical in a listing.
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs"):
            raise InvalidIdError(f"{kind} {text!r} contains the control character U+{ord(ch):04X}")
    if "/" in text or "\\" in text:
        raise InvalidIdError(f"{kind} {text!r} contains a path separator")
    if text in (".", ".."):
        raise InvalidIdError(f"{kind} {text!r} is not allowed")
    return text


def normalize_adapter_id(adapter_id: object) -> str:
    """Return the NFC form of `adapter_id`, or raise InvalidIdError.

    Rules: a non-empty string of at most 128 characters (after NFC), no path separators,
    no control or invisible format characters, no leading/trailing whitespace, not "." or "..".
    """
    return _check_common("adapter id", adapter_id, MAX_ID_LENGTH)


_DIGITS = re.compile(r"^[0-9]+$")


def normalize_tag(tag: object) -> str:
    """Return the NFC form of a tag name, or raise InvalidIdError.

    Besides the adapter-id rules: at most 64 characters, not all digits (those are revision
    numbers), not a reserved word (head, latest, serving), and no whitespace inside.
    """
    text = _check_common("tag", tag, MAX_TAG_LENGTH)
    if _DIGITS.match(text):
        raise InvalidIdError(f"tag {text!r} is all digits, which would read as a revision number")
    if text.lower() in RESERVED_REFS:
        raise InvalidIdError(f"tag {text!r} is a reserved revision name")
    if any(ch.isspace() for ch in text):
        raise InvalidIdError(f"tag {text!r} contains whitespace")
    return text

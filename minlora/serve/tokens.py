"""HMAC-signed tokens: the JWTs of `/api/v1/auth/token` and the signed archive URLs.

One server secret; each use signs with its own key derived from it (HMAC(secret, purpose)),
so a token of one kind is never accepted as the other.  Standard library only (hmac,
hashlib): HS256 is all the SDKs need (they read a JWT's `exp` / `iat` without checking it).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from typing import Any, Optional

__all__ = ["Signer", "TokenError"]


class TokenError(ValueError):
    """A token that is malformed, wrongly signed or expired (the message says which)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("not base64url") from None


class Signer:
    """Signs and checks tokens with keys derived from one secret (>= 32 bytes)."""

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) < 32:
            raise ValueError("the signing secret must be at least 32 bytes")
        self._jwt_key = hmac.new(secret, b"minlora-serve jwt", hashlib.sha256).digest()
        self._url_key = hmac.new(secret, b"minlora-serve url", hashlib.sha256).digest()

    # ------------------------------------------------------------------ JWT (HS256)

    def jwt(self, subject: str, ttl_s: int, now: Optional[float] = None) -> str:
        """A JWT for `subject` valid `ttl_s` seconds, with `iat` and `exp` (what the SDKs read)."""
        t = int(time.time() if now is None else now)
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
        payload = _b64(json.dumps({"sub": subject, "iat": t, "exp": t + int(ttl_s)}, separators=(",", ":")).encode())
        signing_input = f"{header}.{payload}".encode()
        return f"{header}.{payload}.{_b64(hmac.new(self._jwt_key, signing_input, hashlib.sha256).digest())}"

    def verify_jwt(self, token: str, now: Optional[float] = None) -> dict[str, Any]:
        """The claims of a JWT this signer issued; TokenError if not, or expired."""
        parts = token.split(".")
        if len(parts) != 3:
            raise TokenError("a JWT has three dot-separated parts")
        header_b64, payload_b64, sig_b64 = parts
        want = hmac.new(self._jwt_key, f"{header_b64}.{payload_b64}".encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(want, _unb64(sig_b64)):
            raise TokenError("bad signature (not issued by this server, or its secret changed)")
        header = _json(_unb64(header_b64))
        if header.get("alg") != "HS256":
            raise TokenError("unsupported JWT algorithm")
        claims = _json(_unb64(payload_b64))
        exp = claims.get("exp")
        if not isinstance(exp, int) or not isinstance(claims.get("sub"), str):
            raise TokenError("the JWT lacks sub / exp")
        if exp <= (time.time() if now is None else now):
            raise TokenError("the JWT has expired")
        return claims

    # ------------------------------------------------------------------ URL tokens

    def url_token(self, payload: dict[str, Any], ttl_s: int, now: Optional[float] = None) -> str:
        """`<payload>.<signature>` (URL-safe) carrying `payload` plus an expiry."""
        body = dict(payload, exp=int((time.time() if now is None else now) + ttl_s))
        data = _b64(json.dumps(body, separators=(",", ":"), sort_keys=True).encode())
        return f"{data}.{_b64(hmac.new(self._url_key, data.encode(), hashlib.sha256).digest())}"

    def open_url_token(self, token: str, now: Optional[float] = None) -> dict[str, Any]:
        """The payload of a URL token this signer issued; TokenError if not, or expired."""
        data, sep, sig = token.partition(".")
        if not sep:
            raise TokenError("malformed URL token")
        want = hmac.new(self._url_key, data.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(want, _unb64(sig)):
            raise TokenError("bad signature")
        body = _json(_unb64(data))
        exp = body.pop("exp", None)
        if not isinstance(exp, int) or exp <= (time.time() if now is None else now):
            raise TokenError("the link has expired")
        return body


def _json(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise TokenError("not JSON") from None
    if not isinstance(value, dict):
        raise TokenError("not a JSON object")
    return value

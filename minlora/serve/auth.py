"""Who is calling: the `X-API-Key` header, holding an API key or a JWT this server issued.

The SDKs send one header, `X-API-Key`: the raw key, or (when the server announces
`pjwt_auth_enabled`, as this one does, because mint's `sk-` keys pass the SDK only that way)
the JWT from `POST /api/v1/auth/token`.  A JWT names its key by id, so revoking the key in
the keys file revokes its JWTs too.  Failures answer 401; an expired or foreign JWT also
sends `WWW-Authenticate: Bearer error="invalid_token"`, on which newer SDKs fetch a new one.
"""
from __future__ import annotations

from .errors import ApiError
from .keys import KeyRing, Principal
from .tokens import Signer, TokenError

__all__ = ["Authenticator"]

_INVALID_TOKEN = {"WWW-Authenticate": 'Bearer error="invalid_token"'}


class Authenticator:
    def __init__(self, keys: KeyRing, signer: Signer, jwt_ttl_s: int) -> None:
        self.keys = keys
        self.signer = signer
        self.jwt_ttl_s = jwt_ttl_s

    def principal(self, credential: str | None) -> Principal:
        """The caller behind a credential; ApiError 401 when there is none or it is not accepted."""
        if not credential:
            raise ApiError(401, "missing API key (send it in the X-API-Key header)")
        if credential.startswith("eyJ"):
            try:
                claims = self.signer.verify_jwt(credential)
            except TokenError as exc:
                raise ApiError(401, f"invalid token: {exc}", _INVALID_TOKEN) from None
            who = self.keys.by_key_id(claims["sub"])
            if who is None:
                raise ApiError(401, "invalid token: its API key was revoked", _INVALID_TOKEN)
            return who
        who = self.keys.lookup(credential)
        if who is None:
            raise ApiError(401, "invalid API key")
        return who

    def issue(self, who: Principal) -> str:
        return self.signer.jwt(who.key_id, self.jwt_ttl_s)

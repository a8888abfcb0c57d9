"""Who is calling: a token mapped to a source or to the admin, in constant time.

The token comes as a bearer token (RFC 6750), or as the password of Basic
authentication (RFC 7617) for clients that only know Basic; the user name is ignored.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass

from .config import Settings

ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: the admin, or the source a token belongs to."""

    kind: str  # "admin" or "source"
    source: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.kind == ADMIN


def tokens_equal(a: str, b: str) -> bool:
    """Whether two tokens are equal, in time that does not depend on where they differ."""
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


class Authenticator:
    """Compares a presented token against every configured one.

    Every token is compared, whatever matched first, so the time taken does not tell
    which token (or how much of one) was right.
    """

    def __init__(self, settings: Settings) -> None:
        self._admin = settings.admin_token
        # Principals are built once: identify() runs on every request.
        self._admin_principal = Principal(ADMIN)
        self._sources = [(s.token, Principal("source", s.name)) for s in settings.sources]

    def identify(self, authorization: str | None) -> Principal | None:
        """The caller behind an `Authorization: Bearer <token>` or `Basic <user:token>` header, or None."""
        token = presented_token(authorization)
        if token is None:
            return None
        found: Principal | None = None
        if tokens_equal(token, self._admin):
            found = self._admin_principal
        for candidate, principal in self._sources:
            if tokens_equal(token, candidate) and found is None:
                found = principal
        return found


def presented_token(authorization: str | None) -> str | None:
    """The token an Authorization header carries: Bearer's credential, or Basic's password; None if neither.

    A Basic credential that is not base64 of UTF-8 "user:password" (RFC 7617
    section 2), or has an empty password, carries no token.
    """
    if not authorization:
        return None
    scheme, _, credential = authorization.partition(" ")
    credential = credential.strip()
    if not credential:
        return None
    scheme = scheme.lower()
    if scheme == "bearer":
        return credential
    if scheme != "basic":
        return None
    try:
        decoded = base64.b64decode(credential, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    _user, colon, password = decoded.partition(":")
    return password if colon and password else None

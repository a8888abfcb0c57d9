"""Who is calling: a bearer token mapped to a source or to the admin, in constant time."""

from __future__ import annotations

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
        """The caller behind an `Authorization: Bearer ...` header, or None."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        found: Principal | None = None
        if tokens_equal(token, self._admin):
            found = self._admin_principal
        for candidate, principal in self._sources:
            if tokens_equal(token, candidate) and found is None:
                found = principal
        return found

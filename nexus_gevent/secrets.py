"""Secrets: token references (a literal, env:VAR, file:PATH) and generated tokens kept in 0600 files."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

from ._files import fsync_directory, make_dirs_durable
from .errors import ConfigError

#: Mode of a generated secret file: readable by the service's user only.
SECRET_FILE_MODE = 0o600
#: Mode of a directory this module creates: it may hold secrets.
PRIVATE_DIR_MODE = 0o700

# RFC 6750's token characters are a subset of this; anything outside it (spaces,
# controls, non-ASCII) could never arrive intact in an Authorization header.
_TOKEN = re.compile(r"[\x21-\x7e]+")


def check_token(token: str, where: str) -> None:
    """Raise ConfigError naming `where` unless `token` is non-empty visible ASCII without spaces."""
    if not token:
        raise ConfigError(f"{where} is empty")
    if not _TOKEN.fullmatch(token):
        raise ConfigError(f"{where} must be visible ASCII characters only, without spaces")


def resolve_token(reference: object, where: str, env: Mapping[str, str]) -> str:
    """The token a reference names (``env:VAR``, ``file:PATH``, else the literal itself), checked.

    `where` names the reference in error messages; `env` is where ``env:`` looks.
    """
    if not isinstance(reference, str):
        raise ConfigError(f"{where} must be a string")
    token = reference
    if reference.startswith("env:"):
        var = reference[len("env:") :]
        if var not in env:
            raise ConfigError(f"{where} refers to ${var}, which is not set")
        token = env[var]
        where = f"{where} (from ${var})"
    elif reference.startswith("file:"):
        path = Path(reference[len("file:") :])
        try:
            token = path.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: cannot read the token file {path}: {exc}") from exc
        where = f"{where} (from {path})"
    check_token(token, where)
    return token


def stored_token(path: Path) -> str:
    """The token kept in `path`, generated there first if missing (see load_or_create_secret), checked."""
    try:
        token, _ = load_or_create_secret(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read or create the token file {path}: {exc}") from exc
    check_token(token, f"token file {path}")
    return token


def generate_token() -> str:
    """A fresh token: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def ensure_private_dir(path: Path) -> bool:
    """Create `path` (and its parents) if missing; the leaf gets mode 0700. True if created.

    An existing directory keeps its mode: it is the operator's, not ours.
    """
    if path.is_dir():
        return False
    if not make_dirs_durable(path, PRIVATE_DIR_MODE):
        # Another worker won the race; it applies the mode.
        return False
    # mkdir's mode is filtered through the umask; set it exactly.
    os.chmod(path, PRIVATE_DIR_MODE)
    return True


def load_or_create_secret(path: Path) -> tuple[str, bool]:
    """The token stored in `path`, generating it first if the file does not exist.

    Returns (token, created). Safe when several processes call it at once: the
    token is written and fsynced under a private temporary name, then published
    with os.link, which fails instead of overwriting. The loser of a race reads
    the winner's token, so every worker ends up with the same one, and no reader
    ever sees a half-written file.
    """
    try:
        return _read_secret(path), False
    except FileNotFoundError:
        pass
    ensure_private_dir(path.parent)
    token = generate_token()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_FILE_MODE)
    try:
        try:
            # O_CREAT's mode is filtered through the umask; set it exactly.
            os.fchmod(fd, SECRET_FILE_MODE)
            os.write(fd, (token + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _read_secret(path), False
        fsync_directory(path.parent)
        return token, True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _read_secret(path: Path) -> str:
    token = path.read_text(encoding="utf-8").rstrip("\r\n")
    if not token:
        raise ConfigError(f"secret file {path} is empty; delete it to have a new token generated")
    return token

"""Typed settings lookup: an environment variable over a key of a TOML file over a default.

Generic: the variable prefix, the variable that names the file and the keys the
file may hold all come from the caller. Every value is found together with where
it came from (a variable name, or "key in FILE"), so that an error names the
setting at fault.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from .errors import ConfigError

T = TypeVar("T")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class Layers:
    """Looks a setting up in the environment, then in the TOML file; says where it came from.

    A variable set to the empty string counts as unset (compose files often pass ``FOO=``).
    """

    def __init__(self, env: Mapping[str, str], *, prefix: str, file_variable: str, keys: frozenset[str]) -> None:
        self.env = env
        self.prefix = prefix
        self.toml, self.origin = _read_toml(env, file_variable, keys)

    def env_name(self, key: str) -> str:
        """The environment variable of the setting `key`: the prefix, then the key in capitals."""
        return f"{self.prefix}{key.upper()}"

    def where_toml(self, key: str) -> str:
        """Where the TOML key `key` is, for error messages."""
        return f"{key} in {self.origin}"

    def lookup(self, key: str) -> tuple[object, str] | None:
        """The raw value of `key` and where it was found, or None when neither layer sets it."""
        env_name = self.env_name(key)
        value = self.env.get(env_name)
        if value:
            return value, env_name
        if key in self.toml:
            return self.toml[key], self.where_toml(key)
        return None

    def read(self, key: str, default: T, parse: Callable[[object, str], T]) -> T:
        """`parse(value, where)` of the value found for `key`, or `default` when none is."""
        found = self.lookup(key)
        if found is None:
            return default
        return parse(*found)

    def text(self, key: str, default: str) -> str:
        """A non-empty string."""
        return self.read(key, default, _text)

    def integer(self, key: str, default: int, *, minimum: int | None = None) -> int:
        """An integer (a TOML integer, or its digits in the environment), at least `minimum`."""

        return self.read(key, default, lambda value, where: parse_integer(value, where, minimum=minimum))

    def seconds(self, key: str, default: float) -> float:
        """A finite, non-negative number of seconds."""
        return self.read(key, default, parse_seconds)

    def flag(self, key: str, default: bool) -> bool:
        """A TOML boolean, or one of the words in _TRUE / _FALSE in the environment."""
        return self.read(key, default, _flag)

    def tables(self, key: str, allowed: frozenset[str]) -> list[dict[str, object]]:
        """The TOML array of tables `[[key]]` (empty if absent), each holding only `allowed` keys."""
        raw = self.toml.get(key, [])
        if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
            raise ConfigError(f"{self.where_toml(key)} must be an array of tables ([[{key}]])")
        for table in raw:
            unknown = sorted(set(table) - allowed)
            if unknown:
                raise ConfigError(f"unknown key(s) {', '.join(unknown)} in [[{key}]] in {self.origin}")
        return raw


def _read_toml(env: Mapping[str, str], file_variable: str, keys: frozenset[str]) -> tuple[dict[str, object], str]:
    path_text = env.get(file_variable)
    if not path_text:
        return {}, "the environment"
    path = Path(path_text)
    try:
        with path.open("rb") as fh:
            data: dict[str, object] = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{file_variable}: cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file_variable}: {path} is not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - keys)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)} in {path}")
    return data, str(path)


def parse_integer(value: object, where: str, *, minimum: int | None = None) -> int:
    """An integer (a TOML integer, or its digits in the environment), at least `minimum`; `where` names it."""
    number = value if isinstance(value, int) and not isinstance(value, bool) else _from_text(value, int)
    if number is None:
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if minimum is not None and number < minimum:
        raise ConfigError(f"{where} must be at least {minimum}, got {number}")
    return number


def parse_positive(value: object, where: str) -> float:
    """A finite number above 0 (a TOML integer or float, or its text in the environment); `where` names it."""
    number = (
        float(value) if isinstance(value, int | float) and not isinstance(value, bool) else _from_text(value, float)
    )
    if number is None or not math.isfinite(number):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if number <= 0:
        raise ConfigError(f"{where} must be greater than 0, got {number:g}")
    return number


def _from_text(value: object, kind: Callable[[str], T]) -> T | None:
    """`kind` of a string value (the environment's only type), or None if it is not a string or does not parse."""
    # int() and float() also take fullwidth or Arabic-Indic digits: no number an operator meant to type.
    if not isinstance(value, str) or not value.isascii():
        return None
    try:
        return kind(value.strip())
    except ValueError:
        return None


def _text(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a non-empty string, got {value!r}")
    return value


def parse_seconds(value: object, where: str) -> float:
    """A finite, non-negative number of seconds; ConfigError naming `where` otherwise."""
    number = (
        float(value) if isinstance(value, int | float) and not isinstance(value, bool) else _from_text(value, float)
    )
    if number is None or not math.isfinite(number):
        raise ConfigError(f"{where} must be a number of seconds, got {value!r}")
    if number < 0:
        raise ConfigError(f"{where} must not be negative, got {number}")
    return number


def _flag(value: object, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise ConfigError(f"{where} must be true or false, got {value!r}")

"""The TOML of a test's config file (NEXUS_CONFIG), written one `[[destinations]]` or `[[sources]]` table at a time."""

from __future__ import annotations

import json


def _string(value: str) -> str:
    # A JSON string is a TOML basic string: the same quotes and escapes.
    return json.dumps(value)


def destination_table(name: str, url: str) -> str:
    """A `[[destinations]]` table: destination `name` at `url`."""
    return f"[[destinations]]\nname = {_string(name)}\nurl = {_string(url)}\n"


def source_table(name: str, *, token: str | None = None, destination: str | None = None) -> str:
    """A `[[sources]]` table; without `token` or `destination` the service's defaults apply."""
    lines = ["[[sources]]", f"name = {_string(name)}"]
    if token is not None:
        lines.append(f"token = {_string(token)}")
    if destination is not None:
        lines.append(f"destination = {_string(destination)}")
    return "\n".join(lines) + "\n"


def config_toml(*tables: str) -> str:
    """The tables, one after another, as the text of one config file."""
    return "\n".join(tables)

"""The data directory's layout, named once: what lives where under NEXUS_DATA_DIR.

Only names and paths, no I/O and no imports from the rest of the package, so the
offline tool, the gunicorn master and the service can all read it cheaply.
"""

from __future__ import annotations

from pathlib import Path

#: The environment variable that names the data directory.
DATA_DIR_ENV = "NEXUS_DATA_DIR"
#: Relative, so `scripts/serve` from a checkout keeps everything inside it.
DEFAULT_DATA_DIR = "./var"
#: One WAL directory per worker slot (wal/w0, wal/w1, ...) lives under this.
WAL_DIRNAME = "wal"
IDEMPOTENCY_FILENAME = "idempotency.db"
DEAD_LETTERS_FILENAME = "dead-letters.db"
#: The embedded default destination's file.
DEFAULT_DESTINATION_FILENAME = "nexus.db"
#: Generated tokens, one file each, mode 0600 in a 0700 folder.
SECRETS_DIRNAME = "secrets"
#: prometheus_client's multiprocess files, unless PROMETHEUS_MULTIPROC_DIR says otherwise.
METRICS_DIRNAME = "metrics"
#: Per-source rate-limit buckets shared by the workers, one 0600 file per limited source.
RATE_LIMIT_DIRNAME = "ratelimit"


def wal_root(data_dir: Path) -> Path:
    return data_dir / WAL_DIRNAME


def idempotency_file(data_dir: Path) -> Path:
    return data_dir / IDEMPOTENCY_FILENAME


def dead_letters_file(data_dir: Path) -> Path:
    return data_dir / DEAD_LETTERS_FILENAME


def secrets_dir(data_dir: Path) -> Path:
    return data_dir / SECRETS_DIRNAME


def metrics_dir(data_dir: Path) -> Path:
    return data_dir / METRICS_DIRNAME


def rate_limit_dir(data_dir: Path) -> Path:
    return data_dir / RATE_LIMIT_DIRNAME


def default_destination_url(data_dir: Path) -> str:
    """The embedded SQLite destination inside the data directory."""
    return f"sqlite:///{data_dir}/{DEFAULT_DESTINATION_FILENAME}"

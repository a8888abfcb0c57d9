"""`python -m nexus_gevent wal verify|inspect|dead-letters`: read a stopped service's data directory.

Parses the command line, finds the data directory, holds its WAL directories against
a starting service while reading them, and turns every failure into an exit code:
0 success (verify: healthy), 1 verify found damage, 2 usage or I/O error. Never
writes to the data directory.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from ..datadir import DATA_DIR_ENV
from ..wal.fold import STATUSES
from ..wal.segments import list_segments
from . import dead_letters, wal_inspect, wal_verify
from .datadir import ToolError, dead_letters_file, held_for_reading, resolve_data_dir, wal_directories
from .progress import Progress
from .wal_walk import DirectoryWalk, Keep, keep_nothing, walk_directory

EXIT_OK = 0
EXIT_DAMAGE = wal_verify.EXIT_DAMAGED
EXIT_ERROR = 2

PROG = "python -m nexus_gevent"


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run one command; returns its exit code (argparse's own exits included)."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed by argparse
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    try:
        code: int = args.run(args, out, err)
    except BrokenPipeError:  # the reader left early (`... | head`): stop quietly
        _detach(out)
        return EXIT_ERROR
    except (ToolError, OSError, sqlite3.Error) as exc:
        err.write(f"{PROG} wal: error: {exc}\n")
        return EXIT_ERROR
    return code


def _detach(out: TextIO) -> None:
    """Point a closed stdout at /dev/null, so the interpreter's final flush does not fail too."""
    if out is not sys.stdout:
        return
    try:
        fd = out.fileno()
    except (OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Offline tools for a nexus_gevent data directory.")
    tools = parser.add_subparsers(dest="tool", required=True, metavar="TOOL")
    wal = tools.add_parser(
        "wal",
        help="read the WAL and dead letters of a stopped service",
        description="Read a data directory's WAL and dead letters; never writes to it.",
        epilog="exit codes: 0 success (verify: healthy), 1 verify found damage, 2 usage or I/O error, "
        "or a WAL directory held by a running service",
    )
    commands = wal.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", metavar="PATH", help=f"the data directory (default: ${DATA_DIR_ENV}, else ./var)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    reads_wal = argparse.ArgumentParser(add_help=False, parents=[common])
    reads_wal.add_argument("--force", action="store_true", help="read WAL directories a running service holds")
    reads_wal.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress lines on stderr (default: when stderr is a terminal)",
    )

    verify = commands.add_parser("verify", parents=[reads_wal], help="integrity report; exit 1 on damage")
    verify.add_argument(
        "--allow-torn-tail", action="store_true", help="exit 0 when the only damage is torn tails left by crashes"
    )
    verify.set_defaults(run=_run_verify)

    inspect = commands.add_parser("inspect", parents=[reads_wal], help="list WAL entries")
    inspect.add_argument(
        "--status", choices=[*STATUSES, wal_inspect.ALL], default="pending", help="final status (default: pending)"
    )
    inspect.add_argument("--source", help="only entries from this source")
    inspect.add_argument("--destination", help="only entries bound for this destination")
    inspect.add_argument("--payload-id", help="only this entry")
    inspect.add_argument("--limit", type=_count, metavar="N", help="print at most N entries")
    inspect.add_argument("--show-payload", action="store_true", help="include the payload text")
    inspect.set_defaults(run=_run_inspect)

    letters = commands.add_parser("dead-letters", parents=[common], help="list dead letters")
    letters.add_argument("--limit", type=_count, metavar="N", help="print at most N dead letters")
    letters.set_defaults(run=_run_dead_letters)
    return parser


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {value}")
    return value


def _walk_all(
    args: argparse.Namespace, err: TextIO, *, keep: Keep = keep_nothing, with_payload: bool = False
) -> tuple[Path, list[DirectoryWalk], frozenset[Path]]:
    """Walk every WAL directory of the data directory, holding them against a starting service."""
    data_dir = resolve_data_dir(args.data_dir, os.environ)
    directories = wal_directories(data_dir)
    with held_for_reading(directories, force=args.force) as locked:
        for directory in sorted(locked):
            err.write(f"{PROG} wal: warning: {directory} is held by a running service; reading it anyway\n")
        enabled = args.progress if args.progress is not None else err.isatty()
        progress = Progress(err, sum(len(list_segments(d)) for d in directories), enabled=enabled)
        walks = [walk_directory(d, keep=keep, with_payload=with_payload, advance=progress.advance) for d in directories]
        progress.finish()
    return data_dir, walks, locked


def _run_verify(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    data_dir, walks, locked = _walk_all(args, err)
    code = wal_verify.exit_code(walks, allow_torn_tail=args.allow_torn_tail)
    render = wal_verify.render_json if args.json else wal_verify.render_text
    render(out, data_dir, walks, locked, code)
    return code


def _run_inspect(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    keep = wal_inspect.entry_filter(source=args.source, destination=args.destination, payload_id=args.payload_id)
    _data_dir, walks, _locked = _walk_all(args, err, keep=keep, with_payload=args.show_payload)
    damaged = sum(len(w.damage) for w in walks)
    if damaged:
        err.write(f"{PROG} wal: warning: {damaged} damaged runs skipped; see `wal verify`\n")
    listed = wal_inspect.select(walks, status=args.status, limit=args.limit)
    wal_inspect.render(out, listed, as_json=args.json, show_payload=args.show_payload)
    return EXIT_OK


def _run_dead_letters(args: argparse.Namespace, out: TextIO, _err: TextIO) -> int:
    path = dead_letters_file(resolve_data_dir(args.data_dir, os.environ))
    dead_letters.render(out, dead_letters.read_dead_letters(path, limit=args.limit), as_json=args.json)
    return EXIT_OK

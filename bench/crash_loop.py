"""The crash loop's long mode: tests/test_crash_loop.py with many more cycles.

    .venv/bin/python -m bench.crash_loop [--cycles 500] [--seed 20261128]

Runs the same test pytest runs in CI (30 cycles there), with NEXUS_CRASH_CYCLES and
NEXUS_CRASH_SEED set, and prints its one-line "CRASH-LOOP:" summary. Each cycle takes
a second or two, so 500 cycles take about a quarter of an hour. The exit code is
pytest's: 0 when every acknowledged entry was stored exactly once.

The same from pytest directly:

    NEXUS_CRASH_CYCLES=500 .venv/bin/python -m pytest tests/test_crash_loop.py -q
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=500, help="kill -9 cycles (default 500)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random kills (default: the test's)")
    args = parser.parse_args(argv)
    env = {**os.environ, "NEXUS_CRASH_CYCLES": str(args.cycles)}
    if args.seed is not None:
        env["NEXUS_CRASH_SEED"] = str(args.seed)
    command = [sys.executable, "-m", "pytest", "tests/test_crash_loop.py", "-q", "-p", "no:cacheprovider"]
    return subprocess.run(command, cwd=ROOT, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())

"""The power-cut loop's long mode: tests/test_power_cut.py's loop with many more cycles.

    .venv/bin/python -m bench.power_cut [--cycles 1000] [--seed 20261207] [--seconds 3000]

Runs the test pytest runs in CI (15 cycles there) with NEXUS_POWER_CUT_CYCLES and
NEXUS_POWER_CUT_SEED set, and prints its one-line "POWER-CUT:" summary: cycles,
acknowledged, missing, duplicates, starts that had WAL damage to skip, and how each
cut came. `--seconds` time-boxes a run: no cycle starts after it, and the summary
gives the cycles that ran. Needs FUSE (/dev/fuse, Debian's fuse3) and root, like the
test. The exit code is pytest's: 0 when every acknowledged entry was stored exactly
once and every idempotency key survived.

The same from pytest directly:

    NEXUS_POWER_CUT_CYCLES=1000 .venv/bin/python -m pytest tests/test_power_cut.py -q -k Loop
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=1000, help="power-cut cycles (default 1000)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random cuts (default: the test's)")
    parser.add_argument(
        "--seconds", type=float, default=0, help="start no cycle after this many seconds (default: no limit)"
    )
    args = parser.parse_args(argv)
    env = {**os.environ, "NEXUS_POWER_CUT_CYCLES": str(args.cycles), "NEXUS_POWER_CUT_SECONDS": str(args.seconds)}
    if args.seed is not None:
        env["NEXUS_POWER_CUT_SEED"] = str(args.seed)
    # A temporary folder of its own: pytest prunes old folders under its shared default,
    # and another pytest on the machine must never walk into this run's mount.
    with tempfile.TemporaryDirectory(prefix="nexus-power-cut-", ignore_cleanup_errors=True) as base:
        command = [sys.executable, "-m", "pytest", "tests/test_power_cut.py", "-q", "-k", "Loop"]
        command += ["-p", "no:cacheprovider", f"--basetemp={base}/pytest"]
        return subprocess.run(command, cwd=ROOT, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())

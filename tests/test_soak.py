"""A short soak (bench/soak.py at CI size): a steady write rate with destination outages stays flat.

A minute at a modest rate, the SQLite destination write-locked for 3 s every 15 s,
sampled every 5 s: the workers' RSS, the WAL's size and the delivery lag must not
grow from the first third of the run to the last (bench/soak.py's generous limits),
and the backlog must clear once the load stops. The long version is
`.venv/bin/python -m bench.soak --seconds 600`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from bench.soak import SoakConfig, run_soak, summary

pytestmark = pytest.mark.process

#: Long enough for several outages and WAL segment turnovers; NEXUS_SOAK_SECONDS overrides.
SECONDS = float(os.environ.get("NEXUS_SOAK_SECONDS", "60"))
#: Modest, so the run measures growth rather than the machine's ceiling (a 2-core VM shared with other tests).
RATE = 200.0
#: Small segments, so that at this rate segments fill, settle and are reclaimed within the minute.
SEGMENT_BYTES = 256 * 1024


class TestSoak:
    """Promise 5 and no leaks: under a steady load with outages, nothing grows without bound."""

    def test_rss_wal_size_and_lag_stay_flat_under_steady_load_with_outages(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A minute at 200 writes/s, a 3 s outage every 15 s: RSS, WAL size and lag stay flat; every ack delivered."""
        config = SoakConfig(seconds=SECONDS, rate=RATE, workers=2, threads=4, wal_segment_bytes=SEGMENT_BYTES)
        lines: list[str] = []

        result = run_soak(config, tmp_path, progress=lines.append)

        (tmp_path / "soak.json").write_text(json.dumps(result.to_json(), indent=2))
        report = "\n".join([*lines, summary(result)])
        with capsys.disabled():
            sys.stdout.write(f"\nSOAK:\n{report}\n")
        assert result.errors == {}, report
        assert result.statuses.keys() == {"202"}, report
        assert result.acked >= 0.9 * RATE * SECONDS, report
        assert len(result.samples) >= 6, report
        assert all(limit.ok for limit in result.limits), report
        assert result.settled, report
        assert result.delivered_at_end == result.acked, report
        assert result.stop_code == 0, report

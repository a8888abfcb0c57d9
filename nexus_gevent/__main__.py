"""`python -m nexus_gevent ...`: the operator's command line (see nexus_gevent.cli)."""

from __future__ import annotations

if __name__ == "__main__":
    from .cli import main

    raise SystemExit(main())

"""bench/suite.py's results: the figures against their targets, the Markdown, the CSV and the plots.

    .venv/bin/python -m bench.report [bench/results/suite.json]

rebuilds suite.md, the CSV and the plots from a suite.json, without measuring again.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: The issue's targets.
TARGET_WRITES_PER_S = 5_500
TARGET_WRITE_RATIO = 0.6
TARGET_SHED_RATIO = 0.9
TARGET_SHED_P99_MS = 5.0
TARGET_DELIVERY_RATIO = 0.5
TARGET_REPLAY_PER_S = 200_000
TARGET_HALF_MAX_P99_MS = 10.0
TARGET_RSS_MB = 150.0
TARGET_BATCH_TO_SINGLE = 10.0
TARGET_BATCH_TO_RAW = 0.6

Figure = dict[str, Any]


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _figure(
    key: str,
    section: str,
    label: str,
    unit: str,
    values: Sequence[float] | dict[str, float],
    *,
    target: str | None = None,
    check: Callable[[float], bool] | None = None,
    note: str | None = None,
) -> Figure:
    """One row: median/min/max of per-round values (or a spread given as such), and the verdict on the median."""
    if isinstance(values, dict):
        figure: Figure = {"median": values["median"], "min": values["min"], "max": values["max"]}
    else:
        figure = {**spread(values), "per_round": list(values)}
    met = None if check is None else bool(check(figure["median"]))
    return {
        "key": key,
        "section": section,
        "label": label,
        "unit": unit,
        **figure,
        "target": target,
        "met": met,
        "note": note,
    }


def figures(results: dict[str, Any]) -> list[Figure]:
    """Every reported figure, in the order of the issue."""
    out: list[Figure] = []
    rounds: list[dict[str, Any]] = results.get("rounds", [])
    if rounds:
        out.extend(_http_figures(rounds))
    if "batch_path" in results:
        out.extend(_batch_figures(results["batch_path"]))
    if "otlp" in results:
        out.extend(_otlp_figures(results["otlp"]))
    if "delivery" in results:
        out.extend(_delivery_figures(results["delivery"]))
    if "replay" in results:
        out.extend(_replay_figures(results["replay"]))
    return out


def _http_figures(rounds: list[dict[str, Any]]) -> list[Figure]:
    def col(*path: str) -> list[float]:
        values = []
        for r in rounds:
            value: Any = r
            for part in path:
                value = value[part]
            values.append(float(value))
        return values

    sustained = [bool(r["write_path"]["sustained"]) for r in rounds]
    all_sustained = all(sustained)
    n_sustained = f"sustained in {sum(sustained)} of {len(sustained)} rounds"
    out = [
        _figure("ceiling_rps", "1. ceiling", "bare Falcon app, flat out", "req/s", col("ceiling", "accepted_per_s")),
        _figure("ceiling_p50", "1. ceiling", "bare app p50", "ms", col("ceiling", "p50_ms")),
        _figure("ceiling_p99", "1. ceiling", "bare app p99", "ms", col("ceiling", "p99_ms")),
        _figure(
            "write_accepted",
            "2. write path",
            "durable writes/s end to end (202, SQLite delivering)",
            "writes/s",
            col("write_path", "accepted_per_s"),
            target=f">= {TARGET_WRITES_PER_S:,} and sustained",
            check=lambda m: m >= TARGET_WRITES_PER_S and all_sustained,
            note=n_sustained,
        ),
        _figure(
            "write_ratio",
            "2. write path",
            "write path / ceiling (same round)",
            "x",
            col("ratios", "write_path_to_ceiling"),
            target=f">= {TARGET_WRITE_RATIO} and sustained",
            check=lambda m: m >= TARGET_WRITE_RATIO and all_sustained,
            note=n_sustained,
        ),
        _figure(
            "ceiling_cpu",
            "1. ceiling",
            "bare app: worker CPU time per request",
            "us",
            col("ceiling", "cpu_us_per_request"),
        ),
        _figure(
            "write_cpu",
            "2. write path",
            "write path: worker CPU time per request (delivery included)",
            "us",
            col("write_path", "cpu_us_per_request"),
        ),
        _figure(
            "write_cpu_ratio",
            "2. write path",
            "CPU per request, ceiling / write path (same round)",
            "x",
            col("ratios", "cpu_per_request_ceiling_to_write_path"),
            note="what write/ceiling would be if only CPU time counted",
        ),
        _figure("write_p50", "2. write path", "write path p50 at saturation", "ms", col("write_path", "p50_ms")),
        _figure("write_p99", "2. write path", "write path p99 at saturation", "ms", col("write_path", "p99_ms")),
        _figure("write_max", "2. write path", "write path max at saturation", "ms", col("write_path", "max_ms")),
        _figure(
            "write_delivered",
            "2. write path",
            "rows delivered/s during the load",
            "rows/s",
            col("write_path", "delivered_per_s"),
        ),
        _figure(
            "write_lag",
            "2. write path",
            "acknowledged minus delivered when the load stopped",
            "entries",
            col("write_path", "delivery_lag_at_load_end"),
        ),
        _figure(
            "write_backlog_max",
            "2. write path",
            "backlog (shed entries) during the load, max",
            "entries",
            col("write_path", "backlog_max"),
            target="0",
            check=lambda m: m == 0,
        ),
        _figure(
            "half_offered",
            "2. half max",
            "offered: half the write path's rate",
            "req/s",
            col("half_max", "offered_per_s"),
        ),
        _figure("half_achieved", "2. half max", "reached", "writes/s", col("half_max", "accepted_per_s")),
        _figure("half_p50", "2. half max", "p50 at half max", "ms", col("half_max", "p50_ms")),
        _figure(
            "half_p99",
            "2. half max",
            "p99 at half max",
            "ms",
            col("half_max", "p99_ms"),
            target=f"<= {TARGET_HALF_MAX_P99_MS:g} ms",
            check=lambda m: m <= TARGET_HALF_MAX_P99_MS,
        ),
        _figure(
            "shed_rate",
            "3. shed (reject)",
            "429/s, queue full, destination locked",
            "429/s",
            col("shed_reject", "shed_per_s"),
        ),
        _figure(
            "shed_ratio",
            "3. shed (reject)",
            "429/s / ceiling (same round)",
            "x",
            col("ratios", "shed_reject_to_ceiling"),
            target=f">= {TARGET_SHED_RATIO}",
            check=lambda m: m >= TARGET_SHED_RATIO,
        ),
        _figure(
            "shed_p99",
            "3. shed (reject)",
            "429 p99",
            "ms",
            col("shed_reject", "p99_ms"),
            target=f"< {TARGET_SHED_P99_MS:g} ms",
            check=lambda m: m < TARGET_SHED_P99_MS,
        ),
        _figure("shed_p50", "3. shed (reject)", "429 p50", "ms", col("shed_reject", "p50_ms")),
        _figure(
            "shed_paced_rate",
            "3. shed (reject)",
            "paced at half the ceiling: 429/s reached",
            "429/s",
            col("shed_reject", "paced", "shed_per_s"),
        ),
        _figure(
            "shed_paced_p99",
            "3. shed (reject)",
            "paced at half the ceiling: 429 p99",
            "ms",
            col("shed_reject", "paced", "p99_ms"),
            target=f"< {TARGET_SHED_P99_MS:g} ms",
            check=lambda m: m < TARGET_SHED_P99_MS,
            note="not saturated: the cost of a 429, not queueing",
        ),
        _figure(
            "shed_durable_rate",
            "3. shed (durable)",
            "429/s with WAL append + fsync (reference)",
            "429/s",
            col("shed_durable", "shed_per_s"),
        ),
        _figure(
            "shed_durable_ratio",
            "3. shed (durable)",
            "durable 429/s / ceiling (same round)",
            "x",
            col("ratios", "shed_durable_to_ceiling"),
        ),
        _figure("shed_durable_p99", "3. shed (durable)", "durable 429 p99", "ms", col("shed_durable", "p99_ms")),
        _figure(
            "nginx_direct",
            "6. nginx",
            "direct to gunicorn (same load, same run)",
            "writes/s",
            col("direct_vs_nginx", "direct", "accepted_per_s"),
        ),
        _figure(
            "nginx_through",
            "6. nginx",
            "through nginx",
            "writes/s",
            col("direct_vs_nginx", "nginx", "accepted_per_s"),
        ),
        _figure(
            "nginx_ratio", "6. nginx", "through nginx / direct (same round)", "x", col("ratios", "nginx_to_direct")
        ),
        _figure("nginx_p99", "6. nginx", "p99 through nginx", "ms", col("direct_vs_nginx", "nginx", "p99_ms")),
        _figure(
            "rss_full",
            "7. memory",
            "worker RSS, full 10,000-entry queue (largest worker)",
            "MB",
            col("memory", "max_full_rss_mb"),
            target=f"< {TARGET_RSS_MB:g} MB",
            check=lambda m: m < TARGET_RSS_MB,
        ),
        _figure(
            "rss_idle",
            "7. memory",
            "worker RSS, idle after start (largest worker)",
            "MB",
            [max(r["memory"]["idle_rss_mb"]) for r in rounds],
        ),
    ]
    backlog_rss = [r["memory_backlog"]["max_full_rss_mb"] for r in rounds if "memory_backlog" in r]
    if backlog_rss:
        out.append(
            _figure(
                "rss_backlog",
                "7. memory",
                "worker RSS, full queue and 100,000-entry backlog of 250-byte entries (largest worker)",
                "MB",
                backlog_rss,
                target=f"< {TARGET_RSS_MB:g} MB",
                check=lambda m: m < TARGET_RSS_MB,
            )
        )
    return out


def _delivery_figures(d: dict[str, Any]) -> list[Figure]:
    n = f"{d['entries']:,}"
    out: list[Figure] = []
    for dest in ("sqlite", "postgres"):
        out.append(
            _figure(f"delivery_{dest}", "4. delivery", f"{dest}: service, {n} backlog", "entries/s", d[dest]["service"])
        )
        out.append(
            _figure(
                f"delivery_{dest}_raw",
                "4. delivery",
                f"{dest}: raw driver, executemany, 256/transaction",
                "entries/s",
                d[dest]["raw_executemany"],
            )
        )
        out.append(
            _figure(
                f"delivery_{dest}_ratio",
                "4. delivery",
                f"{dest}: service / raw batched insert (per round)",
                "x",
                d[dest]["ratio_service_to_raw_per_round"]["raw_executemany"],
                target=f">= {TARGET_DELIVERY_RATIO}",
                check=lambda m: m >= TARGET_DELIVERY_RATIO,
            )
        )
    for method in ("unnest", "copy"):
        out.append(
            _figure(
                f"delivery_postgres_ratio_{method}",
                "4. delivery",
                f"postgres: service / raw {method} (reference)",
                "x",
                d["postgres"]["ratio_service_to_raw_per_round"][f"raw_{method}"],
            )
        )
    return out


def _batch_figures(b: dict[str, Any]) -> list[Figure]:
    rounds = b["rounds"]
    k = b["settings"]["entries_per_request"]

    def col(*path: str) -> list[float]:
        values = []
        for r in rounds:
            value: Any = r
            for part in path:
                value = value[part]
            values.append(float(value or 0.0))
        return values

    section = "batch path"
    out = [
        _figure(
            f"batch_sustained_sqlite_{size}",
            section,
            f"{size} entries a request, highest sustained rate (SQLite)",
            "entries/s",
            col(f"sqlite_{size}", "sustained_entries_per_s"),
        )
        for size in b["settings"]["sizes"]
        if f"sqlite_{size}" in rounds[0]
    ]
    out += [
        _figure(
            f"batch_p99_sqlite_{size}",
            section,
            f"{size} entries a request, p99 at that rate",
            "ms",
            col(f"sqlite_{size}", "sustained_p99_ms"),
        )
        for size in b["settings"]["sizes"]
        if f"sqlite_{size}" in rounds[0]
    ]
    out.append(
        _figure(
            "batch_raw_sqlite",
            section,
            "raw sqlite3 executemany, 256 a transaction",
            "rows/s",
            col("raw_sqlite", "rows_per_s"),
        )
    )
    ratios = rounds[0]["ratios"]

    def ratio(key: str, against: str, target: float) -> Figure:
        return _figure(
            key,
            section,
            f"sustained: {k} a request / {against} (same round)",
            "x",
            col("ratios", key),
            target=f">= {target}",
            check=lambda m: m >= target,
        )

    if "batch_to_single" in ratios:
        out.append(ratio("batch_to_single", "single entries", TARGET_BATCH_TO_SINGLE))
    if "batch_to_raw_sqlite" in ratios:
        out.append(ratio("batch_to_raw_sqlite", "raw sqlite3 executemany", TARGET_BATCH_TO_RAW))
    if "batch_to_raw_postgres" in ratios:
        out += [
            _figure(
                f"batch_sustained_postgres_{k}",
                section,
                f"{k} entries a request, highest sustained rate (PostgreSQL)",
                "entries/s",
                col(f"postgres_{k}", "sustained_entries_per_s"),
            ),
            _figure(
                "batch_raw_postgres",
                section,
                "raw psycopg executemany, 256 a transaction",
                "rows/s",
                col("raw_postgres", "rows_per_s"),
            ),
            ratio("batch_to_raw_postgres", "raw psycopg executemany", TARGET_BATCH_TO_RAW),
        ]
    return out


def _otlp_figures(o: dict[str, Any]) -> list[Figure]:
    rounds = o["rounds"]
    rows = [
        (
            "otlp_stored",
            "OTLP protobuf, 100 records a request, records stored",
            "records/s",
            ("otlp", "stored_entries_per_s"),
        ),
        (
            "otlp_ndjson_stored",
            "NDJSON batches of 100, same run, entries stored",
            "entries/s",
            ("ndjson", "stored_entries_per_s"),
        ),
    ]
    out = [_figure(key, "otlp", label, unit, [float(r[a][b_]) for r in rounds]) for key, label, unit, (a, b_) in rows]
    out.append(
        _figure(
            "otlp_to_ndjson", "otlp", "OTLP / NDJSON records stored", "x", [r["ratio_otlp_to_ndjson"] for r in rounds]
        )
    )
    return out


def _replay_figures(r: dict[str, Any]) -> list[Figure]:
    out: list[Figure] = []
    labels = {"replay_directory": "replay_directory", "wal_replay": "Wal.replay (I/O thread + index)"}
    for size, data in r.items():
        for method, label in labels.items():
            out.append(
                _figure(
                    f"replay_{method}_{size}",
                    "5. replay",
                    f"{label}, {int(size):,} pending",
                    "entries/s",
                    data[method]["entries_per_s"],
                    target=f">= {TARGET_REPLAY_PER_S:,}",
                    check=lambda m: m >= TARGET_REPLAY_PER_S,
                )
            )
    return out


# -- text -----------------------------------------------------------------------------------


def fmt(value: float, unit: str) -> str:
    if unit in ("ms",):
        return f"{value:.2f}"
    if unit == "us":
        return f"{value:,.0f}"
    if unit == "x":
        return f"{value:.2f}"
    if unit == "MB":
        return f"{value:.1f}"
    return f"{value:,.0f}"


def verdict(figure: Figure) -> str:
    if figure["met"] is None:
        return ""
    return "met" if figure["met"] else "**missed**"


def figures_table(figs: list[Figure]) -> str:
    lines = [
        "| section | figure | unit | median | min | max | target | verdict | note |",
        "|---|---|---|---:|---:|---:|---|---|---|",
    ]
    for f in figs:
        u = f["unit"]
        lines.append(
            f"| {f['section']} | {f['label']} | {u} | {fmt(f['median'], u)} | {fmt(f['min'], u)} | {fmt(f['max'], u)} "
            f"| {f['target'] or ''} | {verdict(f)} | {f['note'] or ''} |"
        )
    return "\n".join(lines)


def markdown(results: dict[str, Any], plots: list[Path], plot_note: str) -> str:
    m = results["machine"]
    rounds = results.get("rounds", [])
    n_rounds = len(rounds) or results["rounds_asked"]
    lines = [
        f"# Benchmark suite: {n_rounds} rounds{' (quick)' if results['quick'] else ''}",
        "",
        (
            f"`{results['command']}`, started {results['started_at']}, took {results['durations_s']['total']:.0f} s "
            f"({', '.join(f'{k} {v:.0f} s' for k, v in results['durations_s'].items() if k != 'total')})."
        ),
        "",
        (
            f"Machine: {m['cpus']} CPUs, Python {m['python']}, SQLite {m['sqlite']}, {m['wrk']}, {m['nginx']}. "
            f"Load average (1, 5, 15 min) {m['loadavg_start']} at the start, {m['loadavg_end']} at the end: the "
            "machine is shared with other work, so every ratio is taken within one round (minutes apart at most), "
            "and every figure is the median of the rounds, with their min and max."
        ),
        "",
        (
            f"Load: wrk -t2 -c{results['connections']}, {results['seconds_per_load']:g} s per run, over loopback, "
            "from this machine (wrk and the service share the 2 CPUs). Verdicts are on the medians. "
            "How each figure is measured, and what limits it: docs/performance.md."
        ),
        "",
        "## Figures against the targets",
        "",
        figures_table(results["figures"]),
        "",
    ]
    if rounds:
        lines += [
            "## Round by round",
            "",
            (
                "| round | load avg | ceiling /s | write /s | sustained | write/ceiling | p99 at half max ms "
                "| reject 429/s | reject p99 ms | durable 429/s | nginx/direct | RSS full MB |"
            ),
            "|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rounds:
            lines.append(
                f"| {r['round']} | {r['loadavg_start'][0]:.1f} to {r['loadavg_end'][0]:.1f} "
                f"| {r['ceiling']['accepted_per_s']:,.0f} | {r['write_path']['accepted_per_s']:,.0f} "
                f"| {'yes' if r['write_path']['sustained'] else 'no'} | {r['ratios']['write_path_to_ceiling']:.2f} "
                f"| {r['half_max']['p99_ms']:.2f} | {r['shed_reject']['shed_per_s']:,.0f} "
                f"| {r['shed_reject']['p99_ms']:.2f} | {r['shed_durable']['shed_per_s']:,.0f} "
                f"| {r['ratios']['nginx_to_direct']:.2f} | {r['memory']['max_full_rss_mb']:.1f} |"
            )
        lines.append("")
    if "curves" in results:
        c = results["curves"]
        lines += [
            f"## Throughput and p99 against offered load (paced, {c['seconds']:g} s a point)",
            "",
            (
                f"Offered rates are fractions of this run's ceiling ({c['ceiling_rate']:,.0f} req/s). "
                "Each connection waits connections/rate seconds on average (0.5x to 1.5x, drawn at random) "
                "between a response and its next request, so the rate reached falls short of the rate offered "
                "by the requests' own latency, and more so once the server saturates."
            ),
            "",
            "| app | offered % of ceiling | offered /s | reached /s | 2xx /s | p50 ms | p99 ms | max ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for app in ("ceiling", "write_path"):
            for p in c[app]:
                lines.append(
                    f"| {app} | {p['fraction']:.0%} | {p['offered_per_s']:,.0f} | {p['requests_per_s']:,.0f} "
                    f"| {p['accepted_per_s']:,.0f} | {p['p50_ms']:.2f} | {p['p99_ms']:.2f} | {p['max_ms']:.2f} |"
                )
        lines.append("")
    if "delivery" in results:
        d = results["delivery"]
        lines += [
            f"## Delivery from a {d['entries']:,}-entry WAL backlog",
            "",
            (
                f"PostgreSQL {d['postgres_server']['server_version']} ({d['postgres_server']['kind']}, "
                f"fsync={d['postgres_server']['fsync']}). Service = one worker's Service from start (replay "
                "included) to the last row's delivered_at; raw = the driver alone, 256 rows a transaction."
            ),
            "",
            "| destination | run | median /s | min /s | max /s | service / this, per round: median (min-max) |",
            "|---|---|---:|---:|---:|---|",
        ]
        for dest in ("sqlite", "postgres"):
            for name, data in d[dest].items():
                if not isinstance(data, dict) or "median" not in data:
                    continue
                ratio = ""
                if name != "service":
                    rr = d[dest]["ratio_service_to_raw_per_round"][name]
                    ratio = f"{rr['median']:.2f} ({rr['min']:.2f}-{rr['max']:.2f})"
                lines.append(
                    f"| {dest} | {name} | {data['median']:,.0f} | {data['min']:,.0f} | {data['max']:,.0f} | {ratio} |"
                )
        lines.append("")
    if "replay" in results:
        lines += [
            "## Replay against pending entries",
            "",
            "Segments just written, so read from the page cache: this is decoding and indexing, not the disk.",
            "",
            (
                "| pending | WAL bytes | replay_directory s (median) | entries/s (min-max) "
                "| Wal.replay s (median) | entries/s (min-max) |"
            ),
            "|---:|---:|---:|---|---:|---|",
        ]
        for size, r in results["replay"].items():
            a, b = r["replay_directory"], r["wal_replay"]
            lines.append(
                f"| {int(size):,} | {r['bytes']:,} | {a['seconds']['median']:.3f} | {_rate_range(a)} "
                f"| {b['seconds']['median']:.3f} | {_rate_range(b)} |"
            )
        lines.append("")
    lines += ["## Plots", "", plot_note, ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    lines.append("")
    return "\n".join(lines)


def _rate_range(timing: dict[str, Any]) -> str:
    rate = timing["entries_per_s"]
    return f"{rate['median']:,.0f} ({rate['min']:,.0f}-{rate['max']:,.0f})"


# -- files ---------------------------------------------------------------------------------------


def write_csv(results: dict[str, Any], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["app", "fraction", "offered_per_s", "requests_per_s", "accepted_per_s", "p50_ms", "p99_ms", "max_ms"]
        )
        for app in ("ceiling", "write_path"):
            for p in results["curves"][app]:
                rates = [round(p[k], 1) for k in ("offered_per_s", "requests_per_s", "accepted_per_s")]
                w.writerow([app, p["fraction"], *rates, p["p50_ms"], p["p99_ms"], p["max_ms"]])


def plot(results: dict[str, Any], out: Path) -> tuple[list[Path], str]:
    """PNG plots with matplotlib when it is installed; (files, a sentence for the Markdown)."""
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return [], (
            "matplotlib is not installed (`.venv/bin/pip install -r bench/requirements.txt`): "
            "no plots; the curve data is in load_curve.csv."
        )
    written: list[Path] = []
    if "curves" in results:
        written.append(_plot_throughput(plt, results["curves"], out / "load_throughput.png"))
        written.append(_plot_latency(plt, results["curves"], out / "load_p99.png"))
    if "replay" in results:
        written.append(_plot_replay(plt, results["replay"], out / "replay.png"))
    return written, "Plots: " + ", ".join(p.name for p in written) + "; the curve data is also in load_curve.csv."


_CURVE_NAMES = {"ceiling": "ceiling (bare Falcon app)", "write_path": "write path (wsgi:app, durable)"}


def _plot_throughput(plt: Any, c: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = 0.0
    for app, label in _CURVE_NAMES.items():
        xs = [p["offered_per_s"] for p in c[app]]
        ys = [p["accepted_per_s"] for p in c[app]]
        top = max(top, *xs, *ys)
        ax.plot(xs, ys, marker="o", label=label)
    ax.plot([0, top], [0, top], linestyle=":", color="grey", label="reached = offered")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("2xx responses/s")
    ax.set_title("Throughput against offered load (wrk -c64, paced)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_latency(plt: Any, c: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (app, label), color in zip(_CURVE_NAMES.items(), ("tab:blue", "tab:orange"), strict=True):
        xs = [p["offered_per_s"] for p in c[app]]
        ax.plot(xs, [p["p99_ms"] for p in c[app]], marker="o", color=color, label=f"{label} p99")
        ax.plot(xs, [p["p50_ms"] for p in c[app]], marker=".", linestyle="--", color=color, label=f"{label} p50")
    ax.axhline(TARGET_HALF_MAX_P99_MS, color="grey", linestyle=":", label=f"{TARGET_HALF_MAX_P99_MS:g} ms")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title("Latency against offered load (wrk -c64, paced)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_replay(plt: Any, r: dict[str, Any], path: Path) -> Path:
    sizes = [int(s) for s in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, label in (("replay_directory", "replay_directory"), ("wal_replay", "Wal.replay")):
        rates = [r[str(s)][method]["entries_per_s"] for s in sizes]
        med = [x["median"] for x in rates]
        err = [[x["median"] - x["min"] for x in rates], [x["max"] - x["median"] for x in rates]]
        ax.errorbar(sizes, med, yerr=err, marker="o", capsize=4, label=label)
    ax.axhline(TARGET_REPLAY_PER_S, color="grey", linestyle=":", label=f"target {TARGET_REPLAY_PER_S:,}/s")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("pending entries in the WAL")
    ax.set_ylabel("entries/s (median, min-max)")
    ax.set_title("Replay speed against backlog")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(results: dict[str, Any], out: Path) -> list[Path]:
    """suite.json, suite.md, load_curve.csv and the plots, in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if "curves" in results:
        write_csv(results, out / "load_curve.csv")
        written.append(out / "load_curve.csv")
    plots, note = plot(results, out)
    written += plots
    if "batch_path" in results:
        # The request-size sweep: batch_sizes.csv always, batch_sizes.png with matplotlib.
        from .batch_path import write_curve

        for path in write_curve(results["batch_path"], out):
            written.append(path)
            if path.suffix == ".png":
                plots.append(path)
                note += " batch_sizes.png: the batch path's sustained rate and p99 by entries a request."
    results["plots"] = [p.name for p in plots]
    (out / "suite.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "suite.md").write_text(markdown(results, plots, note))
    return [out / "suite.json", out / "suite.md", *written]


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results" / "suite.json"
    results = json.loads(source.read_text())
    results["figures"] = figures(results)
    for path in write(results, source.parent):
        print(path)


if __name__ == "__main__":
    main()

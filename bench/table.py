"""The one table: every figure for each system, and monq / peer ratios, as Markdown."""

from __future__ import annotations

from typing import Any

#: (figure key, label, unit, which way is better: "low", "high" or "" for plain counts)
METRICS: list[tuple[str, str, str, str]] = [
    ("start_s", "start until all engines ready", "s", "low"),
    ("stop_s", "stop", "s", "low"),
    ("lat_lb_median_us", "no-op round trip, load-balanced, median", "µs", "low"),
    ("lat_lb_p99_us", "no-op round trip, load-balanced, p99", "µs", "low"),
    ("lat_direct_median_us", "no-op round trip, direct, median", "µs", "low"),
    ("lat_direct_p99_us", "no-op round trip, direct, p99", "µs", "low"),
    ("tput_{small}_per_s", "{small:,} no-ops via apply_async at once", "tasks/s", "high"),
    ("tput_{small}_recorded", "… of which recorded by the Hub", "tasks", ""),
    ("tput_{big}_per_s", "{big:,} no-ops via apply_async at once", "tasks/s", "high"),
    ("tput_{big}_recorded", "… of which recorded by the Hub", "tasks", ""),
    ("map_per_s", "map over {map_n:,} items (chunked)", "items/s", "high"),
    ("data_1MB_MBps", "1 MB array round trip", "MB/s", "high"),
    ("data_10MB_MBps", "10 MB array round trip", "MB/s", "high"),
    ("data_100MB_MBps", "100 MB array round trip", "MB/s", "high"),
    ("data_1MB_raw_MBps", "1 MB round trip, shared memory off (raw frames)", "MB/s", "high"),
    ("data_10MB_raw_MBps", "10 MB round trip, shared memory off (raw frames)", "MB/s", "high"),
    ("data_100MB_raw_MBps", "100 MB round trip, shared memory off (raw frames)", "MB/s",
     "high"),
    ("data_1MB_bulk_MBps", "1 MB round trip, shared memory off (peer to peer)", "MB/s",
     "high"),
    ("data_10MB_bulk_MBps", "10 MB round trip, shared memory off (peer to peer)", "MB/s",
     "high"),
    ("data_100MB_bulk_MBps", "100 MB round trip, shared memory off (peer to peer)", "MB/s",
     "high"),
    ("pair_100MB_MBps", "100 MB over a bare zmq pair (no relay)", "MB/s", "high"),
    ("pair_10MB_MBps", "10 MB over a bare zmq pair (no relay)", "MB/s", "high"),
    ("hist_rows", "history: tasks in the database", "tasks", ""),
    ("hist_error_limit100_ms", "history(status='error', limit=100)", "ms", "low"),
    ("hist_time_range_60s_ms", "history over a time range (~700 rows)", "ms", "low"),
    ("hist_db_query_engine_ms", "db_query by engine (+ time window)", "ms", "low"),
    ("hist_bytes_per_task", "database bytes per task", "B", "low"),
    ("hist_hub_rss_mb", "Hub peak RSS during the history queries", "MB", "low"),
    ("hub_rss_run_mb", "Hub peak RSS over the whole run", "MB", "low"),
]


def fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, int) or (isinstance(v, float) and v >= 100):
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}" if v >= 0.1 else f"{v:.3g}"


def render(results: dict[str, dict[str, Any]], sizes: dict[str, int]) -> str:
    """Markdown table: one row per figure that any system has."""
    names = [s for s in results]
    peers = [s for s in names if s != "monq"] if "monq" in names else []
    head = ["figure", "unit", "better"] + names + [f"monq/{p}" for p in peers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, unit, better in METRICS:
        key, label = key.format(**sizes), label.format(**sizes)
        vals = [results[s].get("figures", {}).get(key) for s in names]
        if all(v is None for v in vals):
            continue
        m = results.get("monq", {}).get("figures", {}).get(key)
        ratios = [fmt(m / p) if better and m is not None and p else "—"
                  for p in (results[s].get("figures", {}).get(key) for s in peers)]
        arrow = {"low": "lower", "high": "higher", "": ""}[better]
        lines.append("| " + " | ".join([label, unit, arrow] + [fmt(v) for v in vals] + ratios)
                     + " |")
    return "\n".join(lines)


RATIO_NOTE = ("Ratios are monq / peer: on \"lower\" rows a ratio below 1 means monq is better, "
              "on \"higher\" rows a ratio above 1 means monq is better.")


def main() -> None:
    """Re-print the table of a saved run: python bench/table.py out.json"""
    import json
    import sys

    import machine

    doc = json.loads(open(sys.argv[1]).read())
    plan = doc["plan"]
    sizes = {"small": plan["tasks"][0], "big": plan["tasks"][-1], "map_n": plan["map_n"]}
    print(machine.header(doc["machine"], doc["engines"]))
    print()
    print(render(doc["results"], sizes))
    print()
    print(RATIO_NOTE)


if __name__ == "__main__":
    main()

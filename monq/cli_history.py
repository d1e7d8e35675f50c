"""The history commands of ``monq``: history, show, stats and purge.

Each works against the running cluster's Hub, or, when none runs (or with
``--db URL``), straight against the history database: the history outlives
the cluster.  They share history's filter options (one vocabulary, as
:class:`monq.hub.filters.TaskFilter` defines it).  :mod:`monq.cli` parses
the command line, reads the environment and maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from monq.connection import DB_FILE, find_connection_file, load_connection_file, profile_dir
from monq.errors import NoClusterError
from monq.hub.filters import parse_duration
from monq.records import TaskRecord, short_id, to_epoch

#: history's filter options: (flag, dest, help)
_FILTER_HELP = "filters (all must match); times: ISO 8601, epoch seconds or '10 minutes ago'"


def add_filter_options(sp: argparse.ArgumentParser, db: bool = True) -> None:
    """The filter options every history command takes."""
    g = sp.add_argument_group("filters", _FILTER_HELP)
    g.add_argument("--status", nargs="+", default=None, metavar="S",
                   help="only these statuses (pending running ok error aborted timeout lost ...)")
    g.add_argument("--engine", nargs="+", type=int, default=None, metavar="N")
    g.add_argument("--client", nargs="+", default=None, metavar="ID")
    g.add_argument("--label", nargs="+", default=None, metavar="L",
                   help="the label a view gave its tasks")
    g.add_argument("--msg-id", default=None, metavar="PREFIX", help="msg_ids starting so")
    g.add_argument("--since", default=None, metavar="T", help="submitted at or after T")
    g.add_argument("--until", default=None, metavar="T", help="submitted before T")
    for what in ("started", "completed"):
        g.add_argument(f"--{what}-since", default=None, metavar="T")
        g.add_argument(f"--{what}-until", default=None, metavar="T")
    g.add_argument("--min-duration", default=None, metavar="D",
                   help="ran at least D (e.g. 2s, 500ms, 1m)")
    g.add_argument("--max-duration", default=None, metavar="D", help="ran at most D")
    g.add_argument("--search", default=None, metavar="WORDS",
                   help="words in stdout, stderr, the traceback or the error message")
    if db:
        sp.add_argument("--db", default=None, metavar="URL",
                        help="read this history database directly (no cluster needed); by "
                             "default the running cluster's Hub is asked, else the profile's "
                             "history.db")


def filters_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """History filters as the Hub and the store take them (epoch seconds, lists)."""
    f: dict[str, Any] = {}
    for name in ("status", "engine", "client", "label"):
        v = getattr(args, name)
        if v:
            f[name] = v[0] if len(v) == 1 else v
    if args.msg_id:
        f["msg_id"] = args.msg_id
    for name in ("since", "until", "started_since", "started_until", "completed_since",
                 "completed_until"):
        v = getattr(args, name)
        if v is not None:
            f[name] = cli_time(v)
    for name in ("min_duration", "max_duration"):
        v = getattr(args, name)
        if v is not None:
            f[name] = parse_duration(v)
    if args.search:
        f["search"] = args.search
    return f


def cli_time(text: str) -> float | None:
    """A time from the command line: epoch seconds as digits, else what to_epoch reads."""
    try:
        return float(text)
    except ValueError:
        return to_epoch(text)


# -- where the history comes from ---------------------------------------------------


class Source(Protocol):
    def page(self, limit: int | None, order: str, cursor: str | None,
             **filters: Any) -> tuple[list[TaskRecord], str | None]: ...
    def count(self, **filters: Any) -> int: ...
    def groups(self, by: str, **filters: Any) -> list[tuple[Any, int]]: ...
    def percentiles(self, by: str | None, **filters: Any) -> list[dict[str, Any]]: ...
    def span(self, **filters: Any) -> dict[str, Any]: ...
    def task(self, msg_id: str) -> TaskRecord: ...
    def purge(self, **kwargs: Any) -> int: ...


class _HubSource:
    """The running cluster's Hub, through a Client."""

    def __init__(self, client: Any) -> None:
        self.c = client

    def page(self, limit: int | None, order: str, cursor: str | None,
             **filters: Any) -> tuple[list[TaskRecord], str | None]:
        reply = self.c._query("history_request", {"limit": limit, "order": order,
                                                  "cursor": cursor, **filters})
        return [TaskRecord.from_row(r) for r in reply["records"]], reply.get("next_cursor")

    def _stats(self, what: str, **content: Any) -> Any:
        return self.c._query("stats_request", {"what": what, **content})

    def count(self, **filters: Any) -> int:
        return int(self._stats("count", **filters)["count"])

    def groups(self, by: str, **filters: Any) -> list[tuple[Any, int]]:
        return [tuple(g) for g in self._stats("groups", by=by, **filters)["groups"]]

    def percentiles(self, by: str | None, **filters: Any) -> list[dict[str, Any]]:
        return list(self._stats("percentiles", by=by, **filters)["groups"])

    def span(self, **filters: Any) -> dict[str, Any]:
        return dict(self._stats("span", **filters)["span"])

    def task(self, msg_id: str) -> TaskRecord:
        return TaskRecord.from_row(self.c._query("task_request", {"msg_id": msg_id})["record"])

    def purge(self, **kwargs: Any) -> int:
        return int(self.c._query("purge_request", kwargs)["purged"])


class _StoreSource:
    """A history database read (and purged) directly."""

    def __init__(self, store: Any) -> None:
        self.s = store

    def page(self, limit: int | None, order: str, cursor: str | None,
             **filters: Any) -> tuple[list[TaskRecord], str | None]:
        rows, nxt = self.s.history_page(limit=limit, order=order, cursor=cursor, **filters)
        return [TaskRecord.from_row(r) for r in rows], nxt

    def count(self, **filters: Any) -> int:
        return int(self.s.count(**filters))

    def groups(self, by: str, **filters: Any) -> list[tuple[Any, int]]:
        return list(self.s.task_stats(by, **filters))

    def percentiles(self, by: str | None, **filters: Any) -> list[dict[str, Any]]:
        return list(self.s.duration_percentiles(by, **filters))

    def span(self, **filters: Any) -> dict[str, Any]:
        return dict(self.s.time_span(**filters))

    def task(self, msg_id: str) -> TaskRecord:
        return TaskRecord.from_row(self.s.find_task(msg_id))

    def purge(self, **kwargs: Any) -> int:
        return int(self.s.purge(**kwargs))


@contextlib.contextmanager
def open_source(args: argparse.Namespace, home: Path) -> Iterator[Source]:
    """The Hub of the profile's running cluster; else its history.db; or ``--db URL``."""
    if args.db:
        yield from _store_source(args.db)
        return
    try:
        path = find_connection_file(args.profile, home=home)
        load_connection_file(path)  # fails fast on a missing file or a dead controller
        from monq.client import Client

        client = Client(connection_file=path, timeout=5.0, query_timeout=60.0)
    except NoClusterError:
        # the history outlives the cluster: read the profile's database itself
        db = profile_dir(args.profile, home) / DB_FILE
        if not db.exists():
            raise
        yield from _store_source(f"sqlite:///{db}")
        return
    with client:
        yield _HubSource(client)


def _store_source(url: str) -> Iterator[Source]:
    from monq.hub.store import TaskStore

    with TaskStore(url) as store:
        yield _StoreSource(store)


# -- output helpers ----------------------------------------------------------------


def out(msg: str = "") -> None:
    print(msg, flush=True)


def record_json(r: TaskRecord) -> str:
    from monq.export import record_dict

    return json.dumps(record_dict(r), ensure_ascii=False)


# -- commands ------------------------------------------------------------------------


def add_commands(sub: Any, profile: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add history, show, stats and purge to ``monq``'s subparsers."""
    s = sub.add_parser("history", help="the tasks the Hub recorded (filter, page, export)")
    profile(s)
    add_filter_options(s)
    s.add_argument("--limit", type=int, default=20,
                   help="at most this many (default 20; 0: all, streamed)")
    s.add_argument("--order", default="-submitted", metavar="KEY",
                   help="submitted, started, completed, duration or msg_id; '-' for "
                        "descending (default -submitted)")
    s.add_argument("--cursor", default=None, help="continue after a previous page (its "
                   "'next page' line gives the cursor)")
    fmt = s.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON object per line")
    fmt.add_argument("--csv", action="store_true", help="CSV with a header line")

    s = sub.add_parser("show", help="one task's full record: times, error, traceback, output")
    profile(s)
    s.add_argument("msg_id", metavar="MSG_ID", help="a msg_id or a unique prefix of one")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--db", default=None, metavar="URL", help="read this database directly")

    s = sub.add_parser("stats", help="counts, throughput and duration percentiles")
    profile(s)
    add_filter_options(s)
    s.add_argument("--json", action="store_true", help="print JSON")

    s = sub.add_parser("purge", help="delete finished tasks from the history")
    profile(s)
    add_filter_options(s)
    s.add_argument("--before", default=None, metavar="T", help="completed before T")
    s.add_argument("--all", action="store_true", help="every finished task (no filter)")
    s.add_argument("--payloads-only", action="store_true",
                   help="keep the records, drop their stored request and result")


def cmd_history(args: argparse.Namespace, home: Path, table: Callable[..., str],
                fmt_time: Callable[[Any], str], fmt_dur: Callable[[Any], str]) -> int:
    from monq.export import write_records

    filters = filters_from_args(args)
    if args.limit < 0:
        raise ValueError(f"--limit must be >= 0, not {args.limit}")
    with open_source(args, home) as src:
        if args.json or args.csv:
            # streamed a page at a time: `--limit 0 --csv` exports any history
            def records() -> Iterator[TaskRecord]:
                left, cursor = args.limit or None, args.cursor
                while True:
                    size = 1000 if left is None else min(1000, left)
                    page, cursor = src.page(size, args.order, cursor, **filters)
                    yield from page
                    if left is not None:
                        left -= len(page)
                    if cursor is None or left == 0:
                        return

            write_records(records(), sys.stdout, "csv" if args.csv else "jsonl")
            sys.stdout.flush()
            return 0
        page, cursor = src.page(args.limit or None, args.order, args.cursor, **filters)
    if not page:
        out("no tasks")
        return 0
    rows = [[short_id(r.msg_id), r.status, "-" if r.engine is None else r.engine,
             _short(r.func or r.label or "-", 40), fmt_time(r.submitted),
             fmt_dur(r.duration)] for r in page]
    out(table(["msg_id", "status", "engine", "func", "submitted", "duration"], rows,
              right="engine duration"))
    if cursor is not None:
        out(f"next page: --cursor {cursor}")
    return 0


def cmd_show(args: argparse.Namespace, home: Path, fmt_time: Callable[[Any], str],
             fmt_dur: Callable[[Any], str]) -> int:
    with open_source(args, home) as src:
        r = src.task(args.msg_id)
    if args.json:
        out(record_json(r))
        return 0
    d = dataclasses.asdict(r)
    out(f"task {r.msg_id}")
    for k in ("status", "engine", "client", "queue", "label", "func", "retries"):
        out(f"  {k + ':':<16}{'-' if d[k] is None else d[k]}")
    for k in ("submitted", "started", "completed", "received"):
        out(f"  {k + ':':<16}{fmt_time(d[k])}")
    out(f"  {'duration:':<16}{fmt_dur(r.duration)}")
    if r.started and r.submitted:
        out(f"  {'waited:':<16}{fmt_dur((r.started - r.submitted).total_seconds())}")
    out(f"  {'request:':<16}{_size(r.request_bytes)}")
    out(f"  {'result:':<16}{_size(r.result_bytes)}")
    if r.payload_evicted:
        out(f"  {'payloads:':<16}evicted {fmt_time(r.payload_evicted)}")
    if r.ename or r.evalue:
        out(f"\nerror: {r.ename or ''}: {r.evalue or ''}")
    for name, text in (("traceback", r.traceback), ("stdout", r.stdout), ("stderr", r.stderr)):
        if text:
            out(f"\n--- {name} ---")
            out(text.rstrip("\n"))
    return 0


def cmd_stats(args: argparse.Namespace, home: Path, table: Callable[..., str],
              fmt_time: Callable[[Any], str], fmt_dur: Callable[[Any], str]) -> int:
    filters = filters_from_args(args)
    with open_source(args, home) as src:
        total = src.count(**filters)
        by_status = src.groups("status", **filters)
        span = src.span(**filters)
        overall = src.percentiles(None, **filters)
        per_engine = src.percentiles("engine", **filters)
        per_label = src.percentiles("label", **filters)
    finished = sum(n for s, n in by_status if s not in ("pending", "running"))
    first, last = span.get("first_submitted"), span.get("last_completed")
    rate = finished / (last - first) if first is not None and last and last > first else None
    if args.json:
        out(json.dumps({"tasks": total, "status": dict(by_status), "finished": finished,
                        "first_submitted": first, "last_completed": last,
                        "throughput": rate, "duration": overall[0] if overall else None,
                        "engine": per_engine, "label": per_label}, default=str))
        return 0
    out(f"tasks: {total}  ("
        + (", ".join(f"{s} {n}" for s, n in by_status) or "none") + ")")
    if rate is not None:
        out(f"throughput: {rate:.2f} tasks/s over {fmt_dur(last - first)} "  # type: ignore[operator]
            f"({fmt_time(first)} to {fmt_time(last)})")
    head = ["", "tasks", "min", "p50", "p90", "p99", "max"]

    def row(name: Any, g: dict[str, Any]) -> list[Any]:
        return [name, g["n"], *(fmt_dur(g.get(k)) for k in ("min", "p50", "p90", "p99", "max"))]

    right = "tasks min p50 p90 p99 max"
    if overall:
        out("\nduration")
        out(table(head, [row("all", overall[0])], right=right))
    if per_engine:
        out("\nduration by engine")
        out(table(["engine", *head[1:]], [row(g["key"], g) for g in per_engine], right=right))
    if per_label:
        out("\nduration by label")
        out(table(["label", *head[1:]],
                  [row("-" if g["key"] is None else g["key"], g) for g in per_label],
                  right=right))
    return 0


def cmd_purge(args: argparse.Namespace, home: Path) -> int:
    kwargs: dict[str, Any] = filters_from_args(args)
    if args.before is not None:
        kwargs["before"] = cli_time(args.before)
    if args.all:
        kwargs["everything"] = True
    if args.payloads_only:
        kwargs["payloads_only"] = True
    with open_source(args, home) as src:
        n = src.purge(**kwargs)
    what = "payloads of" if args.payloads_only else "purged"
    out(f"{what} {n} finished task{'s' * (n != 1)}")
    return 0


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)

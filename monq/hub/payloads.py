"""Payloads stored once per distinct content (schema version 4, SQLite).

A task's request and result are packed frames (:mod:`monq.hub.blobs`).  Many
tasks carry the very same bytes: every call of ``view.apply(f)`` ships the
same pickled ``f``, and most results of a no-op are the same pickled
``None``.  Stored in each row, the pickled function of a no-op was more
than half of what a task cost on disk.

So a payload goes to ``payloads(key, data, refs)`` under a 64-bit hash of its
bytes (``key`` is the table's rowid: no extra index), and the task keeps the
key in ``request_key``/``result_key``.  ``refs`` counts the task columns
that point at it; a batch adds its references with one upsert executemany
(``refs = refs + n``, only ``WHERE data = excluded.data``), and deleting or
evicting tasks takes them away, deleting payloads nobody references.

A hash collision (two different payloads, one key: about one chance in
10^7 with a million distinct payloads) is caught, not trusted: the upsert
changes nothing for that row, the batch sees fewer rows changed than it
sent, finds which keys hold other bytes, and stores those payloads inline
in the task row as before version 4.  Readers take ``request`` if it is set,
else the payload under ``request_key``.

Payloads under :data:`SHARE_MIN` bytes stay inline: sharing them would cost
about what it saves.

Counting errs on the safe side: a reference never taken away keeps a payload
that could have gone; one never counted cannot happen (every reference a
batch writes is counted in the same transaction).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from monq.hub.schema import payloads_table

__all__ = ["KEYS", "forget", "key_of", "load", "store_refs"]

#: payload column -> the column that keeps its key
KEYS = {"request": "request_key", "result": "result_key"}
#: payloads shorter than this stay in their row: a key and a row of ``payloads`` cost
#: about as much, and shared or not, a short payload is cheap to keep (a no-op's
#: pickled None is 13 bytes; its pickled function, 551)
SHARE_MIN = 64
#: keys per IN (...) list
_CHUNK = 500
#: payloads up to this size have their key remembered by content within a batch
_MEMO_MAX = 1 << 16

_p = payloads_table.c
_UPSERT = sqlite_insert(payloads_table)
_UPSERT = _UPSERT.on_conflict_do_update(
    index_elements=[_p.key], set_={"refs": _p.refs + _UPSERT.excluded.refs},
    where=_p.data == _UPSERT.excluded.data)
_RELEASE = payloads_table.update().where(_p.key == bindparam("k")).values(
    refs=_p.refs - bindparam("n"))


def key_of(data: bytes) -> int:
    """The 64-bit (signed, as SQLite integers are) key of a payload."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def store_refs(conn: Connection, rows: Iterable[dict[str, Any]]) -> None:
    """Move the payloads of prepared rows into ``payloads``, in place: ``request`` ->
    ``request_key`` (and the same for ``result``), counting one reference each.

    A payload whose key holds other bytes stays inline in its row.
    Updates that set a payload get its key column AND the inline column
    (None), so that what a row held before is replaced either way.
    """
    found: dict[int, list[Any]] = {}  # key -> [data, refs]
    where: list[tuple[dict[str, Any], str, int]] = []
    # the keys of the payloads seen so far, by content: a burst's tasks mostly carry the
    # same request (the function and its arguments) and the same result, and a dict
    # lookup of equal bytes costs a fraction of hashing them again (blake2b); large ones
    # are rarely repeated, and would be hashed twice
    known: dict[bytes, int] = {}
    # the Hub's rows share one blob object for a batch's equal payloads: the last one
    # counted, and its key's entry, are reused without a lookup
    last: Any = None
    last_k = 0
    last_entry: list[Any] = []
    for r in rows:
        for col in KEYS:
            data = r.get(col)
            if data is None:
                continue
            if data is last:
                last_entry[1] += 1
                where.append((r, col, last_k))
                continue
            if len(data) < SHARE_MIN:
                continue
            if type(data) is bytes and len(data) <= _MEMO_MAX:
                k = known.get(data)
                if k is None:
                    k = known[data] = key_of(data)
            else:
                k = key_of(data)
            entry = found.get(k)
            if entry is None:
                entry = found[k] = [data, 1]
            elif entry[0] == data:
                entry[1] += 1
            else:  # two payloads of this very batch share a key: keep this one inline
                continue
            where.append((r, col, k))
            last, last_k, last_entry = data, k, entry
    if not found:
        return
    params = [{"key": k, "data": d, "refs": n} for k, (d, n) in found.items()]
    changed = conn.execute(_UPSERT, params).rowcount
    clash: set[int] = set()
    if changed is None or changed < 0 or changed < len(params):
        clash = _clashes(conn, found)
    for r, col, k in where:
        if k in clash:
            continue
        r[col] = None
        r[KEYS[col]] = k


def _clashes(conn: Connection, found: dict[int, list[Any]]) -> set[int]:
    """The keys of ``found`` whose stored payload is other bytes (the upsert skipped them)."""
    keys = list(found)
    out = set()
    for i in range(0, len(keys), _CHUNK):
        for k, data in conn.execute(select(_p.key, _p.data).where(_p.key.in_(keys[i:i + _CHUNK]))):
            if bytes(data) != found[k][0]:
                out.add(k)
    return out


def forget(conn: Connection, keys: Sequence[int | None]) -> None:
    """Take one reference away per key (None: none); delete payloads left with none."""
    counts: dict[int, int] = {}
    for k in keys:
        if k is not None:
            counts[k] = counts.get(k, 0) + 1
    if not counts:
        return
    conn.execute(_RELEASE, [{"k": k, "n": n} for k, n in counts.items()])
    ks = list(counts)
    for i in range(0, len(ks), _CHUNK):
        conn.execute(payloads_table.delete().where(_p.key.in_(ks[i:i + _CHUNK]), _p.refs <= 0))


def load(conn: Connection, keys: Iterable[int]) -> dict[int, bytes]:
    """The payloads under ``keys``."""
    ks = list(set(keys))
    out: dict[int, bytes] = {}
    for i in range(0, len(ks), _CHUNK):
        for k, data in conn.execute(select(_p.key, _p.data).where(_p.key.in_(ks[i:i + _CHUNK]))):
            out[k] = bytes(data)
    return out


def sizes(conn: Connection, keys: Iterable[int]) -> dict[int, int]:
    """The byte sizes of the payloads under ``keys``."""
    from sqlalchemy import func

    ks = list(set(keys))
    out: dict[int, int] = {}
    for i in range(0, len(ks), _CHUNK):
        for k, n in conn.execute(select(_p.key, func.length(_p.data))
                                 .where(_p.key.in_(ks[i:i + _CHUNK]))):
            out[k] = int(n)
    return out

"""The Hub's reasoning about load-balanced tasks queued in a dead engine (monq.hub.tracker).

A model of the task relay is driven here: a DEALER that deals requests round
robin (or in any order) into per-engine FIFO pipes, engines that read their
pipes at their own pace, and deaths.  Whatever the interleaving, the tracker
must name exactly the requests stranded in dead engines' pipes: never one that
a live engine will still read (it would run twice), and every stranded one
once the live engines have read far enough (or been probed).
"""

from __future__ import annotations

import random
from collections import deque

import pytest

from monq.hub.tracker import LoadTracker


def test_a_request_read_by_nobody_below_every_horizon_is_an_orphan() -> None:
    t = LoadTracker()
    t.engine_added("a")
    t.engine_added("b")
    for i in range(6):
        t.sent(f"m{i}")
    # round robin: a got m0 m2 m4, b got m1 m3 m5; a reads all, b reads m1 then dies
    for m in ("m0", "m2", "m4"):
        t.read("a", m, None)
    t.read("b", "m1", None)
    assert t.orphans() == []  # b may still read m3, m5
    t.engine_removed("b")
    assert t.orphans() == ["m3"]  # m5 is above a's horizon (m4): a might still get it
    assert t.needs_probe(older_than=0.0)
    t.sent("probe-1")  # the probe goes to a, the only pipe left
    t.read("a", "probe-1", None)
    assert t.orphans() == ["m5"]
    assert not t.needs_probe(older_than=0.0)


def test_new_engine_does_not_hold_back_decisions() -> None:
    t = LoadTracker()
    t.engine_added("a")
    t.sent("m1")
    t.engine_added("b")  # joined after m1 was dealt: it can never hold m1
    t.engine_removed("a")
    assert t.orphans() == ["m1"]


def test_re_registered_engine_must_speak_first() -> None:
    t = LoadTracker()
    t.engine_added("a", fresh=False)  # after a controller restart: its pipe is unknown
    t.sent("m1")
    t.engine_added("b")
    assert t.orphans() == []
    t.sent("m2")
    t.read("a", "m2", None)
    assert t.orphans() == ["m1"]


def test_receipt_before_its_copy_is_applied_when_the_copy_comes() -> None:
    t = LoadTracker()
    t.engine_added("a")
    t.read("a", "m1", None)  # the receipt raced ahead of the monitor copy
    t.sent("m1")
    assert t.unread == {}
    assert t.horizon["a"] == 1


def test_no_engine_left_means_every_unread_request_is_stranded() -> None:
    t = LoadTracker()
    t.engine_added("a")
    t.sent("m1")
    t.sent("m2")
    t.engine_removed("a")
    assert t.orphans() == ["m1", "m2"]


@pytest.mark.parametrize("seed", range(40))
def test_random_relay_runs_orphans_are_exactly_the_stranded_requests(seed: int) -> None:
    rng = random.Random(seed)
    t = LoadTracker()
    pipes: dict[str, deque[str]] = {}
    alive: list[str] = []
    dead: set[str] = set()
    stranded: set[str] = set()
    decided: set[str] = set()
    read_by: dict[str, str] = {}
    n_eng = 0

    def add_engine() -> None:
        nonlocal n_eng
        name = f"e{n_eng}"
        n_eng += 1
        t.engine_added(name)
        pipes[name] = deque()
        alive.append(name)

    for _ in range(rng.randint(1, 4)):
        add_engine()
    turn = 0
    for step in range(600):
        r = rng.random()
        if r < 0.45 and alive:
            # the relay deals one request into the next pipe (some engines may be skipped,
            # like a DEALER skipping a full pipe)
            turn = (turn + rng.choice([1, 1, 1, 2])) % len(alive)
            msg = f"m{step}"
            pipes[alive[turn]].append(msg)
            t.sent(msg)
        elif r < 0.85 and alive:
            e = rng.choice(alive)
            if pipes[e]:
                msg = pipes[e].popleft()
                read_by[msg] = e
                t.read(e, msg, None)
        elif r < 0.9 and len(alive) > 1:
            e = alive.pop(rng.randrange(len(alive)))
            dead.add(e)
            stranded.update(pipes[e])
            t.engine_removed(e)
        elif r < 0.93:
            add_engine()
        elif alive and t.needs_probe(0.0):
            # a probe: dealt like a request, read at once by its engine
            e = rng.choice(alive)
            probe = f"p{step}"
            pipes[e].append(probe)
            t.sent(probe)
        for msg in t.orphans():
            assert msg not in read_by, f"{msg} was read by {read_by.get(msg)}: not an orphan"
            assert msg in stranded, f"{msg} is still in a live pipe"
            decided.add(msg)
    # drain: live engines read everything, probes settle the rest
    for _ in range(50):
        for e in alive:
            while pipes[e]:
                msg = pipes[e].popleft()
                read_by[msg] = e
                t.read(e, msg, None)
        for msg in t.orphans():
            assert msg in stranded and msg not in read_by
            decided.add(msg)
        if not t.needs_probe(0.0):
            break
        for i, e in enumerate(alive):  # a round of probes: one per live engine
            probe = f"q{_}-{i}"
            pipes[e].append(probe)
            t.sent(probe)
    stranded_requests = {m for m in stranded if m.startswith("m")}
    assert {m for m in decided if m.startswith("m")} == stranded_requests

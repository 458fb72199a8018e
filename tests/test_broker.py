"""The Lua wrappers' argument building and reply parsing, as pure functions: the KEYS and
ARGV layout each script documents at its top, and replies in both RESP shapes."""

from __future__ import annotations

import time

from clusterq.broker import ack, dequeue, extend, fail, requeue, sweep
from clusterq.keys import KeySchema

QK = KeySchema("p").queue("q")


def test_ack_layout_with_unique_locks() -> None:
    acks = [
        ack.Ack("a", "w:1", 0, b"", None),
        ack.Ack("b", "w:1", 5000, b"r", "p:{q}:u:abc"),
        ack.Ack("c", "w:2", -5, b"", "p:{q}:u:def"),
    ]
    keys, args = ack.build(QK, acks, remember_ms=-1)
    assert keys == [
        QK.active,
        QK.leases,
        QK.tasks,
        QK.completed,
        QK.results,
        QK.stats,
        QK.done,
        QK.evcfg,
        QK.events,
        "p:{q}:u:abc",
        "p:{q}:u:def",
    ]
    # remember (never negative), then five per ack: id, token, retention (never
    # negative), result, index of its unique lock in KEYS (1-based; 0 none).
    assert args == [0, "a", "w:1", 0, b"", 0, "b", "w:1", 5000, b"r", 10, "c", "w:2", 0, b"", 11]
    assert ack.build(QK, acks[:1], remember_ms=20000)[1][0] == 20000
    assert ack.parse([1, 0, b"1", -1]) == [ack.ACKED, ack.STALE, ack.ACKED, ack.GONE]


def test_fail_layout() -> None:
    keys, args = fail.build(QK, "id", "w:1", b"{}", retry_in_ms=1500)
    assert keys == [
        QK.active, QK.leases, QK.tasks, QK.retry, QK.archived, QK.stats, QK.wake, QK.limits,
        QK.groups, QK.turns, QK.evcfg, QK.events,
    ]  # fmt: skip
    # id, token, meta, delay, only_if_expired, count as failed, hold ms, hold scope
    assert args == ["id", "w:1", b"{}", 1500, 0, 1, 0, "queue"]
    assert fail.build(QK, "id", "t", b"m", retry_in_ms=None)[1][3] == -1  # archive
    assert fail.build(QK, "id", "t", b"m", retry_in_ms=-3)[1][3] == 0  # not in the past
    recovery = fail.build(QK, "id", "t", b"m", retry_in_ms=0, only_if_expired=True)[1]
    assert recovery[4:] == [1, 1, 0, "queue"]
    held = fail.build(QK, "id", "t", b"m", retry_in_ms=9, hold_ms=9, hold_scope="group")[1]
    assert held[6:] == [9, "group"]
    assert fail.build(QK, "id", "t", b"m", retry_in_ms=0, count_failure=False)[1][5] == 0
    assert fail.build(QK, "id", "t", b"m", retry_in_ms=0, hold_ms=-5)[1][6] == 0
    assert fail.build(QK, "id", "t", b"m", retry_in_ms=900, hold_ms=900)[1][6] == 900
    assert [fail.parse(r) for r in (1, 2, 0, b"1", -1)] == [
        "retry",
        "archived",
        "stale",
        "retry",
        "gone",
    ]


def test_extend_requeue_dequeue_layouts() -> None:
    held = [("a", "w:1"), ("b", "w:2")]
    assert extend.build(QK, 10000, held) == (
        [QK.active, QK.leases, QK.cancel],
        [10000, "a", "w:1", "b", "w:2"],
    )
    renewed = extend.parse([[b"a", "b"], [b"c"]])
    assert (renewed.lost, renewed.cancelled) == ({"a", "b"}, {"c"})
    assert requeue.build(QK, held) == (
        [QK.active, QK.leases, QK.pending, QK.wake, QK.evcfg, QK.events, QK.tasks],
        ["a", "w:1", "b", "w:2"],
    )
    assert requeue.parse(b"2") == 2
    keys, args = dequeue.build(QK, 7, 10000, "w:3")
    assert keys == [
        QK.pending,
        QK.active,
        QK.scheduled,
        QK.retry,
        QK.tasks,
        QK.leases,
        QK.paused,
        QK.wake,
        QK.limits,
        QK.fair,
        QK.turns,
        QK.groups,
        QK.evcfg,
        QK.events,
    ]
    assert args == [7, 10000, "w:3", 100]


def test_dequeue_replies() -> None:
    got = dequeue.parse([1, -1, 2, b"a", b"rec-a", "b", b"rec-b"])
    assert not got.paused and got.next_due is None and got.orphans == 2
    assert got.tasks == [("a", b"rec-a"), ("b", b"rec-b")]
    idle = dequeue.parse([1, 1_700_000_000_500, 0])
    assert idle.next_due == 1_700_000_000.5 and idle.tasks == []
    assert dequeue.parse([0, -1, 0]).paused
    # Held back by the limits: how long from now (ms) until the next token / the hold's
    # end, made a Unix time here; the concurrency cap says no time.
    before = time.time()
    rate = dequeue.parse([2, 250, 0])
    assert rate.limited == "rate" and rate.tasks == [] and not rate.paused
    assert rate.next_due is not None  # in ms: up to 1 ms earlier than exact
    assert before + 0.249 <= rate.next_due <= time.time() + 0.25
    assert dequeue.parse([4, 1000, 0]).limited == "hold"
    capped = dequeue.parse([3, -1, 0])
    assert capped.limited == "concurrency" and capped.next_due is None
    assert dequeue.parse([1, -1, 0]).limited is None


def test_sweep_replies_in_both_shapes() -> None:
    swept = sweep.parse([3, b"a", b"w:1", b"rec", "b", "w:2", b"rec-b"])
    assert swept.deleted == 3
    assert swept.expired == [("a", "w:1", b"rec"), ("b", "w:2", b"rec-b")]
    keys, args = sweep.build(QK, archive_max_size=10, archive_max_age_ms=99)
    assert keys == [
        QK.active,
        QK.leases,
        QK.tasks,
        QK.completed,
        QK.results,
        QK.archived,
        QK.done,
        QK.cancel,
    ]
    assert args == [100, 10, 99]

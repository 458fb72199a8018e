"""The one-call enqueue's own path: ``push.lua`` (key types looked at only when a write
is refused, the refusal undone), the wake-up it sends, a script cache emptied under it,
and the producer's shortest way for the most common enqueue. Real standalone server for
the script's tests."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from clusterq import AsyncClient, Client, TaskState
from clusterq.broker import enqueue
from clusterq.keys import KeySchema, QueueKeys
from clusterq.producer import Producer
from clusterq.serialization import reply_text
from clusterq.task import Record


def _push(r: redis.Redis, qk: QueueKeys, *pairs: Any) -> Any:
    return r.evalsha(
        enqueue.PUSH.sha, 5, qk.tasks, qk.pending, qk.wake, qk.evcfg, qk.events, *pairs
    )


@pytest.fixture
def raw(standalone: Any) -> Any:
    r = redis.Redis.from_url(standalone.seed_url)
    r.script_load(enqueue.PUSH.source)
    yield r
    r.close()


def _state(r: redis.Redis, qk: QueueKeys) -> dict[str, Any]:
    """What the push may touch, as it is: the two keys' types and contents."""
    out: dict[str, Any] = {}
    for name in ("tasks", "pending"):
        key = getattr(qk, name)
        kind = reply_text(r.type(key))
        value: Any = None
        if kind == "hash":
            value = r.hgetall(key)
        elif kind == "list":
            value = r.lrange(key, 0, -1)
        elif kind == "string":
            value = r.get(key)
        elif kind == "set":
            value = r.smembers(key)
        elif kind == "zset":
            value = r.zrange(key, 0, -1, withscores=True)
        out[name] = (kind, value)
    return out


FOREIGN = {
    "string": lambda r, k: r.set(k, "foreign"),
    "set": lambda r, k: r.sadd(k, "foreign"),
    "zset": lambda r, k: r.zadd(k, {"foreign": 1}),
    "list": lambda r, k: r.rpush(k, "foreign"),
    "hash": lambda r, k: r.hset(k, "foreign", "x"),
}


@pytest.mark.parametrize("tasks", [1, 3])
@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("pending", "string"),
        ("pending", "set"),
        ("pending", "hash"),
        ("tasks", "string"),
        ("tasks", "zset"),
        ("tasks", "list"),
    ],
)
def test_a_refused_push_leaves_both_keys_as_they_were(
    raw: redis.Redis, prefix: str, key: str, kind: str, tasks: int
) -> None:
    qk = KeySchema(prefix).queue("q")
    # the other key holds clusterq's own data already (a refusal must not touch it)
    if key == "tasks":
        raw.rpush(qk.pending, "older", "oldest")
    else:
        raw.hset(qk.tasks, "older", b"record")
    FOREIGN[kind](raw, getattr(qk, key))
    before = _state(raw, qk)
    pairs = [x for i in range(tasks) for x in (f"id{i}", b"rec%d" % i)]
    with pytest.raises(redis.ResponseError) as refused:
        _push(raw, qk, *pairs)
    want = {"tasks": "hash", "pending": "list"}[key]
    assert str(refused.value) == (
        f"WRONGTYPE clusterq key {getattr(qk, key)} holds a {kind}, not a {want}; "
        "nothing was written"
    )
    assert _state(raw, qk) == before


def test_a_refused_push_into_no_pending_list_leaves_none(raw: redis.Redis, prefix: str) -> None:
    qk = KeySchema(prefix).queue("q")
    raw.set(qk.tasks, "foreign")
    with pytest.raises(redis.ResponseError, match=f"key {qk.tasks} holds a string"):
        _push(raw, qk, "id", b"rec")
    assert raw.exists(qk.pending) == 0


def test_a_push_writes_records_and_ids_and_wakes_an_empty_queue_only(
    standalone: Any, raw: redis.Redis, prefix: str
) -> None:
    qk = KeySchema(prefix).queue("q")
    listener = redis.Redis.from_url(standalone.seed_url).pubsub()
    listener.ssubscribe(qk.wake)
    assert listener.get_message(timeout=1)["type"] == "ssubscribe"

    def wakeups() -> int:
        n = 0
        while (message := listener.get_message(timeout=0.2)) is not None:
            assert message["type"] == "smessage" and message["channel"] == qk.wake.encode()
            n += 1
        return n

    try:
        assert _push(raw, qk, "a", b"ra", "b", b"rb") == 2
        assert wakeups() == 1  # the list was empty
        assert _push(raw, qk, "c", b"rc") == 3
        assert wakeups() == 0  # it had ids: workers are taking them, or awake
        assert raw.lrange(qk.pending, 0, -1) == [b"c", b"b", b"a"]
        assert raw.hgetall(qk.tasks) == {b"a": b"ra", b"b": b"rb", b"c": b"rc"}
        raw.delete(qk.pending)
        assert _push(raw, qk, "d", b"rd") == 1
        assert wakeups() == 1
    finally:
        listener.close()


def test_an_enqueue_meets_an_emptied_script_cache(standalone: Any, prefix: str) -> None:
    """A restarted or promoted node has no scripts: the push is loaded and sent again
    (it did not run: one task)."""
    with Client(standalone.seed_url, prefix=prefix) as client:
        client.enqueue("t", 1)
        r = redis.Redis.from_url(standalone.seed_url)
        try:
            r.script_flush()
            info = client.enqueue("t", 2)
            assert (info.state, info.already_enqueued) == (TaskState.PENDING, False)
            qk = client.keys.queue("default")
            assert r.llen(qk.pending) == 2 and r.hexists(qk.tasks, info.id)
        finally:
            r.close()


def test_both_clients_push_a_fresh_task_and_check_the_others(standalone: Any, prefix: str) -> None:
    import asyncio

    url = standalone.seed_url
    sent: list[object] = []
    real = enqueue.One.__call__

    def spy(self: enqueue.One, client: Any) -> Any:
        reply = real(self, client)
        sent.append(self.pushed)
        return reply

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(enqueue.One, "__call__", spy)
        with Client(url, prefix=prefix) as client:
            fresh = client.enqueue("t", {"n": 1}, queue="q")
            given = client.enqueue("t", {"n": 2}, queue="q", task_id="mine")
            again = client.enqueue("t", {"n": 2}, queue="q", task_id="mine")
            later = client.enqueue("t", None, queue="q", process_in=60)
    assert sent == [True, False, False, False]
    assert (fresh.state, fresh.already_enqueued, fresh.enqueued_at is not None) == (
        TaskState.PENDING,
        False,
        True,
    )
    assert (given.already_enqueued, again.already_enqueued) == (False, True)
    assert later.state == TaskState.SCHEDULED

    async def in_asyncio() -> list[Any]:
        async with await AsyncClient.connect(url, prefix=prefix) as client:
            return [
                await client.enqueue("t", {"n": 3}, queue="q"),
                await client.enqueue("t", {"n": 2}, queue="q", task_id="mine"),
            ]

    afresh, aagain = asyncio.run(in_asyncio())
    assert (afresh.state, afresh.already_enqueued) == (TaskState.PENDING, False)
    assert aagain.already_enqueued
    r = redis.Redis.from_url(url)
    try:
        qk = KeySchema(prefix).queue("q")
        assert set(r.lrange(qk.pending, 0, -1)) == {fresh.id.encode(), b"mine", afresh.id.encode()}
    finally:
        r.close()


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"queue": "q"},
        {"queue": "q", "max_retry": 3},
        {"queue": "q", "task_id": "given"},
        {"retention": 5, "timeout": 2},
        {"process_in": 30},
        {"unique_for": 60},
    ],
)
def test_the_shortest_way_prepares_what_prepare_does(
    options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    producer = Producer(KeySchema("u"), "json", 1024)
    ids = iter(["id-1", "id-2"])
    monkeypatch.setattr("clusterq.producer.new_task_id", lambda: next(ids))
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.5)
    kept = dict(options)
    short = producer.prepare_options("t", {"a": 1}, options)
    assert options == kept  # read, not changed
    full = producer.prepare("t", {"a": 1}, **options)
    if "task_id" not in options:
        assert (short.new.id, full.new.id) == ("id-1", "id-2")
        short.new.id = full.new.id
    assert short == full
    assert Record.decode(short.new.record).payload == b'{"a":1}'
    with pytest.raises(Exception, match="more than the limit of 1024 bytes"):
        producer.prepare_options("t", "x" * 2000, options)

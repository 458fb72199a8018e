"""redis-py's command methods on clusterq's node clients (clusterq.cluster.fastcommands):
each command of ``FAST`` answers exactly what the same client answers through redis-py's
own path (whichever protocol and callbacks the installed redis-py uses), and goes over
the fast connections; what is not in it (floats, blocking commands) goes through
redis-py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import redis

from clusterq.cluster import fastcommands
from clusterq.cluster.connection import RedisURL
from clusterq.cluster.wire import AsyncNodeClient, NodeClient
from clusterq.slots import keyslot
from clusterq.tools.devcluster import LocalCluster, LocalServer

#: (method, arguments with "K"/"K2" for the two keys, options): run in this order on both.
CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("ping", (), {}),
    ("echo", ("hi",), {}),
    ("set", ("K", "v"), {}),
    ("set", ("K", "w"), {"get": True}),
    ("set", ("K", "x"), {"nx": True}),
    ("get", ("K",), {}),
    ("get", ("K2",), {}),
    ("setnx", ("K", "y"), {}),
    ("getset", ("K", "z"), {}),
    ("append", ("K", "ab"), {}),
    ("strlen", ("K",), {}),
    ("getrange", ("K", 0, 1), {}),
    ("setrange", ("K", 1, "QQ"), {}),
    ("getdel", ("K",), {}),
    ("setex", ("K", 100, "x"), {}),
    ("psetex", ("K", 100000, "x"), {}),
    ("getex", ("K",), {"ex": 200}),
    ("ttl", ("K",), {}),
    ("persist", ("K",), {}),
    ("expire", ("K", 300), {}),
    ("pexpire", ("K", 300000), {}),
    ("expireat", ("K", 4102444800), {}),
    ("pexpireat", ("K", 4102444800000), {}),
    ("type", ("K",), {}),
    ("exists", ("K", "K2"), {}),
    ("delete", ("K", "K2"), {}),
    ("unlink", ("K",), {}),
    ("pttl", ("K2",), {}),
    ("incr", ("K",), {}),
    ("execute_command", ("INCR", "K"), {}),
    ("execute_command", ("DECR", "K"), {}),
    ("incrby", ("K", 41), {}),
    ("decr", ("K",), {}),
    ("decrby", ("K", 2), {}),
    ("mset", ({"K": "1", "K2": "2"},), {}),
    ("mget", (["K", "K2", "K3"],), {}),
    ("msetnx", ({"K": "3"},), {}),
    ("delete", ("K", "K2"), {}),
    ("hset", ("K", "f", "v"), {}),
    ("hset", ("K",), {"mapping": {"g": "1", "h": "2"}}),
    ("hsetnx", ("K", "f", "x"), {}),
    ("hget", ("K", "f"), {}),
    ("hget", ("K", "nope"), {}),
    ("hmget", ("K", ["f", "g", "nope"]), {}),
    ("hexists", ("K", "f"), {}),
    ("hincrby", ("K", "g", 5), {}),
    ("hkeys", ("K",), {}),
    ("hvals", ("K",), {}),
    ("hlen", ("K",), {}),
    ("hdel", ("K", "f", "nope"), {}),
    ("delete", ("K",), {}),
    ("rpush", ("K", "a", "b", "c"), {}),
    ("lpush", ("K", "z"), {}),
    ("llen", ("K",), {}),
    ("lrange", ("K", 0, -1), {}),
    ("lindex", ("K", 1), {}),
    ("lset", ("K", 0, "y"), {}),
    ("lrem", ("K", 0, "b"), {}),
    ("lpop", ("K",), {}),
    ("rpop", ("K",), {}),
    ("rpush", ("K", "p", "q", "r"), {}),
    ("lpop", ("K", 2), {}),
    ("ltrim", ("K", 0, 0), {}),
    ("lmove", ("K", "K2", "LEFT", "RIGHT"), {}),
    ("rpoplpush", ("K2", "K"), {}),
    ("lpop", ("K3",), {}),
    ("delete", ("K", "K2"), {}),
    ("sadd", ("K", "a", "b"), {}),
    ("srem", ("K", "b", "x"), {}),
    ("sismember", ("K", "a"), {}),
    ("smismember", ("K", ["a", "x"]), {}),
    ("scard", ("K",), {}),
    ("srandmember", ("K",), {}),
    ("delete", ("K",), {}),
    ("zadd", ("K", {"a": 1, "b": 2, "c": 3}), {}),
    ("zadd", ("K", {"a": 5}), {"xx": True, "ch": True}),
    ("zadd", ("K", {"b": 4}), {"incr": True}),
    ("srandmember", ("K2", 2), {}),
    ("set", ("K2", "s"), {"px": 100000, "xx": True}),
    ("zrem", ("K", "c"), {}),
    ("zcard", ("K",), {}),
    ("zcount", ("K", 0, 10), {}),
    ("zremrangebyscore", ("K", 0, 2), {}),
    ("zremrangebyrank", ("K", 0, 0), {}),
    ("delete", ("K",), {}),
    ("xadd", ("K", {"f": "v"}), {"id": "1-1"}),
    ("xadd", ("K", {"f": "w"}), {"id": "2-1"}),
    ("xlen", ("K",), {}),
    ("xdel", ("K", "1-1"), {}),
    ("xtrim", ("K",), {"maxlen": 0}),
    ("delete", ("K",), {}),
    ("pfadd", ("K", "a", "b"), {}),
    ("pfcount", ("K",), {}),
    ("publish", ("K", "m"), {}),
    ("spublish", ("K", "m"), {}),
    ("delete", ("K",), {}),
]


def _args(args: tuple[Any, ...], keys: dict[str, str]) -> tuple[Any, ...]:
    def one(a: Any) -> Any:
        if isinstance(a, str):
            return keys.get(a, a)
        if isinstance(a, list):
            return [one(x) for x in a]
        if isinstance(a, dict):
            return {one(k): v for k, v in a.items()}
        return a

    return tuple(one(a) for a in args)


def _keys(tag: str) -> dict[str, str]:
    return {"K": f"{{{tag}}}k", "K2": f"{{{tag}}}k2", "K3": f"{{{tag}}}k3"}


def _spy(client: Any, name: str) -> list[tuple[Any, ...]]:
    seen: list[tuple[Any, ...]] = []
    inner = getattr(client, name)

    def spied(*args: Any) -> Any:
        seen.append(args)
        return inner(*args)

    setattr(client, name, spied)
    return seen


def _clients(server: LocalServer) -> tuple[NodeClient, NodeClient]:
    """A node client, and one like it that sends everything through redis-py."""
    url = RedisURL.parse(server.seed_url)
    reference = url.node_client(("127.0.0.1", server.port))
    reference._fast_commands = False
    return url.node_client(("127.0.0.1", server.port)), reference


def test_each_fast_command_answers_as_redis_py(standalone: LocalServer, prefix: str) -> None:
    client, reference = _clients(standalone)
    assert isinstance(client, NodeClient) and fastcommands.usable(client)
    sent = _spy(client, "fast")
    mine, theirs = _keys(f"{prefix}-fast"), _keys(f"{prefix}-ref")
    try:
        for method, args, options in CALLS:
            want = getattr(reference, method)(*_args(args, theirs), **options)
            got = getattr(client, method)(*_args(args, mine), **options)
            assert got == want, (method, args, options)
            assert type(got) is type(want), (method, args, options)
        covered = {command for command, *_ in sent}
        assert covered == fastcommands.FAST, sorted(fastcommands.FAST - covered)
    finally:
        client.close()
        reference.close()


def test_async_fast_commands_answer_as_redis_py(standalone: LocalServer, prefix: str) -> None:
    async def scenario() -> None:
        url = RedisURL.parse(standalone.seed_url)
        client = url.async_node_client(("127.0.0.1", standalone.port))
        reference = url.async_node_client(("127.0.0.1", standalone.port))
        reference._fast_commands = False
        assert isinstance(client, AsyncNodeClient) and fastcommands.usable(client)
        sent: list[tuple[Any, ...]] = []
        execute = client.lane.execute

        async def spied(*args: Any) -> Any:
            sent.append(args)
            return await execute(*args)

        client.lane.execute = spied  # type: ignore[method-assign]
        mine, theirs = _keys(f"{prefix}-afast"), _keys(f"{prefix}-aref")
        try:
            for method, args, options in CALLS:
                want = await getattr(reference, method)(*_args(args, theirs), **options)
                got = await getattr(client, method)(*_args(args, mine), **options)
                assert got == want and type(got) is type(want), (method, args, options)
            assert {command for command, *_ in sent} == fastcommands.FAST
        finally:
            await client.aclose()
            await reference.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "call",
    [
        lambda c, k: c.set(k, 1.5),  # a float: redis-py encodes it
        lambda c, k: c.blpop([k], timeout=0.01),  # blocks on the server
        lambda c, k: c.zincrby(k, 2, "m"),  # a double reply (a float, or bytes)
        lambda c, k: c.hgetall(k),  # a map reply
        lambda c, k: c.smembers(k),  # a set reply
    ],
)
def test_what_is_not_plain_goes_through_redis_py(
    standalone: LocalServer, prefix: str, call: Callable[[Any, str], Any]
) -> None:
    client, reference = _clients(standalone)
    sent = _spy(client, "fast")
    try:
        assert call(client, f"{prefix}:a") == call(reference, f"{prefix}:b")
        assert sent == []
    finally:
        client.close()
        reference.close()


def test_error_replies_are_redis_py_s(standalone: LocalServer, prefix: str) -> None:
    client = RedisURL.parse(standalone.seed_url).node_client(("127.0.0.1", standalone.port))
    key = f"{prefix}:wrong"
    try:
        client.rpush(key, "x")
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            client.incr(key)
        assert client.lrange(key, 0, -1) == [b"x"]  # the connection is still in step
    finally:
        client.close()


def test_readonly_on_a_replica_keeps_the_client_on_redis_py(
    cluster: LocalCluster, prefix: str
) -> None:
    """A client that sent READONLY (connection state) through redis-py reads the replica
    on that connection from then on, as redis-py does, instead of being sent MOVED over a
    fast connection that never got READONLY."""
    key = f"{prefix}:replicated"
    topology = cluster.topology()
    (replica,) = topology.locate_slot_replicas(keyslot(key))
    master = topology.master_for_slot(keyslot(key))
    assert master is not None
    url = RedisURL.parse(cluster.seed_url)
    writer = url.node_client(("127.0.0.1", master.port))
    mirror = url.node_client(("127.0.0.1", replica.port))
    try:
        assert writer.set(key, "v") is True
        writer.execute_command("WAIT", 1, 5000)
        mirror.execute_command("READONLY")
        assert mirror.get(key) == b"v"
        assert mirror._fast_commands is False
    finally:
        writer.close()
        mirror.close()


def test_stateful_commands_are_known_by_their_first_word() -> None:
    assert fastcommands.stateful(("READONLY",)) and fastcommands.stateful(("select", 1))
    assert fastcommands.stateful(("CLIENT TRACKING", "on")) and fastcommands.stateful(
        (b"WATCH", "k")
    )
    assert not fastcommands.stateful(("GET", "k")) and not fastcommands.stateful(())

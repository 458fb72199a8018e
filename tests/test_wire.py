"""The fast path to a node (clusterq.cluster.wire) against a real server: replies in order under
concurrency, error replies as redis-py's exception classes, broken connections."""

from __future__ import annotations

import asyncio
import os

import pytest
import redis

from clusterq.cluster.connection import RedisURL
from clusterq.tools.devcluster import LocalServer
from tests.helpers import await_for


def test_sync_fast_and_pipeline(standalone: LocalServer, prefix: str) -> None:
    client = RedisURL.parse(standalone.seed_url).node_client(("127.0.0.1", standalone.port))
    key = f"{prefix}:wire"
    try:
        assert client.fast("SET", key, "1") == b"OK"
        assert client.fast("INCRBY", key, 41) == 42
        replies = client.fast_pipeline([("GET", key), ("HSET", key, "f", "v"), ("DEL", key)])
        assert replies[0] == b"42"
        assert isinstance(replies[1], redis.ResponseError) and "WRONGTYPE" in str(replies[1])
        assert replies[2] == 1
        with pytest.raises(redis.exceptions.NoScriptError):
            client.fast("EVALSHA", "0" * 40, 0)
        assert client.fast("PING") == b"PONG"  # the connection is still in step
    finally:
        client.close()


async def _lane_roundtrips(url: str, port: int, key: str) -> None:
    client = RedisURL.parse(url).async_node_client(("127.0.0.1", port))
    try:
        replies = await asyncio.gather(*(client.fast("INCR", key) for _ in range(500)))
        assert sorted(replies) == list(range(1, 501))
        piped = await client.fast_pipeline([("GET", key), ("LPUSH", key, "x"), ("DEL", key)])
        assert piped[0] == b"500" and isinstance(piped[1], redis.ResponseError)
        with pytest.raises(redis.exceptions.NoScriptError):
            await client.fast("EVALSHA", "0" * 40, 0)
        # A caller that gives up does not put later replies out of step.
        slow = asyncio.ensure_future(client.fast("BLPOP", f"{key}:none", "0.2"))
        await await_for(lambda: _blocked_in_blpop(port), 5, "the BLPOP to block")
        slow.cancel()
        assert await client.fast("ECHO", "after") == b"after"
    finally:
        await client.aclose()
    with pytest.raises(redis.ConnectionError):
        await client.fast("PING")  # closed for good


def _blocked_in_blpop(port: int) -> bool:
    """Whether the server has a client blocked in BLPOP (only this test sends one)."""
    probe = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
    try:
        return "cmd=blpop" in probe.execute_command("CLIENT", "LIST").decode()
    finally:
        probe.close()


def test_lane_multiplexes_in_order(standalone: LocalServer, prefix: str) -> None:
    asyncio.run(_lane_roundtrips(standalone.seed_url, standalone.port, f"{prefix}:lane"))


def test_lane_unreachable_and_late(dead_port: int, standalone: LocalServer) -> None:
    async def run() -> None:
        client = RedisURL.parse(f"redis://127.0.0.1:{dead_port}").async_node_client(
            ("127.0.0.1", dead_port)
        )
        with pytest.raises(redis.ConnectionError):
            await client.fast("PING")
        await client.aclose()
        late = RedisURL.parse(standalone.seed_url).async_node_client(
            ("127.0.0.1", standalone.port), socket_timeout=0.1
        )
        try:
            with pytest.raises(redis.TimeoutError):
                await late.fast("BLPOP", "wire-test:none", "0.5")
            assert await late.fast("PING") == b"PONG"  # reconnects after the timeout
        finally:
            await late.aclose()

    asyncio.run(run())


def test_sync_wire_unreachable_late_killed_and_authenticated(
    dead_port: int, standalone: LocalServer, prefix: str
) -> None:
    url = RedisURL.parse(standalone.seed_url)
    addr = ("127.0.0.1", standalone.port)
    with pytest.raises(redis.ConnectionError):
        RedisURL.parse(f"redis://127.0.0.1:{dead_port}").node_client(("127.0.0.1", dead_port)).fast(
            "PING"
        )
    late = url.node_client(addr, socket_timeout=0.1)
    try:
        with pytest.raises(redis.TimeoutError):
            late.fast("BLPOP", f"{prefix}:none", "0.5")
        assert late.fast("PING") == b"PONG"  # a new connection, not the late reply
        killed = late.fast("CLIENT", "ID")
        admin = url.node_client(addr)
        admin.fast("CLIENT", "KILL", "ID", killed)
        with pytest.raises(redis.ConnectionError):
            late.fast("PING")  # the server closed it
        assert late.fast("PING") == b"PONG"
        # A user with a password: AUTH is sent before the first command.
        user, password = f"{prefix}-user", "s3cret"
        admin.fast("ACL", "SETUSER", user, "on", f">{password}", "+@all", "~*")
        authed = RedisURL.parse(
            f"redis://{user}:{password}@127.0.0.1:{standalone.port}"
        ).node_client(addr)
        assert authed.fast("ACL", "WHOAMI") == user.encode()
        wrong = RedisURL.parse(f"redis://{user}:nope@127.0.0.1:{standalone.port}").node_client(addr)
        with pytest.raises(redis.AuthenticationError):
            wrong.fast("PING")
        admin.fast("ACL", "DELUSER", user)
        for client in (admin, authed, wrong):
            client.close()
    finally:
        late.close()


def test_sync_wire_in_a_forked_child_opens_its_own(standalone: LocalServer, prefix: str) -> None:
    client = RedisURL.parse(standalone.seed_url).node_client(("127.0.0.1", standalone.port))
    key = f"{prefix}:fork"
    try:
        parent_id = client.fast("CLIENT", "ID")
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit status
            ok = client.fast("CLIENT", "ID") != parent_id and client.fast("INCR", key) == 1
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
        assert client.fast("CLIENT", "ID") == parent_id  # the parent's is untouched
        assert client.fast("GET", key) == b"1"
    finally:
        client.fast("DEL", key)
        client.close()


def test_a_connect_cut_short_by_close_is_a_connection_error_to_its_waiters() -> None:
    """The node left the map while a call waited for the lane's connection: the caller
    gets a ConnectionError (retried like any), never a CancelledError, which would end a
    worker loop as if the worker had stopped it."""
    import asyncio

    import redis

    from clusterq.cluster.wire import Lane, _Endpoint

    async def scenario() -> None:
        accepted = asyncio.Event()

        async def silent(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
            await reader.read(1)  # the AUTH arrived: the client waits for its reply
            accepted.set()  # which never comes

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        lane = Lane(_Endpoint("127.0.0.1", port, None, "secret", 0, None, 30.0, 5.0))
        call = asyncio.ensure_future(lane.execute("PING"))
        await asyncio.wait_for(accepted.wait(), 5)
        lane.close()
        with pytest.raises(redis.ConnectionError, match="closed while connecting"):
            await asyncio.wait_for(call, 5)
        server.close()
        await server.wait_closed()

    asyncio.run(scenario())


def test_a_loop_cancelled_while_needed_is_reported_and_restarted() -> None:
    import asyncio

    from clusterq.worker.state import WorkerStats
    from clusterq.worker.supervise import Supervisor

    async def scenario() -> None:
        stats, events = WorkerStats(), []
        supervisor = Supervisor(stats, events.append, restart_delay=0.01)
        started = []

        async def loop() -> None:
            started.append(asyncio.current_task())
            await asyncio.Event().wait()

        supervisor.start("fetch:images", loop, lambda: True)
        await asyncio.sleep(0)
        started[0].cancel()  # not the supervisor's doing
        for _ in range(200):
            if len(started) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(started) == 2 and stats.loop_restarts == 1
        assert "it was cancelled" in events[0].describe()
        for task in supervisor.running():
            task.cancel()

    asyncio.run(scenario())

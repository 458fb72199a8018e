"""Durable enqueue: the write and its WAIT go over one connection to the queue's master."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from clusterq import Client, ConfigError, TaskState
from clusterq.errors import DurabilityError
from clusterq.tools.devcluster import LocalCluster, LocalServer
from tests.helpers import wait_for

#: Run on Redis and again on Valkey by scripts/test.sh (servers differ here).
pytestmark = pytest.mark.both_servers


def _replica_linked(cluster: LocalCluster, port: int) -> bool:
    client = cluster.client(port)
    try:
        return client.info("replication").get("master_link_status") == "up"
    finally:
        client.close()


class Freezer:
    """SIGSTOP a queue's replica (well under cluster-node-timeout), SIGCONT it again."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.stopped: list[int] = []

    def freeze(self, queue: str) -> None:
        port = self.cluster.topology().locate(queue).replicas[0].port
        self.cluster.kill_node(port, signal.SIGSTOP)  # only a process this cluster started
        self.stopped.append(port)

    def thaw(self) -> None:
        while self.stopped:
            port = self.stopped.pop()
            self.cluster.kill_node(port, signal.SIGCONT)
            wait_for(lambda p=port: _replica_linked(self.cluster, p), 30, "the replica link")


@pytest.fixture
def frozen_replica(fresh_cluster: Callable[[], LocalCluster]) -> Iterator[Freezer]:
    """A cluster of the test's own (the session's shared one is never paused), and a way
    to freeze the replica of a queue's master."""
    freezer = Freezer(fresh_cluster())
    try:
        yield freezer
    finally:
        freezer.thaw()


def test_wait_goes_over_the_writes_connection_to_the_queues_master(
    cluster: LocalCluster, prefix: str
) -> None:
    master = cluster.topology().locate("images").master
    assert master is not None
    monitor = redis.Redis(port=master.port)
    seen: list[dict[str, Any]] = []
    ready = threading.Event()

    def watch() -> None:
        with monitor.monitor() as feed:
            ready.set()
            for command in feed.listen():
                if prefix in command["command"] or command["command"].startswith("WAIT"):
                    seen.append(command)
                if command["command"].startswith("WAIT"):
                    return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    assert ready.wait(5)  # MONITOR answered OK: every command from here on is seen
    with Client(cluster.seed_url, prefix=prefix) as client:
        info = client.enqueue("t", {"n": 1}, queue="images", durability="replica")
    thread.join(10)
    monitor.close()
    assert info.replicas == 1  # WAIT's own answer, for this enqueue
    script = next(c for c in seen if c["command"].startswith("EVALSHA"))
    wait = next(c for c in seen if c["command"].startswith("WAIT"))
    # Same client connection (address and port), on the master that owns the queue,
    # and after the write: so WAIT counted exactly this write.
    assert (script["client_address"], script["client_port"]) == (
        wait["client_address"],
        wait["client_port"],
    )
    assert seen.index(script) < seen.index(wait)


def test_frozen_replica_fails_durable_enqueue_and_retry_confirms_it(
    prefix: str, frozen_replica: Freezer
) -> None:
    cluster = frozen_replica.cluster
    with Client(cluster.seed_url, prefix=prefix, durability_timeout=0.3) as client:
        frozen_replica.freeze("images")
        plain = client.enqueue("t", 1, queue="images")  # the master still takes writes
        assert plain.state == TaskState.PENDING and plain.replicas is None
        with pytest.raises(
            DurabilityError, match=r"no replica confirmed .* task_id \(order-7\)"
        ) as err:
            client.enqueue("t", 2, queue="images", task_id="order-7", durability="replica")
        assert err.value.task_ids == ["order-7"] and err.value.replicas == 0
        with pytest.raises(DurabilityError, match="3 task"):
            client.enqueue_many([("t", n) for n in range(3)], queue="images", durability="replica")
    # Replica back: the same task id is safe to send again and is now confirmed.
    frozen_replica.thaw()
    with Client(cluster.seed_url, prefix=prefix) as client:
        again = client.enqueue("t", 2, queue="images", task_id="order-7", durability="replica")
        assert (again.already_enqueued, again.replicas) == (True, 1)
        stats_key = client.keys.queue("images").stats
        repeats = client.backend.execute_key(
            stats_key, lambda c: c.hget(stats_key, "enqueue_repeats")
        )
        assert int(repeats) == 1  # the retried call wrote something for WAIT to wait on


def test_durable_enqueue_many_across_masters(cluster: LocalCluster, prefix: str) -> None:
    with Client(cluster.seed_url, prefix=prefix, durability="replica") as client:
        infos = client.enqueue_many(
            [("t", n) for n in range(300)], queue="images"
        ) + client.enqueue_many([("t", n) for n in range(300)], queue="webhooks")
    assert {i.replicas for i in infos} == {1}


def test_standalone_without_replica_cannot_be_durable(standalone: LocalServer, prefix: str) -> None:
    with Client(standalone.seed_url, prefix=prefix, durability_timeout=0.1) as client:
        with pytest.raises(DurabilityError, match="no replica confirmed"):
            client.enqueue("t", 1, durability="replica")
        # Written, not lost: it is there, just not confirmed.
        assert client.info(client.enqueue("t", 1, task_id="x1")).state == TaskState.PENDING


def test_waitaof_needs_a_server_that_has_it(cluster: LocalCluster, prefix: str) -> None:
    version = cluster.client(cluster.base_port).info("server")["redis_version"]
    with Client(cluster.seed_url, prefix=prefix) as client:
        if tuple(int(p) for p in version.split(".")[:2]) >= (7, 2):
            assert client.enqueue("t", 1, queue="images", durability="aof").replicas == 1
        else:
            with pytest.raises(
                ConfigError, match=r"not supported by this server .* written but not confirmed"
            ):
                client.enqueue("t", 1, queue="images", durability="aof")


def test_bad_durability_value(standalone: LocalServer) -> None:
    with pytest.raises(ValueError, match="durability must be"):
        Client(standalone.seed_url, durability="always")  # type: ignore[arg-type]


def test_publish_without_a_replica_to_confirm_is_refused(
    standalone: LocalServer, prefix: str
) -> None:
    """Publishing honours durability like enqueue, on both clients: a standalone node
    has no replica, so ``"replica"`` refuses to acknowledge (and ``"none"`` does not)."""
    import asyncio

    from clusterq import AsyncClient

    url = standalone.seed_url
    with Client(url, prefix=prefix, durability="replica", durability_timeout=0.1) as client:
        client.declare_stream("s", 1)
        with pytest.raises(DurabilityError, match=r"event\(s\) appended.*no replica confirmed"):
            client.publish("s", {"n": 1})
        with pytest.raises(DurabilityError):
            client.publish_many("s", [({"n": 2}, None), ({"n": 3}, "k")])
        assert client.publish("s", {"n": 4}, durability="none").partition == 0

    async def scenario() -> None:
        async with await AsyncClient.connect(
            url, prefix=prefix, durability="replica", durability_timeout=0.1
        ) as aclient:
            with pytest.raises(DurabilityError, match="no replica confirmed"):
                await aclient.publish("s", {"n": 5})
            await aclient.publish("s", {"n": 6}, durability="none")

    asyncio.run(scenario())


@pytest.mark.slow
def test_no_acknowledged_event_is_lost_when_its_master_dies_with_its_replica_frozen(
    fresh_cluster: Callable[[], LocalCluster], prefix: str
) -> None:
    """A stream of 3 partitions, ``durability="replica"``. Partition 0's replica is frozen
    (SIGSTOP), events are published to it, then its master is killed (-9) and the replica,
    thawed, is promoted: every event that ``publish`` acknowledged is there (those that
    no replica confirmed were refused with DurabilityError instead)."""
    cluster = fresh_cluster()
    url = cluster.seed_url
    with Client(url, prefix=prefix, durability="replica", durability_timeout=0.2) as client:
        layout = client.declare_stream("events", 3)
        sk = client.keys.stream(layout.partitions[0])
        key = next(f"k{n}" for n in range(1000) if layout.pick(f"k{n}") == 0)
        acknowledged = [client.publish("events", {"n": n}, key=key).id for n in range(5)]
        topology = cluster.topology()
        master = topology.master_for_slot(sk.slot)
        assert master is not None
        [replica] = topology.locate_slot_replicas(sk.slot)
        cluster.kill_node(replica.port, signal.SIGSTOP)
        refused = 0
        try:
            for n in range(5, 25):
                try:
                    acknowledged.append(client.publish("events", {"n": n}, key=key).id)
                except DurabilityError:
                    refused += 1
            cluster.kill_node(master.port)
        finally:
            cluster.kill_node(replica.port, signal.SIGCONT)

        def promoted() -> bool:
            client.backend.refresh_topology()
            now = client.backend.topology.master_for_slot(sk.slot)
            return now is not None and now.port == replica.port

        wait_for(promoted, 60, "the replica's promotion")
        stored = client.backend.execute_key(sk.events, lambda c: c.xrange(sk.events))
    ids = {reply_id.decode() for reply_id, _ in stored}
    assert refused == 20  # nothing unconfirmed was acknowledged
    assert set(acknowledged) <= ids, set(acknowledged) - ids
    cluster.restart_node(master.port)

"""Topology snapshots and diffs: parsing real replies, and events between snapshots."""

from __future__ import annotations

import pytest
import redis

from clusterq import topology as topo
from clusterq.backend import Backend
from clusterq.connection import RedisURL
from clusterq.devcluster import HOST, LocalCluster, LocalServer
from clusterq.slots import SLOT_COUNT, keyslot


def _shape(t: topo.Topology) -> list[tuple[object, ...]]:
    return [
        (s.slots, s.master.id, s.master.addr, sorted(r.addr for r in s.replicas)) for s in t.shards
    ]


def test_cluster_snapshot(cluster: LocalCluster) -> None:
    client = cluster.client(cluster.base_port)
    try:
        snap = topo.fetch(client, "cluster", (HOST, cluster.base_port))
        nodes_text = client.execute_command("CLUSTER", "NODES")
    finally:
        client.close()
    assert snap.mode == "cluster"
    assert snap.slots_covered == SLOT_COUNT
    assert len(snap.shards) == 3 and all(len(s.replicas) == 1 for s in snap.shards)
    assert {n.port for n in snap.nodes} == set(cluster.ports)
    # The CLUSTER NODES fallback reads the same map.
    fallback = topo.parse_cluster_nodes(
        nodes_text.decode() if isinstance(nodes_text, bytes) else nodes_text
    )
    assert _shape(fallback) == _shape(snap)


def test_master_in_snapshot_really_owns_the_slot(cluster: LocalCluster) -> None:
    snap = cluster.topology()
    for queue in ("images", "webhooks", "notifications"):
        loc = snap.locate(queue)
        assert loc.master is not None
        key = f"probe:{{{queue}}}"
        owner = cluster.client(loc.master.port)
        try:
            owner.set(key, "1")  # would raise MOVED on any other master
            owner.delete(key)
            assert int(owner.execute_command("CLUSTER", "KEYSLOT", key)) == loc.keyslot
        finally:
            owner.close()
        for replica in loc.replicas:
            rc = cluster.client(replica.port)
            try:
                assert int(rc.info("replication")["master_port"]) == loc.master.port
            finally:
                rc.close()


def test_standalone_snapshot_one_node_owns_everything(standalone: LocalServer) -> None:
    backend = Backend(standalone.seed_url)
    try:
        snap = backend.topology
    finally:
        backend.close()
    assert snap.mode == "standalone"
    assert len(snap.shards) == 1 and snap.shards[0].slots == ((0, SLOT_COUNT - 1),)
    loc = snap.locate("images")
    assert loc.keyslot == keyslot("images") and loc.master is not None
    assert loc.master.port == standalone.port and loc.replicas == ()


def test_standalone_snapshot_lists_replicas(
    standalone: LocalServer, tmp_path: object, server_bin: object
) -> None:
    from clusterq import servers

    port = servers.find_free_ports(1, with_bus=False)
    replica = LocalServer(
        port,
        f"{tmp_path}/replica",
        server_bin=server_bin,  # type: ignore[arg-type]
        extra_config=[f"replicaof {HOST} {standalone.port}"],
        die_with_parent=True,
    )
    replica.start()
    try:
        client = standalone.client()
        try:
            import time

            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                snap = topo.fetch(client, "standalone", (HOST, standalone.port))
                if snap.shards[0].replicas:
                    break
                time.sleep(0.05)
        finally:
            client.close()
        assert [r.port for r in snap.shards[0].replicas] == [port]
        assert snap.locate("q").replicas[0].addr == f"{HOST}:{port}"
    finally:
        replica.stop()


# ----------------------------------------------------------------------- diff (pure)


def _node(
    i: str, port: int, role: topo.Role = "master", master: str | None = None, health: str = "online"
) -> topo.NodeInfo:
    return topo.NodeInfo(
        id=i, host="127.0.0.1", port=port, role=role, health=health, master_id=master
    )


def _snap(*shards: topo.Shard, extra: tuple[topo.NodeInfo, ...] = ()) -> topo.Topology:
    nodes = [n for s in shards for n in (s.master, *s.replicas)] + list(extra)
    return topo.Topology(mode="cluster", shards=tuple(shards), nodes=tuple(nodes))


A, B = _node("a", 7000), _node("b", 7001)
A_REP = _node("ar", 7003, "replica", "a")
B_REP = _node("br", 7004, "replica", "b")
BEFORE = _snap(topo.Shard(((0, 8191),), A, (A_REP,)), topo.Shard(((8192, 16383),), B, (B_REP,)))


def test_diff_of_identical_snapshots_is_empty() -> None:
    assert topo.diff(BEFORE, BEFORE, ["images"]) == []


def test_diff_failover() -> None:
    promoted = _node("ar", 7003)
    failed = _node("a", 7000, health="failed")
    after = _snap(
        topo.Shard(((0, 8191),), promoted, ()),
        topo.Shard(((8192, 16383),), B, (B_REP,)),
        extra=(failed,),
    )
    queues = ["images", "webhooks", "notifications"]
    events = topo.diff(BEFORE, after, queues)
    kinds = sorted(e.kind for e in events)
    assert kinds == ["master_changed", "node_failed"]
    change = next(e for e in events if isinstance(e, topo.MasterChanged))
    assert change.old.addr == "127.0.0.1:7000" and change.new.addr == "127.0.0.1:7003"
    assert change.slots == ((0, 8191),)
    assert set(change.queues) == {q for q in queues if keyslot(q) <= 8191}
    assert "changed from 127.0.0.1:7000 to 127.0.0.1:7003" in change.describe()
    assert change.to_dict()["event"] == "master_changed"


def test_diff_old_master_rejoins_as_replica() -> None:
    promoted = _node("ar", 7003)
    failed = _node("a", 7000, health="failed")
    during = _snap(
        topo.Shard(((0, 8191),), promoted, ()),
        topo.Shard(((8192, 16383),), B, (B_REP,)),
        extra=(failed,),
    )
    rejoined = _node("a", 7000, "replica", "ar")
    after = _snap(
        topo.Shard(((0, 8191),), promoted, (rejoined,)), topo.Shard(((8192, 16383),), B, (B_REP,))
    )
    events = topo.diff(during, after)
    assert sorted(e.kind for e in events) == ["node_recovered", "replica_added"]
    added = next(e for e in events if isinstance(e, topo.ReplicaAdded))
    assert added.master is not None and added.master.id == "ar" and added.replica.id == "a"


def test_diff_slots_moved_between_masters() -> None:
    after = _snap(topo.Shard(((0, 100),), A, (A_REP,)), topo.Shard(((101, 16383),), B, (B_REP,)))
    events = topo.diff(BEFORE, after)
    assert [e.kind for e in events] == ["slots_moved"]
    moved = events[0]
    assert isinstance(moved, topo.SlotsMoved)
    assert moved.slots == ((101, 8191),) and moved.old == A and moved.new == B


def test_diff_replica_removed_and_node_added() -> None:
    newcomer = _node("c", 7009, "replica", "b")
    after = _snap(
        topo.Shard(((0, 8191),), A, ()), topo.Shard(((8192, 16383),), B, (B_REP, newcomer))
    )
    events = topo.diff(BEFORE, after)
    kinds = sorted(e.kind for e in events)
    assert kinds == ["node_added", "node_removed", "replica_added", "replica_removed"]


def test_shard_lookup_bounds() -> None:
    assert BEFORE.master_for_slot(0) == A and BEFORE.master_for_slot(16383) == B
    with pytest.raises(ValueError):
        BEFORE.shard_for_slot(SLOT_COUNT)


def test_parse_shards_flat_resp2_reply() -> None:
    reply = [
        [
            b"slots",
            [0, 16383],
            b"nodes",
            [
                [
                    b"id",
                    b"m1",
                    b"port",
                    7000,
                    b"ip",
                    b"127.0.0.1",
                    b"endpoint",
                    b"127.0.0.1",
                    b"role",
                    b"master",
                    b"replication-offset",
                    10,
                    b"health",
                    b"online",
                ],
                [
                    b"id",
                    b"r1",
                    b"port",
                    7001,
                    b"ip",
                    b"127.0.0.1",
                    b"endpoint",
                    b"127.0.0.1",
                    b"role",
                    b"replica",
                    b"replication-offset",
                    9,
                    b"health",
                    b"fail",
                ],
            ],
        ],
    ]
    snap = topo.parse_cluster_shards(reply)
    assert snap.shards[0].master.addr == "127.0.0.1:7000"
    replica = snap.shards[0].replicas[0]
    assert (replica.health, replica.master_id, replica.replication_offset) == ("failed", "m1", 9)


def test_fetch_errors_are_redis_errors(dead_port: int) -> None:
    client = RedisURL.parse(f"redis://{HOST}:{dead_port}").node_client((HOST, dead_port))
    with pytest.raises(redis.ConnectionError):
        topo.fetch(client, "cluster", (HOST, dead_port))

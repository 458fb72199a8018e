"""Topology snapshots and diffs: parsing real replies, and events between snapshots."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import redis

from clusterq.cluster import changes
from clusterq.cluster import topology as topo
from clusterq.cluster.backend import Backend
from clusterq.cluster.connection import RedisURL
from clusterq.slots import SLOT_COUNT, keyslot
from clusterq.tools.devcluster import HOST, LocalCluster, LocalServer

#: Run on Redis and again on Valkey by scripts/test.sh (servers differ here).
pytestmark = pytest.mark.both_servers


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
    from clusterq.tools import servers

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
    assert changes.diff(BEFORE, BEFORE, ["images"]) == []


def test_diff_failover() -> None:
    promoted = _node("ar", 7003)
    failed = _node("a", 7000, health="failed")
    after = _snap(
        topo.Shard(((0, 8191),), promoted, ()),
        topo.Shard(((8192, 16383),), B, (B_REP,)),
        extra=(failed,),
    )
    queues = ["images", "webhooks", "notifications"]
    events = changes.diff(BEFORE, after, queues)
    kinds = sorted(e.kind for e in events)
    assert kinds == ["master_changed", "node_failed"]
    change = next(e for e in events if isinstance(e, changes.MasterChanged))
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
    events = changes.diff(during, after)
    assert sorted(e.kind for e in events) == ["node_recovered", "replica_added"]
    added = next(e for e in events if isinstance(e, changes.ReplicaAdded))
    assert added.master is not None and added.master.id == "ar" and added.replica.id == "a"


def test_diff_slots_moved_between_masters() -> None:
    after = _snap(topo.Shard(((0, 100),), A, (A_REP,)), topo.Shard(((101, 16383),), B, (B_REP,)))
    events = changes.diff(BEFORE, after)
    assert [e.kind for e in events] == ["slots_moved"]
    moved = events[0]
    assert isinstance(moved, changes.SlotsMoved)
    assert moved.slots == ((101, 8191),) and moved.old == A and moved.new == B


def test_diff_replica_removed_and_node_added() -> None:
    newcomer = _node("c", 7009, "replica", "b")
    after = _snap(
        topo.Shard(((0, 8191),), A, ()), topo.Shard(((8192, 16383),), B, (B_REP, newcomer))
    )
    events = changes.diff(BEFORE, after)
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


# ------------------------------------------- captured replies around real failovers
#
# tests/data/topology/<server>-<fault>.json hold every distinct CLUSTER SHARDS + CLUSTER
# NODES pair (read in one MULTI) that Redis 7.0 and Valkey 8.1 gave before, during and
# after a kill -9, a SIGSTOP and a CLUSTER FAILOVER of a master, asked of the replica,
# of another master and of the old master (scripts/capture-topology.py made them).

CAPTURES = sorted((Path(__file__).parent / "data" / "topology").glob("*.json"))


def _load(name: str) -> dict[str, Any]:
    return json.loads((Path(__file__).parent / "data" / "topology" / name).read_text())


def _read(view: dict[str, Any]) -> topo.Topology:
    """What :func:`topo.fetch` does with the view: CLUSTER NODES only when needed."""
    shards = view["shards"]
    return topo.parse_cluster_shards(
        shards, "capture", view["nodes"] if topo.shards_ambiguous(shards) else None
    )


def _listed(view: dict[str, Any], slot: int) -> list[dict[str, Any]]:
    """The nodes CLUSTER SHARDS lists in the shard that owns ``slot``, in its order."""
    for raw in view["shards"]:
        shard = dict(zip(raw[::2], raw[1::2], strict=True))
        ranges = shard["slots"]
        if any(lo <= slot <= hi for lo, hi in zip(ranges[::2], ranges[1::2], strict=True)):
            return [dict(zip(n[::2], n[1::2], strict=True)) for n in shard["nodes"]]
    return []


def test_captures_cover_both_servers_and_three_faults() -> None:
    names = {p.stem for p in CAPTURES}
    assert names == {f"{s}-{f}" for s in ("redis", "valkey") for f in ("kill", "stop", "manual")}
    assert "Valkey server v=8" in _load("valkey-kill.json")["server"]
    assert "Redis server v=7" in _load("redis-kill.json")["server"]


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.stem)
def test_captured_views_agree_with_the_slot_table(path: Path) -> None:
    """In every captured view the master we pick for the drilled slot is the node the
    answering node's own slot table (CLUSTER NODES) names, never a failed node while an
    online master is listed, and no master-role node is called a replica."""
    data = json.loads(path.read_text())
    slot = data["slot"]
    promoted_seen = False
    for view in data["snapshots"]:
        snap = _read(view)
        table = topo.parse_cluster_nodes(view["nodes"])
        master = snap.master_for_slot(slot)
        expected = table.master_for_slot(slot)
        where = f"{view['phase']} +{view['at']}s asked {view['asked']}"
        assert master is not None and expected is not None, where
        assert master.id == expected.id, where
        listed = _listed(view, slot)
        if any(n["role"] == "master" and n["health"] == "online" for n in listed):
            assert master.online, where
        for shard in snap.shards:
            assert all(r.role == "replica" for r in shard.replicas), where
            assert shard.master.id not in {r.id for r in shard.replicas}, where
        promoted_seen |= master.port == data["replica_port"]
    assert promoted_seen, "the capture never shows the replica promoted"
    # The last view, asked of any node, names the promoted replica.
    assert _read(data["snapshots"][-1]).master_for_slot(slot).port == data["replica_port"]  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ["valkey-kill.json", "valkey-stop.json"])
def test_valkey_lists_the_failed_master_first_beside_the_promoted_one(name: str) -> None:
    """Valkey 8 keeps the dead master in its shard, still role master, health fail, and
    lists it first: taking the first master (what the parser did) routes to a dead node."""
    data = _load(name)
    slot = data["slot"]
    views = [
        v
        for v in data["snapshots"]
        if [(n["role"], n["health"]) for n in _listed(v, slot)][:2]
        == [("master", "fail"), ("master", "online")]
    ]
    assert views, "no captured view lists the failed master first"
    for view in views:
        assert not topo.shards_ambiguous(view["shards"])  # health settles it: one online
        snap = _read(view)
        master = snap.master_for_slot(slot)
        assert master is not None and master.port == data["replica_port"] and master.online
        shard = snap.shard_for_slot(slot)
        assert shard is not None and shard.replicas == ()  # the failed master is no replica
        dead = snap.node_at(f"{HOST}:{data['old_master_port']}")
        assert dead is not None and dead.health == topo.FAILED and dead.role == "master"


def test_two_online_masters_in_one_shard_are_settled_by_the_slot_table() -> None:
    """Right after CLUSTER FAILOVER, Valkey's promoted replica lists both nodes as online
    masters of the shard: CLUSTER NODES (slot table, config epochs) says which won."""
    data = _load("valkey-manual.json")
    slot = data["slot"]
    views = [v for v in data["snapshots"] if topo.shards_ambiguous(v["shards"])]
    assert views, "no ambiguous view captured"
    for view in views:
        masters = [n for n in _listed(view, slot) if n["role"] == "master"]
        assert len(masters) == 2 and all(n["health"] == "online" for n in masters)
        snap = _read(view)
        winner = snap.master_for_slot(slot)
        assert winner is not None and winner.port == data["replica_port"]
        assert winner.config_epoch is not None
        loser = snap.node_at(f"{HOST}:{data['old_master_port']}")
        assert loser is not None and (loser.config_epoch or 0) < winner.config_epoch


def test_shard_master_without_a_slot_table_prefers_online_then_epoch() -> None:
    failed = _node("old", 7000, health=topo.FAILED)
    winner = topo.NodeInfo("new", HOST, 7003, "master", topo.ONLINE, config_epoch=7)
    stale = topo.NodeInfo("stale", HOST, 7004, "master", topo.ONLINE, config_epoch=2)
    assert topo.shard_master([failed, winner]) is winner
    assert topo.shard_master([failed, stale, winner]) is winner
    assert topo.shard_master([failed]) is failed  # nobody else serves the slots yet
    assert topo.shard_master([_node("r", 7005, "replica", "old")]) is None


def test_loading_replica_is_listed_but_not_online() -> None:
    data = _load("redis-kill.json")
    view = data["snapshots"][0]
    loading = [n for n in _listed(view, data["slot"]) if n["health"] == "loading"]
    assert loading, "the capture has no loading replica"
    shard = _read(view).shard_for_slot(data["slot"])
    assert shard is not None
    replica = next(r for r in shard.replicas if r.port == loading[0]["port"])
    assert replica.health == topo.LOADING and not replica.online


@pytest.mark.parametrize("server", ["redis", "valkey"])
def test_diff_over_a_captured_kill_reports_the_failover(server: str) -> None:
    data = _load(f"{server}-kill.json")
    views = [v for v in data["snapshots"] if v["asked"] == "other_master"]
    events: list[changes.TopologyEvent] = []
    for before, after in itertools.pairwise(views):
        events.extend(changes.diff(_read(before), _read(after), ["images"]))
    changed = [e for e in events if isinstance(e, changes.MasterChanged)]
    assert len(changed) == 1, [e.describe() for e in events]
    event = changed[0]
    assert (event.old.port, event.new.port) == (data["old_master_port"], data["replica_port"])
    assert event.queues == ("images",)
    assert event.old_state in ("failed", "gone")
    assert "failover" in event.describe() and event.old.addr in event.describe()

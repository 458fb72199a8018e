"""Kill -9 the master that owns a queue: the map, `queue ls --cluster` and the diff follow."""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

from clusterq.cli import main
from clusterq.client import Client
from clusterq.cluster import changes
from clusterq.cluster.backend import Backend
from clusterq.tools.devcluster import HOST, LocalCluster

#: Run on Redis and again on Valkey by scripts/test.sh (servers differ here).
pytestmark = pytest.mark.both_servers

QUEUES = ("images", "webhooks", "notifications")


def _queue_ls(url: str, prefix: str) -> dict[str, dict[str, object]]:
    result = CliRunner().invoke(
        main, ["--url", url, "--prefix", prefix, "queue", "ls", "--cluster", "--json"]
    )
    assert result.exit_code == 0, result.output
    return {row["queue"]: row for row in json.loads(result.output)}


def _wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.slow
def test_kill_master_of_images(fresh_cluster: object, prefix: str) -> None:
    cluster: LocalCluster = fresh_cluster()  # type: ignore[operator]
    with Client(cluster.seed_url, prefix=prefix) as client:
        for queue in QUEUES:
            client.enqueue(f"{queue}:task", {"n": 1}, queue=queue)

    before = _queue_ls(cluster.seed_url, prefix)
    old_master = before["images"]["master"]
    [old_replica] = before["images"]["replicas"]
    assert before["images"]["pending"] == 1

    backend = Backend(cluster.seed_url, prefix=prefix)
    backend.note_queues(QUEUES)
    seen: list[changes.TopologyEvent] = []
    backend.subscribe(lambda _new, events: seen.extend(events))
    old_snapshot = backend.topology

    killed_port = int(str(old_master).rsplit(":", 1)[1])
    cluster.kill_node(killed_port)

    def promoted() -> bool:
        backend.refresh_topology()
        loc = backend.topology.locate("images")
        return loc.master is not None and loc.master.addr == old_replica

    _wait_for(promoted, 30, f"{old_replica} to be promoted")

    events = changes.diff(old_snapshot, backend.topology, QUEUES)
    masters = [e for e in events if isinstance(e, changes.MasterChanged)]
    assert len(masters) == 1
    assert masters[0].old.addr == old_master and masters[0].new.addr == old_replica
    assert "images" in masters[0].queues
    assert any(isinstance(e, changes.MasterChanged) for e in seen)  # subscribers heard it too

    # The seed node may be the one we killed: the CLI must still find the cluster.
    seeds = ",".join(f"{HOST}:{p}" for p in cluster.ports)
    after = _queue_ls(f"redis://{seeds}", prefix)
    assert after["images"]["master"] == old_replica
    assert after["images"]["pending"] == 1  # the replica had it
    for queue in ("webhooks", "notifications"):
        assert after[queue]["master"] == before[queue]["master"]

    # The old master comes back as a replica of the promoted node.
    during = backend.topology
    cluster.restart_node(killed_port)
    cluster.wait_healthy(60)
    backend.refresh_topology()
    back = changes.diff(during, backend.topology, QUEUES)
    added = [e for e in back if isinstance(e, changes.ReplicaAdded)]
    assert added and added[0].replica.addr == old_master
    assert added[0].master is not None and added[0].master.addr == old_replica
    assert _queue_ls(f"redis://{seeds}", prefix)["images"]["replicas"] == [old_master]
    backend.close()


@pytest.mark.slow
def test_a_takeover_is_reported_once_and_the_events_settle(fresh_cluster: object) -> None:
    """After CLUSTER FAILOVER TAKEOVER (the old master alive), a map re-read every
    0.2 s reports the change once: no replica flapping between "now replicates" and "no
    longer replicates" (as an operator once saw every 0.5 s)."""
    cluster: LocalCluster = fresh_cluster()  # type: ignore[operator]
    backend = Backend(cluster.seed_url)
    backend.note_queues(QUEUES)
    seen: list[changes.TopologyEvent] = []
    backend.subscribe(lambda _new, events: seen.extend(events))
    location = backend.topology.locate("images")
    assert location.master is not None and location.replicas
    replica = cluster.client(location.replicas[0].port)
    try:
        replica.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
    finally:
        replica.close()

    def promoted() -> bool:
        backend.refresh_topology()
        new = backend.topology.locate("images").master
        return new is not None and new.id == location.replicas[0].id

    _wait_for(promoted, 30, "the takeover")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # watch for 5 s, as a worker does
        backend.refresh_topology()
        time.sleep(0.2)
    backend.close()
    kinds = [event.kind for event in seen]
    assert kinds.count("master_changed") == 1, [e.describe() for e in seen]
    assert "replica_removed" not in kinds, [e.describe() for e in seen]
    assert kinds.count("replica_added") <= 1, [e.describe() for e in seen]

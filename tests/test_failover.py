"""Failover for real: the four drill modes, `cluster watch`, and losing the seed node."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis

from clusterq import AsyncClient, Client, Inspector, Router, Task, Worker
from clusterq.cluster.changes import MasterChanged, TopologyEvent
from clusterq.events import QueueResumed, QueueUnavailable
from clusterq.tools.devcluster import HOST, LocalCluster
from tests.helpers import FAST, await_for, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.both_servers]


class LineReader:
    """Collects a subprocess's stdout lines in a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line)


def test_four_drill_modes_back_to_back(
    fresh_cluster: Callable[[], LocalCluster], clusterq_bin: str, prefix: str
) -> None:
    cluster = fresh_cluster()
    url = cluster.seed_url
    seeds = "redis://" + ",".join(f"{HOST}:{p}" for p in cluster.ports)
    watch = subprocess.Popen(
        [
            clusterq_bin,
            "--url",
            seeds,
            "cluster",
            "watch",
            "--json",
            "--interval",
            "0.2",
            "--duration",
            "400",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    reader = LineReader(watch)
    reports = []
    try:
        for seed, mode in enumerate(("kill", "stop", "manual", "takeover")):
            done = subprocess.run(
                [
                    clusterq_bin,
                    "--url",
                    url,
                    "--prefix",
                    prefix,
                    "drill",
                    "failover",
                    "--queue",
                    "images",
                    "--mode",
                    mode,
                    "--tasks",
                    "2000",
                    "--rate",
                    "500",
                    "--seed",
                    str(seed),
                    "--keep-log",
                    "--json",
                ],
                capture_output=True,
                text=True,
                timeout=280,
            )
            assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
            report = json.loads(done.stdout)
            reports.append(report)
            print(
                mode,
                {
                    k: report[k]
                    for k in (
                        "lost",
                        "duplicated",
                        "extra_deliveries",
                        "promotion",
                        "worker_resume_lag",
                        "first_delivery_after_promotion",
                        "producer_resume",
                        "producer_stall",
                        "stall_bound",
                        "pickup_p99_ms",
                        "other_delivered_during_outage",
                        "errors",
                    )
                },
            )
            # Count again, without the drill's code: the handlers' own log, read with
            # redis-py's cluster client; every one of the 2,000 ids ran at least once.
            ran = _deliveries(cluster, report["delivery_log"], report["run_id"])
            assert set(ran) == {f"{report['run_id']}-{i}" for i in range(2000)}
            extra = sum(ran.values()) - len(ran)
            assert extra == report["extra_deliveries"] <= report["in_flight_bound"]
            # The last tasks were enqueued after the promotion, into the new master; the
            # old one is no master any more: their delivery was fetched from the new one.
            assert _role(report["master_before"]) == "slave"
            assert _role(report["master_after"]) == "master"
            assert report["ok"], report["problems"]
            # the drill's tasks went to a queue of its own, on the master of "images"
            assert report["drill_queue"].startswith("images-drill-")
            assert report["pickup_p50_ms"] >= 0  # stamped at the first send
            assert report["lost"] == 0 and report["still_queued"] == 0
            assert report["acknowledged"] == 2000 and report["gave_up"] == 0
            assert report["extra_deliveries"] <= report["in_flight_bound"]
            assert report["stuck_active"] == 0 and report["healthy_after"]
            assert report["promotion"] is not None
            assert report["master_after"] != report["master_before"]
            if mode in ("kill", "stop"):
                assert report["promotion"] > 1.0  # a real outage of the queue's master...
                assert report["other_delivered_during_outage"] > 0  # ...others kept going
                assert report["worker_resume_lag"] is not None
                # The producer was held up by the outage, and not past the verdict's bound.
                assert 1.0 < report["producer_stall"] <= report["stall_bound"]
            else:
                assert report["duplicated"] <= report["in_flight_bound"]
            cluster.wait_healthy(timeout=30)  # gossip converges, and the next drill can run
    finally:
        watch.terminate()
        watch.wait(timeout=10)
    with Inspector(url, prefix=prefix) as inspector:
        images = inspector.queue("images")  # the named queue got no drill task
        assert (images.pending, images.processed, images.failed) == (0, 0, 0)
    events = [json.loads(line) for line in reader.lines if line.strip()]
    kinds = Counter(e["event"] for e in events)
    assert events[0]["event"] == "snapshot"
    assert kinds["master_changed"] >= 4, kinds
    assert kinds["node_failed"] >= 1 and kinds["node_recovered"] >= 1, kinds
    changed = [e for e in events if e["event"] == "master_changed"]
    assert all(e["slots"] and e["old"] != e["new"] for e in changed)


def _deliveries(cluster: LocalCluster, log_key: str, run_id: str) -> Counter[str]:
    """Deliveries per task id of the drill's queue, from the handlers' log hash."""
    client = redis.RedisCluster(host=HOST, port=cluster.base_port, decode_responses=True)
    try:
        fields = client.hkeys(log_key)
    finally:
        client.close()
    ids = (f.split("|", 1)[0] for f in fields)
    return Counter(i for i in ids if i.startswith(f"{run_id}-") and "-o" not in i[len(run_id) :])


def _role(addr: str) -> str:
    host, _, port = addr.rpartition(":")
    node = redis.Redis(host=host, port=int(port), socket_timeout=5)
    try:
        return str(node.info("replication")["role"])
    finally:
        node.close()


def test_losing_the_seed_node(fresh_cluster: Callable[[], LocalCluster], prefix: str) -> None:
    """Kill -9 the node that the clients and the worker were seeded with (a master)."""
    cluster = fresh_cluster()
    seed = cluster.seed_url  # only this one node
    topology = cluster.topology()
    assert topology.locate("webhooks").master.port == cluster.base_port  # type: ignore[union-attr]
    other = "notifications"
    assert topology.locate(other).master.port != cluster.base_port  # type: ignore[union-attr]
    delivered: dict[str, float] = {}
    events: list[TopologyEvent] = []
    router = Router()

    @router.task("t")
    async def t(task: Task) -> None:
        delivered.setdefault(task.id, time.time())

    async def scenario() -> dict[str, Any]:
        worker = Worker(seed, router, prefix=prefix, queues=["webhooks", other], **FAST)
        worker.subscribe(events.append)
        await worker.start()
        client = await AsyncClient.connect(
            seed, prefix=prefix, durability="replica", watch_interval=0.2
        )
        acked: list[str] = []

        async def produce(queue: str, count: int) -> None:
            for i in range(count):
                info = await client.enqueue("t", i, queue=queue, task_id=f"{queue}-{len(acked)}")
                acked.append(info.id)
                await asyncio.sleep(0.005)

        await produce("webhooks", 50)
        killed_at = time.time()
        cluster.kill_node(cluster.base_port)
        # The other shard keeps flowing while this one fails over.
        await produce(other, 100)
        await await_for(
            lambda: any(isinstance(e, MasterChanged) for e in events), 30, "the promotion"
        )
        # The promoted master has no replica until the old one rejoins: durable enqueue
        # refuses to confirm until then (tested in test_durability), so restart it first.
        cluster.restart_node(cluster.base_port)
        await produce("webhooks", 50)
        await await_for(lambda: set(acked) <= delivered.keys(), 60, "every task")
        resumed = [e for e in events if isinstance(e, QueueResumed) and e.queue == "webhooks"]
        await client.aclose()
        await worker.stop()
        return {"killed_at": killed_at, "acked": acked, "resumed": resumed}

    result = asyncio.run(scenario())
    assert set(result["acked"]) <= delivered.keys()
    changes = [e for e in events if isinstance(e, MasterChanged)]
    assert any("webhooks" in e.queues for e in changes)
    assert any(isinstance(e, QueueUnavailable) and e.queue == "webhooks" for e in events)
    assert result["resumed"] and result["resumed"][-1].node != f"{HOST}:{cluster.base_port}"
    promoted_at = min(e.at for e in result["resumed"]) if result["resumed"] else None
    others_during = [
        t for i, t in delivered.items() if i.startswith(other) and t < (promoted_at or 0)
    ]
    assert others_during, "the other shard stalled during the failover"


def _marked_failed(cluster: LocalCluster, ports: list[int]) -> bool:
    """Whether a node still up marks every one of ``ports`` failed in its CLUSTER NODES
    (the flag ``fail`` the cluster agreed on, not the suspicion ``fail?``)."""
    for port in cluster.ports:
        if port in ports:
            continue
        client = cluster.client(port)
        try:
            reply = client.execute_command("CLUSTER", "NODES")
        except redis.RedisError:
            continue
        finally:
            client.close()
        text = reply.decode() if isinstance(reply, bytes) else str(reply)
        flags = {}
        for line in text.splitlines():
            fields = line.split()
            flags[int(fields[1].split("@")[0].rsplit(":", 1)[1])] = fields[2].split(",")
        if all("fail" in flags.get(p, []) for p in ports):
            return True
    return False


def _first_error(call: Callable[[], object], timeout: float, what: str) -> Exception:
    """Repeat ``call`` in a thread until it raises; the error. Fails after ``timeout``
    (the thread is left to its call: a daemon, it ends with the test session)."""
    errors: list[Exception] = []

    def repeat() -> None:
        while True:
            try:
                call()
            except Exception as exc:
                errors.append(exc)
                return

    threading.Thread(target=repeat, daemon=True).start()
    wait_for(lambda: errors, timeout, what)
    return errors[0]


@pytest.mark.parametrize("full_coverage", ["no", "yes"])
def test_a_shard_that_cannot_come_back_fails_fast_and_says_which(
    fresh_cluster: Callable[..., LocalCluster], prefix: str, full_coverage: str
) -> None:
    """Master and replica of one shard killed: nobody can be promoted. Enqueues into its
    queue fail with ShardDown naming the queue once the cluster marks both failed, not
    when the retry timeout ends (an hour here: only the fail-fast path ends the call
    while the test waits); with full coverage required (the server default) the other
    shards refuse too, and the message says why and what setting to change."""
    from clusterq import ShardDown

    cluster = fresh_cluster([f"cluster-require-full-coverage {full_coverage}"])
    location = cluster.topology().locate("images")
    assert location.master is not None
    other = "webhooks"
    assert cluster.topology().locate(other).master != location.master
    dead = [node.port for node in (location.master, *location.replicas)]
    with Client(cluster.seed_url, prefix=prefix, retry_timeout=3600, down_timeout=1.0) as client:
        client.register_queues(["images", other])
        for port in dead:
            cluster.kill_node(port)
        down = _first_error(
            lambda: client.enqueue("t", None, queue="images"), 120, "the enqueue to give up"
        )
        # The order of events: the cluster marked both nodes failed, then the call gave up.
        assert isinstance(down, ShardDown), repr(down)
        assert _marked_failed(cluster, dead), "gave up before the cluster marked them failed"
        assert "(queues images)" in str(down) and location.master.addr in str(down)
        if full_coverage == "yes":
            refused = _first_error(
                lambda: client.enqueue("t", None, queue=other), 60, "the other shard's refusal"
            )
            assert isinstance(refused, ShardDown), repr(refused)
            assert "cluster-require-full-coverage no" in str(refused)
        else:
            assert client.enqueue("t", None, queue=other).id  # the healthy shard serves


def test_a_kill_drill_whose_node_cannot_restart_stops_and_says_how(
    fresh_cluster: Callable[[], LocalCluster], clusterq_bin: str, prefix: str
) -> None:
    """The killed master's port is taken (here by the test) when the drill restarts it:
    the drill stops producing at once (it used to retry every durable enqueue for 60 s
    against a new master without a replica) and names the node and how to start it."""
    import socket

    cluster = fresh_cluster()
    master = cluster.topology().locate("images").master
    assert master is not None
    pid = cluster.pid(master.port)
    assert pid is not None
    drill = subprocess.Popen(
        [
            clusterq_bin, "--url", cluster.seed_url, "--prefix", prefix, "drill", "failover",
            "--queue", "images", "--mode", "kill", "--tasks", "3000", "--rate", "200",
            "--workers", "1", "--seed", "1",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    squatter = socket.socket()
    try:
        deadline = time.monotonic() + 60
        while servers_pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)  # until the drill killed it
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        bind_until = time.monotonic() + 3  # the dead server's closing sockets linger
        while True:
            try:
                squatter.bind((HOST, master.port))
                break
            except OSError:
                if time.monotonic() > bind_until:
                    raise
                time.sleep(0.01)
        squatter.listen()
        out, err = drill.communicate(timeout=120)  # not 60 s per remaining task
    finally:
        squatter.close()
        if drill.poll() is None:
            drill.kill()
    assert drill.returncode == 1, out + err
    assert f"{HOST}:{master.port} did not start again" in err
    assert "start it with: cd " in err
    cluster.start_node(master.port)  # what the message says to do, done by the test
    cluster.wait_healthy(60)


def servers_pid_alive(pid: int) -> bool:
    from clusterq.tools.servers import pid_alive

    return pid_alive(pid)


def test_a_sync_client_follows_a_frozen_master_to_its_replica_without_waiting_on_it(
    fresh_cluster: Callable[[], LocalCluster], prefix: str
) -> None:
    """A master is frozen (SIGSTOP) and stays frozen until the test ends: a sync client's
    enqueue into its queue times out once on it, then follows the map to the promoted
    replica. It sends the call to the frozen node once: after the timeout it pings it and
    re-reads the map instead of waiting another socket timeout there (the call used to
    go back, stalling a socket timeout past the promotion)."""
    import signal

    cluster = fresh_cluster()
    with Client(cluster.seed_url, prefix=prefix, retry_timeout=90) as client:
        client.enqueue("t", 0, queue="images")  # connections and scripts in place
        frozen = cluster.topology().locate("images").master
        assert frozen is not None
        sent: Counter[tuple[str, int]] = Counter()
        node = client.backend.node

        def counting(addr: Any) -> Any:
            sent[addr] += 1
            return node(addr)

        client.backend.node = counting  # type: ignore[method-assign]
        cluster.kill_node(frozen.port, signal.SIGSTOP)
        try:
            info = client.enqueue("t", 1, queue="images")
            now = client.backend.topology.locate("images").master
        finally:
            cluster.kill_node(frozen.port, signal.SIGCONT)
    assert now is not None and now.port != frozen.port  # it went to the promoted replica
    assert sent[(frozen.host, frozen.port)] == 1, sent
    assert info.state.value == "pending"

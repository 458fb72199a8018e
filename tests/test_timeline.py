"""The failover timeline (issue 29): workers record what they saw (master changes, nodes
failed and back, queues down and back) in the cluster, each change once however many
workers saw it; ``clusterq web`` shows it with how long each outage lasted."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import pytest
from starlette.testclient import TestClient

from clusterq import Client, Inspector, Router, Task, Worker
from clusterq.cluster.changes import MasterChanged, NodeFailed, TopologyEvent
from clusterq.cluster.topology import NodeInfo
from clusterq.events import QueueResumed, timeline_record
from clusterq.ops.timeline import decode, read_timeline
from clusterq.ops.web import create_app
from clusterq.tools.devcluster import LocalCluster
from tests.helpers import FAST, await_for


def test_the_same_change_seen_by_two_workers_has_one_signature() -> None:
    node = NodeInfo("id-a", "127.0.0.1", 7000, "master")
    other = NodeInfo("id-b", "127.0.0.1", 7001, "master")
    one, two = QueueResumed("q", "127.0.0.1:7001", 1.5), QueueResumed("q", "127.0.0.1:7001", 2.5)
    assert timeline_record(one)[0] == timeline_record(two)[0]  # outage and time differ
    assert timeline_record(NodeFailed(node))[0] != timeline_record(NodeFailed(other))[0]
    assert timeline_record(NodeFailed(node))[0] != timeline_record(one)[0]
    garbled = decode(b"1-0", {b"event": b"not json"})
    assert garbled.kind == "?" and "did not write" in garbled.message


@pytest.mark.both_servers
def test_a_failover_is_recorded_once_and_shown_with_its_outage(
    fresh_cluster: Callable[[], LocalCluster], prefix: str
) -> None:
    cluster = fresh_cluster()
    url = cluster.seed_url
    victim = cluster.topology().locate("webhooks").master
    assert victim is not None
    alive = cluster.base_port + 1 if victim.port == cluster.base_port else cluster.base_port
    url = f"redis://127.0.0.1:{alive}"  # a seed that stays up
    router = Router()
    done: list[str] = []

    @router.task("t")
    async def t(task: Task) -> None:
        done.append(task.id)

    seen: list[list[TopologyEvent]] = [[], []]

    async def scenario() -> None:
        workers = [
            Worker(url, router, prefix=prefix, queues=["webhooks"], name=f"tl{n}", **FAST)
            for n in range(2)
        ]
        for worker, events in zip(workers, seen, strict=True):
            worker.subscribe(events.append)
            await worker.start()
        try:
            cluster.kill_node(victim.port)
            await await_for(
                lambda: all(any(isinstance(e, MasterChanged) for e in ev) for ev in seen),
                60,
                "both workers to see the promotion",
            )
            with Client(url, prefix=prefix) as client:
                client.enqueue("t", 1, queue="webhooks")
            await await_for(lambda: done, 60, "a task on the new master")
            await await_for(
                lambda: all(w._announcer is not None and not w._announcer.timeline
                            for w in workers),
                60,
                "both workers to have written what they saw",
            )  # fmt: skip
        finally:
            for worker in workers:
                await worker.stop()
            cluster.restart_node(victim.port)

    asyncio.run(scenario())
    with Inspector(url, prefix=prefix) as inspector:
        entries = read_timeline(inspector.backend, inspector.keys)
    changes = [e for e in entries if e.kind == "master_changed"]
    assert len(changes) == 1, [e.message for e in entries]  # two workers saw it, once
    assert "webhooks" in changes[0].queues
    assert changes[0].data["old"] == victim.addr
    kinds = [e.kind for e in entries]
    assert kinds.count("node_failed") <= 1
    resumed = [e for e in entries if e.kind == "queue_resumed"]
    assert all(e.duration is not None and e.duration >= 0 for e in resumed)
    with TestClient(create_app(url, prefix=prefix)) as http:
        page = http.get("/timeline")
    assert page.status_code == 200
    rows = re.findall(r'<tr class="entry" data-id="[^"]*" data-event="([a-z_?]+)">', page.text)
    assert rows == kinds  # newest first, as read
    assert f"to {changes[0].data['new']}" in page.text


def test_the_timeline_page_says_when_it_cannot_be_read(standalone: Any, prefix: str) -> None:
    with Client(standalone.seed_url, prefix=prefix) as client:
        stream, _ = client.keys.timeline
        client.backend.call(stream, "SET", stream, "not a stream")
    with TestClient(create_app(standalone.seed_url, prefix=prefix)) as http:
        page = http.get("/timeline")
    assert page.status_code == 200 and 'id="timeline-error"' in page.text

"""A busy queue's slot resharded with `redis-cli --cluster reshard` while tasks flow:
nothing acknowledged is lost, nothing runs twice, the slot ends on its new master, and
the producer's longest stall is reported (printed, not bounded: see the README on slot
migrations).

The queue's name is picked so that its slot is the first slot of the middle master's
range, the slot `reshard --cluster-slots 1` moves first.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from external import find_cli
from helpers import await_for, running_worker

from clusterq import AsyncClient, Router, Task
from clusterq.slots import keyslot
from clusterq.tools.devcluster import HOST, LocalCluster

pytestmark = pytest.mark.slow


def _queue_on_slot(slot: int) -> str:
    for n in range(1_000_000):
        name = f"rq{n}"
        if keyslot(name) == slot:
            return name
    raise AssertionError(f"no name found for slot {slot}")


@pytest.mark.parametrize("how", ["redis-cli", "slow-manual"])
def test_resharding_a_busy_queues_slot_loses_and_repeats_nothing(
    fresh_cluster: Callable[..., LocalCluster], server_bin: Path, how: str
) -> None:
    """``redis-cli``: `redis-cli --cluster reshard` (quick). ``slow-manual``: the same
    steps by hand with an operator's pauses: IMPORTING/MIGRATING, 1.5 s, every key of the
    slot in one MIGRATE, 1.5 s, then SETSLOT NODE on every master."""
    cli = find_cli(server_bin)
    if cli is None:
        pytest.fail("no redis-cli/valkey-cli beside the server or on PATH")
    cluster = fresh_cluster()
    topology = cluster.topology()
    source = sorted(topology.shards, key=lambda s: s.slots[0][0])[1]
    target = sorted(topology.shards, key=lambda s: s.slots[0][0])[2]
    slot = source.slots[0][0]
    queue = _queue_on_slot(slot)
    runs: Counter[str] = Counter()
    router = Router()

    @router.task("r")
    async def r(task: Task) -> None:
        runs[task.id] += 1

    stalls: list[float] = []
    acked: list[str] = []

    async def scenario() -> tuple[float, float]:
        client = await AsyncClient.connect(cluster.seed_url, retry_timeout=30)
        async with running_worker(cluster.seed_url, router, queues={queue: 1}):
            stop = asyncio.Event()

            async def produce() -> None:
                n = 0
                while not stop.is_set() and n < 20_000:
                    began = time.monotonic()
                    info = await client.enqueue("r", n, queue=queue)
                    stalls.append(time.monotonic() - began)
                    acked.append(info.id)
                    n += 1
                    await asyncio.sleep(0.004)

            producer = asyncio.create_task(produce())
            await await_for(lambda: len(runs) >= 200, 30, "the queue to be busy")
            began = time.monotonic()
            if how == "redis-cli":
                await asyncio.to_thread(_reshard_with_cli, cli, cluster, source, target)
            else:
                await asyncio.to_thread(_migrate_slowly, cluster, slot, source, target)
            moved_in = time.monotonic() - began
            await asyncio.sleep(1.0)  # keep producing on the new owner for a while
            stop.set()
            await producer
            await await_for(lambda: set(acked) <= set(runs), 60, "every task to run")
        await client.aclose()
        return moved_in, max(stalls)

    moved_in, longest = asyncio.run(scenario())
    after = cluster.topology()
    owner = after.shard_for_slot(slot)
    assert owner is not None and owner.master.id == target.master.id
    lost = set(acked) - set(runs)
    duplicated = [task_id for task_id, n in runs.items() if n > 1]
    print(
        f"\n{how} reshard of slot {slot} (queue {queue}) took {moved_in:.2f}s under load; "
        f"{len(acked)} tasks; longest enqueue stall {longest * 1000:.0f} ms"
    )
    assert (lost, duplicated) == (set(), [])


def _reshard_with_cli(cli: Path, cluster: LocalCluster, source: Any, target: Any) -> None:
    out = subprocess.run(
        [
            str(cli), "--cluster", "reshard", f"{HOST}:{cluster.base_port}",
            "--cluster-from", source.master.id, "--cluster-to", target.master.id,
            "--cluster-slots", "1", "--cluster-yes",
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


def _migrate_slowly(cluster: LocalCluster, slot: int, source: Any, target: Any) -> None:
    src = cluster.client(source.master.port)
    dst = cluster.client(target.master.port)
    try:
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.master.id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.master.id)
        time.sleep(1.5)
        keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
        if keys:
            src.execute_command("MIGRATE", HOST, target.master.port, "", 0, 5000, "KEYS", *keys)
        time.sleep(1.5)
        for shard in cluster.topology().shards:
            node = cluster.client(shard.master.port)
            try:
                node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.master.id)
            finally:
                node.close()
    finally:
        src.close()
        dst.close()


def test_a_call_that_outlasts_its_retries_on_a_migrating_slot_says_so(
    fresh_cluster: Callable[..., LocalCluster],
) -> None:
    """A slot left MIGRATING (an operator's migration stopped halfway): calls retry, then
    fail with SlotMigrating naming the slot, the queue and the target, not a raw
    TRYAGAIN/ASK reply."""
    from clusterq import Client, SlotMigrating

    cluster = fresh_cluster()
    shards = sorted(cluster.topology().shards, key=lambda s: s.slots[0][0])
    source, target = shards[1], shards[2]
    slot = source.slots[0][0]
    queue = _queue_on_slot(slot)
    with Client(cluster.seed_url, retry_timeout=0.5) as client:
        client.enqueue("r", 1, queue=queue)  # the queue's keys exist on the source
        src = cluster.client(source.master.port)
        dst = cluster.client(target.master.port)
        try:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.master.id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.master.id)
            with pytest.raises(SlotMigrating) as caught:
                client.enqueue("r", 2, queue=queue, process_in=60)  # some keys missing
            message = str(caught.value)
            assert f"slot {slot} (queue {queue}) is being migrated" in message
            assert "redis-cli --cluster reshard" in message
        finally:
            for node in (src, dst):
                node.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
                node.close()
        assert client.enqueue("r", 3, queue=queue).queue == queue  # served again

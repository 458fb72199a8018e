"""What the README promises and no other test checked: archive trimming by age, scripts
reloaded after a server lost them, the CLI's environment variables, every field of
``queue ls --cluster --json``."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from typing import Any

from clusterq import AsyncClient, Client, Inspector, Router, SkipRetry, Task, TaskState
from clusterq.broker import dequeue, enqueue
from clusterq.tools.devcluster import HOST, LocalCluster, LocalServer
from tests.helpers import await_for, running_worker, wait_for


def test_archive_is_trimmed_by_age(url: str, prefix: str) -> None:
    router = Router()

    @router.task("bad")
    async def bad(task: Task) -> None:
        raise SkipRetry("no")

    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix)
        infos = [await client.enqueue("bad", i) for i in range(3)]
        async with running_worker(url, router, prefix=prefix, archive_max_age=60) as worker:
            await await_for(lambda: worker.stats.archived == 3, 10, "archiving")
            # A few looks at the queue: sweeps, or (with wake-ups) surveys that would ask
            # for a sweep if anything were to trim.
            assert worker.wakeups is not None
            looks = lambda: worker.stats.sweeps + worker.wakeups.surveys  # noqa: E731
            looked = looks()
            await await_for(lambda: looks() >= looked + 3, 10, "a few sweeps or surveys")
        with Inspector(url, prefix=prefix) as inspector:
            assert inspector.queue("default").archived == 3  # younger than 60 s: kept
        async with running_worker(url, router, prefix=prefix, archive_max_age=0.3):
            with Inspector(url, prefix=prefix) as inspector:
                await await_for(lambda: inspector.queue("default").archived == 0, 10, "trimming")
        for info in infos:  # the records go with them
            assert await _gone(client, info)
        await client.aclose()

    asyncio.run(scenario())


async def _gone(client: AsyncClient, info: Any) -> bool:
    from clusterq import TaskNotFound

    try:
        await client.info(info)
    except TaskNotFound:
        return True
    return False


def _script_cached(cluster: LocalCluster, port: int, sha: str) -> bool:
    node = cluster.client(port)
    try:
        return bool(node.execute_command("SCRIPT", "EXISTS", sha)[0])
    finally:
        node.close()


def test_scripts_are_loaded_again_on_a_node_that_lost_them(
    cluster: LocalCluster, prefix: str
) -> None:
    """A promoted replica, or a restarted master, starts with an empty script cache: the
    first EVALSHA meets NOSCRIPT, the script is loaded on that node and called again."""
    ran: list[int] = []
    router = Router()

    @router.task("t")
    async def t(task: Task) -> None:
        ran.append(task.payload)

    master = cluster.topology().locate("images").master
    assert master is not None
    with Client(cluster.seed_url, prefix=prefix) as client:
        client.enqueue("t", 0, queue="images", process_in=0.01)  # enqueue.lua
    assert _script_cached(cluster, master.port, enqueue.SCRIPT.sha)
    node = cluster.client(master.port)
    try:
        node.execute_command("SCRIPT", "FLUSH")  # what a fresh master's cache looks like
    finally:
        node.close()
    assert not _script_cached(cluster, master.port, enqueue.SCRIPT.sha)
    with Client(cluster.seed_url, prefix=prefix) as client:
        delayed = client.enqueue("t", 1, queue="images", process_in=0.01)
    assert delayed.state == TaskState.SCHEDULED
    assert _script_cached(cluster, master.port, enqueue.SCRIPT.sha)

    async def drain() -> None:
        async with running_worker(cluster.seed_url, router, prefix=prefix, queues=["images"]):
            await await_for(lambda: sorted(ran) == [0, 1], 20, "both tasks")

    asyncio.run(drain())
    assert _script_cached(cluster, master.port, dequeue.SCRIPT.sha)


def test_cli_reads_url_and_prefix_from_the_environment(
    standalone: LocalServer, prefix: str, clusterq_bin: str, env_without_clusterq: None
) -> None:
    env = {**os.environ, "CLUSTERQ_URL": standalone.seed_url, "CLUSTERQ_PREFIX": prefix}
    run = [clusterq_bin, "enqueue", "t", "{}", "--queue", "from-env"]
    done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    listed = subprocess.run(
        [clusterq_bin, "queue", "ls", "--json"], env=env, capture_output=True, text=True
    )
    assert [r["queue"] for r in json.loads(listed.stdout)] == ["from-env"]
    with Inspector(standalone.seed_url, prefix=prefix) as inspector:  # really that prefix
        assert inspector.queue("from-env").pending == 1
    # Without CLUSTERQ_PREFIX, the CLI uses its default prefix: the same listing of the
    # same server shows the queue only when given the prefix as an option.
    bare = {k: v for k, v in env.items() if not k.startswith("CLUSTERQ_")}

    def names(*options: str) -> list[str]:
        listing = subprocess.run(
            [clusterq_bin, "--url", standalone.seed_url, *options, "queue", "ls", "--json"],
            env=bare,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listing.returncode == 0, listing.stderr
        return [r["queue"] for r in json.loads(listing.stdout)]

    assert "from-env" not in names()
    assert names("--prefix", prefix) == ["from-env"]


def test_queue_ls_cluster_json_has_every_documented_field(
    cluster: LocalCluster, prefix: str
) -> None:
    router = Router()

    @router.task("ok")
    async def ok(task: Task) -> None:
        return None

    @router.task("bad")
    async def bad(task: Task) -> None:
        raise SkipRetry("no")

    @router.task("again")
    async def again(task: Task) -> None:
        raise RuntimeError("later")

    url = cluster.seed_url
    with Client(url, prefix=prefix) as client:
        client.enqueue("ok", None, queue="images", retention=60)  # -> completed
        client.enqueue("bad", None, queue="images")  # -> archived
        client.enqueue("again", None, queue="images", max_retry=3)  # -> retry

    async def run() -> None:
        from clusterq.retry import fixed

        async with running_worker(
            url, router, prefix=prefix, queues=["images"], retry_policy=fixed(600)
        ) as worker:
            await await_for(lambda: worker.stats.failed >= 2, 10, "two failures")

    asyncio.run(run())
    with Client(url, prefix=prefix) as client:
        client.enqueue("ok", None, queue="images", process_in=600)  # -> scheduled
        client.enqueue("ok", None, queue="images")  # -> pending
        qk = client.keys.queue("images")
        client.backend.execute_key(qk.paused, lambda c: c.set(qk.paused, 1))
        client.set_limits("images", rate="10/s", concurrency=7)

    def row() -> dict[str, Any]:
        from click.testing import CliRunner

        from clusterq.cli import main

        result = CliRunner().invoke(
            main, ["--url", url, "--prefix", prefix, "queue", "ls", "--cluster", "--json"]
        )
        assert result.exit_code == 0, result.output
        [only] = json.loads(result.output)
        return only  # type: ignore[no-any-return]

    got = wait_for(lambda: (r := row())["completed"] == 1 and r, 10, "the ack")
    location = cluster.topology().locate("images")
    assert location.master is not None
    assert 0 <= got.pop("latency") < 60
    assert got == {
        "queue": "images",
        "keyslot": location.keyslot,
        "master": location.master.addr,
        "master_id": location.master.id,
        "replicas": [r.addr for r in location.replicas],
        "pending": 1,
        "active": 0,
        "scheduled": 1,
        "retry": 1,
        "archived": 1,
        "completed": 1,
        "paused": True,
        "processed": 1,
        "failed": 2,
        "error": None,
        "partition_of": None,
        "partition": None,
        "partitions": 0,
        "limits": {"rate": "10/s", "rate_per_second": 10.0, "burst": 1, "concurrency": 7},
        "concurrency_cap": 7,
        "hold_until": None,
    }
    assert location.master.addr.startswith(f"{HOST}:")

"""Task headers (issue 30): ``enqueue(..., headers={...})``, a small map of strings kept
in the task's record beside the payload, seen as ``task.headers`` by the handler on every
attempt, after a lost lease, in every step of a workflow and in a periodic task's
enqueues; shown by ``info()`` and ``task inspect``. Bad headers are refused in one line
with nothing written."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from clusterq import Client, Router, Task, TaskSpec, chain
from clusterq.broker.facade import Broker
from clusterq.cli import main
from clusterq.cluster.abackend import AsyncBackend
from clusterq.errors import ClusterqError
from clusterq.scheduler import Periodic, Scheduler
from clusterq.task import Record
from tests.helpers import StartWorker, await_for, running_worker, wait_for
from tests.workload import read_events

HEADERS = {"tenant": "42", "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}


def _recording() -> tuple[Router, list[tuple[str, int, dict[str, str]]]]:
    """``job`` records (its payload, its attempt, its headers); a payload starting
    with "fail" fails its first attempt."""
    seen: list[tuple[str, int, dict[str, str]]] = []
    router = Router()

    @router.task("job")
    async def job(task: Task) -> str:
        seen.append((task.payload, task.retry_count, dict(task.headers)))
        if str(task.payload).startswith("fail") and task.retry_count == 0:
            raise RuntimeError("first attempt fails")
        return "ok"

    return router, seen


def test_headers_are_written_before_the_enqueue_time_and_read_back() -> None:
    record = Record("t", b"1", enqueued_ms=5, headers={"a": "b", "é": "\n"})
    raw = record.encode()
    assert raw.startswith(b'{"t":"t","mr":25,"h":{"a":"b"')
    assert raw.split(b"\n", 1)[0].endswith(b',"e":5}')  # the scripts read e as the last
    assert Record.decode(raw) == record
    assert Record.decode(Record("t", b"1").encode()).headers is None
    for bad in (b'{"t":"t","h":[1]}\n', b'{"t":"t","h":{"a":1}}\n'):
        with pytest.raises(ValueError, match="'h' is not a map of strings"):
            Record.decode(bad)


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (["a"], "headers must be a dict of strings, got list"),
        ({"a": 1}, "header 'a' must be a string, got int"),
        ({1: "a"}, "header name '1'"),
        ({"": "a"}, "header name ''"),
        ({f"k{i}": "v" for i in range(65)}, "headers has 65 entries, more than 64"),
        ({"big": "x" * 9000}, "headers is 90.. bytes encoded, more than the limit of 8192"),
        ({"a": "\ud800"}, "headers are not valid text"),
    ],
)
def test_bad_headers_are_refused_in_one_line_and_nothing_is_written(
    standalone: Any, prefix: str, headers: Any, message: str
) -> None:
    with Client(standalone.seed_url, prefix=prefix) as client:
        with pytest.raises(ValueError, match=message) as raised:
            client.enqueue("job", 1, queue="hq", headers=headers)
        assert "\n" not in str(raised.value)
        with pytest.raises(ValueError, match=message):
            client.enqueue_many([("job", 1), ("job", 2)], queue="hq", headers=headers)
        with pytest.raises(ValueError, match=message):
            client.enqueue_many(
                [TaskSpec("job", 1, {"queue": "hq"}), TaskSpec("job", 2, {"headers": headers})]
            )
        qk = client.keys.queue("hq")
        written = client.backend.call(qk.tasks, "HLEN", qk.tasks)
    assert written == 0


def test_headers_reach_every_attempt_and_are_shown(url: str, prefix: str) -> None:
    router, seen = _recording()
    with Client(url, prefix=prefix) as client:
        one = client.enqueue(
            "job", "fail-once", queue="hq", headers=HEADERS, max_retry=3, retention=60
        )
        assert one.headers == HEADERS
        many = client.enqueue_many(
            [("job", "plain"), TaskSpec("job", "own", {"headers": {"tenant": "7"}})],
            queue="hq",
            headers={"tenant": "1"},
            retention=60,
        )
        none = client.enqueue("job", "none", queue="hq", retention=60)

        async def run() -> None:
            async with running_worker(url, router, queues=["hq"], prefix=prefix):
                await await_for(lambda: len(seen) >= 5, 30, "five attempts")

        asyncio.run(run())
        assert sorted(seen) == sorted(
            [
                ("fail-once", 0, HEADERS),
                ("fail-once", 1, HEADERS),  # the retry keeps them
                ("plain", 0, {"tenant": "1"}),
                ("own", 0, {"tenant": "7"}),  # a spec's own win
                ("none", 0, {}),
            ]
        )
        assert client.info(one.id, queue="hq").headers == HEADERS
        assert client.info(many[1].id, queue="hq").headers == {"tenant": "7"}
        assert client.info(none.id, queue="hq").headers == {}
    shown = CliRunner().invoke(
        main, ["--url", url, "--prefix", prefix, "task", "inspect", one.id, "-q", "hq", "--json"]
    )
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["headers"] == HEADERS
    table = CliRunner().invoke(
        main, ["--url", url, "--prefix", prefix, "task", "inspect", one.id, "-q", "hq"]
    )
    assert "traceparent" in table.output and "tenant" in table.output


def test_headers_survive_a_lost_lease(url: str, prefix: str) -> None:
    """A worker that took the task and died (a bare dequeue, never acked): the task
    recovered from its expired lease runs with its headers."""
    router, seen = _recording()
    with Client(url, prefix=prefix) as client:
        client.enqueue("job", "lost", queue="hl", headers=HEADERS)

    async def scenario() -> None:
        backend = await AsyncBackend.connect(url, prefix=prefix)
        try:
            got = await Broker(backend).dequeue(backend.keys.queue("hl"), 10, 300, "dead:1")
            assert len(got.tasks) == 1
            async with running_worker(url, router, queues=["hl"], prefix=prefix):
                await await_for(lambda: seen, 30, "the recovered task")
        finally:
            await backend.aclose()

    asyncio.run(scenario())
    assert seen == [("lost", 1, HEADERS)]  # the lost attempt counted as one


def test_headers_survive_a_worker_killed_mid_task(
    url: str, prefix: str, start_worker: StartWorker, log_dir: Path
) -> None:
    """kill -9 of the worker running the task: the attempt after lease recovery, in
    another worker process, has the same headers."""
    with Client(url, prefix=prefix) as client:
        info = client.enqueue("slow", {"seconds": 1.0}, headers=HEADERS)
        first = start_worker(url)
        wait_for(lambda: ("start", info.id) in read_events(log_dir), 20, "the task to start")
        first.kill()
        first.wait(timeout=10)
        start_worker(url)
        wait_for(lambda: ("done", info.id) in read_events(log_dir), 30, "the task to run again")
    noted = json.dumps(HEADERS, sort_keys=True, separators=(",", ":"))
    seen = [event for event, task_id in read_events(log_dir) if task_id == info.id]
    assert seen.count("start") == 2 and seen.count(f"hdr:{noted}") == 2


def test_workflow_headers_reach_every_step(cluster: Any, prefix: str) -> None:
    """Three steps on three queues (on different masters where the slots fall so): the
    workflow's headers reach each, a step's own header wins over the workflow's."""
    url = cluster.seed_url
    seen: dict[str, dict[str, str]] = {}
    router = Router()

    @router.task("step")
    async def step(task: Task) -> int:
        seen[task.payload] = dict(task.headers)
        return 1

    queues = ["wa", "wb", "wc"]
    flow = chain(
        TaskSpec("step", "a", {"queue": "wa"}),
        TaskSpec("step", "b", {"queue": "wb", "headers": {"tenant": "own", "x": "y"}}),
        TaskSpec("step", "c", {"queue": "wc"}),
    )
    with Client(url, prefix=prefix) as client:
        client.enqueue(flow, headers=HEADERS)

    async def run() -> None:
        async with running_worker(url, router, queues=queues, prefix=prefix):
            await await_for(lambda: len(seen) == 3, 30, "three steps")

    asyncio.run(run())
    assert seen["a"] == HEADERS and seen["c"] == HEADERS
    assert seen["b"] == {**HEADERS, "tenant": "own", "x": "y"}
    with Client(url, prefix=prefix) as client, pytest.raises(ClusterqError, match="header 'a'"):
        client.enqueue(chain(TaskSpec("step", "a", {"queue": "wa"})), headers={"a": 1})


def test_periodic_tasks_carry_their_headers(standalone: Any, prefix: str) -> None:
    url = standalone.seed_url
    entry = Periodic("h", TaskSpec("job", "tick", {"queue": "hc", "headers": HEADERS}), every=1)
    with pytest.raises(ValueError, match="header 'a' must be a string"):
        Periodic("bad", TaskSpec("job", 1, {"headers": {"a": 2}}), every=1)

    async def scenario() -> list[str]:
        scheduler = Scheduler(url, [entry], prefix=prefix, lease=1, name="only")
        serving = asyncio.create_task(scheduler.serve())
        with Client(url, prefix=prefix) as client:
            qk = client.keys.queue("hc")
            ids = await await_for(
                lambda: asyncio.to_thread(
                    lambda: client.backend.call(qk.pending, "LRANGE", qk.pending, 0, -1)
                ),
                20,
                "a periodic task",
            )
            infos = [client.info(i.decode(), queue="hc") for i in ids]
        scheduler.stop()
        await serving
        return [json.dumps(info.headers) for info in infos]

    shown = asyncio.run(scenario())
    assert shown and all(json.loads(h) == HEADERS for h in shown)

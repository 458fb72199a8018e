"""Progress (issue 30): ``task.progress(0.4, {"rows": 4000})`` from an async or a plain
``def`` handler, seen by ``client.info()`` and ``task inspect`` while the task runs; a
report from an attempt that lost its lease is refused."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest
from click.testing import CliRunner

from clusterq import Client, Router, Task
from clusterq.broker import progress as progress_script
from clusterq.broker.facade import Broker
from clusterq.cli import main
from clusterq.cluster.abackend import AsyncBackend
from clusterq.progress import decode_progress, encode_progress
from clusterq.task import TaskState
from tests.helpers import await_for, running_worker


def test_a_report_reads_back_and_bad_ones_are_refused_in_one_line() -> None:
    raw = encode_progress(0.25, {"rows": 4000}, "w:1:2")
    back = decode_progress(raw)
    assert back is not None
    assert (back.fraction, back.data, back.attempt) == (0.25, {"rows": 4000}, "w:1:2")
    assert decode_progress(encode_progress(1, None, "a")).fraction == 1.0  # type: ignore[union-attr]
    for bad, message in (
        (-0.1, "from 0 to 1"),
        (1.5, "from 0 to 1"),
        (float("nan"), "from 0 to 1"),
        (True, "from 0 to 1"),
        ("half", "from 0 to 1"),
    ):
        with pytest.raises(ValueError, match=message):
            encode_progress(bad, None, "a")
    with pytest.raises(ValueError, match="must be a dict"):
        encode_progress(0.5, [1], "a")
    with pytest.raises(ValueError, match="must be JSON"):
        encode_progress(0.5, {"x": object()}, "a")
    with pytest.raises(ValueError, match=r"progress data is 5\d+ bytes"):
        encode_progress(0.5, {"x": "y" * 5000}, "a")
    for foreign in (b"nope", b"[1]", b'{"f":"x","at":1,"k":"a","d":null}', b"\xff"):
        assert decode_progress(foreign) is None
    with pytest.raises(RuntimeError, match="only in a handler"):
        Task("i", "t", None, "q").progress(0.5)


def _held_handlers() -> tuple[Router, dict[str, threading.Event]]:
    """``async-job`` and ``sync-job`` report 0.4 and wait until the test lets them go."""
    router = Router()
    release = {"async": threading.Event(), "sync": threading.Event()}

    @router.task("async-job")
    async def async_job(task: Task) -> None:
        task.progress(0.4, {"rows": 4000, "kind": "async"})
        await asyncio.to_thread(release["async"].wait, 30)
        task.progress(1.0)

    @router.task("sync-job")
    def sync_job(task: Task) -> None:
        task.progress(0.4, {"rows": 4000, "kind": "sync"})
        release["sync"].wait(30)
        task.progress(1.0)

    return router, release


def test_progress_of_a_running_task_is_seen_by_info_and_inspect(url: str, prefix: str) -> None:
    router, release = _held_handlers()
    with Client(url, prefix=prefix) as client:
        tasks = {
            kind: client.enqueue(f"{kind}-job", None, queue="prog", retention=60)
            for kind in ("async", "sync")
        }

        async def scenario() -> None:
            async with running_worker(url, router, queues=["prog"], prefix=prefix):
                for kind, info in tasks.items():
                    seen = await await_for(
                        lambda i=info: asyncio.to_thread(
                            lambda: client.info(i.id, queue="prog").progress
                        ),
                        30,
                        f"the {kind} handler's progress",
                    )
                    assert (seen.fraction, seen.data) == (0.4, {"rows": 4000, "kind": kind})
                    now = client.info(info.id, queue="prog")
                    assert now.state is TaskState.ACTIVE
                    shown = CliRunner().invoke(
                        main,
                        ["--url", url, "--prefix", prefix, "task", "inspect", info.id,
                         "-q", "prog", "--json"],
                    )  # fmt: skip
                    assert json.loads(shown.output)["progress"]["fraction"] == 0.4
                    release[kind].set()
                for info in tasks.values():
                    await await_for(
                        lambda i=info: asyncio.to_thread(
                            lambda: client.info(i.id, queue="prog").state is TaskState.COMPLETED
                        ),
                        30,
                        "completed",
                    )

        asyncio.run(scenario())
        for info in tasks.values():
            final = client.info(info.id, queue="prog").progress
            assert final is not None and final.fraction == 1.0  # kept after it completed


def test_a_report_from_an_attempt_that_lost_its_lease_is_refused(url: str, prefix: str) -> None:
    """A worker took the task and went silent (a bare dequeue, never acked); the task,
    recovered, runs again elsewhere and reports 0.7: the first attempt's late report is
    refused and the second's stays."""
    router = Router()
    release = threading.Event()
    attempts: list[str] = []

    @router.task("job")
    async def job(task: Task) -> None:
        attempts.append(task.attempt)
        task.progress(0.7)
        await asyncio.to_thread(release.wait, 30)

    with Client(url, prefix=prefix) as client:
        info = client.enqueue("job", None, queue="lost")

        async def scenario() -> bool:
            backend = await AsyncBackend.connect(url, prefix=prefix)
            try:
                qk = backend.keys.queue("lost")
                old_token = "dead:1"
                got = await Broker(backend).dequeue(qk, 1, 300, old_token)
                assert len(got.tasks) == 1
                async with running_worker(url, router, queues=["lost"], prefix=prefix):
                    await await_for(
                        lambda: asyncio.to_thread(
                            lambda: client.info(info.id, queue="lost").progress
                        ),
                        30,
                        "the second attempt's report",
                    )
                    keys, args = progress_script.build(
                        qk, info.id, old_token, encode_progress(0.1, None, old_token)
                    )
                    reply = await backend.run_script(progress_script.SCRIPT, qk.slot, keys, args)
                    late = progress_script.parse(reply)
                    release.set()
                return late
            finally:
                await backend.aclose()

        late = asyncio.run(scenario())
    assert late is False
    assert len(attempts) == 1


def test_a_progress_key_holding_foreign_data_breaks_nothing(standalone: Any, prefix: str) -> None:
    with Client(standalone.seed_url, prefix=prefix) as client:
        info = client.enqueue("job", 1, queue="pf")
        key = client.keys.queue("pf").progress(info.id)
        client.backend.call(key, "HSET", key, "x", "y")
        assert client.info(info.id, queue="pf").progress is None
        client.backend.call(key, "DEL", key)
        client.backend.call(key, "SET", key, "not json")
        assert client.info(info.id, queue="pf").progress is None


def test_progress_reports_are_lifecycle_events_when_events_are_on(
    standalone: Any, prefix: str
) -> None:
    url = standalone.seed_url
    router = Router()

    @router.task("job")
    def job(task: Task) -> None:
        task.progress(0.25, {"rows": 1})

    with Client(url, prefix=prefix) as client:
        client.set_events("pe", True)
        info = client.enqueue("job", None, queue="pe")

        async def run() -> None:
            async with running_worker(url, router, queues=["pe"], prefix=prefix):
                await await_for(
                    lambda: any(e.event == "succeeded" for e in client.events("pe")), 30, "done"
                )

        asyncio.run(run())
        events = [(e.event, e.progress) for e in client.events("pe", task_id=info.id)]
    assert events == [
        ("enqueued", None),
        ("started", None),
        ("progress", 0.25),
        ("succeeded", None),
    ]
    shown = CliRunner().invoke(main, ["--url", url, "--prefix", prefix, "events", "pe"])
    assert "progress 25%" in shown.output, shown.output

"""``clusterq dash``, driven as a person would with Textual's pilot: it shows the queues
grouped by master, opens a queue's tasks and acts on them, and keeps updating while a
master is killed, showing the failover."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable

from clusterq import Client, TaskState
from clusterq.ops.admin import Admin
from clusterq.ops.dash import Dashboard, QueueScreen
from clusterq.producer import TaskSpec
from clusterq.tools.devcluster import LocalCluster

SIZE = (180, 50)


async def _until(pilot: Pilot[Any], check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Let the app run until ``check()`` is truthy (the pilot's own clock)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await pilot.pause(0.05)


def _cell(app: Dashboard, queue: str, column: int) -> str:
    table = app.query_one("#queues", DataTable)
    return str(table.get_row_at(app.queue_rows.index(queue))[column])


def test_the_dashboard_lists_queues_and_acts_on_tasks(
    url: str, prefix: str, tmp_path: Path
) -> None:
    with Client(url, prefix=prefix) as client:
        client.enqueue_many([("a", i) for i in range(4)], queue="images")
        parked = [
            info.id
            for info in client.enqueue_many(
                [TaskSpec("b", i, {"queue": "webhooks", "process_in": 600}) for i in range(3)]
            )
        ]
    admin = Admin(url, prefix=prefix, timeout=1.0)
    app = Dashboard(admin, interval=0.2)
    untouched: list[str] = []

    async def drive() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await _until(
                pilot, lambda: {"images", "webhooks"} <= set(app.queue_rows), 15, "the queues"
            )
            assert _cell(app, "images", 3) == "4"  # pending
            assert _cell(app, "webhooks", 5) == "3"  # scheduled
            master = admin.topology.locate("images").master
            assert master is not None and _master_shown_above(app, "images", master.addr)

            # what a person sees: both queues on the screen (exported as SVG)
            def both_shown() -> str | None:
                shot = app.export_screenshot()
                return shot if "webhooks" in shot and "images" in shot else None

            svg = await _until(pilot, both_shown, 10, "both queues on the screen")
            (tmp_path / "dash.svg").write_text(svg)
            # open webhooks, show its scheduled tasks, run the first one now
            app.query_one("#queues", DataTable).move_cursor(row=app.queue_rows.index("webhooks"))
            await pilot.press("enter")
            screen = await _until(
                pilot,
                lambda: isinstance(app.screen, QueueScreen) and app.screen,
                5,
                "the queue screen",
            )
            await pilot.press("s")
            await _until(pilot, lambda: len(screen.ids) == 3, 10, "the scheduled tasks")
            first = screen.ids[0]
            await pilot.press("r")
            await _until(pilot, lambda: len(screen.ids) == 2, 10, "the list without it")
            assert client_state(url, prefix, first) == TaskState.PENDING
            deleted = screen.ids[0]
            await pilot.press("d")  # delete the next one
            await _until(pilot, lambda: len(screen.ids) == 1, 10, "one left")
            untouched.extend(set(parked) - {first, deleted})
            await pilot.press("escape")
            await _until(pilot, lambda: not isinstance(app.screen, QueueScreen), 5, "back")

    asyncio.run(drive())
    admin.close()
    svg = (tmp_path / "dash.svg").read_text()
    assert "webhooks" in svg and "images" in svg
    [left] = untouched
    assert client_state(url, prefix, left) == TaskState.SCHEDULED  # not touched


def _master_shown_above(app: Dashboard, queue: str, addr: str) -> bool:
    """Rows of one master show its address on the first row only."""
    table = app.query_one("#queues", DataTable)
    for row in range(app.queue_rows.index(queue), -1, -1):
        shown = table.get_row_at(row)[0].plain
        if shown:
            return bool(shown == addr)
    return False


def client_state(url: str, prefix: str, task_id: str) -> TaskState:
    with Client(url, prefix=prefix) as client:
        return client.info(task_id, queue="webhooks").state


@pytest.mark.slow
def test_the_dashboard_keeps_updating_through_a_failover_and_shows_it(
    fresh_cluster: Callable[[], LocalCluster], prefix: str
) -> None:
    cluster = fresh_cluster()
    url = cluster.seed_url
    with Client(url, prefix=prefix) as client:
        for queue in ("images", "webhooks", "notifications"):
            client.enqueue("x", queue=queue)
    admin = Admin(url, prefix=prefix, timeout=1.0)
    old = admin.topology.locate("images").master
    assert old is not None
    app = Dashboard(admin, interval=0.3)

    async def drive() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await _until(pilot, lambda: "images" in app.queue_rows, 15, "the queues")
            cluster.kill_node(old.port)
            killed = time.time()
            # it keeps refreshing while the master is down (other queues stay readable)
            await _until(
                pilot,
                lambda: (
                    app.snapshot.at > killed + 1
                    and any(q.queue == "webhooks" and not q.error for q in app.snapshot.queues)
                ),
                20,
                "refreshes during the outage",
            )
            await _until(
                pilot,
                lambda: any("images" in e and "changed from" in e for e in app.events_seen),
                60,
                "the failover in the events",
            )
            new = admin.topology.locate("images").master
            assert new is not None and new.addr != old.addr
            await _until(
                pilot,
                lambda: (
                    _master_shown_above(app, "images", new.addr)
                    and not _cell(app, "images", 3).startswith("error")
                ),
                20,
                "the new master in the table",
            )
            assert _cell(app, "images", 3) == "1"

    asyncio.run(drive())
    admin.close()


def test_the_dashboard_shows_each_queues_limits_and_a_foreign_limits_key(
    url: str, prefix: str
) -> None:
    """The Limits column: a queue's declared limits, ``-`` without; a limits key holding
    what clusterq does not write is that row's error, the others still shown."""
    with Client(url, prefix=prefix) as client:
        for queue in ("images", "webhooks", "broken"):
            client.enqueue("x", queue=queue)
        client.set_limits("images", rate="200/s", burst=20, concurrency=5)
        key = client.keys.queue("broken").limits
        client.backend.execute_key(key, lambda c: c.set(key, "foreign"))
    admin = Admin(url, prefix=prefix, timeout=1.0)
    app = Dashboard(admin, interval=0.2)

    async def drive() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await _until(
                pilot,
                lambda: {"images", "webhooks", "broken"} <= set(app.queue_rows),
                15,
                "the queues",
            )
            table = app.query_one("#queues", DataTable)
            limits = [str(c.label) for c in table.columns.values()].index("Limits")
            assert _cell(app, "images", limits) == "200/s b20 · max 5"
            assert _cell(app, "webhooks", limits) == "-"
            assert _cell(app, "broken", 3).startswith(f"error: {key}")
            assert len(table.get_row_at(app.queue_rows.index("broken"))) == len(table.columns)

    asyncio.run(drive())
    admin.close()

"""``clusterq web``, what runs (issue 29): the workers (and the queues no live worker
serves), the periodic entries, the streams, the partitioned queues and a workflow's
steps, against the session's real servers with Starlette's test client. What each page
shows is compared with what the admin API reads at the same time."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import redis
from starlette.testclient import TestClient

from clusterq import (
    Admin,
    Client,
    Periodic,
    Router,
    SkipRetry,
    Task,
    TaskSpec,
    Worker,
    chain,
    group,
)
from clusterq.ops.croninfo import cron_history, cron_status
from clusterq.ops.web import create_app
from clusterq.ops.web.runtime import GRAPH_STEPS, depths, skew, workflow_svg
from clusterq.scheduler import Scheduler
from clusterq.tools import servers
from clusterq.tools.devcluster import LocalServer
from clusterq.workflow import StepInfo
from tests.helpers import FAST, await_for, running_worker, wait_for

EVIL = "<script>alert(1)</script>"
PAGES = ("/workers", "/cron", "/streams", "/partitions", "/workflow")


class _Page(HTMLParser):
    """Every element's attributes (``elements``), the links and forms' targets, and how
    many script tags were seen."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.links: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        self.elements.append((tag, found))
        self.links += [found[name] for name in ("href", "action") if name in found]
        self.scripts += tag == "script"

    def having(self, attribute: str) -> dict[str, dict[str, str]]:
        """The elements with ``attribute``, by its value (the first of each value)."""
        out: dict[str, dict[str, str]] = {}
        for _, attrs in self.elements:
            if attribute in attrs:
                out.setdefault(attrs[attribute], attrs)
        return out


def _parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    return page


@pytest.fixture
def http(url: str, prefix: str) -> Iterator[TestClient]:
    with TestClient(create_app(url, prefix=prefix)) as client:
        yield client


@pytest.fixture
def admin(url: str, prefix: str) -> Iterator[Admin]:
    with Admin(url, prefix=prefix) as opened:
        yield opened


def _get(http: TestClient, path: str, **params: str) -> _Page:
    page = http.get(path, params=params)
    assert page.status_code == 200, page.text[-2000:]
    parsed = _parse(page.text)
    assert EVIL not in page.text and parsed.scripts == 0  # names stay text
    return parsed


# ---------------------------------------------------------------------- workers


def test_workers_are_listed_and_queues_nobody_serves_are_flagged(
    url: str, prefix: str, http: TestClient, admin: Admin
) -> None:
    router = Router()

    @router.task("noop")
    async def noop(task: Task) -> None:
        return None

    with Client(url, prefix=prefix) as client:
        client.declare_queue("orders", 3)
        for name in ("forgotten", EVIL, "served"):
            client.enqueue("noop", None, queue=name)
        client.enqueue("noop", None, queue="orders")

    async def scenario() -> tuple[_Page, Any, list[str]]:
        async with running_worker(
            url, router, queues=["served", "orders"], prefix=prefix, concurrency=3
        ) as worker:
            live = await asyncio.to_thread(
                wait_for,
                lambda: [w for w in admin.workers() if w.id == worker.id],
                10,
                "the worker's announcement",
            )
            page = await asyncio.to_thread(_get, http, "/workers")
            names = await asyncio.to_thread(admin.queue_names)
            return page, live[0], names

    page, announced, names = asyncio.run(scenario())
    workers = page.having("data-worker")
    assert set(workers) == {announced.id}
    row = workers[announced.id]
    assert row["data-queues"].split() == sorted(announced.queues) == ["orders", "served"]
    assert int(row["data-concurrency"]) == announced.concurrency == 3
    layout = admin.layouts()["orders"]
    served = {"served", *layout.members}
    unserved = {
        attrs["data-queue"]: attrs
        for tag, attrs in page.elements
        if tag == "tr" and "unserved" in attrs.get("class", "")
    }
    assert set(unserved) == set(names) - served >= {"forgotten", EVIL}
    for name in ("forgotten", EVIL):
        info = admin.queue(name)
        assert int(unserved[name]["data-waiting"]) == info.pending + info.scheduled + info.retry
        assert int(unserved[name]["data-waiting"]) > 0
    assert not set(unserved) & set(layout.members)  # served through the logical name


def test_each_process_of_a_supervised_worker_is_a_row(
    url: str, prefix: str, http: TestClient, admin: Admin
) -> None:
    """The processes of ``worker run --processes N`` announce themselves each, labelled
    with their supervisor and number (as clusterq/worker/child.py labels them)."""
    router = Router()

    @router.task("noop")
    async def noop(task: Task) -> None:
        return None

    with Client(url, prefix=prefix) as client:
        client.enqueue("noop", None, queue="procs")

    async def scenario() -> tuple[_Page, list[Any]]:
        workers = [Worker(url, router, queues=["procs"], prefix=prefix, **FAST) for _ in range(2)]
        for index, worker in enumerate(workers):
            worker.labels.update(supervisor=f"sup-{prefix}", process=index)
        for worker in workers:
            await worker.start()
        try:
            ids = {w.id for w in workers}
            live = await asyncio.to_thread(
                wait_for,
                lambda: len([w for w in admin.workers() if w.id in ids]) == 2 and admin.workers(),
                10,
                "both announcements",
            )
            page = await asyncio.to_thread(_get, http, "/workers")
        finally:
            for worker in workers:
                await worker.stop()
        return page, live

    page, live = asyncio.run(scenario())
    rows = page.having("data-worker")
    assert set(rows) == {w.id for w in live}
    for w in live:
        assert rows[w.id]["data-supervisor"] == w.supervisor == f"sup-{prefix}"
        assert rows[w.id]["data-process"] == str(w.process)
    assert sorted(w.process for w in live if w.process is not None) == [0, 1]
    assert "procs" in admin.queue_names() and "procs" not in page.having("data-queue")


def test_without_workers_every_queue_with_tasks_is_flagged(
    url: str, prefix: str, http: TestClient, admin: Admin
) -> None:
    with Client(url, prefix=prefix) as client:
        client.enqueue("noop", None, queue="alone")
        client.register_queues(["empty"])
    page = http.get("/workers")
    assert page.status_code == 200
    assert "No live worker" in page.text
    flagged = re.findall(
        r'<tr class="unserved" data-queue="([^"]*)" data-waiting="(\d+)">.*?</tr>', page.text, re.S
    )
    assert {name: int(n) for name, n in flagged} == {
        q.queue: q.pending for q in admin.queues(admin.queue_names())
    }
    alone = re.search(r'data-queue="alone".*?</tr>', page.text, re.S)
    empty = re.search(r'data-queue="empty".*?</tr>', page.text, re.S)
    assert alone and "tasks waiting, no worker" in alone.group(0)
    assert empty and "tasks waiting, no worker" not in empty.group(0)


# ---------------------------------------------------------------------- streams


def test_streams_show_each_partition_and_group_as_the_inspector_reads_them(
    url: str, prefix: str, http: TestClient, admin: Admin
) -> None:
    seen: list[Any] = []
    router = Router()

    @router.consumer("clicks", group="billing")
    async def billing(event: Any) -> None:
        seen.append(event)

    @router.consumer("clicks", group="audit", max_deliveries=1)
    async def audit(event: Any) -> None:
        if event.payload == {"n": 3}:
            raise RuntimeError("cannot audit this")

    with Client(url, prefix=prefix) as client:
        client.declare_stream("clicks", 3)
        client.declare_stream(EVIL, 1)
        for n in range(7):
            client.publish("clicks", {"n": n}, key=f"user-{n}")
        client.publish(EVIL, EVIL)

    async def scenario() -> None:
        async with running_worker(url, router, queues=["stream-side"], prefix=prefix, lease=0.3):
            await await_for(lambda: len(seen) >= 7, 15, "the group read every event")

            def settled() -> bool:
                """Both groups on every partition, every event acked by both, and the
                event that failed once in a dead-letter stream."""
                parts = admin.streams(["clicks"])
                acked = all(g.pending == 0 and g.lag == 0 for p in parts for g in p.groups)
                both = all(len(p.groups) == 2 for p in parts)
                return acked and both and sum(p.dead for p in parts) == 1

            await await_for(lambda: asyncio.to_thread(settled), 15, "acks and the dead letter")

    asyncio.run(scenario())
    page = http.get("/streams")
    assert page.status_code == 200 and EVIL not in page.text and _parse(page.text).scripts == 0
    tables = dict(
        re.findall(r'<table class="stream" data-stream="([^"]*)">(.*?)</table>', page.text, re.S)
    )
    assert set(tables) == {"clicks", "&lt;script&gt;alert(1)&lt;/script&gt;"}
    read = admin.streams()
    assert {p.stream for p in read} == {"clicks", EVIL}
    shown = _parse(tables["clicks"]).having("data-partition")
    clicks = [p for p in read if p.stream == "clicks"]
    assert len(shown) == len(clicks) == 3
    for p in clicks:
        row = shown[str(p.partition)]
        assert int(row["data-keyslot"]) == p.keyslot
        assert row["data-master"] == (p.master or "-")
        assert int(row["data-length"]) == p.length
        assert int(row["data-dead"]) == p.dead
    assert sum(p.length for p in clicks) == 7 and sum(p.dead for p in clicks) == 1
    groups = [a for _, a in _parse(tables["clicks"]).elements if "data-group" in a]
    assert [(g["data-group"], g["data-pending"], g["data-lag"]) for g in groups] == [
        (g.group, str(g.pending), str(g.lag)) for p in clicks for g in p.groups
    ]
    assert {g["data-group"] for g in groups} == {"billing", "audit"}


# ---------------------------------------------------------------------- partitions


def test_partitions_show_where_each_partition_lives_and_the_skew(
    url: str, prefix: str, http: TestClient, admin: Admin
) -> None:
    with Client(url, prefix=prefix) as client:
        client.declare_queue("orders", 3)
        for n in range(7):
            client.enqueue("noop", n, queue="orders")
        client.declare_queue(EVIL, 2)

    def check(http: TestClient, admin: Admin) -> _Page:
        page = http.get("/partitions")
        assert page.status_code == 200 and EVIL not in page.text
        tables = dict(
            re.findall(r'<table class="layout" data-queue="([^"]*)">(.*?)</table>', page.text, re.S)
        )
        assert set(tables) == {"orders", "&lt;script&gt;alert(1)&lt;/script&gt;"}
        layout = admin.layouts()["orders"]
        infos = {q.queue: q for q in admin.queues(layout.members)}
        parsed = _parse(tables["orders"])
        rows = parsed.having("data-member")
        assert list(rows) == [*layout.queues, *layout.draining]
        for member, row in rows.items():
            assert row["data-role"] == ("current" if member in layout.queues else "draining")
            assert int(row["data-keyslot"]) == infos[member].keyslot
            assert row["data-master"] == (infos[member].master or "-")
            assert int(row["data-pending"]) == infos[member].pending
        pending = [infos[m].pending for m in layout.queues]
        expected = skew(pending)
        marks = parsed.having("data-skew")
        if expected is None:
            assert not marks
        else:
            assert math.isclose(float(next(iter(marks))), expected, abs_tol=1e-3)
            assert math.isclose(expected, max(pending) / (sum(pending) / len(pending)))
        return parsed

    check(http, admin)
    with Client(url, prefix=prefix) as client:
        client.declare_queue("orders", 2)  # the three partitions of the first layout drain
    # a new app and admin: both keep the layouts they read for a few seconds
    with TestClient(create_app(url, prefix=prefix)) as again, Admin(url, prefix=prefix) as fresh:
        assert len(fresh.layouts()["orders"].draining) == 3
        parsed = check(again, fresh)
    assert sum(a.get("data-role") == "draining" for _, a in parsed.elements) == 3


def test_skew_is_the_largest_over_the_mean() -> None:
    assert skew([]) is None and skew([0, 0]) is None
    assert skew([1, 1, 1]) == 1.0 and skew([6, 0, 0]) == 3.0


# ---------------------------------------------------------------------- workflows


def _workflow_router() -> Router:
    router = Router()

    @router.task("value")
    async def value(task: Task) -> Any:
        return task.payload

    @router.task("add")
    async def add(task: Task) -> int:
        return sum(task.parent_results or []) + int(task.payload or 0)

    @router.task("bad")
    async def bad(task: Task) -> None:
        raise SkipRetry("broken <b>step</b>")

    return router


def _spec(task_type: str, payload: Any = None, queue: str = "wf-a") -> TaskSpec:
    return TaskSpec(task_type, payload, {"queue": queue})


def _check_workflow_page(http: TestClient, admin: Admin, workflow_id: str) -> _Page:
    page = _get(http, "/workflow", id=workflow_id)
    info = admin.workflow(workflow_id)
    status = page.having("data-status")
    assert list(status) == [info.status]
    rows = {a["data-step"]: a for t, a in page.elements if t == "tr" and "data-step" in a}
    boxes = {a["data-step"]: a for t, a in page.elements if t == "g" and "data-step" in a}
    assert set(rows) == set(boxes) == {s.id for s in info.steps}
    for step in info.steps:
        assert rows[step.id]["data-state"] == boxes[step.id]["data-state"] == step.state
        assert rows[step.id]["data-deps"] == (", ".join(step.deps) or "-")
    arrows = {(a["data-from"], a["data-to"]) for t, a in page.elements if t == "line"}
    assert arrows == {(dep, s.id) for s in info.steps for dep in s.deps}
    return page


def test_a_workflow_shows_each_step_its_state_and_deps(
    url: str, prefix: str, http: TestClient, admin: Admin
) -> None:
    good = chain(
        _spec("value", 1),
        group(_spec("add", 10, "wf-b"), _spec("add", 100)),
        _spec("add", 0, "wf-b"),
    )
    broken = chain(_spec("value", 1), _spec("bad"), _spec("add", 1))

    async def scenario() -> tuple[str, str]:
        async with running_worker(url, _workflow_router(), queues=["wf-a", "wf-b"], prefix=prefix):
            with Client(url, prefix=prefix) as client:
                ok, failed = client.enqueue(good), client.enqueue(broken)
                assert await asyncio.to_thread(client.result, ok, timeout=20) == 112

                def ended() -> bool:
                    return client.info(failed).status == "failed"

                await await_for(lambda: asyncio.to_thread(ended), 20, "the failure")
                return ok.id, failed.id

    ok, failed = asyncio.run(scenario())
    page = _check_workflow_page(http, admin, ok)
    info = admin.workflow(ok)
    assert [s.state for s in info.steps] == ["done"] * 4
    assert {s.id: s.deps for s in info.steps} == {
        "0": (), "1.0": ("0",), "1.1": ("0",), "2": ("1.0", "1.1")
    }  # fmt: skip
    assert {s.id: s.result for s in info.steps} == {"0": 1, "1.0": 11, "1.1": 101, "2": 112}
    assert [a["data-step"] for t, a in page.elements if t == "tr" and "data-step" in a] == [
        "0", "1.0", "1.1", "2"
    ]  # by depth  # fmt: skip
    html = http.get("/workflow", params={"id": ok}).text
    assert 'id="workflow-result">112<' in html
    page = _check_workflow_page(http, admin, failed)
    info = admin.workflow(failed)
    assert [s.state for s in info.steps] == ["done", "failed", "skipped"]
    html = http.get("/workflow", params={"id": failed}).text
    assert "broken &lt;b&gt;step&lt;/b&gt;" in html and "<b>step" not in html


def test_a_running_workflow_with_a_script_for_a_type_stays_text(
    url: str, prefix: str, http: TestClient, admin: Admin
) -> None:
    with Client(url, prefix=prefix) as client:  # no worker: the first step stays enqueued
        handle = client.enqueue(chain(_spec(EVIL), _spec("value", EVIL, EVIL)))
    _check_workflow_page(http, admin, handle.id)
    assert [s.state for s in admin.workflow(handle.id).steps] == ["enqueued", "waiting"]


def test_a_large_workflow_is_a_table_without_a_graph(
    url: str, prefix: str, http: TestClient, admin: Admin
) -> None:
    with Client(url, prefix=prefix) as client:  # no worker: every step stays enqueued
        handle = client.enqueue(group(*[_spec("value", n) for n in range(GRAPH_STEPS + 1)]))
    html = http.get("/workflow", params={"id": handle.id}).text
    page = _parse(html)
    rows = [a["data-step"] for t, a in page.elements if t == "tr" and "data-step" in a]
    assert sorted(rows) == sorted(s.id for s in admin.workflow(handle.id).steps)
    assert len(rows) == GRAPH_STEPS + 1 and "<svg" not in html and "Too many steps" in html


def test_chromium_draws_the_workflow_graph(
    standalone: LocalServer, prefix: str, tmp_path: Path
) -> None:
    """The page with its SVG, as a browser builds it: every step a box, every dep an
    arrow, and the script in a step's type text."""
    import threading

    import uvicorn

    from tests.test_web import _browse, _chromium

    chromium = _chromium()
    url = standalone.seed_url
    with Client(url, prefix=prefix) as client:
        handle = client.enqueue(chain(_spec(EVIL), group(_spec("a"), _spec("b")), _spec("c")))
    port = servers.find_free_ports(1, with_bus=False)
    server = uvicorn.Server(
        uvicorn.Config(create_app(url, prefix=prefix), port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), 30, "uvicorn")
        assert server.started, "uvicorn did not start"
        dom = _browse(chromium, f"http://127.0.0.1:{port}/workflow?id={handle.id}", "--dump-dom")
    finally:
        server.should_exit = True
        thread.join(10)
    page = _parse(dom)
    assert page.scripts == 0
    with Admin(url, prefix=prefix) as admin:
        info = admin.workflow(handle.id)
    boxes = {a["data-step"]: a["data-state"] for t, a in page.elements if t == "g"}
    assert boxes == {s.id: s.state for s in info.steps}
    arrows = {(a["data-from"], a["data-to"]) for t, a in page.elements if t == "line"}
    assert arrows == {(d, s.id) for s in info.steps for d in s.deps}
    assert len(arrows) == 4  # 0 -> 1.0, 0 -> 1.1, 1.0 -> 2, 1.1 -> 2


def test_a_missing_workflow_is_a_404_naming_it(http: TestClient) -> None:
    page = http.get("/workflow", params={"id": "nope-42"})
    assert page.status_code == 404 and "no workflow &#39;nope-42&#39;" in page.text
    page = http.get("/workflow", params={"id": EVIL})
    assert page.status_code == 404 and EVIL not in page.text
    page = http.get("/workflow", params={"id": "has {braces}"})
    assert page.status_code == 404 and "has {braces}" in page.text
    form = http.get("/workflow")
    assert form.status_code == 200 and 'action="/workflow"' in form.text


def test_the_graph_puts_each_step_a_column_after_its_deepest_dep() -> None:
    steps = [
        StepInfo("a", "t", "q", "done", "wf:x:a"),
        StepInfo("b", EVIL, "q", "failed", "wf:x:b", error=EVIL, deps=("a",)),
        StepInfo("c", "t", "q", "waiting", "wf:x:c", deps=("a", "b", "gone")),
        StepInfo("d", "t", "q", "waiting", "wf:x:d", deps=("d", "e")),
        StepInfo("e", "t", "q", "waiting", "wf:x:e", deps=("d",)),  # a cycle: cut
    ]
    assert depths(steps)[:3] == [0, 1, 2]
    svg = workflow_svg(steps)
    assert EVIL not in svg and "&lt;script&gt;" in svg
    xs = dict(re.findall(r'data-step="(\w)"[^>]*><title>[^<]*</title><rect x="([\d.]+)"', svg))
    assert float(xs["a"]) < float(xs["b"]) < float(xs["c"])


# ---------------------------------------------------------------------- cron


def test_cron_shows_the_entries_the_leader_and_the_latest_firings(
    url: str, prefix: str, http: TestClient, admin: Admin
) -> None:
    entries = [Periodic("tick", TaskSpec("cron:tick", None, {"queue": EVIL}), every=1)]
    backend = admin.backend

    async def scenario() -> tuple[Any, str, Any]:
        scheduler = Scheduler(url, entries, prefix=prefix, lease=5, name="only")
        serving = asyncio.create_task(scheduler.serve())
        try:
            await await_for(
                lambda: asyncio.to_thread(lambda: len(cron_history(backend, "tick", 10)) >= 2),
                20,
                "two firings",
            )
            before = await asyncio.to_thread(cron_status, backend)
            page = await asyncio.to_thread(http.get, "/cron")
            after = await asyncio.to_thread(cron_status, backend)
        finally:
            scheduler.stop()
            await serving
        return before, page.text, after

    before, html, after = asyncio.run(scenario())
    assert EVIL not in html and _parse(html).scripts == 0
    page = _parse(html)
    assert before[0] is not None and before[0].startswith("only:") and before[0] == after[0]
    assert list(page.having("data-leader")) == [before[0]]
    [row] = page.having("data-entry").values()
    [was], [now] = before[1], after[1]
    assert row["data-entry"] == "tick" and row["data-queue"] == EVIL
    assert was.last_tick is not None and now.last_tick is not None
    assert was.last_tick <= float(row["data-last"]) <= now.last_tick
    assert was.next_tick is not None and now.next_tick is not None
    assert was.next_tick <= float(row["data-next"]) <= now.next_tick
    shown = [a["data-task"] for t, a in page.elements if t == "tr" and "data-task" in a]
    fired = {f["task_id"] for f in cron_history(backend, "tick", 100)}
    assert 2 <= len(shown) <= 5 and set(shown) <= fired
    # the scheduler gave up the lead on the way out
    assert "none (no scheduler leads)" in http.get("/cron").text


# ---------------------------------------------------------------------- every page


def test_every_page_is_in_the_nav_and_links_under_the_root_path(url: str, prefix: str) -> None:
    with TestClient(create_app(url, prefix=prefix, read_only=True), root_path="/q") as http:
        for path in PAGES:
            page = http.get(path)
            assert page.status_code == 200
            parsed = _parse(page.text)
            assert parsed.links and all(link.startswith("/q/") for link in parsed.links)
            assert all(f'href="/q{p}"' in page.text for p in PAGES)
            assert "<button" not in page.text or path == "/workflow"  # the id form only


def test_a_server_that_died_is_a_message_on_each_page(
    server_bin: Path, tmp_path: Path, prefix: str
) -> None:
    port = servers.find_free_ports(1, with_bus=False)
    server = LocalServer(port, tmp_path / "doomed", server_bin=server_bin, die_with_parent=True)
    server.start()
    try:
        app = create_app(server.seed_url, prefix=prefix)
    finally:
        server.stop()
    with TestClient(app) as http:  # each read retries for a few seconds: three pages
        for path in ("/workers", "/partitions"):
            page = http.get(path)
            assert page.status_code == 200 and "n/a (" in page.text, path
        page = http.get("/workflow", params={"id": "w1"})
        assert page.status_code == 200 and "n/a (" in page.text


def test_an_acl_refusal_is_a_message_on_each_page(standalone: LocalServer, prefix: str) -> None:
    """A user that may not read hashes (HGETALL refused) sees ``n/a (ACL)``."""
    user = f"web-{prefix}"
    node = redis.Redis(port=standalone.port)
    node.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "&*", "+@all", "-hgetall")
    try:
        url = f"redis://{user}:pw@127.0.0.1:{standalone.port}"
        with TestClient(create_app(url, prefix=prefix)) as http:
            for path in PAGES[:4]:
                page = http.get(path)
                assert page.status_code == 200 and "n/a (ACL)" in page.text, path
            page = http.get("/workflow", params={"id": "w1"})
            assert page.status_code == 200 and "n/a (ACL)" in page.text
    finally:
        node.execute_command("ACL", "DELUSER", user)
        node.close()

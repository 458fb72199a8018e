"""``clusterq web`` task pages (issue 29): one task with its actions, a queue's tasks by
state with bulk actions, and search, against the session's real servers over HTTP
(Starlette's test client) and once in Debian's headless Chromium. What the pages show
is compared with what the admin API says; each action is checked through ``Inspector``."""

from __future__ import annotations

import asyncio
import html
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from clusterq import Admin, Client, Router, Task, TaskState
from clusterq.ops.inspector import Inspector
from clusterq.ops.tasksearch import find_task
from clusterq.ops.web import create_app
from clusterq.ops.web.tasks import PAGE_SIZE, pretty
from clusterq.slots import keyslot
from clusterq.tools.devcluster import HOST, LocalCluster, LocalServer
from tests.helpers import await_for, running_worker, wait_for
from tests.test_web import EVIL, _browse, _chromium, _parse

SECRET = "s3cret"


def _csrf(page: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert found is not None, "no CSRF token on the page"
    return found.group(1)


def _text_of(page: str, element_id: str) -> str:
    """The text of the element with ``id`` (no nested tags), unescaped."""
    found = re.search(rf'id="{element_id}"[^>]*>(.*?)</', page, re.S)
    assert found is not None, f"no #{element_id} on the page"
    return html.unescape(found.group(1))


def _job_done(http: TestClient, response: Any) -> str:
    """A bulk action runs in the background: the text (tags stripped) of the job's page
    ``response`` was redirected to, once the job ended."""
    assert response.status_code == 200 and "/jobs/" in response.url.path, response.text
    path = response.url.path

    def ended() -> str | None:
        page = http.get(path).text
        return None if 'data-status="running"' in page else page

    page = wait_for(ended, 30, "the bulk action to end")
    assert 'data-status="done"' in page
    return html.unescape(re.sub(r"<[^>]+>", "", page))


def _rows(page: str, attr: str = "data-task") -> list[dict[str, str]]:
    return [row for row in _parse_all(page) if attr in row]


def _parse_all(page: str) -> list[dict[str, str]]:
    from html.parser import HTMLParser

    found: list[dict[str, str]] = []

    class Parser(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            found.append({"tag": tag, **{k: v or "" for k, v in attrs}})

    Parser().feed(page)
    return found


def _fail_tasks(url: str, prefix: str, queue: str, errors: dict[str, str]) -> None:
    """Tasks of type ``flaky`` (``max_retry=0``), one per entry of ``errors`` (task id:
    the error its handler raises), run by a worker until archived; each reports
    progress (half done, ``{"rows": 5}``) before it fails."""
    router = Router()

    @router.task("flaky")
    def flaky(task: Task) -> None:
        task.progress(0.5, {"rows": 5})
        raise RuntimeError(task.payload["error"])

    async def scenario() -> None:
        with Client(url, prefix=prefix) as client, Inspector(url, prefix=prefix) as inspector:
            for task_id, error in errors.items():
                client.enqueue("flaky", {"error": error}, queue=queue, task_id=task_id, max_retry=0)
            async with running_worker(url, router, queues=[queue], prefix=prefix):
                await await_for(
                    lambda: inspector.queue(queue).archived == len(errors),
                    20,
                    "the tasks to be archived",
                )

    asyncio.run(scenario())


@pytest.fixture
def http(url: str, prefix: str) -> Iterator[TestClient]:
    with TestClient(create_app(url, prefix=prefix, secret=SECRET)) as client:
        yield client


# ---------------------------------------------------------------------- one task


def test_the_task_page_shows_payload_headers_and_state(
    url: str, prefix: str, http: TestClient
) -> None:
    payload = {"n": 1, "note": EVIL, "nested": {"list": [1, 2, "ü"]}}
    headers = {"trace": EVIL, "tenant": "acme"}
    with Client(url, prefix=prefix) as client, Admin(url, prefix=prefix) as admin:
        task_id = client.enqueue(
            EVIL, payload, queue="web-t", headers=headers, max_retry=7, task_id=EVIL
        ).id
        page = http.get("/task", params={"queue": "web-t", "id": task_id})
        detail = admin.task("web-t", task_id)
    assert page.status_code == 200
    assert EVIL not in page.text and _parse(page.text).scripts == 0  # all of it text
    assert _text_of(page.text, "task-id") == task_id == EVIL
    assert _text_of(page.text, "task-type") == detail.info.type == EVIL
    assert _text_of(page.text, "task-state") == "pending" == detail.info.state.value
    assert _text_of(page.text, "task-retried") == "retried 0 of 7"
    assert _text_of(page.text, "payload") == pretty(detail.info.payload)
    assert '"nested": {\n    "list": [' in _text_of(page.text, "payload")  # indented JSON
    shown = re.findall(r'<tr><td class="text">([^<]*)</td><td class="text">([^<]*)</td></tr>',
                       page.text.split('id="headers"')[1])  # fmt: skip
    assert {html.unescape(k): html.unescape(v) for k, v in shown} == headers
    assert 'id="no-timeline"' in page.text  # events are off
    actions = {row["data-action"] for row in _parse_all(page.text) if "data-action" in row}
    assert actions == {"archive", "delete"}  # what applies to a pending task


def test_a_failed_task_shows_its_error_progress_and_timeline_then_is_acted_on(
    url: str, prefix: str, http: TestClient
) -> None:
    with Admin(url, prefix=prefix) as admin:
        admin.set_events("web-f", True)
        _fail_tasks(url, prefix, "web-f", {"t1": f"disk full {EVIL}"})
        detail = admin.task("web-f", "t1")
        page = http.get("/task?queue=web-f&id=t1")
        assert page.status_code == 200 and _parse(page.text).scripts == 0
        assert detail.info.state == TaskState.ARCHIVED and detail.info.last_error
        assert f"disk full {EVIL}" in detail.info.last_error
        assert _text_of(page.text, "last-error") == detail.info.last_error
        assert _text_of(page.text, "task-state") == "archived"
        assert detail.info.progress is not None
        assert _text_of(page.text, "progress-percent") == "50.0"
        assert _text_of(page.text, "progress-data") == pretty({"rows": 5})
        timeline = admin.timeline("web-f", "t1")
        assert timeline
        shown = [row["data-event"] for row in _parse_all(page.text) if "data-event" in row]
        assert shown == [event.event for event in timeline]
        token = _csrf(page.text)
        actions = {row["data-action"] for row in _parse_all(page.text) if "data-action" in row}
        assert actions == {"run", "delete"}

        done = http.post("/task/run?queue=web-f&id=t1", data={"csrf": token})
        assert done.status_code == 200 and 'data-status="ok"' in done.text
        assert admin.task("web-f", "t1").info.state == TaskState.PENDING
        # cancel does not apply to a pending task: the page says so, nothing changes
        done = http.post("/task/cancel?queue=web-f&id=t1", data={"csrf": token})
        assert 'data-status="state:pending"' in done.text
        assert admin.task("web-f", "t1").info.state == TaskState.PENDING
        done = http.post("/task/archive?queue=web-f&id=t1", data={"csrf": token})
        assert 'data-status="ok"' in done.text
        assert admin.task("web-f", "t1").info.state == TaskState.ARCHIVED
        done = http.post("/task/delete?queue=web-f&id=t1", data={"csrf": token})
        assert 'data-status="ok"' in done.text
        assert admin.act("delete", "web-f", ["t1"]) == {"t1": "missing"}
        gone = http.get("/task?queue=web-f&id=t1")
        assert gone.status_code == 404 and "t1" in _text_of(gone.text, "problem")


def test_an_active_task_shows_its_worker_and_is_cancelled_from_the_page(
    url: str, prefix: str, http: TestClient
) -> None:
    router = Router()
    started = asyncio.Event()

    @router.task("hold")
    async def hold(task: Task) -> None:
        started.set()
        await asyncio.Event().wait()  # until cancelled

    async def scenario() -> None:
        with Client(url, prefix=prefix) as client, Admin(url, prefix=prefix) as admin:
            task_id = client.enqueue("hold", {"n": 1}, queue="web-a").id
            async with running_worker(url, router, queues=["web-a"], prefix=prefix) as worker:
                await asyncio.wait_for(started.wait(), 10)
                path = f"/task?queue=web-a&id={task_id}"
                page = await asyncio.to_thread(http.get, path)
                assert _text_of(page.text, "task-state") == "active"
                assert _text_of(page.text, "task-worker") == worker.id
                assert admin.task("web-a", task_id).worker == worker.id
                actions = [r["data-action"] for r in _parse_all(page.text) if "data-action" in r]
                assert actions == ["cancel"]
                done = await asyncio.to_thread(
                    http.post, f"/task/cancel?queue=web-a&id={task_id}",
                    data={"csrf": _csrf(page.text)},
                )  # fmt: skip
                assert 'data-status="ok"' in done.text
                await await_for(
                    lambda: admin.task("web-a", task_id).info.state == TaskState.ARCHIVED,
                    10,
                    "the task to be cancelled",
                )
            page = await asyncio.to_thread(http.get, path)
            assert "cancelled by an operator" in _text_of(page.text, "last-error")

    asyncio.run(scenario())


def test_a_missing_or_invalid_task_is_a_404_naming_it(http: TestClient) -> None:
    page = http.get("/task", params={"queue": "nowhere", "id": "no-such-task"})
    assert page.status_code == 404 and "no-such-task" in page.text and "nowhere" in page.text
    assert http.get("/task", params={"queue": "a b", "id": "x"}).status_code == 404
    assert http.get("/task", params={"queue": "q", "id": ""}).status_code == 404
    assert http.get("/tasks", params={"queue": "q", "state": "lost"}).status_code == 404


def test_actions_need_the_csrf_token(url: str, prefix: str, http: TestClient) -> None:
    with Client(url, prefix=prefix) as client, Admin(url, prefix=prefix) as admin:
        task_id = client.enqueue("job", 1, queue="web-c").id
        for data in ({}, {"csrf": "0" * 64}, {"csrf": "é"}):
            assert http.post(f"/task/delete?queue=web-c&id={task_id}", data=data).status_code == 403
            selected = {**data, "action": "delete", "id": task_id}
            refused = http.post("/tasks/selected?queue=web-c&state=pending", data=selected)
            assert refused.status_code == 403
            every = {**data, "action": "delete"}
            assert http.post("/tasks/all?queue=web-c&state=pending", data=every).status_code == 403
        assert admin.task("web-c", task_id).info.state == TaskState.PENDING


def test_read_only_renders_no_action_and_refuses_every_post(url: str, prefix: str) -> None:
    app = create_app(url, prefix=prefix, read_only=True, secret=SECRET)
    with (
        TestClient(app) as http,
        Client(url, prefix=prefix) as client,
        Admin(url, prefix=prefix) as admin,
    ):
        task_id = client.enqueue("job", 1, queue="web-r").id
        admin.archive("web-r", [task_id])
        for path in (
            f"/task?queue=web-r&id={task_id}",
            "/tasks?queue=web-r&state=archived",
            f"/search?id={task_id}&queue=web-r",
        ):
            page = http.get(path)
            assert page.status_code == 200 and task_id in page.text
            assert 'method="post"' not in page.text and "csrf" not in page.text
            assert 'type="checkbox"' not in page.text
        posts: list[tuple[str, dict[str, str]]] = [
            (f"/task/{action}?queue=web-r&id={task_id}", {}) for action in ("run", "delete")
        ] + [
            ("/tasks/selected?queue=web-r&state=archived", {"action": "run", "id": task_id}),
            ("/tasks/all?queue=web-r&state=archived", {"action": "delete"}),
        ]
        for path, form in posts:
            assert http.post(path, data={**form, "csrf": admin_token()}).status_code == 403
        assert admin.task("web-r", task_id).info.state == TaskState.ARCHIVED


def admin_token() -> str:
    """The token a writable app with :data:`SECRET` would give."""
    import hashlib
    import hmac

    return hmac.new(SECRET.encode(), b"clusterq-web-csrf", hashlib.sha256).hexdigest()


# ---------------------------------------------------------------------- a state's tasks


def test_a_state_is_listed_page_by_page_and_selected_rows_are_acted_on(
    url: str, prefix: str, http: TestClient
) -> None:
    with Client(url, prefix=prefix) as client, Admin(url, prefix=prefix) as admin:
        for i in range(PAGE_SIZE + 5):
            client.enqueue("job", {"i": i, "note": EVIL}, queue="web-l")
        first = http.get("/tasks?queue=web-l&state=pending")
        second = http.get("/tasks?queue=web-l&state=pending&page=2")
        assert first.status_code == second.status_code == 200
        assert _parse(first.text).scripts == 0 and EVIL not in first.text
        ids = admin.task_ids("web-l", "pending", limit=PAGE_SIZE + 5)
        assert [r["data-task"] for r in _rows(first.text)] == ids[:PAGE_SIZE]
        assert [r["data-task"] for r in _rows(second.text)] == ids[PAGE_SIZE:]
        assert "Page 2 of 2" in second.text and 'rel="prev"' in second.text
        assert "pending (25)" in first.text
        chosen = ids[:2]
        done = http.post(
            "/tasks/selected?queue=web-l&state=pending",
            data={"csrf": _csrf(first.text), "action": "archive", "id": chosen},
        )
        assert done.status_code == 200 and 'data-status="ok"' in done.text
        assert set(admin.task_ids("web-l", "archived")) == set(chosen)
        assert admin.queue("web-l").pending == PAGE_SIZE + 3
        # an action that does not apply to the state is refused before anything happens
        wrong = http.post(
            "/tasks/selected?queue=web-l&state=pending",
            data={"csrf": _csrf(first.text), "action": "run", "id": ids[2]},
        )
        assert wrong.status_code == 400 and admin.queue("web-l").pending == PAGE_SIZE + 3


def test_delete_all_archived_deletes_exactly_those_and_run_all_takes_a_type(
    url: str, prefix: str, http: TestClient
) -> None:
    with Client(url, prefix=prefix) as client, Admin(url, prefix=prefix) as admin:
        pending = [client.enqueue("job", i, queue="web-b").id for i in range(4)]
        cold = [client.enqueue("cold", i, queue="web-b").id for i in range(3)]
        hot = [client.enqueue("hot", i, queue="web-b").id for i in range(2)]
        admin.archive("web-b", cold + hot)
        page = http.get("/tasks?queue=web-b&state=archived")
        token = _csrf(page.text)
        assert 'action="/tasks/all?queue=web-b&amp;state=archived"' in page.text
        ran = http.post(
            "/tasks/all?queue=web-b&state=archived",
            data={"csrf": token, "action": "run", "type": "hot"},
        )
        assert "2 done, 3 left alone" in _job_done(http, ran)
        assert set(admin.task_ids("web-b", "archived")) == set(cold)
        assert set(admin.task_ids("web-b", "pending", limit=100)) == set(pending + hot)
        deleted = http.post(
            "/tasks/all?queue=web-b&state=archived", data={"csrf": token, "action": "delete"}
        )
        assert "3 done, 0 left alone" in _job_done(http, deleted)
        info = admin.queue("web-b")
        assert info.archived == 0 and info.pending == len(pending + hot)
        assert set(admin.task_ids("web-b", "pending", limit=100)) == set(pending + hot)


def test_a_partitioned_queue_lists_the_tasks_of_all_its_partitions(
    url: str, prefix: str, http: TestClient
) -> None:
    with Client(url, prefix=prefix) as client, Admin(url, prefix=prefix) as admin:
        client.declare_queue("web-pq", partitions=3)
        ids = [client.enqueue("job", i, queue="web-pq", key=f"k{i}").id for i in range(9)]
        members = admin.members("web-pq")
        assert len({t.queue for t in admin.tasks("web-pq", "pending", limit=20)}) > 1
        page = http.get("/tasks?queue=web-pq&state=pending")
        assert "pending (9)" in page.text
        assert {r["data-task"] for r in _rows(page.text)} == set(ids)
        done = http.post(
            "/tasks/all?queue=web-pq&state=pending",
            data={"csrf": _csrf(page.text), "action": "archive"},
        )
        assert "9 done, 0 left alone" in _job_done(http, done)
        assert sum(admin.queue(m).archived for m in members) == 9


# ---------------------------------------------------------------------- search


def test_search_finds_a_task_id_in_the_right_queues_across_the_masters(
    cluster: LocalCluster, prefix: str
) -> None:
    url = cluster.seed_url
    names = [f"s-{i}" for i in range(30)]  # on every master, but once in 10^5 runs
    with Client(url, prefix=prefix) as client, Admin(url, prefix=prefix) as admin:
        for name in names:
            client.enqueue("job", name, queue=name)
        client.enqueue("job", "here", queue="s-7", task_id="needle")
        client.enqueue("job", "there", queue="s-2", task_id="needle")
        admin.archive("s-2", ["needle"])
        masters = {q.master for q in admin.queues()}
    assert len(masters) == 3  # the queues spread over every master
    with TestClient(create_app(url, prefix=prefix)) as http:
        page = http.get("/search?id=needle")
        nothing = http.get("/search?id=hay")
    assert page.status_code == 200
    found = {(r["data-queue"], r["data-state"]) for r in _rows(page.text)}
    assert found == {("s-7", "pending"), ("s-2", "archived")}
    assert f"Looked in {len(names)} queue(s)" in page.text
    assert _rows(nothing.text) == [] and "found in 0" in nothing.text


def test_an_id_is_looked_up_in_one_pipelined_call_per_master(
    cluster: LocalCluster, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """find_task asks each master once about all its queues (no call per queue)."""
    url = cluster.seed_url
    names = [f"p-{i}" for i in range(30)]
    with Client(url, prefix=prefix) as client:
        for name in names:
            client.enqueue("job", name, queue=name)
        client.enqueue("job", "here", queue="p-5", task_id="needle")
    with Inspector(url, prefix=prefix) as inspector:
        masters = {q.master for q in inspector.queues()}
        calls: list[int] = []
        execute = inspector.backend.execute

        def counted(slot: int, fn: Any, **kwargs: Any) -> Any:
            calls.append(slot)
            return execute(slot, fn, **kwargs)

        def per_key(key: str, fn: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"a call for {key} alone")

        monkeypatch.setattr(inspector.backend, "execute", counted)
        monkeypatch.setattr(inspector.backend, "execute_key", per_key)
        found = find_task(inspector, "needle", names)
        monkeypatch.undo()
    assert [(t.queue, t.state) for t in found.tasks] == [("p-5", TaskState.PENDING)]
    assert found.errors == {} and found.queues == len(names)
    assert len(masters) == 3 and len(calls) == len(masters) + 1  # + reading the one found


def test_the_filter_finds_by_error_type_and_payload_text(
    url: str, prefix: str, http: TestClient
) -> None:
    _fail_tasks(url, prefix, "web-s", {"a": "disk full", "b": "timeout talking to db"})
    with Client(url, prefix=prefix) as client:
        client.enqueue("job", {"customer": "Zebra Corp"}, queue="web-s", task_id="c")
        client.enqueue("job", {"customer": "other"}, queue="web-s", headers={"who": "zebra"},
                       task_id="d")  # fmt: skip
        client.enqueue("other", {"customer": "nobody"}, queue="web-s", task_id="e")

    def found(**params: Any) -> set[str]:
        page = http.get("/search", params={"queue": "web-s", **params})
        assert page.status_code == 200
        return {r["data-task"] for r in _rows(page.text)}

    assert found(error="DISK") == {"a"}
    assert found(error="db") == {"b"}
    assert found(type="job") == {"c", "d"}
    assert found(text="zebra") == {"c", "d"}
    assert found(text="zebra", type="job", error="x") == set()
    assert found() == {"a", "b", "c", "d", "e"}
    page = http.get("/search", params={"queue": "web-s", "error": "disk", "limit": "1"})
    assert "first 1 tasks of each state" in page.text


# ---------------------------------------------------------------------- errors from a node


def test_a_command_the_acl_refuses_shows_as_a_message(standalone: LocalServer, prefix: str) -> None:
    url = standalone.seed_url
    with Client(url, prefix=prefix) as client:
        task_id = client.enqueue("job", 1, queue="web-acl").id
    admin = standalone.client()
    user = f"web-{prefix}"
    admin.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "&*", "+@all",
                          "-hget", "-hexists", "-zrange", "-lrange")  # fmt: skip
    try:
        limited = f"redis://{user}:pw@{url.split('://', 1)[1]}"
        with TestClient(create_app(limited, prefix=prefix)) as http:
            pages = [
                http.get(f"/task?queue=web-acl&id={task_id}"),
                http.get("/tasks?queue=web-acl&state=pending"),
                http.get(f"/search?id={task_id}"),
                http.get("/search?queue=web-acl&text=x"),
            ]
        for page in pages:
            assert page.status_code in (200, 503), page.text
            assert "NOPERM" in page.text or "permission" in page.text.lower(), page.text
    finally:
        admin.execute_command("ACL", "DELUSER", user)
        admin.close()


def test_a_dead_master_shows_as_its_queues_errors_while_the_rest_renders(
    fresh_cluster: Callable[..., LocalCluster], prefix: str
) -> None:
    """A master is killed and no replica may take its place: the search by id still
    finds the task in the queues of the live masters and names the queues it could not
    look in; the pages of a queue on the dead master show the error (never a 500)."""
    cluster = fresh_cluster(["cluster-replica-no-failover yes"])
    seeds = "redis://" + ",".join(f"{HOST}:{port}" for port in cluster.ports)
    names = [f"d-{i}" for i in range(30)]
    with Client(seeds, prefix=prefix) as client, Admin(seeds, prefix=prefix) as admin:
        for name in names:
            client.enqueue("job", name, queue=name, task_id="needle")
        where = {q.queue: q.master for q in admin.queues()}
        shared = {  # the registry and the layouts must stay readable
            "{}:{}".format(*admin.backend.master_addr(keyslot(key)))
            for key in (admin.keys.queues, admin.keys.layouts)
        }
    victim = sorted({m for m in where.values() if m} - shared)[0]
    on_victim = sorted(n for n, m in where.items() if m == victim)
    alive = sorted(set(names) - set(on_victim))
    assert on_victim and alive
    cluster.kill_node(int(victim.rsplit(":", 1)[1]))
    with TestClient(create_app(seeds, prefix=prefix)) as http:
        search = http.get("/search?id=needle")
        dead_task = http.get(f"/task?queue={on_victim[0]}&id=needle")
        dead_list = http.get(f"/tasks?queue={on_victim[0]}&state=pending")
        live_task = http.get(f"/task?queue={alive[0]}&id=needle")
    assert search.status_code == 200
    assert sorted(r["data-queue"] for r in _rows(search.text)) == alive
    for name in on_victim:
        assert f"queue {name}: " in search.text
    assert dead_task.status_code == 503 and on_victim[0] in _text_of(dead_task.text, "problem")
    assert dead_list.status_code == 200 and 'id="error"' in dead_list.text
    assert live_task.status_code == 200 and _text_of(live_task.text, "task-id") == "needle"


# ---------------------------------------------------------------------- root path, browser


def test_under_a_root_path_every_link_starts_with_it(url: str, prefix: str) -> None:
    with Client(url, prefix=prefix) as client:
        task_id = client.enqueue("job", 1, queue="web-p").id
    with TestClient(create_app(url, prefix=prefix), root_path="/q") as http:
        links = [
            link
            for path in (
                f"/task?queue=web-p&id={task_id}",
                "/tasks?queue=web-p&state=pending",
                f"/search?id={task_id}&queue=web-p",
                "/queue?name=web-p",
            )
            for link in _parse(http.get(path).text).links
        ]
    assert links and all(link.startswith("/q/") for link in links), links
    assert "/q/tasks?queue=web-p&state=archived" in links


def test_chromium_renders_the_task_page(cluster: LocalCluster, prefix: str, tmp_path: Path) -> None:
    chromium = _chromium()
    import threading
    import time

    import uvicorn

    from clusterq.tools import servers

    url = cluster.seed_url
    with Client(url, prefix=prefix) as client:
        task_id = client.enqueue("job", {"note": EVIL}, queue="web-browser",
                                 headers={"h": EVIL}).id  # fmt: skip
    port = servers.find_free_ports(1, with_bus=False)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(url, prefix=prefix), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        dom = _browse(chromium, f"{base}/task?queue=web-browser&id={task_id}", "--dump-dom")
        listed = _browse(chromium, f"{base}/tasks?queue=web-browser&state=pending", "--dump-dom")
        shots = {
            "task": f"/task?queue=web-browser&id={task_id}",
            "tasks": "/tasks?queue=web-browser&state=pending",
            "search": f"/search?id={task_id}&queue=web-browser&text=script",
        }
        for name, path in shots.items():
            shot = tmp_path / f"{name}.png"
            _browse(chromium, base + path, f"--screenshot={shot}", "--window-size=1280,900")
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        server.should_exit = True
        thread.join(10)
    assert _text_of(dom, "task-id") == task_id
    assert _parse(dom).scripts == 0 and EVIL in html.unescape(_text_of(dom, "payload"))
    assert [r["data-task"] for r in _rows(listed)] == [task_id]
    print(f"screenshots in {tmp_path}")

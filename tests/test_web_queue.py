"""``clusterq web``'s queue page (issue 29): the processed/failed chart (``charts.py``,
unit-tested, and compared on the page with ``Inspector.history``), purge and remove with
the queue's name typed to confirm, and bulk actions on a whole state run in the
background as jobs whose progress is pushed live (over SSE, and in Chromium)."""

from __future__ import annotations

import asyncio
import html
import json
import re
import threading
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from clusterq import Admin, Client, Router, Task
from clusterq.ops.admin import BulkResult
from clusterq.ops.inspector import Inspector
from clusterq.ops.queueinfo import Minute
from clusterq.ops.web import charts, create_app
from clusterq.ops.web.jobs import new_job
from clusterq.tools.devcluster import LocalCluster
from tests.browser import browser
from tests.helpers import await_for, running_worker, wait_for
from tests.test_web import EVIL, _chromium
from tests.test_web_live import _serve
from tests.test_web_tasks import SECRET, _csrf, _job_done

NOW = 1_000 * 60 + 30.0  # half a minute into minute 1000


# ---------------------------------------------------------------------- charts.py


def test_the_bars_match_the_minutes_given() -> None:
    history = [
        Minute(at=(1000 - 20) * 60, processed=9, failed=9),  # before the window: left out
        Minute(at=(1000 - 2) * 60, processed=4, failed=1),
        Minute(at=1000 * 60, processed=2, failed=0),
    ]
    bars = charts.bars(history, NOW, minutes=10)
    assert [(b.series, b.at, b.value) for b in bars] == [
        ("processed", (1000 - 2) * 60, 4),
        ("failed", (1000 - 2) * 60, 1),
        ("processed", 1000 * 60, 2),
    ]
    tallest, small, half = bars
    plot = charts.HEIGHT - charts.BOTTOM - charts.TOP
    assert tallest.height == plot and half.height == plot / 2 and small.height == plot / 4
    assert tallest.y + tallest.height == small.y + small.height  # one baseline
    assert tallest.x < small.x < half.x <= charts.WIDTH - half.width


def test_the_svg_holds_each_bar_and_escapes_every_text() -> None:
    history = [Minute(at=(1000 - 1) * 60, processed=7, failed=3)]
    svg = charts.render(history, NOW, minutes=10, label=EVIL)
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    values = re.findall(r'data-series="(\w+)" data-minute="(\d+)" data-value="(\d+)"', svg)
    assert values == [("processed", str(999 * 60), "7"), ("failed", str(999 * 60), "3")]
    assert EVIL not in svg and html.escape(EVIL) in svg
    assert ">7<" in svg  # the y axis: the largest count


def test_no_history_shows_no_activity_yet() -> None:
    assert "no activity yet" in charts.render([], NOW)
    old = [Minute(at=(1000 - 400) * 60, processed=1, failed=1)]
    assert "no activity yet" in charts.render(old, NOW, minutes=360)
    assert "<svg" not in charts.render(old, NOW, minutes=360)


def _run_tasks(url: str, prefix: str, queue: str, good: int, bad: int) -> None:
    """``good`` tasks processed and ``bad`` ones failed (archived) by a worker."""
    router = Router()

    @router.task("ok")
    def ok(task: Task) -> None:
        pass

    @router.task("bad")
    def fails(task: Task) -> None:
        raise RuntimeError("no")

    async def scenario() -> None:
        with Client(url, prefix=prefix) as client, Inspector(url, prefix=prefix) as inspector:
            for i in range(good):
                client.enqueue("ok", i, queue=queue)
            for i in range(bad):
                client.enqueue("bad", i, queue=queue, max_retry=0)

            def finished() -> bool:
                info = inspector.queue(queue)
                return info.pending == info.active == 0 and info.archived == bad

            async with running_worker(url, router, queues=[queue], prefix=prefix):
                await await_for(finished, 30, "the tasks to be run")

    asyncio.run(scenario())


@pytest.fixture
def http(url: str, prefix: str) -> Iterator[TestClient]:
    with TestClient(create_app(url, prefix=prefix, secret=SECRET)) as client:
        yield client


def test_the_queue_page_charts_its_history(url: str, prefix: str, http: TestClient) -> None:
    assert "no activity yet" in http.get("/queue?name=chart-q").text
    _run_tasks(url, prefix, "chart-q", good=5, bad=3)
    page = http.get("/queue?name=chart-q").text
    with Inspector(url, prefix=prefix) as inspector:
        history = inspector.history("chart-q")
    assert sum(m.processed for m in history) >= 5 and sum(m.failed for m in history) == 3
    shown = {
        (series, int(minute)): int(value)
        for series, minute, value in re.findall(
            r'data-series="(\w+)" data-minute="(\d+)" data-value="(\d+)"', page
        )
    }
    expected = {
        (series, int(m.at)): getattr(m, series)
        for m in history
        for series in ("processed", "failed")
        if getattr(m, series)
    }
    assert shown == expected and '<svg xmlns="http://www.w3.org/2000/svg" class="chart"' in page


# ---------------------------------------------------------------------- purge and remove


def _fill(url: str, prefix: str, queue: str, pending: int, archived: int) -> list[str]:
    """``pending`` + ``archived`` tasks in ``queue``; the archived ones' ids."""
    with Client(url, prefix=prefix) as client, Admin(url, prefix=prefix) as admin:
        infos = client.enqueue_many([("job", i) for i in range(pending + archived)], queue=queue)
        ids = [info.id for info in infos[pending:]]
        admin.archive(queue, ids)
    return ids


def _audit(http: TestClient) -> list[tuple[str, str, str]]:
    rows = re.findall(r'<tr class="audit">(.*?)</tr>', http.get("/audit").text, re.S)
    cells = [[html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", r)] for r in rows]
    return [(c[3], c[4], c[5]) for c in cells]


def test_purge_needs_the_typed_name_and_deletes_exactly_that_state(
    url: str, prefix: str, http: TestClient
) -> None:
    _fill(url, prefix, "purge-q", pending=3, archived=4)
    page = http.get("/queue?name=purge-q").text
    assert 'id="purge"' in page and 'id="remove"' in page
    token = _csrf(page)
    wrong = http.post(
        "/queue/purge?name=purge-q", data={"csrf": token, "state": "archived", "confirm": "purge"}
    )
    assert wrong.status_code == 400 and "nothing was done" in html.unescape(wrong.text)
    with Admin(url, prefix=prefix) as admin:
        assert admin.queue("purge-q").archived == 4
        active = http.post(
            "/queue/purge?name=purge-q",
            data={"csrf": token, "state": "active", "confirm": "purge-q"},
        )
        assert active.status_code == 400
        done = http.post(
            "/queue/purge?name=purge-q",
            data={"csrf": token, "state": "archived", "confirm": "purge-q"},
        )
        assert "4 done, 0 left alone" in _job_done(http, done)
        info = admin.queue("purge-q")
        assert info.archived == 0 and info.pending == 3
    assert _audit(http) == [
        ("purge", "all archived tasks in purge-q", "4 ok"),
        ("purge archived", "queue purge-q", "refused: the typed name differs"),
    ]


def test_remove_needs_the_typed_name_and_force_while_tasks_are_held(
    url: str, prefix: str, http: TestClient
) -> None:
    _fill(url, prefix, "rm-q", pending=2, archived=0)
    token = _csrf(http.get("/queue?name=rm-q").text)
    with Admin(url, prefix=prefix) as admin:
        wrong = http.post("/queue/remove?name=rm-q", data={"csrf": token, "confirm": "rm-"})
        assert wrong.status_code == 400 and admin.queue("rm-q").pending == 2
        held = http.post("/queue/remove?name=rm-q", data={"csrf": token, "confirm": "rm-q"})
        assert held.status_code == 409 and "force" in held.text
        assert admin.queue("rm-q").pending == 2
        forced = http.post(
            "/queue/remove?name=rm-q", data={"csrf": token, "confirm": "rm-q", "force": "1"}
        )
        assert forced.status_code == 200 and "removed, 2 task(s) deleted" in forced.text
        assert "rm-q" not in {q.queue for q in admin.queues()}
        assert admin.queue("rm-q").size == 0
    assert [entry[:2] for entry in _audit(http)] == [
        ("remove (force)", "queue rm-q"),
        ("remove", "queue rm-q"),
        ("remove", "queue rm-q"),
    ]
    assert _audit(http)[1][2].startswith("refused: ")


def test_purge_and_remove_are_refused_without_csrf_read_only_or_as_a_viewer(
    url: str, prefix: str
) -> None:
    _fill(url, prefix, "guard-q", pending=1, archived=1)
    purge = {"state": "archived", "confirm": "guard-q"}
    remove = {"confirm": "guard-q", "force": "1"}
    with TestClient(create_app(url, prefix=prefix, secret=SECRET)) as http:
        assert http.post("/queue/purge?name=guard-q", data=purge).status_code == 403
        assert http.post("/queue/remove?name=guard-q", data=remove).status_code == 403
        form = {"csrf": _csrf(http.get("/queue?name=guard-q").text)}
    with TestClient(create_app(url, prefix=prefix, secret=SECRET, read_only=True)) as ro:
        page = ro.get("/queue?name=guard-q").text
        assert 'id="purge"' not in page and 'id="remove"' not in page
        assert ro.post("/queue/purge?name=guard-q", data={**form, **purge}).status_code == 403
        assert ro.post("/queue/remove?name=guard-q", data={**form, **remove}).status_code == 403
    app = create_app(url, prefix=prefix, secret=SECRET, auth=("ops", "pw"), viewers=[("eve", "x")])
    with TestClient(app) as http:
        page = http.get("/queue?name=guard-q", auth=("eve", "x")).text
        assert 'id="purge"' not in page and 'id="remove"' not in page
        for path, data in (("purge", purge), ("remove", remove)):
            answer = http.post(
                f"/queue/{path}?name=guard-q", data={**form, **data}, auth=("eve", "x")
            )
            assert answer.status_code == 403
        assert _audit_as(http, ("eve", "x")) == []
    with Admin(url, prefix=prefix) as admin:
        info = admin.queue("guard-q")
        assert info.pending == 1 and info.archived == 1


def _audit_as(http: TestClient, auth: tuple[str, str]) -> list[str]:
    return re.findall(r'<tr class="audit">', http.get("/audit", auth=auth).text)


# ---------------------------------------------------------------------- bulk in the background


def _gated(admin: Admin, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """``admin.act_all`` held until the returned event is set (the job's thread waits:
    its page can be opened while it is still running)."""
    gate = threading.Event()
    act_all: Callable[..., Any] = admin.act_all

    def held(*args: Any, **kwargs: Any) -> Any:
        assert gate.wait(60), "the test never let the job go"
        return act_all(*args, **kwargs)

    monkeypatch.setattr(admin, "act_all", held)
    return gate


def test_a_bulk_run_of_500_archived_tasks_ends_with_its_counts(
    url: str, prefix: str, http: TestClient
) -> None:
    ids = _fill(url, prefix, "bulk-q", pending=0, archived=500)
    page = http.get("/tasks?queue=bulk-q&state=archived").text
    started = http.post(
        "/tasks/all?queue=bulk-q&state=archived",
        data={"csrf": _csrf(page), "action": "run"},
        follow_redirects=False,
    )
    assert started.status_code == 303 and "/jobs/" in started.headers["location"]
    text = _job_done(http, http.get(started.headers["location"]))
    assert "500 done, 0 left alone" in text and "500 of 500 task(s)" in text
    assert re.search(r"ok\s*500", text)
    with Admin(url, prefix=prefix) as admin:
        info = admin.queue("bulk-q")
        assert info.archived == 0 and info.pending == 500
        assert set(admin.task_ids("bulk-q", "pending", limit=600)) == set(ids)
    assert _audit(http)[0] == ("run", "all archived tasks in bulk-q", "500 ok")
    assert http.get("/jobs/nope").status_code == 404


def test_a_bulk_run_that_fails_says_why_on_its_page_and_in_the_audit(
    url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fill(url, prefix, "fail-q", pending=0, archived=2)
    app = create_app(url, prefix=prefix, secret=SECRET)

    def down(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("master <b>down</b>")

    monkeypatch.setattr(app.state.admin, "act_all", down)
    with TestClient(app) as http:
        page = http.get("/tasks?queue=fail-q&state=archived").text
        started = http.post(
            "/tasks/all?queue=fail-q&state=archived", data={"csrf": _csrf(page), "action": "run"}
        )
        path = started.url.path

        def failed() -> str | None:
            page = http.get(path).text
            return page if 'data-status="failed"' in page else None

        text = wait_for(failed, 30, "the job to fail")
        assert "master &lt;b&gt;down&lt;/b&gt;" in text and "<b>down" not in text
        assert _audit(http)[0] == (
            "run",
            "all archived tasks in fail-q",
            "failed: master <b>down</b>",
        )
    with Admin(url, prefix=prefix) as admin:
        assert admin.queue("fail-q").archived == 2


def test_a_jobs_progress_sums_the_partitions_and_only_increases() -> None:
    """``Admin.act_all`` counts each partition from zero again: the job adds them up."""
    job = new_job("run", "pq", "archived", "all archived tasks")
    seen = []
    for done, total in ((200, 300), (300, 300), (100, 150), (150, 150), (200, 400)):
        job.progress(done, total)
        seen.append((job.seen, job.total, job.to_dict()["percent"]))
    assert seen == [
        (200, 300, 66),
        (300, 300, 100),
        (400, 450, 88),
        (450, 450, 100),
        (650, 850, 76),  # a third partition's first batch, larger than the last one's
    ]
    assert job.status == "running" and job.wait(job.version - 1, 1.0) == job.version
    job.finish(BulkResult(done=449, skipped=1, statuses={"ok": 449, "type": 1}))
    assert job.to_dict()["counts"] == {"ok": 449, "type": 1} and job.status == "done"


def _events(base: str, path: str, got: list[dict[str, Any]]) -> None:
    """Read the job's event stream until it says the job ended (bounded: 200 events)."""
    with urllib.request.urlopen(base + path, timeout=30) as stream:
        for raw in stream:
            line = raw.decode().rstrip("\n")
            if line.startswith("data: "):
                got.append(json.loads(line[6:]))
                if got[-1]["status"] != "running" or len(got) >= 200:
                    return


def test_the_job_streams_its_progress_until_done(
    url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fill(url, prefix, "sse-q", pending=0, archived=500)
    app = create_app(url, prefix=prefix, secret=SECRET)
    gate = _gated(app.state.admin, monkeypatch)
    for base in _serve(app):
        with TestClient(app) as http:
            page = http.get("/tasks?queue=sse-q&state=archived").text
            started = http.post(
                "/tasks/all?queue=sse-q&state=archived",
                data={"csrf": _csrf(page), "action": "delete"},
                follow_redirects=False,
            )
        job_id = started.headers["location"].rsplit("/", 1)[1]
        got: list[dict[str, Any]] = []
        reader = threading.Thread(target=_events, args=(base, f"/live/jobs/{job_id}", got))
        reader.start()
        wait_for(got.__len__, 30, "the first event")
        assert got[0]["status"] == "running" and got[0]["seen"] == 0
        gate.set()
        reader.join(60)
        assert not reader.is_alive()
    seen = [event["seen"] for event in got]
    assert seen == sorted(seen) and seen[0] < seen[-1] == 500  # increasing, to the end
    assert got[-1]["status"] == "done" and got[-1]["counts"] == {"ok": 500}
    assert got[-1]["percent"] == 100
    with Admin(url, prefix=prefix) as admin:
        assert admin.queue("sse-q").archived == 0


def test_chromium_sees_a_bulk_run_reach_done_without_a_reload(
    cluster: LocalCluster, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = cluster.seed_url
    _fill(url, prefix, "web-bulk", pending=0, archived=300)
    app = create_app(url, prefix=prefix)
    gate = _gated(app.state.admin, monkeypatch)
    for base in _serve(app):
        with browser(_chromium(), f"{base}/tasks?queue=web-bulk&state=archived") as page:
            page.page.click('#all button[value="run"]')
            page.page.wait_for_load_state("load")
            assert "/jobs/" in page.page.url
            page.evaluate("window.stillTheSamePage = true")
            assert page.evaluate("document.getElementById('job').dataset.status") == "running"
            gate.set()
            page.wait_for("document.getElementById('job').dataset.status === 'done'")
            assert page.evaluate("window.stillTheSamePage") is True  # no reload
            assert page.evaluate("document.getElementById('job-status').textContent") == "done"
            assert page.evaluate("document.getElementById('job-progress').value") == 100
            ok = page.evaluate(
                "document.querySelector('#outcome tr[data-status=ok] td:last-child').textContent"
            )
            assert ok == "300"
            assert page.evaluate("document.querySelectorAll('script:not([src])').length") == 0
        assert page.errors == [], page.errors
    with Admin(url, prefix=prefix) as admin:
        assert admin.queue("web-bulk").pending == 300

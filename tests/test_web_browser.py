"""``clusterq web`` in Debian's headless Chromium, driven by Playwright (issue 29's browser
tests), against the 6-node cluster: every page opens with no console error, no failed
request, and under a root path every request starts with it; an archived task is run
from its page and processed; a kill -9 of a master shows on the overview (the queue's
new master, without a reload) and on the timeline while the other queues keep
rendering. Each page's screenshot is saved."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from clusterq import Admin, Client
from clusterq.ops.web import create_app
from clusterq.tools.devcluster import LocalCluster
from tests.browser import Page, browser
from tests.helpers import StartWorker, wait_for
from tests.test_web import _chromium
from tests.test_web_live import _serve
from tests.workload import read_events

PAGES = ["/", "/cluster", "/timeline", "/search", "/workers", "/cron", "/streams",
         "/partitions", "/workflow", "/audit"]  # fmt: skip


def _row(queue: str) -> str:
    return f"document.querySelector('tr.queue[data-queue=\"{queue}\"]')"


def test_every_page_opens_without_an_error_and_under_a_root_path(
    cluster: LocalCluster, prefix: str, tmp_path: Path
) -> None:
    url = cluster.seed_url
    with Client(url, prefix=prefix) as client:
        info = client.enqueue("job", {"note": "<script>alert(1)</script>"}, queue="pages")
    extra = ["/queue?name=pages", "/tasks?queue=pages&state=pending",
             f"/task?queue=pages&id={info.id}"]  # fmt: skip
    proxied = Starlette(routes=[Mount("/q", app=create_app(url, prefix=prefix, interval=0.5))])
    for base in _serve(proxied):
        with browser(_chromium(), base + "/q/") as page:
            for n, path in enumerate(PAGES + extra):
                page.goto(base + "/q" + path)
                assert page.evaluate("document.querySelectorAll('script:not([src])').length") == 0
                shot = tmp_path / f"page-{n}.png"
                page.page.screenshot(path=str(shot), full_page=True)
                assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            page.goto(base + "/q/")
            page.wait_for("document.getElementById('live').textContent.startsWith('live: up')")
        assert page.errors == [], page.errors
        paths = [r.split("/", 1)[1] if "/" in r else "" for r in page.requests]
        assert paths and all(p.startswith("q/") for p in paths), paths  # every request


def test_an_archived_task_is_run_from_its_page_and_processed(
    cluster: LocalCluster, prefix: str, start_worker: StartWorker, log_dir: Path
) -> None:
    url = cluster.seed_url
    with Client(url, prefix=prefix) as client:
        info = client.enqueue("record", None, queue="default")
    with Admin(url, prefix=prefix) as admin:
        admin.archive("default", [info.id])
        assert admin.task("default", info.id).info.state == "archived"
    start_worker(url)
    for base in _serve(create_app(url, prefix=prefix)):
        with browser(_chromium(), f"{base}/task?queue=default&id={info.id}") as page:
            page.page.click('button[data-action="run"]')
            page.page.wait_for_load_state("load")
            wait_for(lambda: ("done", info.id) in read_events(log_dir), 30, "the task to run")
        assert page.errors == [], page.errors


@pytest.mark.both_servers
def test_a_failover_shows_on_the_overview_and_the_timeline_without_a_reload(
    fresh_cluster: Callable[[], LocalCluster], prefix: str, start_worker: StartWorker
) -> None:
    cluster = fresh_cluster()
    topology = cluster.topology()
    names = [f"fo-{n}" for n in range(40)]
    by_master: dict[int, str] = {}
    for name in names:
        master = topology.locate(name).master
        assert master is not None
        by_master.setdefault(master.port, name)
    (victim_port, moving), (steady_port, steady) = list(by_master.items())[:2]
    url = f"redis://127.0.0.1:{steady_port}"
    with Client(url, prefix=prefix) as client:
        client.enqueue("job", 1, queue=moving)
        client.enqueue("job", 1, queue=steady)
    start_worker(url, queues=f"{moving}=1,{steady}=1")  # it writes what it sees
    old = f"127.0.0.1:{victim_port}"
    for base in _serve(create_app(url, prefix=prefix, interval=0.5)):
        with browser(_chromium(), base + "/") as page:
            page.wait_for(f"{_row(moving)} && {_row(moving)}.dataset.master === '{old}'")
            timeline = Page(page.page.context.new_page())  # a second tab, on the timeline
            timeline.goto(base + "/timeline")
            timeline.wait_for("document.getElementById('live').textContent !== 'live: connecting'")
            cluster.kill_node(victim_port)
            try:
                moved = page.wait_for(
                    f"{_row(moving)}.dataset.master !== '{old}' && {_row(moving)}.dataset.master",
                    90,
                )
                assert page.evaluate(f"!!{_row(steady)}")  # the other master's queue is there
                table = page.evaluate(f"{_row(moving)}.closest('table').dataset.master")
                assert table == moved  # under its new master's table
                # the failover appears on the open timeline page, without a reload
                timeline.wait_for("!!document.querySelector('tr[data-event=master_changed]')", 90)
                text = timeline.evaluate("document.getElementById('timeline').textContent")
                assert f"from {old} to {moved}" in text
            finally:
                cluster.restart_node(victim_port)
        errors = [e for e in page.errors + timeline.errors if "/live/" not in e]
        assert errors == [], errors


def test_read_only_and_a_viewer_see_no_action_and_every_post_is_refused(
    cluster: LocalCluster, prefix: str
) -> None:
    import hashlib
    import hmac

    url = cluster.seed_url
    with Client(url, prefix=prefix) as client:
        info = client.enqueue("job", 1, queue="ro")
    token = hmac.new(b"s", b"clusterq-web-csrf", hashlib.sha256).hexdigest()
    posts = [
        "/queue/pause?name=ro",
        f"/task/run?queue=ro&id={info.id}",
        "/tasks/all?queue=ro&state=pending",
        "/tasks/selected?queue=ro&state=pending",
    ]
    pages = [*PAGES, "/queue?name=ro", "/tasks?queue=ro&state=pending",
             f"/task?queue=ro&id={info.id}"]  # fmt: skip
    read_only = create_app(url, prefix=prefix, read_only=True, secret="s")
    watched = create_app(
        url, prefix=prefix, secret="s", auth=("ops", "pw"), viewers=[("eve", "look")]
    )
    eve = {"username": "eve", "password": "look"}
    for app, credentials in ((read_only, None), (watched, eve)):
        for base in _serve(app):
            context = {"http_credentials": credentials} if credentials else {}
            with browser(_chromium(), base + "/", **context) as page:
                for path in pages:
                    page.goto(base + path)
                    actions = "form[method=post], button.action"
                    assert page.evaluate(f"document.querySelectorAll('{actions}').length") == 0
                for path in posts:
                    answer = page.page.request.post(
                        base + path, form={"csrf": token, "action": "delete", "id": info.id}
                    )
                    assert answer.status == 403, (path, answer.status)
            assert page.errors == [], page.errors
    for base in _serve(watched):  # the operator: no CSRF token, no action
        ops = {"username": "ops", "password": "pw"}
        with browser(_chromium(), base + "/", http_credentials=ops) as page:
            answer = page.page.request.post(base + "/queue/pause?name=ro", form={"csrf": "x"})
            assert answer.status == 403
    with Admin(url, prefix=prefix) as admin:
        assert admin.task("ro", info.id).info.state == "pending"
        assert not admin.queue("ro").paused

"""``clusterq web``: live updates from one shared poller, roles and tokens, the Origin
check, security headers, the audit page, the theme; in Chromium, the live script runs
under the Content Security Policy without a console error."""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from clusterq import Admin, Client
from clusterq.cluster.backend import Backend
from clusterq.ops.web import create_app
from clusterq.tools import servers
from tests.helpers import wait_for
from tests.test_web import _chromium


@pytest.fixture
def queues(url: str, prefix: str) -> list[str]:
    names = ["live-a", "live-b"]
    with Client(url, prefix=prefix) as client:
        for name in names:
            client.enqueue("job", 1, queue=name)
    return names


def _serve(app: Any) -> Iterator[str]:
    import uvicorn

    port = servers.find_free_ports(1, with_bus=False)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), 30, "uvicorn to start")
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def live_app(url: str, prefix: str, queues: list[str]) -> Iterator[tuple[Any, str]]:
    app = create_app(url, prefix=prefix, interval=0.2)
    for base in _serve(app):
        yield app, base


def _read_events(base: str, count: int, got: list[list[dict[str, Any]]]) -> None:
    with urllib.request.urlopen(base + "/live/queues", timeout=30) as stream:
        seen = []
        for raw in stream:
            line = raw.decode().rstrip("\n")
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
                if len(seen) == count:
                    break
    got.append(seen[-1])


def test_every_open_page_shares_one_poll(
    live_app: tuple[Any, str], url: str, prefix: str, queues: list[str]
) -> None:
    """Three pages listening, each receiving three updates: the queues were read about
    three times, not nine; with no page left, the poller stops."""
    app, base = live_app
    got: list[list[dict[str, Any]]] = []
    readers = [threading.Thread(target=_read_events, args=(base, 3, got)) for _ in range(3)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(60)
    assert len(got) == 3
    poller = app.state.live
    # one poll per interval, whoever listens: three pages fed by one poll each time
    # (a poll per page would be nine)
    assert 3 <= poller.polls < 9
    with Admin(url, prefix=prefix) as admin:
        listed = {q.queue: q.pending for q in admin.queues()}
    for last in got:
        assert {q["queue"]: q["pending"] for q in last} == listed
    wait_for(lambda: poller.subscribers == 0 and poller._task is None, 30, "the poller to stop")


def test_roles_tokens_origin_and_headers(url: str, prefix: str, queues: list[str]) -> None:
    app = create_app(
        url, prefix=prefix, auth=("ops", "pw"), viewers=[("eve", "look")], token="t0ken",
        secret="s",
    )  # fmt: skip
    with TestClient(app) as http, Admin(url, prefix=prefix) as admin:
        denied = http.get("/")
        assert (
            denied.status_code == 401
            and "default-src 'self'" in denied.headers["content-security-policy"]
        )
        assert http.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
        viewer = http.get("/queue?name=live-a", auth=("eve", "look"))
        assert viewer.status_code == 200 and "<form" not in viewer.text
        assert "script-src 'self'" in viewer.headers["content-security-policy"]
        assert viewer.headers["x-content-type-options"] == "nosniff"
        operator = http.get("/queue?name=live-a", auth=("ops", "pw"))
        token = re.search(r'name="csrf" value="([0-9a-f]+)"', operator.text)
        assert token is not None
        form = {"csrf": token.group(1)}
        as_viewer = http.post("/queue/pause?name=live-a", data=form, auth=("eve", "look"))
        assert as_viewer.status_code == 403 and not admin.queue("live-a").paused
        elsewhere = http.post(
            "/queue/pause?name=live-a",
            data=form,
            auth=("ops", "pw"),
            headers={"Origin": "http://evil.example"},
        )
        assert elsewhere.status_code == 403 and not admin.queue("live-a").paused
        bearer = {"Authorization": "Bearer t0ken", "Origin": "http://testserver"}
        done = http.post(
            "/queue/pause?name=live-a", data=form, headers=bearer, follow_redirects=False
        )
        assert done.status_code == 303 and admin.queue("live-a").paused
        http.post("/queue/unpause?name=live-a", data=form, auth=("ops", "pw"))
        assert not admin.queue("live-a").paused
        audit = http.get("/audit", auth=("eve", "look"))
    rows = re.findall(r'<tr class="audit">(.*?)</tr>', audit.text, re.S)
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in rows]
    assert [(c[1], c[3], c[4]) for c in cells] == [
        ("ops", "unpause", "queue live-a"),
        ("token", "pause", "queue live-a"),
    ]  # newest first; the refused ones are not actions


def test_the_theme_is_kept_in_a_cookie(url: str, prefix: str, queues: list[str]) -> None:
    with TestClient(create_app(url, prefix=prefix)) as http:
        assert '<html lang="en">' in http.get("/").text
        http.get("/theme?to=dark")
        assert '<html lang="en" data-theme="dark">' in http.get("/cluster").text
        http.get("/theme?to=system")
        assert '<html lang="en">' in http.get("/").text


def test_chromium_runs_the_live_script_without_a_console_error(
    live_app: tuple[Any, str], url: str, prefix: str, queues: list[str]
) -> None:
    """The overview in Chromium: the live script connects and updates the rows in place
    (a task enqueued after the page opened shows up), and nothing was logged as an
    error: no exception, no Content Security Policy violation."""
    from tests.browser import browser

    _, base = live_app
    with browser(_chromium(), base + "/") as page:
        page.wait_for("document.getElementById('live').textContent.startsWith('live: updated')")
        cell = 'document.querySelector(\'tr[data-queue="live-a"] td[data-field="pending"]\')'
        assert page.evaluate(cell + ".textContent") == "1"
        with Client(url, prefix=prefix) as client:
            client.enqueue("job", 2, queue="live-a")
        page.wait_for(cell + ".textContent === '2'")
        assert page.evaluate("document.querySelectorAll('script').length") == 1
        page.evaluate("console.log('clusterq test: console works')")
        assert page.errors == []
        page.evaluate("console.error('clusterq test: errors are seen')")
        page.wait_for("true")
        page.page.wait_for_timeout(0)  # let the console event through
        assert page.errors and "errors are seen" in page.errors[-1]


def test_a_proxys_forwarded_prefix_is_the_root_path(
    url: str, prefix: str, queues: list[str]
) -> None:
    from tests.test_web import _parse

    with TestClient(create_app(url, prefix=prefix)) as http:
        page = http.get("/", headers={"X-Forwarded-Prefix": "/ops/queues/"})
        links = _parse(page.text).links
        assert links and all(link.startswith("/ops/queues/") for link in links), links
        for bad in ('/"><script>', "ops", "//evil.example", "/a b"):
            page = http.get("/", headers={"X-Forwarded-Prefix": bad})
            assert all(link.startswith("/") and not link.startswith("//") for link in
                       _parse(page.text).links)  # fmt: skip
            assert "evil" not in page.text and "<script>" not in page.text


def test_a_frozen_master_stalls_only_the_pages_that_need_it(
    fresh_cluster: Any, prefix: str
) -> None:
    """SIGSTOP the master of one queue: its page waits (then says what failed), while the
    page of a queue on another master, asked afterwards, answers meanwhile."""
    import signal

    cluster = fresh_cluster()
    topology = cluster.topology()
    names = [f"stall-{n}" for n in range(40)]
    by_master: dict[int, str] = {}
    for name in names:
        master = topology.locate(name).master
        assert master is not None
        by_master.setdefault(master.port, name)
    (frozen_port, slow), (_, fast) = list(by_master.items())[:2]
    seed = next(p for p in by_master if p != frozen_port)
    url = f"redis://127.0.0.1:{seed}"
    with Client(url, prefix=prefix) as client:
        client.enqueue("job", 1, queue=slow)
        client.enqueue("job", 1, queue=fast)
    answers: dict[str, int] = {}
    entered = threading.Event()

    def get(base: str, name: str) -> None:
        try:
            with urllib.request.urlopen(f"{base}/queue?name={name}", timeout=120) as reply:
                answers[name] = reply.status
        except urllib.error.HTTPError as exc:
            answers[name] = exc.code

    backend = Backend(url, prefix=prefix, retry_timeout=30.0)  # the stuck page waits long
    app = create_app(backend=backend, prefix=prefix)
    admin = app.state.admin
    real = admin.queue

    def queue(name: str) -> Any:
        if name == slow:
            entered.set()  # the stuck page is now in the admin API, on the frozen master
        return real(name)

    admin.queue = queue
    for base in _serve(app):
        get(base, fast)  # warm: the map read, the connections made
        answers.clear()
        cluster.kill_node(frozen_port, signal.SIGSTOP)
        try:
            stuck = threading.Thread(target=get, args=(base, slow), daemon=True)
            stuck.start()
            assert entered.wait(30), "the frozen master's page never reached the admin API"
            get(base, fast)
            assert answers.get(fast) == 200  # answered while the other page waits
            assert slow not in answers and stuck.is_alive()
        finally:
            cluster.kill_node(frozen_port, signal.SIGCONT)
        stuck.join(120)
        assert answers.get(slow) == 200  # and that one too, once the master is back
    backend.close()


def test_several_clusters_in_one_ui(standalone: Any, cluster: Any, prefix: str) -> None:
    """The standalone server and the 6-node cluster as two clusters of one UI: each one's
    pages under /c/NAME/ show its own queues, every page can switch to the other, the
    credentials are asked once for all, a viewer acts on neither."""
    from clusterq.ops.web import create_multi_app
    from tests.test_web import _parse

    for url, name in ((standalone.seed_url, "on-one"), (cluster.seed_url, "on-six")):
        with Client(url, prefix=prefix) as client:
            client.enqueue("job", 1, queue=name)
    app = create_multi_app(
        {"one": standalone.seed_url, "six": cluster.seed_url},
        prefix=prefix,
        auth=("ops", "pw"),
        viewers=[("eve", "look")],
    )
    with TestClient(app) as http:
        assert http.get("/c/six/").status_code == 401  # checked once, for every cluster
        first = http.get("/", auth=("ops", "pw"), follow_redirects=False)
        assert first.status_code == 307 and first.headers["location"] == "/c/one/"
        pages = {n: http.get(f"/c/{n}/", auth=("ops", "pw")) for n in ("one", "six")}
        shown = {n: {r["data-queue"] for r in _parse(p.text).rows} for n, p in pages.items()}
        assert "on-one" in shown["one"] and "on-one" not in shown["six"]
        assert "on-six" in shown["six"] and "on-six" not in shown["one"]
        links = _parse(pages["one"].text).links
        assert "/c/six/" in links and all(link.startswith("/c/") for link in links), links
        rows = [r for r in _parse(pages["six"].text).rows]
        assert {r["data-master"] for r in rows} != {"-"}  # the cluster's masters
        viewer = http.get("/c/six/queue?name=on-six", auth=("eve", "look"))
        assert viewer.status_code == 200 and "<form" not in viewer.text
        token = re.search(
            r'name="csrf" value="([0-9a-f]+)"',
            http.get("/c/six/queue?name=on-six", auth=("ops", "pw")).text,
        )
        assert token is not None
        refused = http.post(
            "/c/six/queue/pause?name=on-six", data={"csrf": token.group(1)}, auth=("eve", "look")
        )
        assert refused.status_code == 403
        done = http.post(
            "/c/six/queue/pause?name=on-six",
            data={"csrf": token.group(1)},
            auth=("ops", "pw"),
            follow_redirects=False,
        )
        assert done.status_code == 303 and done.headers["location"] == "/c/six/queue?name=on-six"
    with Admin(cluster.seed_url, prefix=prefix) as admin:
        assert admin.queue("on-six").paused


def test_a_dead_node_is_named_on_the_cluster_page_and_the_rest_renders(
    fresh_cluster: Any, prefix: str
) -> None:
    import signal

    cluster = fresh_cluster()
    replica = next(n for n in cluster.topology().nodes if n.role == "replica")
    master = next(n for n in cluster.topology().nodes if n.role == "master")
    url = f"redis://127.0.0.1:{master.port}"
    backend = Backend(url, prefix=prefix, retry_timeout=1.0)
    with TestClient(create_app(backend=backend, prefix=prefix)) as http:
        cluster.kill_node(replica.port, signal.SIGKILL)
        try:
            page = http.get("/cluster")
        finally:
            cluster.restart_node(replica.port)
    backend.close()
    assert page.status_code == 200
    rows = re.findall(r'<tr class="node" data-role="\w+">(.*?)</tr>', page.text, re.S)
    dead = [r for r in rows if f"127.0.0.1:{replica.port}<" in r]
    assert len(rows) == 6 and len(dead) == 1
    assert 'class="memory">n/a (' in dead[0]
    alive = [r for r in rows if r is not dead[0]]
    assert all('class="memory">n/a' not in r for r in alive)


def test_two_prefixes_of_one_server_as_two_clusters(standalone: Any, prefix: str) -> None:
    from clusterq.ops.web import create_multi_app
    from tests.test_web import _parse

    url = standalone.seed_url
    prefixes = {"blue": prefix + "-blue", "green": prefix + "-green"}
    for name, own in prefixes.items():
        with Client(url, prefix=own) as client:
            client.enqueue("job", 1, queue=f"only-{name}")
    backends = {name: Backend(url, prefix=own) for name, own in prefixes.items()}
    with TestClient(create_multi_app(dict(backends.items()))) as http:
        for name in prefixes:
            rows = {r["data-queue"] for r in _parse(http.get(f"/c/{name}/").text).rows}
            assert rows == {f"only-{name}"}
    for backend in backends.values():
        backend.close()

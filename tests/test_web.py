"""``clusterq web`` (issue 29, first pages): the overview, the cluster's slot map and a
queue's page, against the session's real servers: over HTTP with Starlette's test client,
and in Debian's headless Chromium (``chromium --dump-dom``) served by uvicorn. What the
pages show is compared with what the admin API (``queue ls --cluster --json``) reads."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any

import pytest
from starlette.testclient import TestClient

from clusterq import Admin, Client
from clusterq.cluster.topology import NodeInfo, Shard, Topology
from clusterq.ops.web import create_app
from clusterq.ops.web.slotmap import SLOTS, UNCOVERED, render, spans
from clusterq.tools import servers
from clusterq.tools.devcluster import LocalCluster

EVIL = "<script>alert(1)</script>"


class _Rows(HTMLParser):
    """The attributes of the elements with a ``data-queue`` (rows of the overview), the
    ``href``/``action`` of every link and form, and whether a script tag other than the
    UI's own was seen."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, str]] = []
        self.links: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        if "data-queue" in found:
            self.rows.append(found)
        for name in ("href", "action"):
            if name in found:
                self.links.append(found[name])
        if tag == "script" and not found.get("src", "").endswith("/static/live.js"):
            self.scripts += 1  # any script but the UI's own


def _parse(html: str) -> _Rows:
    parser = _Rows()
    parser.feed(html)
    return parser


@pytest.fixture
def queues(url: str, prefix: str) -> list[str]:
    names = ["web-a", "web-b", "web-c", EVIL]
    with Client(url, prefix=prefix) as client:
        for i, name in enumerate(names):
            client.enqueue("job", {"i": i, "note": EVIL}, queue=name)
    return names


def test_the_overview_shows_each_queue_under_its_master(
    url: str, prefix: str, queues: list[str]
) -> None:
    with TestClient(create_app(url, prefix=prefix)) as http:
        page = http.get("/")
    assert page.status_code == 200
    shown = {row["data-queue"]: row for row in _parse(page.text).rows}
    with Admin(url, prefix=prefix) as admin:
        listed = {q.queue: q.to_dict() for q in admin.queues()}  # queue ls --cluster --json
    assert set(shown) == set(listed) >= set(queues)
    for name, row in shown.items():
        assert int(row["data-keyslot"]) == listed[name]["keyslot"]
        assert row["data-master"] == (listed[name]["master"] or "-")
    # every queue sits in the table of the master that owns its slot
    for table in re.findall(
        r'<table class="master" data-master="([^"]*)">(.*?)</table>', page.text, re.S
    ):
        master, body = table
        for row in _parse(body).rows:
            assert row["data-master"] == master


def test_names_and_payloads_are_shown_as_text(url: str, prefix: str, queues: list[str]) -> None:
    with TestClient(create_app(url, prefix=prefix)) as http:
        pages = [http.get("/"), http.get("/cluster"), http.get("/queue", params={"name": EVIL})]
    for page in pages:
        assert page.status_code == 200
        assert EVIL not in page.text and _parse(page.text).scripts == 0
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in pages[2].text


def test_the_cluster_page_draws_every_slot_and_each_queue(
    cluster: LocalCluster, prefix: str
) -> None:
    url = cluster.seed_url
    with Client(url, prefix=prefix) as client:
        client.enqueue("job", 1, queue="mapped")
    with TestClient(create_app(url, prefix=prefix)) as http:
        page = http.get("/cluster")
    assert page.status_code == 200
    span = (
        r'<rect class="span( uncovered)?" x="[^"]*" y="0" width="[^"]*" height="\d+" '
        r'fill="([^"]*)"><title>slots (\d+)-(\d+): ([^<]*)</title>'
    )
    rects = re.findall(span, page.text)
    assert rects and not any(uncovered for uncovered, *_ in rects)
    assert sum(int(end) - int(start) + 1 for _, _, start, end, _ in rects) == SLOTS
    assert len({who for *_, who in rects}) == 3  # three masters, a colour each
    with Admin(url, prefix=prefix) as admin:
        keyslot = admin.queue("mapped").keyslot
    assert f"<title>mapped: slot {keyslot}</title>" in page.text
    roles = re.findall(r'<tr class="node" data-role="(\w+)">', page.text)
    assert sorted(roles) == ["master"] * 3 + ["replica"] * 3
    assert "no replica" not in page.text
    # each node's own INFO, and each replica's lag behind its master
    cells = re.findall(
        r'<tr class="node" data-role="(\w+)">.*?<td class="lag">([^<]*)</td>'
        r'<td class="memory">([^<]*)</td><td class="clients">([^<]*)</td>',
        page.text,
        re.S,
    )
    assert len(cells) == 6
    for role, lag, memory, clients in cells:
        assert re.fullmatch(r"[\d.]+[BKMG]", memory) and int(clients) >= 1, (memory, clients)
        assert lag == "" if role == "master" else re.fullmatch(r"[\d,]+ B", lag), (role, lag)


def _topology(*shards: tuple[tuple[int, int], str]) -> Topology:
    nodes = [NodeInfo(f"id{i}", "127.0.0.1", 7000 + i, "master") for i in range(len(shards))]
    return Topology(
        "cluster",
        tuple(Shard((rng,), node) for (rng, _), node in zip(shards, nodes, strict=True)),
        tuple(nodes),
    )


def test_the_slot_map_marks_uncovered_slots_red_and_escapes_names() -> None:
    topology = _topology(((0, 99), "a"), ((200, 16383), "b"))
    bar, colours = spans(topology)
    assert [(s.start, s.end, s.master) for s in bar] == [
        (0, 99, "127.0.0.1:7000"), (100, 199, None), (200, 16383, "127.0.0.1:7001"),
    ]  # fmt: skip
    assert bar[1].colour == UNCOVERED and len(set(colours.values())) == 2
    svg = render(topology, [(EVIL, 150)])
    assert EVIL not in svg and "&lt;script&gt;" in svg and 'class="span uncovered"' in svg


def test_a_queue_is_paused_and_unpaused_with_the_csrf_token(
    url: str, prefix: str, queues: list[str]
) -> None:
    app = create_app(url, prefix=prefix, secret="s3cret")
    with TestClient(app) as http, Admin(url, prefix=prefix) as admin:
        page = http.get("/queue?name=web-a")
        token = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
        assert token is not None
        refused = http.post("/queue/pause?name=web-a", data={"csrf": "0" * 64})
        assert refused.status_code == 403 and not admin.queue("web-a").paused
        refused = http.post("/queue/pause?name=web-a", data={"csrf": "é" * 64})
        assert refused.status_code == 403 and not admin.queue("web-a").paused
        refused = http.post("/queue/pause?name=web-a")
        assert refused.status_code == 403 and not admin.queue("web-a").paused
        done = http.post(
            "/queue/pause?name=web-a", data={"csrf": token.group(1)}, follow_redirects=False
        )
        assert done.status_code == 303 and done.headers["location"] == "/queue?name=web-a"
        assert admin.queue("web-a").paused
        assert "Unpause" in http.get("/queue?name=web-a").text
        http.post("/queue/unpause?name=web-a", data={"csrf": token.group(1)})
        assert not admin.queue("web-a").paused


def test_read_only_shows_no_action_and_refuses_every_post(
    url: str, prefix: str, queues: list[str]
) -> None:
    app = create_app(url, prefix=prefix, read_only=True, secret="s3cret")
    with TestClient(app) as http, Admin(url, prefix=prefix) as admin:
        for path in ("/", "/cluster", "/queue?name=web-a"):
            page = http.get(path)
            assert (
                page.status_code == 200 and "<form" not in page.text and "<button" not in page.text
            )
        for action in ("pause", "unpause"):
            assert http.post(f"/queue/{action}?name=web-a", data={"csrf": "x"}).status_code == 403
        assert not admin.queue("web-a").paused


def test_under_a_root_path_every_link_starts_with_it(
    url: str, prefix: str, queues: list[str]
) -> None:
    with TestClient(create_app(url, prefix=prefix), root_path="/q") as http:
        links = [
            link
            for path in ("/", "/cluster", "/queue?name=web-a")
            for link in _parse(http.get(path).text).links
        ]
    assert links and all(link.startswith("/q/") for link in links), links


def test_basic_auth_is_asked_for_every_request(url: str, prefix: str, queues: list[str]) -> None:
    app = create_app(url, prefix=prefix, auth=("ops", "pw"))
    with TestClient(app) as http:
        for path in ("/", "/cluster", "/api/queues"):
            page = http.get(path)
            assert page.status_code == 401 and "Basic" in page.headers["www-authenticate"]
            assert http.get(path, auth=("ops", "wrong")).status_code == 401
            assert http.get(path, headers={"Authorization": b"Basic \xe9"}).status_code == 401
            assert http.get(path, auth=("ops", "pw")).status_code == 200


def test_the_api_lists_the_queues_as_queue_ls_does(
    url: str, prefix: str, queues: list[str]
) -> None:
    with TestClient(create_app(url, prefix=prefix)) as http:
        data = http.get("/api/queues").json()
    with Admin(url, prefix=prefix) as admin:
        listed = admin.queues()
    assert {q["queue"]: q["keyslot"] for q in data} == {q.queue: q.keyslot for q in listed}


# ---------------------------------------------------------------------- in Chromium


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CLUSTERQ_REQUIRE_CHROMIUM") == "1":
            pytest.fail(
                "no chromium, and CLUSTERQ_REQUIRE_CHROMIUM=1 (scripts/setup.sh installs Debian's)"
            )
        pytest.skip("no chromium on PATH (scripts/setup.sh installs Debian's where it may)")
    return found


@pytest.fixture
def served(cluster: LocalCluster, prefix: str) -> Iterator[str]:
    """The UI on the session's cluster, served by uvicorn on a free loopback port."""
    import uvicorn

    port = servers.find_free_ports(1, with_bus=False)
    config = uvicorn.Config(
        create_app(cluster.seed_url, prefix=prefix),
        host="127.0.0.1",
        port=port,
        log_level="warning",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def _browse(chromium: str, url: str, *args: str) -> str:
    done = subprocess.run(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-dev-shm-usage", *args, url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_chromium_renders_every_page(
    served: str, cluster: LocalCluster, prefix: str, tmp_path: Any
) -> None:
    chromium = _chromium()
    with Client(cluster.seed_url, prefix=prefix) as client:
        for name in ("browser-a", "browser-b", EVIL):
            client.enqueue("job", {"note": EVIL}, queue=name)
    overview = _browse(chromium, served + "/", "--dump-dom")
    rows = {row["data-queue"]: row for row in _parse(overview).rows}
    with Admin(cluster.seed_url, prefix=prefix) as admin:
        listed = {q.queue: q for q in admin.queues()}
    assert set(rows) == set(listed)
    for name, row in rows.items():
        assert int(row["data-keyslot"]) == listed[name].keyslot
        assert row["data-master"] == listed[name].master
    assert _parse(overview).scripts == 0  # the queue named like a script stayed text
    assert "Queues by master" in overview
    cluster_page = _browse(chromium, served + "/cluster", "--dump-dom")
    assert cluster_page.count('class="span"') >= 3 and "uncovered" not in cluster_page
    queue_page = _browse(chromium, served + "/queue?name=browser-a", "--dump-dom")
    assert 'id="queue-name">browser-a<' in queue_page
    shot = tmp_path / "overview.png"
    _browse(chromium, served + "/", f"--screenshot={shot}", "--window-size=1280,900")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps({"screenshot": str(shot)})


def test_clusterq_web_serves_read_only_under_a_root_path_with_auth(
    url: str, prefix: str, queues: list[str], clusterq_bin: str
) -> None:
    """``clusterq web --read-only --root-path /q --auth ops:pw`` as a user starts it: a
    request without the password gets 401, with it the overview (links under /q), and a
    POST 403."""
    port = servers.find_free_ports(1, with_bus=False)
    command = [clusterq_bin, "--url", url, "--prefix", prefix, "web", "--port", str(port)]
    command += ["--read-only", "--root-path", "/q", "--auth", "ops:pw"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    auth = "Basic " + base64.b64encode(b"ops:pw").decode()

    def get(path: str, **headers: str) -> tuple[int, str]:
        request = urllib.request.Request(base + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""

    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                status, _ = get("/")
                break
            except OSError:
                assert time.monotonic() < deadline, "clusterq web did not start"
                time.sleep(0.1)
        assert status == 401
        status, page = get("/", Authorization=auth)
        assert status == 200 and "web-a" in page
        links = _parse(page).links
        assert links and all(link.startswith("/q/") for link in links)
        post = urllib.request.Request(
            base + "/queue/pause?name=web-a", data=b"csrf=x", headers={"Authorization": auth}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(post, timeout=10)
        assert refused.value.code == 403
    finally:
        proc.terminate()
        proc.wait(10)

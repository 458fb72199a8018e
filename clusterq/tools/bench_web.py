"""``clusterq bench web``: what the web UI costs the cluster (the ``web`` extra).

The UI is served by uvicorn on a free loopback port over ``queues`` queues (default 50,
one task each). Measured: how long the overview takes to render (sequential GETs of
``/``), and the commands per second the masters receive while pages stay open — 1 and
10 pages on the live overview (server-sent events from one shared poller), against the
same pages each polling ``/api/queues`` at the same interval (what a UI without a
shared poller does)."""

from __future__ import annotations

import threading
import time
import urllib.request
from typing import Any

from clusterq.errors import ConfigError
from clusterq.tools import servers
from clusterq.tools.bench_handlers import NOOP_TYPE
from clusterq.tools.bench_report import BenchRow, ms_percentiles
from clusterq.tools.bench_session import Session
from clusterq.tools.bench_spread import _per_master

#: Seconds between live updates (and between a polling page's reads) in the benchmark.
INTERVAL = 0.5
#: Seconds each way of keeping pages open is measured.
WINDOW = 3.0
#: Overview renders timed.
RENDERS = 30


def bench_web(s: Session) -> list[BenchRow]:
    try:
        import uvicorn

        from clusterq.ops.web import create_app
    except ImportError:
        raise ConfigError("bench web needs the web extra: pip install 'clusterq[web]'") from None
    n = s.settings.queues or 50
    queues = s.queues(n)
    try:
        for queue in queues:
            s.client.enqueue(NOOP_TYPE, {"run": s.run_id}, queue=queue)
        app = create_app(s.settings.url, prefix=s.settings.prefix, interval=INTERVAL)
        port = servers.find_free_ports(1, with_bus=False)
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise ConfigError("bench web: uvicorn did not start")
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        try:
            rows = [_renders(s, base, n)]
            for pages in (1, 10):
                rows.append(_open_pages(s, base, pages, live=True))
                rows.append(_open_pages(s, base, pages, live=False))
        finally:
            server.should_exit = True
            thread.join(10)
    finally:
        s.drop(queues)
    return rows


def _renders(s: Session, base: str, n: int) -> BenchRow:
    samples = []
    started = time.perf_counter()
    for i in range(RENDERS):
        begun = time.perf_counter()
        with urllib.request.urlopen(base + "/", timeout=30) as reply:
            reply.read()
        samples.append(time.perf_counter() - begun)
        s.progress("web: overview renders", i + 1, RENDERS)
    seconds = time.perf_counter() - started
    p50, p99 = ms_percentiles(samples)
    return BenchRow(
        f"web: overview, {n} queues",
        RENDERS,
        round(seconds, 3),
        RENDERS / seconds,
        p50,
        p99,
        note="pages/s, one after the other (each reads every queue's row)",
    )


def _open_pages(s: Session, base: str, pages: int, *, live: bool) -> BenchRow:
    """``pages`` pages open for WINDOW seconds: listening to the live overview, or each
    reading /api/queues every INTERVAL (their own polling)."""
    stop = time.monotonic() + WINDOW + 1.0
    received = [0] * pages

    def listen(n: int) -> None:
        with urllib.request.urlopen(base + "/live/queues", timeout=30) as stream:
            for line in stream:
                if line.startswith(b"data: "):
                    received[n] += 1
                if time.monotonic() > stop:
                    return

    def poll(n: int) -> None:
        while time.monotonic() < stop:
            with urllib.request.urlopen(base + "/api/queues", timeout=30) as reply:
                reply.read()
            received[n] += 1
            time.sleep(INTERVAL)

    threads = [
        threading.Thread(target=listen if live else poll, args=(n,), daemon=True)
        for n in range(pages)
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # every page connected and past its first read
    before, started = _commands(s), time.perf_counter()
    time.sleep(WINDOW)
    after, seconds = _commands(s), time.perf_counter() - started
    for thread in threads:
        thread.join(30)
    rate = (after - before) / seconds
    how = "live (one shared poll)" if live else "each polling /api/queues"
    s.progress(f"web: {pages} page(s) {how}", 1, 1)
    return BenchRow(
        f"web: {pages} page(s), {how}",
        pages,
        round(seconds, 3),
        None,
        note=f"{rate:,.0f} commands/s on the server(s), reads every {INTERVAL:g} s; "
        f"{sum(received)} updates received",
        extra={"commands_per_s": round(rate, 1), "pages": pages, "live": live},
    )


def _commands(s: Session) -> int:
    """Commands processed so far by the masters (the server, standalone)."""
    masters = _per_master(s)
    if masters:
        return sum(count for count, _ in masters.values())
    info: Any = s.backend.node(s.backend.url.seeds[0]).info("stats")
    return int(info["total_commands_processed"])

"""`clusterq worker run --processes N`: a supervisor and its worker processes — hard time
limits on sync handlers, recycling by task count and by memory, a child killed, signals,
`worker ls` and metrics over the processes.

Every run of a handler is counted outside clusterq twice: a line in a file per process
(tests.workload) and a redis-py HINCRBY on the standalone server (not the one under test
when the queue is on the cluster). The supervisor's replacements come from its JSON log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from clusterq import Client, Inspector
from clusterq.cli import main
from clusterq.tools.devcluster import LocalCluster, LocalServer
from clusterq.tools.servers import find_free_ports
from tests.helpers import StartWorker, wait_for
from tests.workload import read_events


@pytest.fixture
def counts(standalone: LocalServer, prefix: str, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """``counts()`` -> Counter of "<event> <task id>" as the handlers counted through
    redis-py (the handlers of worker processes started after this fixture)."""
    url = str(standalone.seed_url)
    key = f"{prefix}:test-counts"
    monkeypatch.setenv("CLUSTERQ_TEST_COUNT_URL", url)
    monkeypatch.setenv("CLUSTERQ_TEST_COUNT_KEY", key)
    client = redis.Redis.from_url(url)

    class Counts:
        def __call__(self) -> Counter[str]:
            return Counter({k.decode(): int(v) for k, v in client.hgetall(key).items()})

    return Counts()  # type: ignore[return-value]


def _supervisor_events(proc: subprocess.Popen[str], kind: str) -> list[dict[str, Any]]:
    """The supervisor's events of ``kind`` from its JSON log, each with its log time."""
    events = []
    for line in Path(proc.log_path).read_text().splitlines():  # type: ignore[attr-defined]
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        event = entry.get("event")
        if isinstance(event, dict) and event.get("event") == kind:
            events.append({**event, "time": entry["time"]})
    return events


def _seconds(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


def _per_task(counted: Counter[str], event: str) -> Counter[str]:
    return Counter({k.split(" ", 1)[1]: n for k, n in counted.items() if k.startswith(event + " ")})


def _done_by_pid(log_dir: Path) -> dict[int, Counter[str]]:
    """Per process: the task ids whose 'done' line it wrote."""
    out: dict[int, Counter[str]] = {}
    for path in log_dir.glob("*.log"):
        lines = path.read_text().splitlines()
        out[int(path.stem)] = Counter(x.split(" ", 1)[1] for x in lines if x.startswith("done "))
    return out


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def _state(url: str, prefix: str, task_id: str) -> Any:
    with Client(url, prefix=prefix) as client:
        return client.info(task_id, queue="default")


@pytest.mark.parametrize("how", ["sleep", "spin"])
def test_a_stuck_sync_handler_is_killed_retried_then_archived(
    url: str,
    prefix: str,
    how: str,
    start_worker: StartWorker,
    log_dir: Path,
    counts: Any,
) -> None:
    """time.sleep(3600) (GIL released) and `while True: pass` (GIL held), timeout 1 s,
    one retry: each attempt ends as a timeout, its process is replaced, the task is
    archived after its retry; the other tasks all run, each once."""
    with Client(url, prefix=prefix) as client:
        stuck = client.enqueue("stuck", {"how": how}, timeout=1, max_retry=1, retention=600)
        others = [t.id for t in client.enqueue_many([("counted", {})] * 300)]
    worker = start_worker(
        url,
        "--processes",
        "2",
        "--shutdown-timeout",
        "5",
        "--log-format",
        "json",
        "--streams",
        "none",
    )
    info = wait_for(
        lambda: (i := _state(url, prefix, stuck.id)).state == "archived" and i,
        90,
        "the stuck task to be archived after its retry",
    )
    assert info.retried == 1
    assert info.last_error is not None and "timeout" in info.last_error
    assert _per_task(counts(), "start")[stuck.id] == 2  # both attempts ran, no third
    wait_for(lambda: set(_per_task(counts(), "done")) == set(others), 60, "the others")
    assert set(_per_task(counts(), "done").values()) == {1}  # each once
    replaced = _supervisor_events(worker, "process_replaced")
    causes = Counter(e["cause"] for e in replaced)
    # Each attempt's process was replaced (one process may have held both attempts).
    assert causes["hard_timeout"] in (1, 2), replaced
    assert set(causes) == {"hard_timeout"}

    # What the replaced processes did with the rest they held: finished, or handed back.
    def gone() -> list[dict[str, Any]]:
        exited = _supervisor_events(worker, "process_exited")
        return [e for e in exited if e["reason"].startswith("task ")]

    left = wait_for(lambda: len(gone()) == len(replaced) and gone(), 30, "them to exit")
    assert all("returned" in e for e in left)  # each said so before it went
    print(
        f"\nstuck ({how}): {len(replaced)} process(es) replaced; they processed "
        f"{sum(e['processed'] for e in left)} and handed back {sum(e['returned'] for e in left)}"
    )
    _stop(worker)


def test_hard_timeout_applies_to_sync_handlers_without_a_timeout(
    standalone: LocalServer,
    prefix: str,
    start_worker: StartWorker,
    counts: Any,
) -> None:
    url = str(standalone.seed_url)
    with Client(url, prefix=prefix) as client:
        stuck = client.enqueue("stuck", {"how": "sleep"}, max_retry=0, retention=600)
    worker = start_worker(
        url, "--processes", "1", "--hard-timeout", "1", "--log-format", "json", "--streams", "none"
    )
    info = wait_for(
        lambda: (i := _state(url, prefix, stuck.id)).state == "archived" and i,
        60,
        "the task to be archived",
    )
    assert info.last_error is not None and "timeout" in info.last_error
    wait_for(lambda: _supervisor_events(worker, "process_replaced"), 20, "the replacement")
    _stop(worker)


def test_recycling_by_task_count_runs_every_task_once(
    standalone: LocalServer,
    prefix: str,
    start_worker: StartWorker,
    log_dir: Path,
    counts: Any,
) -> None:
    """5,000 tasks, --max-tasks-per-process 500: processes take their 500 (never one
    more) and are replaced; every task is done exactly once."""
    url = str(standalone.seed_url)
    with Client(url, prefix=prefix) as client:
        ids = [t.id for t in client.enqueue_many([("counted", {})] * 5000)]
    worker = start_worker(
        url,
        "--processes",
        "2",
        "--max-tasks-per-process",
        "500",
        "--log-format",
        "json",
        "--streams",
        "none",
        concurrency=8,
    )
    wait_for(lambda: len(_per_task(counts(), "done")) == 5000, 120, "all 5,000 tasks")
    done = _per_task(counts(), "done")
    assert set(done) == set(ids) and set(done.values()) == {1}
    assert Counter(e for e, _ in read_events(log_dir))["done"] == 5000
    # No process took more than its 500; each that took 500 was replaced (the last two
    # shared what was left: 9 or 10 replacements).
    ran = sorted(c.total() for c in _done_by_pid(log_dir).values())
    assert sum(ran) == 5000 and ran[-1] == 500 and ran.count(500) >= 9
    replaced = wait_for(
        lambda: (
            (r := _supervisor_events(worker, "process_replaced")) and len(r) >= ran.count(500) and r
        ),
        30,
        "a replacement for each process that took its 500",
    )
    assert [e["cause"] for e in replaced] == ["max_tasks"] * ran.count(500)
    _stop(worker)


def test_recycling_by_memory_runs_every_task_once(
    standalone: LocalServer,
    prefix: str,
    start_worker: StartWorker,
    log_dir: Path,
    counts: Any,
) -> None:
    """A handler keeping ~1 MiB per task, 5,000 tasks, --max-memory-per-process: the
    processes are replaced as they grow; every task is done exactly once."""
    url = str(standalone.seed_url)
    with Client(url, prefix=prefix) as client:
        ids = [t.id for t in client.enqueue_many([("leak", {})] * 5000)]
    limit = 400  # MiB: a fresh process is well under, ~5,000 MiB of leaks well over
    worker = start_worker(
        url,
        "--processes",
        "2",
        "--max-memory-per-process",
        str(limit),
        "--log-format",
        "json",
        "--streams",
        "none",
    )
    wait_for(lambda: len(_per_task(counts(), "done")) == 5000, 240, "all 5,000 tasks")
    done = _per_task(counts(), "done")
    assert set(done) == set(ids) and set(done.values()) == {1}
    replaced = _supervisor_events(worker, "process_replaced")
    assert replaced and {e["cause"] for e in replaced} == {"memory"}
    # No process ran much past the limit: ~1 MiB per task, checked after each task.
    assert max(c.total() for c in _done_by_pid(log_dir).values()) < limit
    print(f"\n5,000 leaking tasks: {len(replaced)} replacements by memory")
    _stop(worker)


def test_kill_9_of_a_child_duplicates_only_what_it_held(
    url: str,
    prefix: str,
    start_worker: StartWorker,
    log_dir: Path,
    counts: Any,
) -> None:
    with Client(url, prefix=prefix) as client:
        ids = [t.id for t in client.enqueue_many([("counted", {})] * 5000)]
    worker = start_worker(
        url, "--processes", "2", "--log-format", "json", "--streams", "none", concurrency=8
    )
    wait_for(lambda: len(_per_task(counts(), "done")) >= 500, 60, "the first 500 tasks")
    victim = _supervisor_events(worker, "process_started")[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(_per_task(counts(), "done")) == 5000, 120, "all 5,000 tasks")
    done = _per_task(counts(), "done")
    assert set(done) == set(ids)  # none lost
    twice = {t for t, n in done.items() if n > 1}
    assert max(done.values()) <= 2
    # A task done twice was done once by the killed process (its ack never landed).
    assert twice <= set(_done_by_pid(log_dir).get(victim, Counter()))
    replaced = _supervisor_events(worker, "process_replaced")
    assert [(e["pid"], e["cause"]) for e in replaced] == [(victim, "died")]
    [exited] = [e for e in _supervisor_events(worker, "process_exited") if e["pid"] == victim]
    [new] = _supervisor_events(worker, "process_started")[2:]
    delay = _seconds(new["time"]) - _seconds(exited["time"])
    print(
        f"\nkill -9 of a child during 5,000 tasks: {len(twice)} done twice, 0 lost; "
        f"replaced {delay * 1000:.0f} ms after its exit was seen"
    )
    _stop(worker)


def test_sigterm_stops_every_process_gracefully(
    standalone: LocalServer,
    prefix: str,
    start_worker: StartWorker,
    log_dir: Path,
) -> None:
    url = str(standalone.seed_url)
    with Client(url, prefix=prefix) as client:
        ids = [t.id for t in client.enqueue_many([("slow", {"seconds": 0.5})] * 4)]
    worker = start_worker(
        url,
        "--processes",
        "2",
        "--shutdown-timeout",
        "30",
        "--log-format",
        "json",
        "--streams",
        "none",
        concurrency=2,
    )
    wait_for(lambda: len([e for e, _ in read_events(log_dir) if e == "start"]) == 4, 30, "4")
    _stop(worker)
    done = Counter(t for e, t in read_events(log_dir) if e == "done")
    assert set(done) == set(ids)  # finished, not abandoned
    exited = _supervisor_events(worker, "process_exited")
    assert len(exited) == 2 and {e["code"] for e in exited} == {0}
    assert not _supervisor_events(worker, "process_replaced")


def test_worker_ls_lists_each_process_under_its_supervisor(
    standalone: LocalServer, prefix: str, start_worker: StartWorker
) -> None:
    url = str(standalone.seed_url)
    worker = start_worker(
        url, "--processes", "3", "--name", "pool-a", "--log-format", "json", "--streams", "none"
    )

    def listed() -> list[dict[str, Any]]:
        result = CliRunner().invoke(
            main, ["--url", url, "--prefix", prefix, "worker", "ls", "--json"]
        )
        assert result.exit_code == 0, result.output
        rows = json.loads(result.output)
        return rows if len(rows) == 3 else []

    rows = wait_for(listed, 30, "three processes to announce themselves")
    assert {r["supervisor"] for r in rows} == {"pool-a"}
    assert sorted(r["process"] for r in rows) == [0, 1, 2]
    started = {e["pid"] for e in _supervisor_events(worker, "process_started")}
    assert {r["pid"] for r in rows} == started
    text = CliRunner().invoke(main, ["--url", url, "--prefix", prefix, "worker", "ls"])
    assert "pool-a" in text.output and "3 processes" in text.output
    with Inspector(url, prefix=prefix) as inspector:
        assert len(inspector.workers()) == 3
    _stop(worker)


def test_limits_without_processes_are_refused(standalone: LocalServer, prefix: str) -> None:
    result = CliRunner().invoke(
        main,
        [
            "--url",
            str(standalone.seed_url),
            "--prefix",
            prefix,
            "worker",
            "tests.workload:router",
            "--max-tasks-per-process",
            "5",
        ],
    )
    assert result.exit_code != 0
    assert "need --processes" in result.output


def test_a_kill_drill_with_two_processes_per_worker_loses_nothing(
    fresh_cluster: Callable[[], LocalCluster], clusterq_bin: str, prefix: str
) -> None:
    """The master of the drill's queue killed under a worker of two processes, then
    (the baseline, same cluster) under two single-process workers: 0 lost both times;
    the resume lags printed side by side."""
    cluster = fresh_cluster()
    lags = {}
    for seed, label, options in (
        (1, "1 worker x 2 processes", ["--workers", "1", "--processes", "2"]),
        (2, "2 workers x 1 process", ["--workers", "2"]),
    ):
        done = subprocess.run(
            [
                clusterq_bin,
                "--url",
                cluster.seed_url,
                "--prefix",
                prefix,
                "drill",
                "failover",
                "--queue",
                "images",
                "--mode",
                "kill",
                "--tasks",
                "2000",
                "--rate",
                "500",
                "--seed",
                str(seed),
                "--json",
                *options,
            ],
            capture_output=True,
            text=True,
            timeout=280,
        )
        assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
        report = json.loads(done.stdout)
        assert report["ok"], report["problems"]
        assert report["lost"] == 0 and report["still_queued"] == 0
        assert report["acknowledged"] == 2000
        assert report["extra_deliveries"] <= report["in_flight_bound"]
        assert report["worker_resume_lag"] is not None  # the processes' events were read
        lags[label] = report["worker_resume_lag"]
    print(f"\nkill drill, worker resume lag: {lags}")


def test_metrics_add_up_over_the_processes(
    standalone: LocalServer, prefix: str, start_worker: StartWorker, counts: Any
) -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    url = str(standalone.seed_url)
    port = find_free_ports(1, with_bus=False)
    with Client(url, prefix=prefix) as client:
        client.enqueue_many([("counted", {})] * 300)
    worker = start_worker(url, "--processes", "2", "--metrics-port", str(port), "--streams", "none")
    wait_for(lambda: len(_per_task(counts(), "done")) == 300, 60, "the 300 tasks")

    def scrape() -> dict[str, float]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return {}
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "clusterq_worker_tasks_total":
                    out[sample.labels["outcome"]] = (
                        out.get(sample.labels["outcome"], 0) + sample.value
                    )
                elif sample.name in ("clusterq_worker_processes",):
                    out[sample.name] = sample.value
        return out

    # Each process reports its own count; the supervisor serves the sum.
    seen = wait_for(lambda: (m := scrape()).get("succeeded") == 300 and m, 30, "the sum")
    assert seen["clusterq_worker_processes"] == 2
    _stop(worker)


def test_run_processes_from_python(
    standalone: LocalServer, prefix: str, log_dir: Path, counts: Any, tmp_path: Path
) -> None:
    """The Python API behind --processes: run_processes(url, router, N, **options)."""
    url = str(standalone.seed_url)
    script = (
        "from clusterq.worker import ProcessLimits, run_processes\n"
        "from tests.workload import router\n"
        f"run_processes({url!r}, router, 2, prefix={prefix!r}, streams='none',\n"
        "              limits=ProcessLimits(max_tasks=50))\n"
    )
    with Client(url, prefix=prefix) as client:
        ids = [t.id for t in client.enqueue_many([("counted", {})] * 200)]
    out = open(tmp_path / "pool.out", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "CLUSTERQ_TEST_LOG_DIR": str(log_dir)},
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: len(_per_task(counts(), "done")) == 200, 60, "the 200 tasks")
        assert set(_per_task(counts(), "done")) == set(ids)
        # 200 tasks, 50 per process: at least three processes took their 50 and left.
        assert sum(1 for c in _done_by_pid(log_dir).values() if c.total() == 50) >= 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        out.close()


def test_processes_that_cannot_start_stop_the_supervisor_with_the_reason(
    dead_port: int, clusterq_bin: str
) -> None:
    """A wrong URL: the first processes die before their worker starts. The supervisor
    says so and exits 1, instead of restarting them for ever."""
    done = subprocess.run(
        [
            clusterq_bin,
            "--url",
            f"redis://127.0.0.1:{dead_port}",
            "worker",
            "tests.workload:router",
            "--processes",
            "2",
            "--streams",
            "none",
        ],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert f"cannot reach 127.0.0.1:{dead_port}" in done.stderr
    assert "before its worker started" in done.stderr.splitlines()[-1]


def test_cpus_pin_each_process_to_its_cpu(
    standalone: LocalServer, prefix: str, start_worker: StartWorker
) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    spec = ",".join(str(c) for c in allowed)
    worker = start_worker(
        str(standalone.seed_url),
        "--processes",
        "2",
        "--cpus",
        spec,
        "--log-format",
        "json",
        "--streams",
        "none",
    )
    started = wait_for(
        lambda: len(s := _supervisor_events(worker, "process_started")) == 2 and s, 30, "both"
    )

    def pinned() -> dict[int, set[int]]:
        # pinned as each process starts: wait until both have started their workers
        return {e["index"]: os.sched_getaffinity(e["pid"]) for e in started}

    wait_for(lambda: all(len(c) == 1 for c in pinned().values()), 30, "both pinned")
    assert pinned() == {i: {allowed[i % len(allowed)]} for i in (0, 1)}
    _stop(worker)


@pytest.mark.parametrize("spec", ["999", "1-", "x"])
def test_bad_cpus_are_refused_in_one_line(standalone: LocalServer, spec: str) -> None:
    result = CliRunner().invoke(
        main,
        ["--url", str(standalone.seed_url), "worker", "tests.workload:router", "--cpus", spec],
    )
    assert result.exit_code != 0
    assert "--cpus" in result.output and "Traceback" not in result.output

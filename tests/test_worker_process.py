"""Worker processes (the installed `clusterq worker`): crashes, signals, a 10k scenario."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from clusterq import Client, Inspector, TaskSpec
from clusterq.cli import main
from clusterq.tools.devcluster import LocalCluster
from tests.helpers import StartWorker, wait_for
from tests.workload import read_events

ROOT = Path(__file__).resolve().parents[1]
QUEUES = ("images", "webhooks", "notifications")
#: What a worker logs when it hands unfinished tasks back to their queue.
HANDED_BACK = re.compile(r"returned \d+ unfinished tasks")


def _output(proc: subprocess.Popen[str]) -> str:
    return Path(proc.log_path).read_text()  # type: ignore[attr-defined]


def _events(log_dir: Path, kind: str) -> Counter[str]:
    return Counter(task_id for event, task_id in read_events(log_dir) if event == kind)


def _quiet(url: str, prefix: str) -> bool:
    with Inspector(url, prefix=prefix) as inspector:
        return all(
            (q.pending, q.active, q.scheduled, q.retry, q.archived) == (0, 0, 0, 0, 0)
            for q in inspector.queues()
        )


def test_kill_9_mid_task_runs_again_and_completes(
    url: str, prefix: str, start_worker: StartWorker, log_dir: Path
) -> None:
    with Client(url, prefix=prefix) as client:
        info = client.enqueue("slow", {"seconds": 1.0}, retention=60)
        first = start_worker(url)
        wait_for(lambda: _events(log_dir, "start")[info.id] == 1, 20, "the task to start")
        first.kill()  # SIGKILL: no goodbye, the lease is all that is left
        first.wait(timeout=10)
        assert _events(log_dir, "done")[info.id] == 0
        start_worker(url)
        wait_for(lambda: _events(log_dir, "done")[info.id] == 1, 30, "the task to run again")
        done = wait_for(lambda: (i := client.info(info)).state == "completed" and i, 10, "the ack")
    assert _events(log_dir, "start")[info.id] == 2
    assert done.state == "completed" and done.retried == 1
    assert done.last_error is not None and "lease expired" in done.last_error
    wait_for(lambda: _quiet(url, prefix), 10, "the queue to be empty")


def test_sigterm_during_a_burst_loses_nothing(
    url: str, prefix: str, start_worker: StartWorker, log_dir: Path
) -> None:
    with Client(url, prefix=prefix) as client:
        ids = [t.id for t in client.enqueue_many([("slow", {"seconds": 0.6})] * 30)]
    first = start_worker(url, "--shutdown-timeout", "0.2")
    wait_for(lambda: len(_events(log_dir, "done")) >= 4, 30, "a few tasks to finish")
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=20) == 0
    out = _output(first)
    assert "stopping gracefully" in out and "stopped" in out
    assert HANDED_BACK.search(out)  # tasks still running after the grace period went back

    start_worker(url)
    wait_for(lambda: set(_events(log_dir, "done")) >= set(ids), 60, "every task to complete")
    wait_for(lambda: _quiet(url, prefix), 10, "the queue to be empty")
    with Inspector(url, prefix=prefix) as inspector:
        stats_key = inspector.keys.queue("default").stats
        failed = inspector.backend.execute_key(stats_key, lambda c: c.hget(stats_key, "failed"))
    assert failed is None  # returned tasks did not use up retries


def test_graceful_stop_finishes_active_tasks(
    standalone: object, prefix: str, start_worker: StartWorker, log_dir: Path
) -> None:
    url = standalone.seed_url  # type: ignore[attr-defined]
    with Client(url, prefix=prefix) as client:
        ids = [t.id for t in client.enqueue_many([("slow", {"seconds": 0.5})] * 4)]
    worker = start_worker(url, "--shutdown-timeout", "10")
    wait_for(lambda: len(_events(log_dir, "start")) == 4, 20, "all four to start")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0
    assert set(_events(log_dir, "done")) == set(ids)  # finished, not abandoned
    assert not HANDED_BACK.search(_output(worker))
    assert _quiet(url, prefix)


def test_second_signal_stops_at_once_and_nothing_is_lost(
    standalone: object, prefix: str, start_worker: StartWorker, log_dir: Path
) -> None:
    url = standalone.seed_url  # type: ignore[attr-defined]
    with Client(url, prefix=prefix) as client:
        # Tasks that do not end while the test runs, and an hour of grace: a graceful stop
        # would wait for them, so only the abort can end the process first.
        ids = [t.id for t in client.enqueue_many([("slow", {"seconds": 3600})] * 2)]
    first = start_worker(url, "--shutdown-timeout", "3600")
    wait_for(lambda: len(_events(log_dir, "start")) == 2, 20, "both to start")
    first.send_signal(signal.SIGTERM)
    wait_for(lambda: "stopping gracefully" in _output(first), 10, "the first signal")
    first.send_signal(signal.SIGTERM)
    wait_for(lambda: first.poll() is not None, 60, "the process to end (before its tasks)")
    assert first.returncode == 0
    assert _events(log_dir, "done") == Counter()  # neither task finished
    out = _output(first)
    assert "stopping at once" in out
    assert "aborted; unfinished tasks return when their leases expire" in out  # it ran
    assert not HANDED_BACK.search(out)  # nothing was handed back: the leases bring them back
    start_worker(url)
    wait_for(
        lambda: all(_events(log_dir, "start")[i] == 2 for i in ids),
        60,
        "both tasks to start again in the next worker",
    )


def test_worker_ls_shows_live_workers(
    cluster: LocalCluster, prefix: str, start_worker: StartWorker
) -> None:
    url = cluster.seed_url
    worker = start_worker(url, "--name", "w-ls-1", queues="images=2,webhooks=1", concurrency=3)

    def listed() -> list[dict[str, object]]:
        result = CliRunner().invoke(
            main, ["--url", url, "--prefix", prefix, "worker", "ls", "--json"]
        )
        assert result.exit_code == 0, result.output
        return json.loads(result.output)  # type: ignore[no-any-return]

    [row] = wait_for(listed, 20, "the worker to announce itself")
    assert row["id"] == "w-ls-1" and row["pid"] == worker.pid
    assert row["queues"] == {"images": 2, "webhooks": 1} and row["concurrency"] == 3
    table = CliRunner().invoke(main, ["--url", url, "--prefix", prefix, "worker", "ls"])
    assert "w-ls-1" in table.output and "images=2" in table.output
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=20)
    assert listed() == []


@pytest.mark.slow
def test_ten_thousand_tasks_on_three_masters_with_two_workers(
    cluster: LocalCluster, prefix: str, start_worker: StartWorker, log_dir: Path
) -> None:
    url = cluster.seed_url
    masters = {cluster.topology().locate(q).master.addr for q in QUEUES}  # type: ignore[union-attr]
    assert len(masters) == 3
    with Client(url, prefix=prefix) as client:
        client.enqueue_many(
            [TaskSpec("record", {"i": i}, {"queue": QUEUES[i % 3]}) for i in range(10_000)]
        )
    queues = ",".join(f"{q}=1" for q in QUEUES)
    for _ in range(2):
        start_worker(url, queues=queues, concurrency=20)
    wait_for(lambda: sum(_events(log_dir, "done").values()) >= 10_000, 240, "10,000 tasks")
    done = _events(log_dir, "done")
    assert len(done) == 10_000 and set(done.values()) == {1}  # each exactly once
    assert len(list(log_dir.glob("*.log"))) == 2  # both processes took part
    result = CliRunner().invoke(
        main, ["--url", url, "--prefix", prefix, "queue", "ls", "--cluster", "--json"]
    )
    rows = {r["queue"]: r for r in json.loads(result.output)}
    assert sorted(rows) == sorted(QUEUES)
    assert {rows[q]["master"] for q in QUEUES} == masters
    assert all(rows[q]["pending"] == 0 and rows[q]["active"] == 0 for q in QUEUES)

"""Handlers run by worker processes that the tests start (tests.workload:router).

Each handler appends ``<event> <task id>`` lines to ``$CLUSTERQ_TEST_LOG_DIR/<pid>.log``
so a test can count what every process started and finished, even after kill -9.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

from clusterq import Event, Router, Task

router = Router()
_log_dir = Path(os.environ.get("CLUSTERQ_TEST_LOG_DIR", "."))


def _note(event: str, task: Task) -> None:
    with open(_log_dir / f"{os.getpid()}.log", "a", buffering=1) as handle:
        handle.write(f"{event} {task.id}\n")


@router.task("record")
def record(task: Task) -> str:
    _note("done", task)
    return task.id


@router.task("slow")
def slow(task: Task) -> None:
    """Sleeps payload["seconds"] between a 'start' and a 'done' line (and notes the
    task's headers, if it has any, as ``hdr:<compact JSON>``)."""
    _note("start", task)
    if task.headers:
        _note("hdr:" + json.dumps(dict(task.headers), sort_keys=True, separators=(",", ":")), task)
    time.sleep(float(task.payload.get("seconds", 1.0)))
    _note("done", task)


def _note_event(group: str, event: Event) -> None:
    with open(_log_dir / f"{os.getpid()}.log", "a", buffering=1) as handle:
        # the time: lines of different processes are in different files
        handle.write(f"ev:{group} {event.id} {event.key} {event.payload['seq']} {time.time_ns()}\n")


@router.consumer("orders", group="billing")
async def billing(event: Event) -> None:
    """Unordered: a short pause, then a line per event."""
    await asyncio.sleep(0.002)
    _note_event("billing", event)


@router.consumer("orders", group="ship", ordered=True)
def ship(event: Event) -> None:
    """Ordered: a short pause, then a line per event."""
    time.sleep(0.002)
    _note_event("ship", event)


def read_events(log_dir: Path) -> list[tuple[str, str]]:
    """All (event, task id) lines written by every process."""
    events = []
    for path in sorted(log_dir.glob("*.log")):
        for line in path.read_text().splitlines():
            if " " in line:
                event, task_id = line.split(" ", 1)
                events.append((event, task_id))
    return events


# ------------------------------------------------------------- worker processes' tests

_counter: tuple[int, object] | None = None


def _count(event: str, task: Task) -> None:
    """Also count ``<event> <task id>`` through redis-py, on the server named by
    $CLUSTERQ_TEST_COUNT_URL (not the one under test), if set."""
    global _counter
    url = os.environ.get("CLUSTERQ_TEST_COUNT_URL")
    if not url:
        return
    import redis

    if _counter is None or _counter[0] != os.getpid():  # a forked process: its own
        _counter = (os.getpid(), redis.Redis.from_url(url))
    client = _counter[1]
    assert isinstance(client, redis.Redis)
    client.hincrby(os.environ["CLUSTERQ_TEST_COUNT_KEY"], f"{event} {task.id}", 1)


def _both(event: str, task: Task) -> None:
    _note(event, task)
    _count(event, task)


@router.task("counted")
def counted(task: Task) -> None:
    """A line and a redis-py count per run."""
    _both("done", task)


@router.task("stuck")
def stuck(task: Task) -> None:
    """Never returns on its own: payload["how"] is "sleep" (time.sleep(3600): the GIL
    released) or "spin" (a pure-Python loop holding the GIL)."""
    _both("start", task)
    if task.payload.get("how") == "spin":
        while True:
            pass
    time.sleep(3600)


_leaked: list[bytearray] = []


@router.task("leak")
def leak(task: Task) -> None:
    """Keeps ~1 MiB for ever (per process), then a line and a count."""
    chunk = bytearray(1 << 20)
    chunk[::4096] = b"x" * len(chunk[::4096])  # touched: resident, not just reserved
    _leaked.append(chunk)
    _both("done", task)


# ------------------------------------------------------------------ flow control's tests

_recorder: tuple[int, object] | None = None


def _record(key: str, line: str) -> None:
    """RPUSH ``line`` to ``key`` through redis-py, on the server named by
    $CLUSTERQ_TEST_COUNT_URL (set by the test that started the process)."""
    global _recorder
    import redis

    if _recorder is None or _recorder[0] != os.getpid():  # a forked process: its own
        _recorder = (os.getpid(), redis.Redis.from_url(os.environ["CLUSTERQ_TEST_COUNT_URL"]))
    client = _recorder[1]
    assert isinstance(client, redis.Redis)
    client.rpush(key, line)


@router.task("timed")
def timed(task: Task) -> None:
    """Records ``start <time> <task id> <pid>`` to payload["key"] (through redis-py),
    sleeps payload["seconds"], then records ``end <time> <task id> <pid>``: times from
    time.time() on this machine, taken before each RPUSH."""
    key = str(task.payload["key"])
    _record(key, f"start {time.time():.6f} {task.id} {os.getpid()}")
    time.sleep(float(task.payload.get("seconds", 0.0)))
    _record(key, f"end {time.time():.6f} {task.id} {os.getpid()}")

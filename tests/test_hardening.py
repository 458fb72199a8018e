"""Defects found by adversarial testing (issue 11), each on real servers: a poisoned
record or a raising retry policy must not stop a worker's loops; fencing tokens unique
per process run; a batch is all-or-nothing per task; bad input named in one line."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import pytest

from clusterq import AsyncClient, Client, Router, Task, TaskState, Worker
from clusterq.errors import ConfigError
from tests.helpers import await_for, running_worker, write_raw_records


def test_two_workers_with_one_name_never_share_a_fencing_token(url: str, prefix: str) -> None:
    tokens: list[str] = []
    router = Router()

    @router.task("t")
    async def t(task: Task) -> None:
        tokens.append(task.attempt)
        await asyncio.sleep(0.01)

    async def scenario() -> None:
        with Client(url, prefix=prefix) as client:
            client.enqueue_many([("t", i) for i in range(60)])
        async with (
            running_worker(url, router, prefix=prefix, name="web-1", concurrency=2),
            running_worker(url, router, prefix=prefix, name="web-1", concurrency=2),
        ):
            await await_for(lambda: len(tokens) == 60, 30, "all tasks")

    asyncio.run(scenario())
    dequeues = set(tokens)
    assert all(token.startswith("web-1:") for token in dequeues)
    runs = {token.split(":")[1] for token in dequeues}
    assert len(runs) == 2  # one nonce per worker run, though the names are the same


def _poison(url: str, prefix: str, queue: str, task_id: str, *, active: bool) -> None:
    """A record clusterq never writes (max retry "x"), pending or under a dead lease."""
    write_raw_records(url, prefix, queue, {task_id: b'{"t":"x","mr":"x"}\nnull'}, active=active)


@pytest.mark.parametrize("where", ["pending", "active"])
def test_a_poisoned_record_is_archived_and_every_loop_goes_on(
    url: str, prefix: str, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="clusterq.worker")
    ran: list[str] = []
    router = Router()

    @router.task("x")
    async def x(task: Task) -> None:
        ran.append(task.id)

    _poison(url, prefix, "default", "poison-1", active=where == "active")

    async def scenario() -> Worker:
        client = await AsyncClient.connect(url, prefix=prefix)
        async with running_worker(url, router, prefix=prefix) as worker:
            await await_for(lambda: _archived(client, "poison-1"), 15, "the poison archived")
            # The recoverer still recovers, the fetcher still fetches, after the poison.
            good = await client.enqueue("x", None)
            await await_for(lambda: good.id in ran, 15, "a good task")
            _poison(url, prefix, "default", "poison-2", active=True)
            await await_for(lambda: _archived(client, "poison-2"), 15, "a second poison")
        info = await client.info("poison-1")
        await client.aclose()
        assert "'mr'" in (info.last_error or "") and info.payload is None
        assert info.last_failed_at is not None and abs(info.last_failed_at - time.time()) < 60
        return worker

    worker = asyncio.run(scenario())
    assert worker.stats.loop_restarts == 0 and "poison-1" not in ran
    assert worker.stats.recovered == (2 if where == "active" else 1)  # each expired lease


async def _archived(client: AsyncClient, task_id: str) -> bool:
    try:
        return (await client.info(task_id)).state == TaskState.ARCHIVED
    except ValueError:
        return False  # still the poisoned record


@pytest.mark.parametrize("bad", ["raises", "nan"])
def test_a_failing_retry_policy_archives_the_task_and_recovery_goes_on(
    url: str, prefix: str, bad: str
) -> None:
    calls: list[int] = []

    def policy(retried: int, error: BaseException, task: Task) -> float:
        calls.append(retried)
        if bad == "raises":
            raise RuntimeError("policy bug")
        return math.nan

    router = Router()

    @router.task("fails")
    async def fails(task: Task) -> None:
        raise ValueError("handler error")

    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix)
        info = await client.enqueue("fails", None, max_retry=5)
        async with running_worker(url, router, prefix=prefix, retry_policy=policy) as worker:
            await await_for(lambda: _archived(client, info.id), 15, "the archive")
            _poison(url, prefix, "default", "expired-after", active=True)
            await await_for(lambda: _archived(client, "expired-after"), 15, "a recovery")
            assert worker.stats.loop_restarts == 0
        done = await client.info(info)
        await client.aclose()
        assert done.last_error is not None
        assert "ValueError: handler error; the retry policy failed" in done.last_error
        if bad == "nan":
            assert done.last_error.endswith("ValueError: the retry policy gave nan seconds")

    asyncio.run(scenario())
    assert calls


def test_unknown_task_types_get_a_short_budget_and_a_clear_error(
    url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="clusterq.worker")

    async def scenario() -> Any:
        from clusterq.retry import fixed

        client = await AsyncClient.connect(url, prefix=prefix)
        info = await client.enqueue("nobody:knows", None)  # max_retry 25 by default
        async with running_worker(url, Router(), prefix=prefix, retry_policy=fixed(0)):
            await await_for(lambda: _archived(client, info.id), 15, "the archive")
        done = await client.info(info)
        await client.aclose()
        return done

    done = asyncio.run(scenario())
    assert done.retried == 3  # three retries, then archived (not counted as a fourth)
    assert done.last_error == "no handler registered for task type 'nobody:knows'"
    assert f"task {done.id} (nobody:knows) archived: no handler" in caplog.text


def test_handler_exceptions_are_logged_with_their_traceback(
    url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="clusterq.worker")
    router = Router()

    @router.task("boom")
    async def boom(task: Task) -> None:
        raise KeyError("missing-thing")

    async def scenario() -> None:
        from clusterq.retry import fixed

        client = await AsyncClient.connect(url, prefix=prefix)
        info = await client.enqueue("boom", None, max_retry=1)
        async with running_worker(url, router, prefix=prefix, retry_policy=fixed(0)):
            await await_for(lambda: _archived(client, info.id), 15, "the archive")
        await client.aclose()

    asyncio.run(scenario())
    records = [r for r in caplog.records if "KeyError: 'missing-thing'" in r.getMessage()]
    assert len(records) == 2 and all(r.exc_info and r.exc_info[0] is KeyError for r in records)
    assert "in boom" in caplog.text  # the handler's frame is in the traceback


def test_a_loop_that_stops_is_reported_and_started_again() -> None:
    from clusterq.events import LoopStopped
    from clusterq.worker.state import WorkerStats
    from clusterq.worker.supervise import Supervisor

    async def scenario() -> tuple[list[object], WorkerStats, int]:
        stats, events, runs = WorkerStats(), [], [0]
        supervisor = Supervisor(stats, events.append, restart_delay=0.01)
        needed = [True]
        second = asyncio.Event()

        async def flaky() -> None:
            runs[0] += 1
            if runs[0] == 1:
                raise RuntimeError("one bad record")
            second.set()
            await asyncio.sleep(30)

        supervisor.start("recover", flaky, lambda: needed[0])
        await asyncio.wait_for(second.wait(), 5)
        needed[0] = False
        for task in supervisor.running():
            task.cancel()
        await supervisor.wait("")
        return events, stats, runs[0]

    events, stats, runs = asyncio.run(scenario())
    assert runs == 2 and stats.loop_restarts == 1
    [event] = events
    assert isinstance(event, LoopStopped) and event.loop == "recover"
    assert event.error == "RuntimeError: one bad record"


# ------------------------------------------------------------- input, batches, secrets


def test_a_batch_with_one_bad_option_sends_nothing(url: str, prefix: str) -> None:
    from clusterq import Inspector, TaskSpec

    with Client(url, prefix=prefix) as client:
        batch = [
            TaskSpec("p", 1),
            TaskSpec("p", 2, {"process_in": 60}),
            TaskSpec("p", 3, {"unique_for": 1e17}),
        ]
        with pytest.raises(ValueError, match=r"unique_for must be between 0 and .* got 1e\+17"):
            client.enqueue_many(batch)
        assert client.enqueue("p", 1, task_id="p1-again").already_enqueued is False
    with Inspector(url, prefix=prefix) as inspector:
        [queue] = inspector.queues()
        assert (queue.pending, queue.scheduled) == (1, 0)  # only the last enqueue


def test_the_enqueue_script_checks_every_task_before_writing(url: str, prefix: str) -> None:
    """Past the client's checks (another client version, a hand-made call): one bad task
    in a script call leaves nothing of the others behind."""
    import redis

    from clusterq.broker import enqueue
    from clusterq.broker.script import run_one
    from clusterq.task import Record

    with Client(url, prefix=prefix) as client:
        qk = client.keys.queue("default")
        record = Record("p", b"1").encode()
        tasks = [
            enqueue.NewTask("first", record, delay_ms=0),
            enqueue.NewTask("bad", record, unique_key=qk.unique("x"), unique_ttl_ms=10**17),
        ]
        step = enqueue.call(qk, tasks, first=False)
        with pytest.raises(redis.ResponseError, match="nothing was written"):
            client.backend.execute(qk.slot, lambda c: run_one(c, step))
        written = client.backend.execute(qk.slot, lambda c: c.hexists(qk.tasks, "first"))
        assert not written


@pytest.mark.parametrize(
    "option", ["process_in", "process_at", "timeout", "deadline", "unique_for", "retention"]
)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_options_are_named(
    standalone: Any, prefix: str, option: str, value: float
) -> None:
    with Client(standalone.seed_url, prefix=prefix) as client:
        with pytest.raises(ValueError, match=rf"^{option} must be") as err:
            client.enqueue("t", None, **{option: value})
        assert "nan" in str(err.value).lower() or "inf" in str(err.value).lower()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lease": math.nan}, "lease must be a number of seconds above 0, got nan"),
        ({"poll_interval": 0}, "poll_interval must be a number of seconds above 0, got 0"),
        ({"recover_interval": math.inf}, "recover_interval must be a number of seconds"),
        ({"concurrency": 0}, "concurrency must be an integer of at least 1, got 0"),
        ({"shutdown_timeout": math.nan}, "shutdown_timeout must be 0 or more seconds, got nan"),
    ],
)
def test_worker_settings_are_checked(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Worker("redis://127.0.0.1:1", Router(), **kwargs)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (None, "the URL must be a string like redis://host:port, got NoneType"),
        ("redis://[::1", "missing ']' after the IPv6 host"),
        ("redis://[::1]x", "expected [host]:port"),
        ("redis://h:1?socket_timeout=0", "socket_timeout='0': a number of seconds above 0"),
        ("redis://h:1?connect_timeout=nan", "connect_timeout='nan'"),
        ("redis://h:1?db=x", "db='x': a number"),
    ],
)
def test_bad_urls_get_one_clear_error(url: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        Client(url)
    assert message in str(err.value)


def test_passwords_never_reach_messages_or_command_lines(
    standalone: Any, clusterq_bin: str, env_without_clusterq: None, tmp_path: Any
) -> None:
    import os
    import subprocess

    from clusterq.cluster.connection import redact_url

    assert redact_url("redis://u:TOPSECRET@h:1,h:2/0") == "redis://u:***@h:1,h:2/0"
    assert redact_url("x rediss://:TOPSECRET@h:1 y") == "x rediss://:***@h:1 y"
    with pytest.raises(ConfigError) as err:
        Client("redis://:TOPSECRET@")
    assert "TOPSECRET" not in str(err.value) and "***" in str(err.value)
    env = {**os.environ, "CLUSTERQ_URL": "redis://:TOPSECRET@127.0.0.1:1"}
    done = subprocess.run(
        [clusterq_bin, "queue", "ls"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and "TOPSECRET" not in done.stdout + done.stderr
    bad_scheme = subprocess.run(
        [clusterq_bin, "--url", "http://:TOPSECRET@h:1", "queue", "ls"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad_scheme.returncode == 1 and "TOPSECRET" not in bad_scheme.stderr


def test_worker_processes_get_the_url_from_the_environment(
    tmp_path: Any, server_bin: Any, prefix: str
) -> None:
    from clusterq.tools import servers
    from clusterq.tools.devcluster import LocalServer
    from clusterq.tools.workerprocs import WorkerProcesses

    port = servers.find_free_ports(1, with_bus=False)
    server = LocalServer(
        port,
        tmp_path / "pw",
        server_bin=server_bin,
        password="s3cret-pw",
        die_with_parent=True,
    )
    server.start()
    url = f"redis://:s3cret-pw@127.0.0.1:{port}"
    procs = WorkerProcesses(
        url=url,
        prefix=prefix,
        router="tests.workload:router",
        queues="default=1",
        count=1,
        concurrency=1,
        name=f"env-{prefix}",
    )
    procs.start()
    try:
        asyncio.run(_announced(procs, url))  # it runs, so it got the URL somehow
        with open(f"/proc/{procs.procs[0].pid}/cmdline", "rb") as handle:
            cmdline = handle.read().decode()
        with open(f"/proc/{procs.procs[0].pid}/environ", "rb") as handle:
            environ = handle.read().decode()
    finally:
        procs.stop()
        server.stop()
    assert "s3cret-pw" not in cmdline and "--url" not in cmdline
    assert f"CLUSTERQ_URL={url}" in environ


async def _announced(procs: Any, url: str) -> None:
    from clusterq.cluster.abackend import AsyncBackend

    backend = await AsyncBackend.connect(url, prefix=procs.prefix)
    try:
        await procs.announced(backend, 30)
    finally:
        await backend.aclose()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["enqueue", "t", "{}", "--process-in", "inf"], "process_in must be a finite number"),
        (["worker", "tests.workload:router", "--lease", "nan"], "lease must be a number"),
    ],
)
def test_cli_names_the_bad_option_in_one_line(
    standalone: Any, prefix: str, args: list[str], message: str
) -> None:
    from click.testing import CliRunner

    from clusterq.cli import main

    result = CliRunner().invoke(main, ["--url", standalone.seed_url, "--prefix", prefix, *args])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


# ------------------------------------------------------------- listings of foreign data


def _cli(url: str, prefix: str, *args: str) -> Any:
    from click.testing import CliRunner

    from clusterq.cli import main

    return CliRunner().invoke(main, ["--url", url, "--prefix", prefix, *args])


def test_listings_show_data_as_it_is_never_as_markup_or_escapes(
    standalone: Any, prefix: str
) -> None:
    import json

    from clusterq.worker.announce import MAX_AHEAD

    url = standalone.seed_url
    with Client(url, prefix=prefix) as client:
        client.enqueue("t", None, queue="[/x]")
        client.enqueue("t", None, queue="[bold]q")
        registry, workers = client.keys.queues, client.keys.workers
        client.backend.execute_key(registry, lambda c: c.sadd(registry, "bad{name}", "x y"))

    def announce() -> None:
        """Write the workers' entries as a live worker keeps writing its own, just before
        a listing reads them: a fake one, live (its expiry about as far ahead as a worker
        ever writes, so that a slow listing does not find it past), one claiming an
        expiry no worker writes, and one that is no JSON."""
        now = time.time()
        fake = {
            "id": "[red]w\x1b[31mevil\x07",
            "host": "h\x1b]0;title\x07",
            "pid": 1,
            "queues": {"[/x]": 1},
            "concurrency": 1,
            "started": now,
            "active": 0,
            "processed": 0,
            "failed": 0,
            "expires": now + MAX_AHEAD - 1,
        }
        forever = {**fake, "id": "immortal", "expires": now + 10**9}
        entries = {"a": json.dumps(fake), "b": json.dumps(forever), "c": "{oops"}
        with Client(url, prefix=prefix) as client:
            client.backend.execute_key(workers, lambda c: c.hset(workers, mapping=entries))

    announce()
    table = _cli(url, prefix, "queue", "ls", "--cluster")
    assert table.exit_code == 0, table.output
    assert "[/x]" in table.stdout and "[bold]q" in table.stdout
    assert "skipped: 'bad{name}', 'x y'" in table.stderr or "skipped: 'x y', 'bad{name}'" in (
        table.stderr
    )
    listed = _cli(url, prefix, "queue", "ls", "--json")
    assert listed.exit_code == 0
    assert sorted(r["queue"] for r in json.loads(listed.stdout)) == ["[/x]", "[bold]q"]
    announce()
    shown = _cli(url, prefix, "worker", "ls")
    assert shown.exit_code == 0, shown.output
    assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout
    assert "[red]w\\x1b[31mevil\\x07" in shown.stdout.replace("\n", "")
    assert "immortal" not in shown.stdout  # an expiry no worker writes: not live
    announce()
    ids = [w["id"] for w in json.loads(_cli(url, prefix, "worker", "ls", "--json").stdout)]
    assert ids == ["[red]w\x1b[31mevil\x07"]

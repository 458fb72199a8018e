"""`clusterq doctor` against users with and without the documented permissions (ACL
users made for the test on the session's servers, deleted afterwards)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from clusterq.ops.doctor import check
from clusterq.ops.permissions import ROLES, SCRIPTED, acl_rules, commands
from clusterq.tools.devcluster import LocalCluster, LocalServer

#: ``redis.call('XINFO', 'CONSUMERS', ...)``: the command, and its first argument when it
#: is a literal (the subcommand, for commands that have subcommands).
CALL = re.compile(r"redis\.p?call\(\s*'([A-Za-z]+)'(?:\s*,\s*'([A-Za-z-]+)')?")
PACKAGE = Path(__file__).parents[1] / "clusterq"


def _clients(target: LocalServer | LocalCluster) -> list[redis.Redis]:
    if isinstance(target, LocalCluster):
        return [target.client(port) for port in target.ports]
    return [target.client()]


@pytest.fixture(params=["standalone", "cluster"])
def users(request: pytest.FixtureRequest, prefix: str) -> Iterator[Any]:
    """make(rules) -> the URL of a new ACL user with ``rules`` on every node."""
    target: LocalServer | LocalCluster = request.getfixturevalue(request.param)
    made: list[str] = []

    def make(rules: str) -> str:
        name = f"doctor-{prefix}-{len(made)}"
        for client in _clients(target):
            try:
                client.execute_command("ACL", "SETUSER", name, "reset", "on", ">pw", *rules.split())
            finally:
                client.close()
        made.append(name)
        host_port = target.seed_url.split("://", 1)[1]
        return f"redis://{name}:pw@{host_port}"

    try:
        yield make
    finally:
        for client in _clients(target):
            try:
                for name in made:
                    client.execute_command("ACL", "DELUSER", name)
            finally:
                client.close()


def _keys_under(request: pytest.FixtureRequest, prefix: str) -> dict[str, str]:
    """Every key under ``prefix`` on the servers of the ``users`` fixture, with its type
    (read as the default user, straight from each node; a replica's keys are typed on
    their master)."""
    target = request.getfixturevalue(request.node.callspec.params["users"])
    found: dict[str, str] = {}
    for client in _clients(target):
        try:
            for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                try:
                    found[key.decode()] = client.type(key).decode()
                except redis.exceptions.MovedError:
                    found.setdefault(key.decode(), "?")
        finally:
            client.close()
    return found


def test_the_documented_rules_are_enough_for_every_role(
    users: Any, prefix: str, request: pytest.FixtureRequest
) -> None:
    """Every command is allowed, and probing them wrote nothing but the doctor's own
    string key (no stream made by XGROUP CREATE, no key moved by RENAME, ...)."""
    report = check(users(acl_rules(prefix)), prefix=prefix)
    assert {role: report.ok(role) for role in ROLES} == dict.fromkeys(ROLES, True)
    assert report.allowed == set().union(*(commands(r) for r in ROLES)) - (
        {"cluster|shards", "cluster|nodes"} - report.allowed
    )
    written = _keys_under(request, prefix)
    assert list(written.values()) == ["string"], written
    assert all(key.startswith(f"{prefix}:doctor:{{probe}}:") for key in written), written


def test_missing_commands_are_named_per_role(users: Any, prefix: str, clusterq_bin: str) -> None:
    """No BLMOVE (the worker's idle wait), no HINCRBY (called by the scripts), no
    SMEMBERS (queue ls): each role is told exactly what it lacks."""
    rules = acl_rules(prefix) + " -blmove -hincrby -smembers"
    url = users(rules)
    report = check(url, prefix=prefix)
    assert report.missing("producer") == ["hincrby"]
    assert report.missing("worker") == ["blmove", "hincrby"]
    assert report.missing("operator") == ["hincrby", "smembers"]
    out = subprocess.run(
        [clusterq_bin, "--url", url, "--prefix", prefix, "doctor", "--json"],
        capture_output=True, text=True, timeout=60, env=os.environ.copy(),
    )  # fmt: skip
    assert out.returncode == 1
    assert json.loads(out.stdout)["roles"]["worker"]["missing"] == ["blmove", "hincrby"]
    ok = subprocess.run(
        [clusterq_bin, "--url", url, "--prefix", prefix, "doctor", "--role", "producer"],
        capture_output=True, text=True, timeout=60, env=os.environ.copy(),
    )  # fmt: skip
    assert ok.returncode == 1 and "hincrby" in ok.stdout
    assert "ACL SETUSER <user>" in ok.stderr


def test_without_scripts_the_scripted_commands_are_reported_unchecked(
    users: Any, prefix: str
) -> None:
    """No EVALSHA: the commands only the scripts send cannot be probed, nor the writes
    probed on the key the probe script makes; they are reported unchecked (neither
    allowed nor missing) for every role, and a role that needs them is not ok. What can
    be probed without a script still is."""
    report = check(users(acl_rules(prefix) + " -evalsha"), prefix=prefix)
    assert report.denied == {"evalsha"}
    roles = report.to_dict()["roles"]
    only_in_scripts = {"hincrby", "lpos", "rpop", "rpush", "zadd", "zrem", "spublish", "time"}
    on_the_probe_key = {"hset", "lpush", "set"}
    for role in ROLES:
        unchecked = set(roles[role]["unchecked"])
        assert only_in_scripts | on_the_probe_key <= unchecked, role
        assert not unchecked & (report.allowed | report.denied), role
        assert roles[role]["missing"] == ["evalsha"] and roles[role]["ok"] is False
        assert not report.ok(role)
    assert {"ping", "script|load", "hget", "llen", "zcard", "del", "exists"} <= report.allowed


def test_every_listed_command_is_probed(users: Any, prefix: str) -> None:
    """For each command of the table (but those the probing itself needs: to connect, to
    run the probe script and make its key), a user refused that one command alone is
    told exactly that one is missing: each probe sends the command it stands for, and
    none is reported allowed without having been sent."""
    needed = set().union(*(commands(role) for role in ROLES))
    kept = {"ping", "info", "select", "cluster|shards", "cluster|nodes", "evalsha",
            "script|load", "set"}  # fmt: skip
    refused = sorted(needed - kept)
    assert {"xadd", "xreadgroup", "xinfo|groups", "lset", "rename", "pttl"} <= set(refused)
    rules = acl_rules(prefix)
    for name in refused:
        report = check(users(f"{rules} -{name}"), prefix=prefix)
        assert (report.denied, report.unchecked) == ({name}, set()), name
        for role in ROLES:
            assert report.missing(role) == ([name] if name in commands(role) else []), role


def _readme_acl_table() -> dict[str, set[str]]:
    """The README's ACL table: each row's first cell's first word (all, producer, worker,
    operator, the) -> the commands of its first code span."""
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("## Deploying to a managed or secured cluster", 1)[1].split("\n## ")[0]
    rows: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = line.split(" | ")
        if not line.startswith("| ") or len(cells) < 2 or "`" not in cells[1]:
            continue
        span = cells[1].split("`")[1].replace("\\|", "|")
        rows[cells[0][2:].split()[0]] = set(span.split())
    return rows


def test_the_readme_acl_table_is_the_permission_table() -> None:
    """The README's ACL section lists what :mod:`clusterq.ops.permissions` lists: per role its
    direct commands and the scripts' two, and the scripts' commands."""
    from clusterq.ops.permissions import CONNECT, DIRECT, SCRIPTS

    rows = _readme_acl_table()
    assert rows.keys() == {"all", "producer", "worker", "operator", "the"}, rows.keys()
    assert rows["all"] == set(CONNECT)
    assert rows["the"] == set(SCRIPTED)
    for role in ROLES:
        assert rows[role] == set(SCRIPTS) | set(DIRECT[role]), role


def _acl_names(node: redis.Redis, calls: set[tuple[str, str]]) -> set[str]:
    """The ACL names of ``calls`` as the server spells them: ``xinfo|consumers`` for a
    command with subcommands (asked of the server: COMMAND INFO), else the command."""
    out = set()
    for name, first in calls:
        info = node.execute_command("COMMAND", "INFO", name)[name]
        subs = {s[0].decode() for s in info.get("subcommands") or []}
        if not subs:
            out.add(name)
            continue
        assert f"{name}|{first}" in subs, f"{name} {first!r}: not a subcommand of {name}"
        out.add(f"{name}|{first}")
    return out


def test_every_script_calls_only_listed_commands(standalone: LocalServer) -> None:
    """Redis checks each command a script calls against the caller's ACL: every command
    any of clusterq's scripts calls (by its ACL name: ``xgroup|delconsumer``) is in the
    table the rules and the doctor read, and the table lists none that no script calls."""
    scripts = sorted(PACKAGE.rglob("*.lua"))
    assert {"stream.lua", "manage.lua", "workflow.lua", "dequeue.lua"} <= {p.name for p in scripts}
    calls: set[tuple[str, str]] = set()
    for script in scripts:
        if script.name == "doctor.lua":  # probes by name; checked by the doctor's tests
            continue
        text = script.read_text()
        calls |= {(c.lower(), sub.lower()) for c, sub in CALL.findall(text)}
        assert len(re.findall(r"redis\.p?call\(", text)) == len(CALL.findall(text)), script
    node = standalone.client()
    try:
        called = _acl_names(node, calls)
    finally:
        node.close()
    assert {"lset", "rename", "persist", "xack", "xgroup|delconsumer"} <= called
    assert called <= set(SCRIPTED), sorted(called - set(SCRIPTED))
    assert set(SCRIPTED) <= called, sorted(set(SCRIPTED) - called)


def test_each_roles_rules_are_enough_for_flow_control(
    users: Any, prefix: str, clusterq_bin: str
) -> None:
    """Users with one role's rules each: the operator sets, shows and clears limits with
    `queue limit` (the limits script, HGETALL) and lists them; the producer enqueues;
    a worker takes the tasks of a capped queue (the dequeue script reading the limits
    hash, a RateLimited hold written by the fail script) without a refusal."""
    import asyncio

    from clusterq import Client, RateLimited, Router, Task
    from clusterq.limits import Limits
    from tests.helpers import await_for, running_worker

    operator, producer, worker_url = (
        users(acl_rules(prefix, (role,))) for role in ("operator", "producer", "worker")
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [clusterq_bin, "--url", operator, "--prefix", prefix, "queue", *args],
            capture_output=True, text=True, timeout=60, env=os.environ.copy(),
        )  # fmt: skip

    with Client(producer, prefix=prefix) as client:
        client.enqueue_many([("ok", i) for i in range(6)], queue="capped")
        client.enqueue("429", queue="capped")
    set_ = cli("limit", "capped", "--concurrency", "2", "--rate", "1000/s")
    assert set_.returncode == 0 and "2 at once" in set_.stdout, set_.stderr
    shown = cli("limit", "capped", "--json")
    assert json.loads(shown.stdout)["limits"]["concurrency"] == 2, shown.stderr
    listed = cli("ls", "--json")
    assert json.loads(listed.stdout)[0]["limits"]["concurrency"] == 2, listed.stderr
    with Client(producer, prefix=prefix) as client:
        assert client.limits("capped") == Limits.of("1000/s", None, 2)

    router = Router()
    calls: list[str] = []

    @router.task("ok")
    async def ok(task: Task) -> None:
        calls.append(task.id)

    @router.task("429")
    async def too_many(task: Task) -> None:
        calls.append(task.id)
        raise RateLimited(0.05, scope="queue")

    async def work() -> None:
        async with running_worker(worker_url, router, queues=["capped"], prefix=prefix) as w:
            await await_for(lambda: w.stats.processed >= 6, 30, "the capped queue's tasks")
            await await_for(lambda: w.stats.rate_limited >= 1, 30, "the 429")
            assert w.stats.failed == 0 and w.stats.loop_restarts == 0

    asyncio.run(work())
    cleared = cli("limit", "capped", "--clear")
    assert cleared.returncode == 0 and "no limits" in cleared.stdout, cleared.stderr


#: How a refusal by the ACL reads: a command sent directly (NOPERM, "no permissions"),
#: or one a script called ("can't run this command or subcommand" on Redis 7.0).
REFUSALS = ("NOPERM", "no permissions", "can't run this command")


def _refused(records: list[logging.LogRecord]) -> list[str]:
    """The log lines that tell of a command the ACL refused."""
    return [r.getMessage() for r in records if any(x in r.getMessage() for x in REFUSALS)]


def _role_urls(users: Any, prefix: str) -> tuple[str, str, str]:
    """Three users, each with one role's rules only: operator, producer, worker."""
    operator, producer, worker = (
        users(acl_rules(prefix, (role,))) for role in ("operator", "producer", "worker")
    )
    return operator, producer, worker


def _cli(clusterq_bin: str, url: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [clusterq_bin, "--url", url, "--prefix", prefix, *args],
        capture_output=True, text=True, timeout=60, env=os.environ.copy(),
    )  # fmt: skip


def test_each_roles_rules_are_enough_for_streams(
    users: Any,
    prefix: str,
    clusterq_bin: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Users with one role's rules each. The producer declares a stream of 3 partitions
    and publishes to it (HGET, HSET, XADD). A worker consumes it with an unordered group
    (XGROUP CREATE, XREADGROUP, XPENDING, XCLAIM of a failed event) and an ordered one
    (the member hash, partition leases, XPENDING of its backlog); each dead-letters the
    event its handler keeps failing (XRANGE, XADD, XACK in the stream script), checks
    its lag (XINFO STREAM, XINFO GROUPS); a second worker removes the first's consumers
    from the groups (XINFO CONSUMERS, XGROUP DELCONSUMER). The operator's `stream ls`
    and `stream inspect` show lengths, dead letters and groups (XLEN, XINFO). No
    refusal anywhere, not even in the worker's debug log (the lag checks and the
    removal of gone consumers only log theirs)."""
    import clusterq.worker.consumer as consumer_module
    from clusterq import Client, Event, Router
    from tests.helpers import await_for, running_worker

    operator, producer, worker_url = _role_urls(users, prefix)
    caplog.set_level(logging.DEBUG, logger="clusterq")
    monkeypatch.setattr(consumer_module, "FORGET_AFTER", 0.0)
    monkeypatch.setattr(consumer_module, "FORGET_CHECK_INTERVAL", 0.0)

    with Client(producer, prefix=prefix) as client:
        client.declare_stream("orders", 3)
        client.publish_many("orders", [({"n": n}, f"customer-{n % 5}") for n in range(20)])
        client.publish("orders", "bad", key="customer-bad")

    handled: dict[str, set[int]] = {"billing": set(), "ship": set()}
    router = Router()

    def handle(group: str, event: Event) -> None:
        if event.payload == "bad":
            raise RuntimeError(f"{group} cannot take it")
        handled[group].add(event.payload["n"])

    @router.consumer("orders", group="billing", max_deliveries=2)
    async def billing(event: Event) -> None:
        handle("billing", event)

    @router.consumer("orders", group="ship", ordered=True, max_deliveries=2)
    async def ship(event: Event) -> None:
        handle("ship", event)

    def unrefused() -> bool:
        assert not _refused(caplog.records), _refused(caplog.records)
        return True

    async def work() -> None:
        async with running_worker(worker_url, router, prefix=prefix, name="first") as w:
            await await_for(
                lambda: (
                    unrefused()
                    and handled == {"billing": set(range(20)), "ship": set(range(20))}
                    and w.consumers.stats.dead == 2
                ),
                60,
                "every event handled by both groups, the bad one dead-lettered by each",
            )
        async with running_worker(worker_url, router, prefix=prefix, name="second"):
            await await_for(
                lambda: unrefused() and "consumer first (gone) removed" in caplog.text,
                30,
                "the first worker's consumers removed from the groups",
            )

    asyncio.run(work())
    unrefused()
    listed = _cli(clusterq_bin, operator, prefix, "stream", "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    shown = _cli(clusterq_bin, operator, prefix, "stream", "inspect", "orders", "--json")
    assert shown.returncode == 0, shown.stderr
    for rows in (json.loads(listed.stdout), json.loads(shown.stdout)):
        assert [r["partition"] for r in rows] == [0, 1, 2] and not any(r["error"] for r in rows)
        assert sum(r["length"] for r in rows) == 21 and sum(r["dead"] for r in rows) == 2
        for row in rows:
            assert {g["group"] for g in row["groups"]} == {"billing", "ship"}, row
            assert all(g["pending"] == 0 and g["lag"] == 0 for g in row["groups"]), row


def test_each_roles_rules_are_enough_for_a_staged_workflow_and_task_actions(
    users: Any, prefix: str, clusterq_bin: str
) -> None:
    """The producer starts a workflow too large for one call: written in parts to a
    staging hash, then renamed into place (RENAME, PERSIST in the workflow script); a
    worker runs its steps and advances it; the producer waits for its result and the
    operator inspects it (HGETALL, PTTL). The operator archives a pending task by its id
    (the manage script finds it with LPOS and takes it out of the list with LSET), then
    deletes every pending task of the queue (the script checks each where the listing saw
    it: LINDEX)."""
    from clusterq import Client, Router, Task, TaskSpec, chord
    from clusterq.errors import TaskNotFound
    from clusterq.workflow.run import plan_start
    from tests.helpers import running_worker

    operator, producer, worker_url = _role_urls(users, prefix)
    router = Router()

    @router.task("size")
    async def size(task: Task) -> int:
        return len(task.payload)

    @router.task("total")
    async def total(task: Task) -> int:
        return sum(task.parent_results or [])

    steps = [TaskSpec("size", "x" * 400_000, {"queue": "wf"}) for _ in range(11)]
    workflow = chord(steps, TaskSpec("total", None, {"queue": "wf"}))
    with Client(producer, prefix=prefix) as client:
        calls = plan_start(client, workflow, "planned", None).calls
        assert [c[0] for c in calls] == ["stage", "stage", "commit"]  # staged, then renamed
        handle = client.enqueue(workflow)
        parked = client.enqueue("parked", 1, queue="parked")
        left = client.enqueue_many([("parked", n) for n in range(3)], queue="parked")

        async def work() -> int:
            async with running_worker(worker_url, router, queues=["wf"], prefix=prefix):
                return await asyncio.to_thread(client.result, handle, timeout=60)  # type: ignore[no-any-return]

        assert asyncio.run(work()) == 11 * 400_000
        shown = _cli(clusterq_bin, operator, prefix, "workflow", "inspect", handle.id, "--json")
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["status"] == "succeeded"
        archived = _cli(clusterq_bin, operator, prefix, "task", "archive", parked.id,
                        "-q", "parked", "--yes")  # fmt: skip
        assert archived.returncode == 0 and "archived" in archived.stdout, archived.stderr
        assert client.info(parked.id, queue="parked").state == "archived"
        deleted = _cli(clusterq_bin, operator, prefix, "task", "delete", "--all", "--state",
                       "pending", "-q", "parked", "--yes")  # fmt: skip
        assert deleted.returncode == 0 and "deleted: 3 task(s)" in deleted.stdout, deleted.stderr
        for task in left:
            with pytest.raises(TaskNotFound):
                client.info(task.id, queue="parked")
        assert client.info(parked.id, queue="parked").state == "archived"

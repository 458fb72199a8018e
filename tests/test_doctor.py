"""`clusterq doctor` against users with and without the documented permissions (ACL
users made for the test on the session's servers, deleted afterwards)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from clusterq.doctor import check
from clusterq.permissions import ROLES, acl_rules, commands
from clusterq.tools.devcluster import LocalCluster, LocalServer


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


def test_the_documented_rules_are_enough_for_every_role(users: Any, prefix: str) -> None:
    report = check(users(acl_rules(prefix)), prefix=prefix)
    assert {role: report.ok(role) for role in ROLES} == dict.fromkeys(ROLES, True)
    assert report.allowed == set().union(*(commands(r) for r in ROLES)) - (
        {"cluster|shards", "cluster|nodes"} - report.allowed
    )


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


#: The scripts flow control runs: the limits' writer, the dequeue that enforces them,
#: the fail that sets a hold, and what every script shares.
FLOW_SCRIPTS = ("limits", "dequeue", "fail", "_prelude")


def test_the_scripts_of_flow_control_call_only_listed_commands() -> None:
    """Redis checks each command a script calls against the caller's ACL: every one the
    flow-control scripts call is in the table the rules and the doctor read."""
    import re
    from pathlib import Path

    from clusterq.permissions import SCRIPTED

    broker = Path(__file__).parents[1] / "clusterq" / "broker"
    called: set[str] = set()
    for name in FLOW_SCRIPTS:
        text = (broker / f"{name}.lua").read_text()
        called |= {c.lower() for c in re.findall(r"redis\.p?call\('([A-Za-z]+)'", text)}
    assert {"hmget", "hdel", "del", "zcard", "hset", "spublish"} <= called
    assert called <= set(SCRIPTED), sorted(called - set(SCRIPTED))


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

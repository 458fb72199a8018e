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

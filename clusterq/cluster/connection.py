"""Connection settings: URL parsing, per-node clients, cluster/standalone detection.

A URL names one or more seed nodes::

    redis://[user[:password]@]host[:port][,host[:port]...][/db][?option=value&...]
    rediss://...                      (TLS)

Options: ``socket_timeout`` and ``connect_timeout`` (seconds); for TLS, as redis-py
names them: ``ssl_ca_certs`` (the CA file), ``ssl_cert_reqs`` (none|optional|required),
``ssl_certfile`` and ``ssl_keyfile`` (a client certificate, for servers that ask for
one), ``ssl_check_hostname`` (true|false; default true when certificates are required).
``db`` is only allowed in standalone mode. ``remap_host``: reach every node at this host,
on the port the cluster announces for it, for a cluster whose nodes announce addresses
this client cannot reach (containers on a Docker network, with their ports published on
the host; an SSH tunnel or a NAT that keeps the ports); the map still shows the announced
addresses.
"""

from __future__ import annotations

import math
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qs, unquote

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from clusterq.cluster.wire import AsyncNodeClient, NodeClient
from clusterq.errors import AuthFailed, ConfigError, ConnectionFailed, ForeignData, ModeMismatch

Mode = Literal["cluster", "standalone"]
Addr = tuple[str, int]
T = TypeVar("T")

DEFAULT_URL = "redis://127.0.0.1:7000"
DEFAULT_PORT = 6379
_SCHEMES = ("redis", "rediss")
_TIMEOUT_OPTIONS = ("socket_timeout", "connect_timeout")


_CREDENTIALS = re.compile(r"(://[^/@?#]*?:)[^/@?#]*@")


def redact_url(text: str) -> str:
    """``text`` with the password of any URL in it replaced by ``***``: for messages,
    logs and command lines."""
    return _CREDENTIALS.sub(r"\1***@", text)


def format_addr(addr: Addr) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_addr(text: str, default_port: int = DEFAULT_PORT) -> Addr:
    """``host:port`` (or ``[v6]:port``) to a tuple; raises :class:`ConfigError`."""
    text = text.strip()
    if not text:
        raise ConfigError("empty host in address")
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ConfigError(f"invalid address {text!r}: missing ']' after the IPv6 host")
        if rest and not rest.startswith(":"):
            raise ConfigError(f"invalid address {text!r}: expected [host]:port")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not host:
        raise ConfigError(f"missing host in address {text!r}")
    if not port_text and (text.endswith(":")):
        raise ConfigError(
            f"empty port in address {text!r} (leave out the ':' for the default port "
            f"{default_port})"
        )
    if not port_text:
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"invalid port in address {text!r}") from None
    if not 0 < port < 65536:
        raise ConfigError(f"port out of range in address {text!r}")
    return host, port


@dataclass(frozen=True)
class RedisURL:
    """Parsed connection settings shared by every node client."""

    seeds: tuple[Addr, ...]
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssl: bool = False
    db: int = 0
    socket_timeout: float = 5.0
    connect_timeout: float = 2.0
    ssl_ca_certs: str | None = None
    ssl_cert_reqs: str = "required"
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool | None = None
    #: Connect to every node at this host instead of the one it announces (port kept).
    remap_host: str | None = None
    #: A redis-py ``CredentialProvider`` (``get_credentials()`` -> ``(password,)`` or
    #: ``(username, password)``), asked on every new connection, so credentials that
    #: rotate (IAM auth tokens) are used after failovers too. Not part of the URL: see
    #: :meth:`with_credentials`.
    credential_provider: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def parse(cls, url: str) -> RedisURL:
        if not isinstance(url, str):
            raise ConfigError(
                f"the URL must be a string like redis://host:port, got {type(url).__name__}"
            )
        shown = redact_url(url)
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in _SCHEMES:
            raise ConfigError(f"invalid URL {shown!r}: expected redis://host:port or rediss://...")
        rest, _, query = rest.partition("?")
        netloc, _, path = rest.partition("/")
        userinfo, at, hosts = netloc.rpartition("@")
        if not at:
            hosts, userinfo = netloc, ""
        username: str | None = None
        password: str | None = None
        if userinfo:
            user, colon, pw = userinfo.partition(":")
            username = unquote(user) or None
            password = unquote(pw) if colon else None
            if colon and not user:
                username = None
        seeds = tuple(parse_addr(h) for h in hosts.split(",")) if hosts else ()
        if not seeds:
            raise ConfigError(f"invalid URL {shown!r}: no host")
        db = 0
        if path.strip("/"):
            try:
                db = int(path.strip("/"))
            except ValueError:
                raise ConfigError(f"invalid URL {shown!r}: database must be a number") from None
        options: dict[str, Any] = {}
        for key, values in parse_qs(query, keep_blank_values=True).items():
            value = values[-1]
            if key in _TIMEOUT_OPTIONS:
                try:
                    seconds = float(value)
                except ValueError:
                    seconds = math.nan
                if not (math.isfinite(seconds) and seconds > 0):
                    raise ConfigError(
                        f"invalid URL option {key}={value!r}: a number of seconds above 0"
                    )
                options[key] = seconds
            elif key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
                if not os.path.isfile(value):
                    raise ConfigError(f"invalid URL option {key}={value!r}: no such file")
                options[key] = value
            elif key == "ssl_check_hostname":
                if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                    raise ConfigError(
                        f"invalid URL option ssl_check_hostname={value!r}: true|false"
                    )
                options[key] = value.lower() in ("true", "yes", "1")
            elif key == "ssl_cert_reqs":
                if value not in ("none", "optional", "required"):
                    raise ConfigError(f"invalid URL option ssl_cert_reqs={value!r}")
                options[key] = value
            elif key == "remap_host":
                if not value or any(c in value for c in "/@,") or value.count(":") == 1:
                    raise ConfigError(
                        f"invalid URL option remap_host={value!r}: a host name or address, "
                        "without a port"
                    )
                options[key] = value.strip("[]")
            elif key == "db":
                try:
                    db = int(value)
                except ValueError:
                    raise ConfigError(f"invalid URL option db={value!r}: a number") from None
            else:
                raise ConfigError(f"unknown URL option {key!r}")
        return cls(
            seeds=seeds,
            username=username,
            password=password,
            ssl=scheme == "rediss",
            db=db,
            **options,
        )

    def with_seeds(self, seeds: tuple[Addr, ...]) -> RedisURL:
        return replace(self, seeds=seeds)

    def with_credentials(self, provider: Any) -> RedisURL:
        """These settings with credentials from ``provider`` (a redis-py
        ``CredentialProvider``) instead of the URL's user and password."""
        if not callable(getattr(provider, "get_credentials", None)):
            raise ConfigError("a credential provider needs a get_credentials() method")
        return replace(self, credential_provider=provider, username=None, password=None)

    def redacted(self) -> str:
        """The URL without its password, for messages."""
        scheme = "rediss" if self.ssl else "redis"
        user = (
            f"{self.username or ''}{':***' if self.password else ''}@"
            if (self.username or self.password)
            else ""
        )
        hosts = ",".join(format_addr(a) for a in self.seeds)
        return f"{scheme}://{user}{hosts}" + (f"/{self.db}" if self.db else "")

    def node_kwargs(self, *, db: int | None = None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "username": self.username,
            "password": self.password,
            "db": self.db if db is None else db,
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.connect_timeout,
            "socket_keepalive": True,
            "health_check_interval": 0,
        }
        if self.credential_provider is not None:
            kwargs["credential_provider"] = self.credential_provider
        if self.ssl:
            kwargs.update(
                ssl=True, ssl_ca_certs=self.ssl_ca_certs, ssl_cert_reqs=self.ssl_cert_reqs
            )
            if self.ssl_certfile:
                kwargs.update(ssl_certfile=self.ssl_certfile, ssl_keyfile=self.ssl_keyfile)
            kwargs["ssl_check_hostname"] = (
                self.ssl_check_hostname
                if self.ssl_check_hostname is not None
                else self.ssl_cert_reqs == "required"
            )
        return kwargs

    def node_client(self, addr: Addr, *, db: int | None = None, **overrides: Any) -> NodeClient:
        """A synchronous client of one node, with its own connection pool.

        It never retries by itself: redis-py >= 6 re-sends a command up to 3 times by
        default, which can run a script twice. clusterq's backends decide when a retry
        is safe.
        """
        kwargs = self.node_kwargs(db=db)
        kwargs["retry"] = Retry(NoBackoff(), 0)
        kwargs.update(overrides)
        host, port = self.reach(addr)
        return NodeClient(host=host, port=port, **kwargs)

    def async_node_client(
        self, addr: Addr, *, db: int | None = None, **overrides: Any
    ) -> AsyncNodeClient:
        """An asyncio client of one node, with its own connection pool (no retries either)
        and a multiplexed connection for the hot path (:class:`clusterq.cluster.wire.Lane`)."""
        kwargs = self.node_kwargs(db=db)
        kwargs["retry"] = AsyncRetry(NoBackoff(), 0)
        kwargs.update(overrides)
        host, port = self.reach(addr)
        return AsyncNodeClient(host=host, port=port, **kwargs)

    def reach(self, addr: Addr) -> Addr:
        """Where to connect for the node at ``addr`` (see ``remap_host``)."""
        return (self.remap_host, addr[1]) if self.remap_host else addr


def command(client: redis.Redis, *args: Any) -> Any:
    """``client.execute_command(*args)``, typed (redis-py leaves it unannotated)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


async def acommand(client: redis.asyncio.Redis, *args: Any) -> Any:
    """Asynchronous :func:`command`."""
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


def translate_error(exc: BaseException, addr: Addr | str) -> Exception:
    """Turn a redis-py error met while talking to ``addr`` into a one-line clusterq error."""
    where = addr if isinstance(addr, str) else format_addr(addr)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    upper = text.upper()
    if isinstance(exc, redis.AuthenticationError) or any(
        word in upper for word in ("WRONGPASS", "NOAUTH", "INVALID PASSWORD", "INVALID USERNAME")
    ):
        return AuthFailed(f"authentication refused by {where}: {text}")
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError | socket.error):
        hint = ""
        if any(s in text for s in ("Name or service not known", "nodename nor servname")):
            hint = (
                " (a name this client cannot resolve: if the cluster announces addresses of "
                "another network, e.g. Docker's, add ?remap_host=<a host that reaches the "
                "nodes' ports> to the URL)"
            )
        return ConnectionFailed(f"cannot reach {where}: {text}{hint}")
    if upper.startswith("WRONGTYPE CLUSTERQ KEY"):  # a script's check of its keys' types
        return ForeignData(text)
    return exc if isinstance(exc, Exception) else RuntimeError(text)


def foreign_key_error(exc: Exception, key: str) -> Exception:
    """A plain ``WRONGTYPE`` met by a command on ``key`` (it names no key) as a
    :class:`ForeignData` that names it; any other error as it is."""
    text = str(exc).strip()
    if isinstance(exc, redis.ResponseError) and text.upper().startswith("WRONGTYPE"):
        return ForeignData(
            f"clusterq key {key} holds another type than clusterq writes there ({text}); "
            "nothing was changed"
        )
    return exc


def call_node(addr: Addr, fn: Callable[[], T]) -> T:
    """Run ``fn`` and translate redis-py connection/auth errors for ``addr``."""
    try:
        return fn()
    except (redis.ConnectionError, redis.TimeoutError, redis.AuthenticationError) as exc:
        raise translate_error(exc, addr) from exc
    except redis.ResponseError as exc:
        translated = translate_error(exc, addr)
        if translated is exc:
            raise
        raise translated from exc


def info_mode(info: dict[str, Any]) -> Mode:
    """Cluster or standalone, from ``INFO cluster``."""
    return "cluster" if str(info.get("cluster_enabled", "0")) == "1" else "standalone"


def check_mode(found: Mode, expected: Mode | None, addr: Addr) -> Mode:
    if expected is not None and found != expected:
        where = format_addr(addr)
        if expected == "cluster":
            raise ModeMismatch(
                f"{where} is a standalone server (cluster_enabled:0), but a cluster was "
                "expected (--cluster)"
            )
        raise ModeMismatch(
            f"{where} is a cluster node (cluster_enabled:1), but a standalone server was "
            "expected (--standalone)"
        )
    return found

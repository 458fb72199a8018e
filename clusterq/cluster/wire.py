"""The hot path to a node: commands packed by hiredis, without redis-py's per-command layer.

redis-py 8 spends 40-100 µs of Python per command on retry wrappers, observability hooks,
pool bookkeeping and (asyncio) pure-Python packing and a timeout task per send. A task
queue sends a few commands per task, so that overhead, not Redis, would set clusterq's
throughput. The node clients of :mod:`clusterq.cluster.connection` are redis-py clients with two
additions used for the scripts and simple commands of the hot path:

- :class:`NodeClient` (sync) keeps blocking connections of its own for ``fast`` /
  ``fast_pipeline`` (one per thread that uses it at once): a socket and a hiredis reader,
  nothing else. Closing the client or :meth:`NodeClient.drop_connections` closes them.
- :class:`AsyncNodeClient` has a :class:`Lane`: one connection that carries many
  concurrent requests (replies come back in order), writes everything asked for in one
  event-loop turn with one system call, and fails every waiting request at once when the
  connection breaks or a reply is late (``socket_timeout``). Commands that block on the
  server (``BLMOVE``, ``WAIT``) must not go over a lane: they would hold up the others;
  they use redis-py's pooled connections as before.

Replies are raw (bytes, ints, lists); error replies become redis-py's exception classes
(``MOVED``, ``NOSCRIPT``, ``READONLY``...), so callers classify them as usual.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import os
import socket
import ssl
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import hiredis
import redis
import redis.asyncio

from clusterq.cluster import fastcommands

try:  # private in redis-py: where its error replies are parsed (5.x and later)
    from redis._parsers.base import BaseParser
except ImportError as exc:  # pragma: no cover - depends on the installed redis-py
    raise ImportError(
        f"clusterq needs redis-py's reply parser (redis._parsers.base.BaseParser), which the "
        f"installed redis-py {getattr(redis, '__version__', '?')} does not have; install one "
        "that has it (5.0 through 8.1 do): pip install 'redis[hiredis]>=5,<8.2'"
    ) from exc

__all__ = ["AsyncNodeClient", "Lane", "NodeClient", "pack"]

Command = Sequence[Any]
_MORE = object()  # the reader needs more bytes


def pack(args: Command) -> bytes:
    """One command in the Redis protocol (str, bytes, int and float arguments)."""
    return hiredis.pack_command(tuple(args))  # type: ignore[no-any-return]


def _reader() -> hiredis.Reader:
    return hiredis.Reader(replyError=BaseParser.parse_error, notEnoughData=_MORE)


# ----------------------------------------------------------------------- synchronous


@dataclass(frozen=True)
class _Endpoint:
    """Where and how the fast path connects (from the redis-py client's settings)."""

    host: str
    port: int
    username: str | None
    password: str | None
    db: int
    ssl_context: ssl.SSLContext | None
    socket_timeout: float | None
    connect_timeout: float | None
    credential_provider: Any = None

    @classmethod
    def of(cls, kwargs: dict[str, Any]) -> _Endpoint:
        return cls(
            kwargs.get("host", "localhost"),
            int(kwargs.get("port", 6379)),
            kwargs.get("username"),
            kwargs.get("password"),
            int(kwargs.get("db", 0)),
            _ssl_context(kwargs),
            kwargs.get("socket_timeout"),
            kwargs.get("socket_connect_timeout"),
            kwargs.get("credential_provider"),
        )

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    def handshake(self) -> list[Command]:
        """AUTH (asking the credential provider again: tokens rotate) and SELECT."""
        out: list[Command] = []
        username, password = self.username, self.password
        if self.credential_provider is not None:
            credentials = tuple(self.credential_provider.get_credentials())
            username, password = (None, *credentials) if len(credentials) == 1 else credentials
        if password is not None:
            if username:
                out.append(("AUTH", username, password))
            else:
                out.append(("AUTH", password))
        if self.db:
            out.append(("SELECT", self.db))
        return out


class _Wire:
    """One blocking connection of the fast path: hiredis packs and parses, nothing else
    sits between the caller and the socket. A connection error closes it (a reply may
    be in flight); the next use of a closed one raises."""

    def __init__(self, endpoint: _Endpoint) -> None:
        self.where = endpoint.where
        try:
            sock = socket.create_connection(
                (endpoint.host, endpoint.port), timeout=endpoint.connect_timeout
            )
        except OSError as exc:
            raise redis.ConnectionError(f"Error connecting to {self.where}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if endpoint.ssl_context is not None:
            try:
                sock = endpoint.ssl_context.wrap_socket(sock, server_hostname=endpoint.host)
            except OSError as exc:
                sock.close()
                raise redis.ConnectionError(f"TLS to {self.where} failed: {exc}") from exc
        sock.settimeout(endpoint.socket_timeout)
        self.sock: socket.socket | None = sock
        self.reader = _reader()
        for command in endpoint.handshake():
            (reply,) = self.roundtrip(pack(command), 1)
            if isinstance(reply, Exception):
                self.close()
                raise redis.AuthenticationError(f"{self.where}: {reply}")

    def roundtrip(self, packed: bytes, count: int) -> list[Any]:
        """Send, then read ``count`` replies (error replies in place of theirs)."""
        self.send(packed)
        return self.read(count)

    def send(self, packed: bytes) -> None:
        sock = self._sock()
        try:
            sock.sendall(packed)
        except BaseException as exc:
            raise self._broken(exc) from exc

    def read(self, count: int) -> list[Any]:
        """Read ``count`` replies (error replies in place of theirs)."""
        sock = self._sock()
        reader = self.reader
        out: list[Any] = []
        try:
            while len(out) < count:
                reply = reader.gets()
                if reply is _MORE:
                    data = sock.recv(65536)
                    if not data:
                        raise redis.ConnectionError(f"connection to {self.where} lost")
                    reader.feed(data)
                else:
                    out.append(reply)
        except BaseException as exc:
            raise self._broken(exc) from exc
        return out

    def _broken(self, exc: BaseException) -> BaseException:
        """Close (a reply may be in flight); what to raise for ``exc``."""
        self.close()
        if isinstance(exc, hiredis.ProtocolError):
            return redis.ConnectionError(f"protocol error from {self.where}: {exc}")
        if isinstance(exc, TimeoutError):  # socket.timeout
            return redis.TimeoutError(f"{self.where} did not answer in time")
        if isinstance(exc, OSError):
            return redis.ConnectionError(f"connection to {self.where}: {exc}")
        return exc

    def _sock(self) -> socket.socket:
        if self.sock is None:
            raise redis.ConnectionError(f"connection to {self.where} closed")
        return self.sock

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


_NODE_CLIENTS: weakref.WeakSet[NodeClient] = weakref.WeakSet()


def _forget_wires() -> None:
    """In a forked child: the connections are the parent's, to be left alone."""
    for client in list(_NODE_CLIENTS):
        client._spare = []


os.register_at_fork(after_in_child=_forget_wires)


class NodeClient(redis.Redis):
    """A redis-py client of one node with a fast path for the commands clusterq sends most:
    connections of its own (several, for callers in several threads; a forked child opens
    its own)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._endpoint = _Endpoint.of(kwargs)
        self._spare: list[_Wire] = []
        self._fast_commands = fastcommands.usable(self)
        _NODE_CLIENTS.add(self)

    def execute_command(self, *args: Any, **options: Any) -> Any:
        """redis-py's command methods: the plain ones over the fast connections
        (:mod:`clusterq.cluster.fastcommands`), the rest as redis-py sends them."""
        if not fastcommands.takes(self, args, options):
            return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        try:
            reply = self.fast(*args)
        except redis.ResponseError as exc:
            return fastcommands.on_error(exc, options)
        return fastcommands.parsed(self.response_callbacks, args[0], reply, options)

    def _take(self) -> _Wire:
        try:
            return self._spare.pop()
        except IndexError:
            return _Wire(self._endpoint)

    def _roundtrip(self, packed: bytes, count: int) -> list[Any]:
        wire = self._take()
        out = wire.roundtrip(packed, count)  # on an error it is closed and left out
        self._spare.append(wire)
        return out

    def fast(self, *args: Any) -> Any:
        """Send one command, return its raw reply (an error reply is raised)."""
        (reply,) = self._roundtrip(pack(args), 1)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def fast_pipeline(
        self, commands: Sequence[Command], meanwhile: Callable[[], object] | None = None
    ) -> list[Any]:
        """Send several commands at once (no transaction); error replies are returned in
        place of their replies, connection errors are raised. ``meanwhile()`` runs after
        the commands are sent, before the replies are read."""
        packed = b"".join([pack(c) for c in commands])
        if meanwhile is None:
            return self._roundtrip(packed, len(commands))
        wire = self._take()
        wire.send(packed)  # the replies wait in the socket meanwhile
        try:
            meanwhile()
        except BaseException:
            wire.close()
            raise
        out = wire.read(len(commands))
        self._spare.append(wire)
        return out

    def drop_connections(self) -> None:
        """Close every connection (for a client no longer used)."""
        spare, self._spare = self._spare, []
        for wire in spare:
            wire.close()
        self.connection_pool.disconnect()

    def close(self) -> None:
        spare, self._spare = self._spare, []
        for wire in spare:
            wire.close()
        super().close()


# ----------------------------------------------------------------------- asyncio


class _LaneProtocol(asyncio.Protocol):
    def __init__(self, where: str, timeout: float | None) -> None:
        self.where = where
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.reader = _reader()
        #: (future, time sent) per request, in the order of the replies to come.
        self.waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.watchdog: asyncio.TimerHandle | None = None
        self.error: Exception | None = None

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.waiting
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(redis.ConnectionError(f"protocol error from {self.where}: {exc}"))
                return
            if reply is _MORE:
                return
            if not waiting:
                self._fail(redis.ConnectionError(f"unexpected reply from {self.where}"))
                return
            future, _ = waiting.popleft()
            if future.done():  # its caller gave up (cancelled)
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self._fail(redis.ConnectionError(f"connection to {self.where} lost{reason}"))

    # requests
    def send(self, packed: bytes, count: int = 1) -> list[asyncio.Future[Any]]:
        if self.error is not None:
            raise self.error
        now = time.monotonic()
        futures = [self.loop.create_future() for _ in range(count)]
        self.waiting.extend((f, now) for f in futures)
        self.out.append(packed)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)
        if self.watchdog is None and self.timeout:
            self.watchdog = self.loop.call_later(self.timeout, self._check_late)
        return futures

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.out and self.transport is not None and self.error is None:
            data = b"".join(self.out) if len(self.out) > 1 else self.out[0]
            self.out.clear()
            self.transport.write(data)

    def _check_late(self) -> None:
        self.watchdog = None
        if not self.waiting or self.error is not None or not self.timeout:
            return
        oldest = self.waiting[0][1]
        late = time.monotonic() - oldest
        if late >= self.timeout:
            self._fail(redis.TimeoutError(f"{self.where} did not answer within {self.timeout:g}s"))
        else:
            self.watchdog = self.loop.call_later(self.timeout - late, self._check_late)

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        if self.transport is not None:
            self.transport.abort()
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)

    def close(self) -> None:
        self._fail(redis.ConnectionError(f"connection to {self.where} closed"))


class Lane:
    """One multiplexed connection to a node, (re)connected on demand."""

    def __init__(self, endpoint: _Endpoint) -> None:
        self.endpoint = endpoint
        self.where = endpoint.where
        self._proto: _LaneProtocol | None = None
        self._connecting: asyncio.Future[_LaneProtocol] | None = None
        self._closed = False

    async def _connected(self) -> _LaneProtocol:
        proto = self._proto
        if proto is not None and proto.error is None:
            return proto
        if self._closed:
            raise redis.ConnectionError(f"connection to {self.where} closed")
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        except asyncio.CancelledError:
            # close() cancelled the shared connect (the node left the map) while we waited:
            # to this caller that is a failed connection, retried like one, not a
            # cancellation of its own task (which would end a worker loop silently).
            if connecting.cancelled() and not _cancelling():
                raise redis.ConnectionError(
                    f"connection to {self.where} closed while connecting"
                ) from None
            raise
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def _connect(self) -> _LaneProtocol:
        endpoint = self.endpoint
        proto = await open_connection(
            endpoint, lambda: _LaneProtocol(self.where, endpoint.socket_timeout)
        )
        if self._closed:  # closed meanwhile (wait_for may have lost close()'s cancel)
            proto.close()
            raise redis.ConnectionError(f"connection to {self.where} closed while connecting")
        handshake = endpoint.handshake()
        try:
            for command in handshake:
                (future,) = proto.send(pack(command))
                await future
        except redis.RedisError as exc:
            proto.close()
            raise redis.AuthenticationError(f"{self.where}: {exc}") from exc
        if self._closed:
            proto.close()
            raise redis.ConnectionError(f"connection to {self.where} closed")
        self._proto = proto
        return proto

    async def execute(self, *args: Any) -> Any:
        """Send one command and return its raw reply (an error reply is raised)."""
        proto = self._proto
        if proto is None or proto.error is not None:
            proto = await self._connected()
        (future,) = proto.send(pack(args))
        return await future

    async def pipeline(self, commands: Sequence[Command]) -> list[Any]:
        """Send several commands back to back; error replies are returned in place of
        their replies, a connection error is raised."""
        proto = self._proto
        if proto is None or proto.error is not None:
            proto = await self._connected()
        futures = proto.send(b"".join(pack(c) for c in commands), len(commands))
        out: list[Any] = []
        for future in futures:
            try:
                out.append(await future)
            except redis.ResponseError as exc:
                out.append(exc)
        return out

    def close(self) -> None:
        """Fail what is waiting and close the connection; later calls fail too."""
        self._closed = True
        if self._proto is not None:
            self._proto.close()
        if self._connecting is not None:
            self._connecting.cancel()


P = TypeVar("P", bound=asyncio.Protocol)


async def open_connection(endpoint: _Endpoint, protocol: Callable[[], P]) -> P:
    """A connection to ``endpoint`` (TLS if it says so) served by ``protocol()``, within
    its connect timeout; failures are redis-py's ``ConnectionError``."""
    loop = asyncio.get_running_loop()
    try:
        _, proto = await asyncio.wait_for(
            loop.create_connection(
                protocol, endpoint.host, endpoint.port, ssl=endpoint.ssl_context
            ),
            endpoint.connect_timeout,
        )
    except (OSError, asyncio.TimeoutError) as exc:
        raise redis.ConnectionError(f"Error connecting to {endpoint.where}: {exc}") from exc
    return proto


def _cancelling() -> bool:
    """Whether the running task itself was asked to stop (Python >= 3.11 can tell)."""
    task = asyncio.current_task()
    counter = getattr(task, "cancelling", None)
    return bool(counter()) if counter is not None else False


def _ssl_context(kwargs: dict[str, Any]) -> ssl.SSLContext | None:
    if not kwargs.get("ssl"):
        return None
    context = ssl.create_default_context(cafile=kwargs.get("ssl_ca_certs"))
    reqs = kwargs.get("ssl_cert_reqs", "required")
    if reqs in ("none", ssl.CERT_NONE):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif reqs in ("optional", ssl.CERT_OPTIONAL):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_OPTIONAL
    elif kwargs.get("ssl_check_hostname") is False:
        context.check_hostname = False
    if kwargs.get("ssl_certfile"):
        context.load_cert_chain(kwargs["ssl_certfile"], kwargs.get("ssl_keyfile"))
    return context


class AsyncNodeClient(redis.asyncio.Redis):
    """An asyncio redis-py client of one node with a :class:`Lane` for the hot path."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lane = Lane(_Endpoint.of(kwargs))
        self._fast_commands = fastcommands.usable(self)

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        """See :meth:`NodeClient.execute_command` (over the lane)."""
        if not fastcommands.takes(self, args, options):
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        try:
            reply = await self.lane.execute(*args)
        except redis.ResponseError as exc:
            return fastcommands.on_error(exc, options)
        out = fastcommands.parsed(self.response_callbacks, args[0], reply, options)
        return await out if inspect.isawaitable(out) else out

    async def fast(self, *args: Any) -> Any:
        return await self.lane.execute(*args)

    async def fast_pipeline(self, commands: Sequence[Command]) -> list[Any]:
        return await self.lane.pipeline(commands)

    async def drop_connections(self) -> None:
        """Close every connection, the lane's too (for a client no longer used): what
        waits on them fails at once."""
        self.lane.close()
        await self.connection_pool.disconnect()

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        self.lane.close()
        with contextlib.suppress(Exception):
            await super().aclose(close_connection_pool)

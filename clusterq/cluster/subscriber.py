"""One connection to a node in sharded pub/sub mode (``SSUBSCRIBE``), for wake-ups.

A shard channel lives in a hash slot like a key, so a channel is subscribed to on the
master that serves its slot (elsewhere the server answers ``MOVED``). The server itself
ends a subscription when the channel's slot leaves the node (a reshard, or a failover
that demotes the node: it sends ``sunsubscribe``); a connection that breaks ends them
all. Both are reported through ``on_dropped``, so the owner can subscribe again where the
slot went and look for what it may have missed meanwhile.

RESP2 framing in subscribed mode: each ``SSUBSCRIBE <channel>`` is answered by one
``ssubscribe`` confirmation or one error, each ``PING`` by ``pong``, in the order sent;
``smessage`` and server-sent ``sunsubscribe`` arrive in between. Nothing here sends
``SUNSUBSCRIBE`` (its reply could not be told from the server's own): a channel no
longer wanted is left until the connection is closed.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Iterable
from typing import Any

import hiredis
import redis

from clusterq.cluster.wire import _MORE, _Endpoint, _reader, open_connection, pack

#: Seconds between keepalive PINGs; a node that does not answer one within the
#: connection's socket timeout (a frozen master) is given up as if the connection broke.
KEEPALIVE_INTERVAL = 1.0


class _SubscriberProtocol(asyncio.Protocol):
    def __init__(self, owner: Subscriber) -> None:
        self.owner = owner
        self.reader = _reader()
        self.transport: asyncio.Transport | None = None
        #: Replies to come, in order: one future per SSUBSCRIBE channel or PING.
        self.replies: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.error: Exception | None = None
        #: Before subscribed mode (AUTH, SELECT): the one plain reply awaited.
        self.plain: asyncio.Future[Any] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while self.error is None:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self.fail(redis.ConnectionError(f"protocol error from {self.owner.where}: {exc}"))
                return
            if reply is _MORE:
                return
            self._dispatch(reply)

    def _dispatch(self, reply: Any) -> None:
        if self.plain is not None:
            plain, self.plain = self.plain, None
            if not plain.done():
                plain.set_result(reply)
            return
        kind = reply[0] if isinstance(reply, list) and reply else None
        if kind == b"smessage":
            self.owner.on_message(reply[1])
        elif kind == b"sunsubscribe":
            self.owner.dropped([reply[1]], "the server ended the subscription (slot moved)")
        elif kind in (b"ssubscribe", b"pong") or isinstance(reply, Exception):
            if not self.replies:
                self.fail(redis.ConnectionError(f"unexpected reply from {self.owner.where}"))
                return
            future = self.replies.popleft()
            if not future.done():
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        else:
            self.fail(redis.ConnectionError(f"unexpected reply from {self.owner.where}"))

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self.fail(redis.ConnectionError(f"connection to {self.owner.where} lost{reason}"))

    def send(self, command: tuple[Any, ...]) -> asyncio.Future[Any]:
        if self.error is not None:
            raise self.error
        assert self.transport is not None
        future = asyncio.get_running_loop().create_future()
        self.replies.append(future)
        self.transport.write(pack(command))
        return future

    def fail(self, error: Exception) -> None:
        if self.error is not None:
            return
        self.error = error
        if self.transport is not None:
            self.transport.abort()
        waiting = [*self.replies, *([self.plain] if self.plain is not None else [])]
        self.replies.clear()
        for future in waiting:
            if not future.done():
                future.set_exception(error)
        self.owner.lost(error)


class Subscriber:
    """Sharded pub/sub subscriptions on one node: ``on_message(channel)`` for each
    message, ``on_dropped(channels, reason)`` when subscriptions end without being asked
    to (then they are gone: subscribe again, on the slot's new master)."""

    def __init__(
        self,
        endpoint: _Endpoint,
        on_message: Callable[[bytes], None],
        on_dropped: Callable[[list[bytes], str], None],
    ) -> None:
        self.endpoint = endpoint
        self.where = endpoint.where
        self.on_message = on_message
        self.on_dropped = on_dropped
        #: Channels the server confirmed and has not dropped.
        self.channels: set[bytes] = set()
        self._proto: _SubscriberProtocol | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self.closed = False

    async def _connect(self) -> _SubscriberProtocol:
        endpoint = self.endpoint
        proto = await open_connection(endpoint, lambda: _SubscriberProtocol(self))
        # AUTH before the connection is in subscribed mode: its replies are plain ones,
        # which this protocol takes as errors or unexpected; read them by hand instead.
        try:
            for command in endpoint.handshake():
                reply = await self._plain_reply(proto, command)
                if isinstance(reply, Exception):
                    raise redis.AuthenticationError(f"{self.where}: {reply}")
        except BaseException:
            proto.fail(redis.ConnectionError(f"connection to {self.where} closed"))
            raise
        self._proto = proto
        self._keepalive = asyncio.ensure_future(self._ping_loop(proto))
        return proto

    async def _plain_reply(self, proto: _SubscriberProtocol, command: Any) -> Any:
        """Send a command outside subscribed mode and wait for its (plain) reply."""
        future = proto.plain = asyncio.get_running_loop().create_future()
        assert proto.transport is not None
        proto.transport.write(pack(command))
        return await asyncio.wait_for(future, self.endpoint.socket_timeout)

    async def subscribe(self, channels: Iterable[bytes]) -> dict[bytes, Exception]:
        """Subscribe to ``channels`` (connecting first if need be); returns the channels
        the server refused, with why (``MOVED``: the slot is served elsewhere; ``NOPERM``:
        the user may not subscribe). A broken connection raises ``ConnectionError``."""
        if self.closed:
            raise redis.ConnectionError(f"subscriber of {self.where} closed")
        proto = self._proto
        if proto is None or proto.error is not None:
            proto = await self._connect()
        wanted = [c for c in channels if c not in self.channels]
        futures = [proto.send(("SSUBSCRIBE", c)) for c in wanted]
        refused: dict[bytes, Exception] = {}
        timeout = self.endpoint.socket_timeout
        for channel, future in zip(wanted, futures, strict=True):
            try:
                await asyncio.wait_for(future, timeout)
            except redis.ResponseError as exc:
                refused[channel] = exc
                continue
            except asyncio.TimeoutError:
                proto.fail(redis.TimeoutError(f"{self.where} did not answer SSUBSCRIBE"))
                raise proto.error from None  # type: ignore[misc]
            if proto.error is None:
                self.channels.add(channel)
        if proto.error is not None:
            raise proto.error
        return refused

    async def _ping_loop(self, proto: _SubscriberProtocol) -> None:
        timeout = self.endpoint.socket_timeout or 5.0
        while proto.error is None:
            await asyncio.sleep(KEEPALIVE_INTERVAL)
            if proto.error is not None:
                return
            sent = time.monotonic()
            try:
                await asyncio.wait_for(proto.send(("PING",)), timeout)
            except asyncio.TimeoutError:
                late = time.monotonic() - sent
                proto.fail(redis.TimeoutError(f"{self.where} did not answer PING in {late:.1f}s"))
            except redis.RedisError:
                return

    def dropped(self, channels: list[bytes], reason: str) -> None:
        gone = [c for c in channels if c in self.channels]
        self.channels.difference_update(gone)
        if gone:
            self.on_dropped(gone, reason)

    def lost(self, error: Exception) -> None:
        """The connection broke: every subscription of it is gone."""
        if self._keepalive is not None and self._keepalive is not asyncio.current_task():
            self._keepalive.cancel()
        self._keepalive = None
        self.dropped(list(self.channels), "closed" if self.closed else str(error))

    def close(self) -> None:
        self.closed = True
        proto, self._proto = self._proto, None
        if proto is not None:
            proto.fail(redis.ConnectionError(f"subscriber of {self.where} closed"))

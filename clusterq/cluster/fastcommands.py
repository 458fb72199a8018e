"""redis-py's command methods over a node client's fast connections.

A handler that talks to Redis through the worker's clients (``current_worker().backend``
or ``.sync_backend``: ``backend.execute_key(key, lambda c: c.incr(key))``) writes
redis-py code, and would pay redis-py's per-command layer (40-100 µs of Python: retry
wrappers, observability hooks, pool bookkeeping) for each call. The node clients of
:mod:`clusterq.cluster.wire` instead send the commands of :data:`FAST` over their own
connections (a hiredis-packed request on a plain socket, or the asyncio lane) and parse
the reply with the client's own redis-py response callback, so the method returns what
redis-py would return.

Only commands that never block on the server and leave no state on the connection go
that way, with arguments of the plain types (``str``, ``bytes``, ``int``: a ``float``
or anything else goes through redis-py, which encodes it its own way) and no option for
the reply's callback, on clients that neither decode replies nor were asked for RESP3
nor cache. Everything else (blocking pops,
``WAIT``, ``MULTI``, pub/sub, ``SELECT``, ``CLIENT ...``, scripts) takes redis-py's own
path, unchanged; and once a client has sent a command of :data:`STATEFUL` that way, all
its commands do. A connection error is raised at once, without redis-py's retries: the
backends retry every call through failovers anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis

#: The commands a node client sends over its fast connections (see the module's text):
#: those whose replies are the same in RESP2 and RESP3 (integers, strings, nil, arrays of
#: strings). Doubles, maps and sets (``ZSCORE``, ``HGETALL``, ``SMEMBERS``...) are parsed
#: differently by each protocol's callbacks and stay with redis-py.
# fmt: off
FAST = frozenset({
    "GET", "SET", "SETEX", "PSETEX", "SETNX", "GETSET", "GETDEL", "GETEX", "MGET", "MSET",
    "MSETNX", "INCR", "INCRBY", "DECR", "DECRBY", "APPEND", "STRLEN", "GETRANGE",
    "SETRANGE", "DEL", "UNLINK", "EXISTS", "EXPIRE", "PEXPIRE", "EXPIREAT", "PEXPIREAT",
    "TTL", "PTTL", "PERSIST", "TYPE", "HGET", "HSET", "HSETNX", "HMGET", "HDEL", "HEXISTS",
    "HINCRBY", "HKEYS", "HVALS", "HLEN", "LPUSH", "RPUSH", "LPOP", "RPOP", "LLEN",
    "LRANGE", "LINDEX", "LREM", "LSET", "LTRIM", "LMOVE", "RPOPLPUSH", "SADD", "SREM",
    "SISMEMBER", "SMISMEMBER", "SCARD", "SRANDMEMBER", "ZADD", "ZREM", "ZCARD", "ZCOUNT",
    "ZREMRANGEBYSCORE", "ZREMRANGEBYRANK", "XADD", "XLEN", "XDEL", "XTRIM", "PUBLISH",
    "SPUBLISH", "PFADD", "PFCOUNT", "PING", "ECHO",
})
# fmt: on

#: Commands that change what the connection they are sent on does next (``READONLY`` on a
#: replica, ``SELECT``, ``CLIENT TRACKING``...): once a client sends one through redis-py,
#: its later commands follow it there, never over a fast connection that lacks it.
STATEFUL = frozenset(
    {"READONLY", "READWRITE", "SELECT", "CLIENT", "AUTH", "HELLO", "RESET", "ASKING", "MULTI",
     "WATCH", "SWAPDB"}
)  # fmt: skip

#: Option names redis-py's ``parse_response`` consumes itself (the rest go to callbacks).
_EMPTY_RESPONSE = "EMPTY_RESPONSE"
_NEVER_DECODE = "NEVER_DECODE"


def usable(client: redis.Redis | redis.asyncio.Redis) -> bool:
    """Whether ``client``'s replies can be parsed from the raw replies of the fast
    connections: no decoding, RESP2, no client-side cache, not a single-connection
    client."""
    kwargs = client.connection_pool.connection_kwargs
    return (
        not kwargs.get("decode_responses")
        and kwargs.get("protocol") in (None, 2, "2")
        and getattr(client.connection_pool, "cache", None) is None
        and getattr(client, "connection", None) is None
    )


def eligible(args: tuple[Any, ...], options: Mapping[str, Any]) -> bool:
    """Whether the command ``args`` may go over a fast connection: one of :data:`FAST`,
    plain arguments, and no option for its callback (``ZADD ... INCR`` answers a double,
    ``SET ... GET`` a value: redis-py parses those)."""
    if not args or args[0] not in FAST:
        return False
    if options and (len(options) > 1 or "keys" not in options):
        return False
    for arg in args:
        kind = type(arg)
        if kind is not str and kind is not bytes and kind is not int:
            return False
    return True


def stateful(args: tuple[Any, ...]) -> bool:
    """Whether the command ``args`` is one of :data:`STATEFUL` (``"CLIENT TRACKING"``
    spelled as one argument counts by its first word)."""
    if not args or not isinstance(args[0], str | bytes):
        return False
    name = args[0].decode(errors="replace") if isinstance(args[0], bytes) else args[0]
    return name.split(" ", 1)[0].upper() in STATEFUL


def takes(client: Any, args: tuple[Any, ...], options: Mapping[str, Any]) -> bool:
    """Whether a node client (its ``_fast_commands``: :func:`usable`, until a command of
    :data:`STATEFUL` goes through redis-py and turns it off for good) sends ``args`` over
    a fast connection."""
    if not client._fast_commands:
        return False
    if eligible(args, options):
        return True
    if stateful(args):
        client._fast_commands = False
    return False


def on_error(exc: redis.ResponseError, options: Mapping[str, Any]) -> Any:
    """An error reply, as redis-py's ``parse_response`` treats it."""
    if _EMPTY_RESPONSE in options:
        return options[_EMPTY_RESPONSE]
    raise exc


def parsed(callbacks: Mapping[Any, Any], command: str, reply: Any, options: dict[str, Any]) -> Any:
    """A raw reply through the client's redis-py callback for ``command``, with the
    call's options (less those ``parse_response`` consumes)."""
    options.pop(_EMPTY_RESPONSE, None)
    options.pop(_NEVER_DECODE, None)
    options.pop("keys", None)
    callback = callbacks.get(command)
    return reply if callback is None else callback(reply, **options)

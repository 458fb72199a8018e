"""What clusterq needs from the server, per role: the commands and the keys.

One table, read by three things: the README's ACL section, ``acl_rules()`` (the rule
line an operator gives ``ACL SETUSER``), and ``clusterq doctor``, which checks a user
has each of them. Redis checks the commands a Lua script calls against the caller's ACL
too, so the scripts' commands are listed (``SCRIPTED``).

Keys: every key clusterq reads or writes starts with ``<prefix>:`` (``~clusterq:*``);
so does every channel: the shard channels ``<prefix>:{queue}:wake`` that wake idle
workers (``&clusterq:*``).
"""

from __future__ import annotations

from typing import Literal

Role = Literal["producer", "worker", "operator"]
ROLES: tuple[Role, ...] = ("producer", "worker", "operator")

#: Connecting, learning the mode and the cluster map (every role).
CONNECT = ("ping", "info", "select", "cluster|shards", "cluster|nodes")

#: Commands called inside clusterq's Lua scripts (every ``.lua`` of the package but the
#: doctor's; a test reads them all): enqueue, push, dequeue, ack, fail, extend, requeue,
#: sweep, survey, manage (LINDEX and LSET take a pending task out of its list), cron,
#: fair groups in dequeue (ZRANGEBYLEX: a group's first task),
#: limits, layout, workflow (a large workflow's staged state goes into place with RENAME
#: and PERSIST), stream (dead letters: XRANGE, XADD, XACK; fenced acks; consumers of
#: workers gone: XINFO CONSUMERS, XGROUP DELCONSUMER), lifecycle events (XADD, and XLEN,
#: XRANGE, XREVRANGE for the counts the cap is kept by). SPUBLISH wakes idle workers.
#: Commands with subcommands are listed by their ACL name (``xinfo|consumers``).
SCRIPTED = (
    "del", "exists", "get", "incr", "persist", "pexpire", "rename", "set", "spublish",
    "time", "type",
    "hdel", "hexists", "hget", "hincrby", "hkeys", "hlen", "hmget", "hset", "hsetnx",
    "lindex", "llen", "lpos", "lpush", "lrem", "lset", "ltrim", "rpop", "rpush",
    "zadd", "zcard", "zrange", "zrangebylex", "zrangebyscore", "zrem", "zremrangebyscore",
    "zscore",
    "xack", "xadd", "xgroup|delconsumer", "xinfo|consumers", "xlen", "xrange", "xrevrange",
)  # fmt: skip

SCRIPTS = ("evalsha", "script|load")

#: Commands sent directly, per role (the scripts' ones too where sent directly).
DIRECT: dict[Role, tuple[str, ...]] = {
    # enqueue by script; WAIT for durability; queue names into the registry (SADD);
    # task info and results (HGET, ZSCORE); the partitioned queues' declarations and a
    # queue's limits (HGETALL; set_limits runs the limits script); a workflow's state
    # (HGETALL, PTTL); streams: declared (HGET, HSET of <prefix>:streams), published to
    # (XADD).
    "producer": ("hset", "wait", "sadd", "hget", "zscore", "hgetall", "pttl", "xadd"),
    # idle queues wait for wake-ups (SSUBSCRIBE), or without them with BLMOVE; the
    # announcement in <prefix>:workers (HSET, EXPIRE, HGETALL, HDEL); advancing a workflow
    # enqueues its next steps and WAITs for a replica. Stream consumers: the declaration
    # (HGET), their groups (XGROUP CREATE), reads (XREADGROUP), events pending too long or
    # left by a previous owner (XPENDING, XCLAIM), the lag (XINFO STREAM, XINFO GROUPS),
    # consumers of workers gone (XINFO CONSUMERS); an ordered group's member hash (HSET,
    # PEXPIRE, HGETALL, HDEL).
    "worker": (
        "ssubscribe", "blmove", "sadd", "hset", "expire", "hgetall", "hdel", "hget",
        "zscore", "wait", "pexpire",
        "xgroup|create", "xreadgroup", "xpending", "xclaim",
        "xinfo|stream", "xinfo|groups", "xinfo|consumers",
    ),
    # queue ls/inspect (a fair group's waiting tasks: ZLEXCOUNT), worker ls, task
    # ls/inspect, cluster watch; pause and unpause
    # (SET, DEL, SPUBLISH), queue rm (DEL, SREM); task actions run the manage script;
    # queue limit runs the limits script and reads the limits back (HGETALL); workflow
    # inspect (HGETALL, PTTL); stream ls/inspect: the declarations (HGETALL), each
    # partition's length and dead letters (XLEN), groups and lag (XINFO GROUPS, STREAM);
    # lifecycle events: on/off (SET, DEL of the flag), read (XRANGE, a script command
    # too), followed (XREAD with a block).
    "operator": (
        "smembers", "llen", "zcard", "exists", "hgetall", "hget", "zscore",
        "lrange", "lindex", "hmget", "hscan", "zrange", "zlexcount", "memory|usage",
        "set", "del", "srem", "spublish", "pttl",
        "xlen", "xinfo|groups", "xinfo|stream", "xread", "xrevrange",
    ),
}  # fmt: skip

#: Roles whose work runs the Lua scripts.
USES_SCRIPTS: dict[Role, bool] = {"producer": True, "worker": True, "operator": True}


def commands(role: Role) -> list[str]:
    """Every command ``role`` needs, sorted (ACL names: ``cluster|shards`` is a
    subcommand)."""
    needed = set(CONNECT) | set(DIRECT[role])
    if USES_SCRIPTS[role]:
        needed |= set(SCRIPTS) | set(SCRIPTED)
    return sorted(needed)


def acl_rules(prefix: str = "clusterq", roles: tuple[Role, ...] = ROLES) -> str:
    """The ACL rules for a user that plays ``roles``, e.g. for
    ``ACL SETUSER app on >password <rules>``: no command but those, keys and channels of
    ``prefix`` only."""
    needed: set[str] = set()
    for role in roles:
        needed |= set(commands(role))
    scope = ["resetchannels", f"~{prefix}:*", f"&{prefix}:*", "-@all"]
    return " ".join([*scope, *(f"+{c}" for c in sorted(needed))])

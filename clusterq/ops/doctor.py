"""``clusterq doctor``: does the URL's user have every permission clusterq needs?

Each command of :mod:`clusterq.ops.permissions` is sent once, in a form the server refuses
or answers without changing anything that matters: commands that write are aimed at a
string key of the doctor's own (``<prefix>:doctor:{probe}:…``, expiring in 30 s), where
they fail with WRONGTYPE; reads go to a key that does not exist. The server checks the
ACL before anything else, so a NOPERM reply means "missing" and any other reply means
"allowed". The commands scripts call are probed by a script (``doctor.lua``) with
``redis.pcall``, the way clusterq's own scripts would meet them.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from clusterq.cluster.backend import Backend
from clusterq.cluster.connection import RedisURL, command
from clusterq.cluster.wire import NodeClient, _Wire, pack
from clusterq.errors import ClusterqError
from clusterq.keys import DEFAULT_PREFIX, KeySchema
from clusterq.ops.permissions import ROLES, SCRIPTED, Role, commands
from clusterq.slots import keyslot

SCRIPT = (Path(__file__).with_name("doctor.lua")).read_text()

Probe = Callable[[str, str], tuple[Any, ...]]

#: Writes aimed at the doctor's string key ``a`` (WRONGTYPE instead of a write): only
#: once the probe script has made it.
_ON_STRING: dict[str, Probe] = {
    "hset": lambda a, b: ("HSET", a, "f", "v"),
    "lpush": lambda a, b: ("LPUSH", a, "v"),
    "sadd": lambda a, b: ("SADD", a, "v"),
    "srem": lambda a, b: ("SREM", a, "v"),
    "set": lambda a, b: ("SET", a, "x", "PX", 30000),  # the probe key itself
}
#: The rest: no key, or the key ``b`` that is never written.
_PLAIN: dict[str, Probe] = {
    "ping": lambda a, b: ("PING",),
    "info": lambda a, b: ("INFO", "server"),
    "cluster|shards": lambda a, b: ("CLUSTER", "SHARDS"),
    "cluster|nodes": lambda a, b: ("CLUSTER", "NODES"),
    "evalsha": lambda a, b: ("EVALSHA", "0" * 40, 1, b),
    "script|load": lambda a, b: ("SCRIPT", "LOAD", "return 0"),
    "wait": lambda a, b: ("WAIT", 0, 0),
    "blmove": lambda a, b: ("BLMOVE", b, b, "RIGHT", "RIGHT", 0.01),
    "expire": lambda a, b: ("EXPIRE", b, 30),
    "hgetall": lambda a, b: ("HGETALL", b),
    "hdel": lambda a, b: ("HDEL", b, "f"),
    "hget": lambda a, b: ("HGET", b, "f"),
    "zscore": lambda a, b: ("ZSCORE", b, "m"),
    "smembers": lambda a, b: ("SMEMBERS", b),
    "llen": lambda a, b: ("LLEN", b),
    "zcard": lambda a, b: ("ZCARD", b),
    "exists": lambda a, b: ("EXISTS", b),
    "del": lambda a, b: ("DEL", b),
    "lrange": lambda a, b: ("LRANGE", b, 0, 0),
    "lindex": lambda a, b: ("LINDEX", b, 0),
    "hmget": lambda a, b: ("HMGET", b, "f"),
    "hscan": lambda a, b: ("HSCAN", b, 0),
    "zrange": lambda a, b: ("ZRANGE", b, 0, 0),
    "zlexcount": lambda a, b: ("ZLEXCOUNT", b, "-", "+"),
    "memory|usage": lambda a, b: ("MEMORY", "USAGE", b),
    "pttl": lambda a, b: ("PTTL", b),
    # streams: on a key that does not exist (no MKSTREAM: nothing is created)
    "xlen": lambda a, b: ("XLEN", b),
    "xread": lambda a, b: ("XREAD", "COUNT", 1, "STREAMS", b, "0-0"),
    "xrevrange": lambda a, b: ("XREVRANGE", b, "+", "-", "COUNT", 1),
    "xinfo|stream": lambda a, b: ("XINFO", "STREAM", b),
    "xinfo|groups": lambda a, b: ("XINFO", "GROUPS", b),
    "xgroup|create": lambda a, b: ("XGROUP", "CREATE", b, "g", "0"),
    "xreadgroup": lambda a, b: ("XREADGROUP", "GROUP", "g", "c", "COUNT", 1, "STREAMS", b, ">"),
    "xpending": lambda a, b: ("XPENDING", b, "g"),
    "xclaim": lambda a, b: ("XCLAIM", b, "g", "c", 0, "0-1"),
}


@dataclass
class DoctorReport:
    """What the URL's user may do. ``missing``: per role, the commands it lacks;
    ``unchecked``: commands that could not be probed (they need another one missing)."""

    url: str
    mode: str
    allowed: set[str] = field(default_factory=set)
    denied: set[str] = field(default_factory=set)
    unchecked: set[str] = field(default_factory=set)
    roles: tuple[Role, ...] = ROLES

    def missing(self, role: Role) -> list[str]:
        return sorted(set(commands(role)) & self.denied)

    def ok(self, role: Role) -> bool:
        needed = set(commands(role))
        return not (needed & self.denied) and not (needed & self.unchecked)

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "mode": self.mode,
            "roles": {
                role: {
                    "ok": self.ok(role),
                    "missing": self.missing(role),
                    "unchecked": sorted(set(commands(role)) & self.unchecked),
                }
                for role in self.roles
            },
        }


def _denied(exc: BaseException) -> bool:
    return isinstance(exc, redis.exceptions.NoPermissionError) or "NOPERM" in str(exc)


def _try(client: NodeClient, args: tuple[Any, ...]) -> bool:
    """Whether the server let the command through its ACL check."""
    try:
        command(client, *args)
    except redis.ResponseError as exc:
        return not _denied(exc)
    return True


def _try_alone(client: NodeClient, args: tuple[Any, ...]) -> bool:
    """A command that changes the connection's mode (SSUBSCRIBE), on a connection of its
    own, closed afterwards."""
    wire = _Wire(client._endpoint)
    try:
        (reply,) = wire.roundtrip(pack(args), 1)
    finally:
        wire.close()
    return not (isinstance(reply, Exception) and _denied(reply))


def _probe_scripted(
    client: NodeClient, a: str, b: str, scripted: set[str], report: DoctorReport
) -> bool:
    """Run doctor.lua: the scripts' commands it was refused go to ``report``. Returns
    whether the string key ``a`` now exists (for the direct write probes)."""
    try:
        sha = command(client, "SCRIPT", "LOAD", SCRIPT)
        reply = command(client, "EVALSHA", sha, 2, a, b, f"{a}:wake")
    except redis.ResponseError as exc:
        if not _denied(exc):
            raise
        report.unchecked |= scripted  # script|load or evalsha missing
        return False
    refused = {x.decode() if isinstance(x, bytes) else str(x) for x in reply}
    if "?" in refused:  # SET refused: nothing else was tried
        report.denied.add("set")
        report.unchecked |= scripted - {"set"}
        return False
    report.denied |= refused & scripted
    report.allowed |= scripted - refused
    return True


def check(
    url: str | RedisURL, *, prefix: str = DEFAULT_PREFIX, roles: tuple[Role, ...] = ROLES
) -> DoctorReport:
    """Probe every command ``roles`` need on the master of the doctor's probe slot."""
    wanted = sorted(set().union(*(commands(role) for role in roles)))
    try:
        backend = Backend(url, prefix=prefix, retry_timeout=5)
    except redis.ResponseError as exc:
        if _denied(exc):
            raise ClusterqError(
                f"cannot even connect: {exc} (needs ping, info, cluster|shards)"
            ) from None
        raise
    try:
        a, b = KeySchema(prefix).doctor(secrets.token_hex(6))
        report = DoctorReport(backend.url.redacted(), backend.mode, roles=roles)

        def probe(client: NodeClient) -> None:
            scripted = {c for c in wanted if c in SCRIPTED}
            string_ready = bool(scripted) and _probe_scripted(client, a, b, scripted, report)
            for name in wanted:
                if name in report.allowed or name in report.denied:
                    continue  # decided by the script
                if name == "ssubscribe":
                    ok: bool | None = _try_alone(client, ("SSUBSCRIBE", f"{a}:wake"))
                elif name == "select":
                    ok = _try(client, ("SELECT", backend.url.db))
                elif name in _ON_STRING:
                    ok = _try(client, _ON_STRING[name](a, b)) if string_ready else None
                elif name in _PLAIN:
                    ok = _try(client, _PLAIN[name](a, b))
                else:
                    continue  # only a script calls it: left as the script probe left it
                report.unchecked.discard(name)
                if ok is None:
                    report.unchecked.add(name)
                else:
                    (report.allowed if ok else report.denied).add(name)

        backend.execute(keyslot(a), probe, timeout=10)
        return report
    finally:
        backend.close()

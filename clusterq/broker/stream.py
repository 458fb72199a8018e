"""stream: ownership leases, fenced acks and dead letters of stream partitions
(``stream.lua``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from clusterq.broker.script import LuaScript
from clusterq.keys import StreamKeys

SCRIPT = LuaScript("stream")
#: Dead letters kept per partition (approximately; the oldest go first).
DEAD_MAXLEN = 10_000


def acquire(
    sk: StreamKeys, group: str, consumer: str, lease_ms: int
) -> tuple[list[str], list[Any]]:
    return [sk.owner(group), sk.epoch(group)], ["acquire", consumer, lease_ms]


def renew(sk: StreamKeys, group: str, token: str, lease_ms: int) -> tuple[list[str], list[Any]]:
    return [sk.owner(group)], ["renew", token, lease_ms]


def release(sk: StreamKeys, group: str, token: str) -> tuple[list[str], list[Any]]:
    return [sk.owner(group)], ["release", token]


def ack(
    sk: StreamKeys, group: str, token: str | None, ids: Sequence[str]
) -> tuple[list[str], list[Any]]:
    """``token`` None: unordered (no owner to check)."""
    return [sk.events, sk.owner(group)], ["ack", group, token or "", *ids]


def dead(sk: StreamKeys, group: str, event_id: str, reason: str) -> tuple[list[str], list[Any]]:
    return [sk.events, sk.dead], ["dead", group, event_id, reason[:2000], DEAD_MAXLEN]


def forget(
    sk: StreamKeys, group: str, idle_ms: int, names: Sequence[str]
) -> tuple[list[str], list[Any]]:
    """Remove from ``group`` those of ``names`` (consumers of workers no longer alive)
    that hold nothing pending and were idle ``idle_ms``."""
    return [sk.events], ["forget", group, idle_ms, *names]


def text(reply: Any) -> str | None:
    if reply is None or reply is False:
        return None
    return reply.decode() if isinstance(reply, bytes) else str(reply)

"""cron: the periodic scheduler's leader lease and tick claims (``cron.lua``)."""

from __future__ import annotations

from typing import Any

from clusterq.broker.script import LuaScript
from clusterq.keys import CronKeys

SCRIPT = LuaScript("cron")


def acquire(keys: CronKeys, scheduler_id: str, lease_ms: int) -> tuple[list[str], list[Any]]:
    return [keys.leader, keys.epoch], ["acquire", scheduler_id, lease_ms]


def renew(keys: CronKeys, token: str, lease_ms: int) -> tuple[list[str], list[Any]]:
    return [keys.leader], ["renew", token, lease_ms]


def release(keys: CronKeys, token: str) -> tuple[list[str], list[Any]]:
    return [keys.leader], ["release", token]


def start(keys: CronKeys, token: str, entry: str, tick_ms: int) -> tuple[list[str], list[Any]]:
    return [keys.leader, keys.state], ["start", token, entry, tick_ms]


def claim(keys: CronKeys, token: str, entry: str, tick_ms: int) -> tuple[list[str], list[Any]]:
    return [keys.leader, keys.state], ["claim", token, entry, tick_ms]


def redrive(keys: CronKeys, token: str, entry: str, tick_ms: int) -> tuple[list[str], list[Any]]:
    return [keys.leader, keys.state], ["redrive", token, entry, tick_ms]


def publish(
    keys: CronKeys,
    token: str,
    now_ms: int,
    cutoff_ms: int,
    described: dict[str, str],
    ghosts: list[str],
) -> tuple[list[str], list[Any]]:
    """``described``: the leader's entries (name -> JSON description); ``ghosts``: names
    it does not declare, forgotten if no leader declared them since ``cutoff_ms``."""
    args: list[Any] = ["publish", token, now_ms, cutoff_ms, len(described)]
    for name, description in described.items():
        args += [name, description]
    args += ghosts
    history = [keys.history(name) for name in ghosts]
    return [keys.leader, keys.state, keys.entries, *history], args


def done(
    keys: CronKeys, entry: str, tick_ms: int, record: str, keep: int
) -> tuple[list[str], list[Any]]:
    return [keys.state, keys.history(entry)], ["done", entry, tick_ms, record, keep]


def text(reply: Any) -> str | None:
    if reply is None:
        return None
    return reply.decode() if isinstance(reply, bytes) else str(reply)

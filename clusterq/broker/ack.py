"""ack: active -> completed or deleted (``ack.lua``), several per call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from clusterq.broker.script import LuaScript
from clusterq.keys import QueueKeys

SCRIPT = LuaScript("ack")


@dataclass(frozen=True)
class Ack:
    id: str
    token: str
    retention_ms: int = 0
    result: bytes = b""
    unique_key: str | None = None


def build(
    qk: QueueKeys, acks: Sequence[Ack], *, remember_ms: int = 0
) -> tuple[list[str], list[Any]]:
    keys = [
        qk.active, qk.leases, qk.tasks, qk.completed, qk.results, qk.stats, qk.done, qk.evcfg,
        qk.events,
    ]  # fmt: skip
    args: list[Any] = [max(0, remember_ms)]
    for ack in acks:
        index = 0
        if ack.unique_key is not None:
            keys.append(ack.unique_key)
            index = len(keys)
        args += [ack.id, ack.token, max(0, ack.retention_ms), ack.result, index]
    return keys, args


#: Per ack: applied; refused, the caller no longer holding the lease; the task is gone.
ACKED, STALE, GONE = 1, 0, -1


def parse(reply: Sequence[Any]) -> list[int]:
    """Per ack: :data:`ACKED`, :data:`STALE` (the caller no longer held the lease: another
    worker holds the task, or recovery took it back) or :data:`GONE` (its record was
    deleted: by an operator, or with its queue)."""
    return [int(v) for v in reply]

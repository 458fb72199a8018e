"""sweep: retention, archive trimming, expired leases (``sweep.lua``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from clusterq.broker.script import LuaScript
from clusterq.keys import QueueKeys
from clusterq.serialization import reply_text

SCRIPT = LuaScript("sweep")


@dataclass(frozen=True)
class Swept:
    deleted: int = 0
    #: (task id, token, raw record) of active tasks whose lease expired.
    expired: list[tuple[str, str, bytes]] = field(default_factory=list)


def build(
    qk: QueueKeys, *, limit: int = 100, archive_max_size: int, archive_max_age_ms: int
) -> tuple[list[str], list[Any]]:
    keys = [
        qk.active,
        qk.leases,
        qk.tasks,
        qk.completed,
        qk.results,
        qk.archived,
        qk.done,
        qk.cancel,
    ]
    return keys, [limit, archive_max_size, archive_max_age_ms]


def parse(reply: Sequence[Any]) -> Swept:
    expired = [
        (reply_text(reply[i]), reply_text(reply[i + 1]), bytes(reply[i + 2]))
        for i in range(1, len(reply), 3)
    ]
    return Swept(deleted=int(reply[0]), expired=expired)

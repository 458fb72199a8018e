"""extend: renew leases of active tasks (``extend.lua``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from clusterq.broker.script import LuaScript
from clusterq.keys import QueueKeys

SCRIPT = LuaScript("extend")


@dataclass(frozen=True)
class Renewed:
    """Ids whose lease was lost, and ids an operator asked to cancel."""

    lost: set[str] = field(default_factory=set)
    cancelled: set[str] = field(default_factory=set)


def build(
    qk: QueueKeys, lease_ms: int, held: Sequence[tuple[str, str]]
) -> tuple[list[str], list[Any]]:
    args: list[Any] = [lease_ms, *(value for pair in held for value in pair)]
    return [qk.active, qk.leases, qk.cancel], args


def _ids(values: Sequence[Any]) -> set[str]:
    return {v.decode() if isinstance(v, bytes) else str(v) for v in values}


def parse(reply: Sequence[Any]) -> Renewed:
    lost, cancelled = reply
    return Renewed(lost=_ids(lost), cancelled=_ids(cancelled))

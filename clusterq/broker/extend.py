"""extend: renew leases of active tasks (``extend.lua``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from clusterq.broker.script import LuaScript
from clusterq.keys import QueueKeys

SCRIPT = LuaScript("extend")


def build(
    qk: QueueKeys, lease_ms: int, held: Sequence[tuple[str, str]]
) -> tuple[list[str], list[Any]]:
    args: list[Any] = [lease_ms, *(value for pair in held for value in pair)]
    return [qk.active, qk.leases], args


def parse(reply: Sequence[Any]) -> set[str]:
    """Ids whose lease was lost."""
    return {v.decode() if isinstance(v, bytes) else str(v) for v in reply}

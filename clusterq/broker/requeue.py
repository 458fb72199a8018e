"""requeue: active -> pending without a retry (``requeue.lua``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from clusterq.broker.script import LuaScript
from clusterq.keys import QueueKeys

SCRIPT = LuaScript("requeue")


def build(qk: QueueKeys, held: Sequence[tuple[str, str]]) -> tuple[list[str], list[Any]]:
    """``held``: (task id, token) pairs."""
    args: list[Any] = [value for pair in held for value in pair]
    return [qk.active, qk.leases, qk.pending, qk.wake, qk.evcfg, qk.events, qk.tasks], args


def parse(reply: Any) -> int:
    return int(reply)

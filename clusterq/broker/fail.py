"""fail: active -> retry or archived (``fail.lua``); also lease-expiry recovery."""

from __future__ import annotations

from typing import Any, Literal

from clusterq.broker.script import LuaScript
from clusterq.keys import QueueKeys

SCRIPT = LuaScript("fail")

FailOutcome = Literal["retry", "archived", "stale", "gone"]


def build(
    qk: QueueKeys,
    task_id: str,
    token: str,
    new_meta: bytes,
    *,
    retry_in_ms: int | None,
    only_if_expired: bool = False,
    count_failure: bool = True,
    hold_ms: int = 0,
    hold_scope: str = "queue",
) -> tuple[list[str], list[Any]]:
    """``retry_in_ms=None`` archives the task; ``hold_ms`` keeps every task of the queue
    (``hold_scope="group"``: of the task's fair group) from starting for that long (a
    handler's ``RateLimited(scope=...)``)."""
    keys = [
        qk.active, qk.leases, qk.tasks, qk.retry, qk.archived, qk.stats, qk.wake, qk.limits,
        qk.groups, qk.turns, qk.evcfg, qk.events,
    ]  # fmt: skip
    delay = -1 if retry_in_ms is None else max(0, retry_in_ms)
    args = [
        task_id, token, new_meta, delay, int(only_if_expired), int(count_failure), max(0, hold_ms),
        hold_scope,
    ]  # fmt: skip
    return keys, args


def parse(reply: Any) -> FailOutcome:
    return {1: "retry", 2: "archived", -1: "gone"}.get(int(reply), "stale")  # type: ignore[return-value]

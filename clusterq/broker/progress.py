"""progress: an active task's progress report, fenced by its lease (``progress.lua``)."""

from __future__ import annotations

from typing import Any

from clusterq.broker.script import LuaScript
from clusterq.keys import QueueKeys
from clusterq.progress import PROGRESS_TTL_MS

SCRIPT = LuaScript("progress")


def build(
    qk: QueueKeys, task_id: str, token: str, report: bytes, fraction: float = 0.0
) -> tuple[list[str], list[Any]]:
    keys = [qk.leases, qk.progress(task_id), qk.evcfg, qk.events, qk.tasks]
    return keys, [task_id, token, report, PROGRESS_TTL_MS, repr(float(fraction))]


def parse(reply: Any) -> bool:
    """True if the report was kept; False if the caller no longer holds the lease."""
    if isinstance(reply, Exception):
        raise reply
    return bool(reply == 1)

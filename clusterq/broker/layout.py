"""layout: compare-and-set of a partitioned queue's declaration (``layout.lua``)."""

from __future__ import annotations

from typing import Any

from clusterq.broker.script import LuaScript
from clusterq.errors import ConfigError
from clusterq.keys import KeySchema
from clusterq.partitions import Layout

SCRIPT = LuaScript("layout")


def put(keys: KeySchema, layout: Layout, read_version: int) -> tuple[list[str], list[Any]]:
    """Store ``layout`` unless the stored version is no longer ``read_version``."""
    return [keys.layouts], [layout.name, read_version, layout.to_json()]


def written(reply: Any, layout: Layout) -> bool:
    """Whether ``layout`` is stored now: the script wrote it, or a first call that was
    retried (its reply lost) had written this very layout."""
    if int(reply[0]):
        return True
    stored = reply[1]
    if not stored:
        return False
    try:
        now = Layout.from_json(stored)
    except ConfigError:
        return False
    return (now.version, now.queues, now.draining) == (
        layout.version,
        layout.queues,
        layout.draining,
    )

"""timeline: the failover timeline's events, each recorded once (``timeline.lua``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from clusterq.broker.script import LuaScript
from clusterq.keys import KeySchema

SCRIPT = LuaScript("timeline")
#: A change seen again within this long (ms) is a copy (another worker saw it too).
COPY_WINDOW_MS = 60_000
#: The timeline's cap (entries, approximately).
MAXLEN = 10_000


def build(keys: KeySchema, records: Sequence[tuple[str, str]]) -> tuple[list[str], list[Any]]:
    """``records``: (signature, JSON) pairs (:func:`clusterq.events.timeline_record`)."""
    stream, seen = keys.timeline
    args: list[Any] = [COPY_WINDOW_MS, MAXLEN, *(part for pair in records for part in pair)]
    return [stream, seen], args


def parse(reply: Any) -> int:
    if isinstance(reply, Exception):
        raise reply
    return int(reply)

"""workflow: one workflow's state, created and advanced (``workflow.lua``).

A workflow's state is written whole by one call, or, when it is large, in parts into a
staging hash that one last call turns into the state (``RENAME``): a reader never sees
half a workflow, and no call holds the server long.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from clusterq.broker.script import LuaScript
from clusterq.serialization import reply_text

SCRIPT = LuaScript("workflow")

#: The most fields one call writes (a larger workflow is written in parts).
PART_FIELDS = 4000
#: The most bytes of field values one call writes.
PART_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ReadyStep:
    """A step the script claimed: to enqueue now, with what it waited for."""

    id: str
    spec: dict[str, Any]
    parents: list[Any]


def _parts(fields: Sequence[tuple[str, Any]]) -> Iterator[list[Any]]:
    part: list[Any] = []
    size = 0
    for name, value in fields:
        length = len(value) if isinstance(value, bytes | str) else 24
        if part and (len(part) >= 2 * PART_FIELDS or size + length > PART_BYTES):
            yield part
            part, size = [], 0
        part += [name, value]
        size += length + len(name)
    if part:
        yield part


def create_calls(fields: Sequence[tuple[str, Any]]) -> list[list[Any]]:
    """The ARGV of the calls that create a workflow with ``fields``: one ``create``, or
    ``stage`` parts then a ``commit`` (the reply of the last call is the ready steps)."""
    parts = list(_parts(fields))
    if len(parts) <= 1:
        return [["create", *(parts[0] if parts else [])]]
    return [["stage", *part] for part in parts] + [["commit"]]


def done(step_id: str, result: bytes, most_parent_bytes: int) -> list[Any]:
    return ["done", step_id, result, most_parent_bytes]


def fail(step_id: str, error: str) -> list[Any]:
    return ["fail", step_id, error]


def enqueued(step_ids: Sequence[str]) -> list[Any]:
    return ["enqueued", *step_ids]


#: The most step ids one ``enqueued`` call marks.
MARKS_PER_CALL = 1000


def enqueued_calls(step_ids: Sequence[str]) -> list[list[Any]]:
    return [
        enqueued(step_ids[i : i + MARKS_PER_CALL]) for i in range(0, len(step_ids), MARKS_PER_CALL)
    ]


def committed(reply: Any) -> list[str] | None:
    """The entries' ids, when ``reply`` is that of a ``commit`` that made the state (the
    caller enqueues them all, from the specs it has); None for any other reply."""
    if isinstance(reply, bytes | str):
        return [str(i) for i in json.loads(reply)]
    return None


def parse_ready(reply: Any) -> list[ReadyStep] | None:
    """The steps a call made ready; None when the workflow no longer exists (it ended
    and its state expired, or it never was)."""
    if reply == 0:
        return None
    if not isinstance(reply, list | tuple):
        return []
    out = []
    for i in range(0, len(reply), 3):
        out.append(
            ReadyStep(
                reply_text(reply[i]),
                json.loads(reply_text(reply[i + 1])),
                json.loads(reply_text(reply[i + 2])),
            )
        )
    return out

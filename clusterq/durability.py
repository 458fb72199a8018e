"""Durable enqueue: what follows the writes on the same connection to the queue's master
(``WAIT`` / ``WAITAOF``), how many replicas confirmed, and the error when none did."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from clusterq.cluster.connection import Addr, format_addr
from clusterq.errors import ConfigError, DurabilityError

Durability = Literal["none", "replica", "aof"]
# How long the server may take to confirm, per level, when the caller sets no timeout.
# ``aof`` waits for fsyncs: with ``appendfsync everysec`` (the usual setting) the master and
# the replica each fsync once a second, so a WAITAOF takes up to about a second before any
# network delay (0.87 s measured on the local cluster); 1 s would fail about half the time.
DEFAULT_DURABILITY_TIMEOUTS: dict[str, float] = {"none": 0.0, "replica": 1.0, "aof": 3.0}


def durability_timeout_for(level: Durability, timeout: float | None) -> float:
    """``timeout`` when given, else the default for ``level`` (see above)."""
    if timeout is not None:
        return timeout
    if level not in DEFAULT_DURABILITY_TIMEOUTS:
        raise ValueError(f"durability must be 'none', 'replica' or 'aof', got {level!r}")
    return DEFAULT_DURABILITY_TIMEOUTS[level]


def durability_commands(level: Durability, timeout: float | None) -> list[tuple[Any, ...]]:
    """What follows the writes on the same connection to confirm them.

    ``replica``: ``WAIT 1`` (one replica has the write in memory). ``aof``: ``WAITAOF 1 1``
    (fsynced to the master's and one replica's append-only file; Redis >= 7.2, Valkey).
    ``timeout`` None: the level's default (:data:`DEFAULT_DURABILITY_TIMEOUTS`).
    """
    ms = max(1, int(durability_timeout_for(level, timeout) * 1000))
    if level == "none":
        return []
    if level == "replica":
        return [("WAIT", 1, ms)]
    if level == "aof":
        return [("WAITAOF", 1, 1, ms)]
    raise ValueError(f"durability must be 'none', 'replica' or 'aof', got {level!r}")


def confirmed_replicas(level: Durability, tail: Sequence[Any]) -> int | None:
    """How many replicas confirmed the writes, from the replies to durability_commands.

    Raises the error a ``WAIT`` met (the backend retries transient ones)."""
    if level == "none":
        return None
    reply = tail[-1]
    if isinstance(reply, Exception):
        text = str(reply)
        if "unknown command" in text.lower():
            raise ConfigError(
                f"durability={level!r} is not supported by this server ({text}); "
                "the tasks were written but not confirmed"
            )
        raise reply
    if level == "aof":
        return int(reply[1])
    return int(reply)


def require_confirmed(
    level: Durability,
    replicas: int | None,
    ids: Sequence[str],
    where: Addr,
    timeout: float | None,
    *,
    events: bool = False,
) -> None:
    """Raise :class:`DurabilityError` when no replica confirmed the writes of ``ids``
    (task ids; with ``events``, the ids of published events)."""
    if replicas is not None and replicas < 1:
        timeout = durability_timeout_for(level, timeout)
        ids = list(ids)
        shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        what, advice = (
            ("event(s) appended", "publish them again (they may then be there twice)")
            if events
            else ("task(s) written", "enqueue again with the same task_id")
        )
        raise DurabilityError(
            f"{len(ids)} {what} to {format_addr(where)} but no replica confirmed them "
            f"within {timeout:g}s (durability={level!r}); they may be lost if that master "
            f"fails: {advice} ({shown})",
            ids,
            replicas,
        )

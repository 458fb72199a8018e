"""What ``clusterq cron ls`` and ``cron history`` show: the entries a leading scheduler
published, where each stands, and its latest firings (read-only)."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any

from clusterq.broker import cron
from clusterq.cluster.backend import Backend
from clusterq.errors import ConfigError, InvalidName
from clusterq.keys import validate_entry_name
from clusterq.producer import TaskSpec
from clusterq.scheduler import Periodic, now_ms
from clusterq.slots import keyslot


@dataclass(frozen=True)
class EntryStatus:
    """One entry as ``clusterq cron ls`` shows it."""

    name: str
    schedule: str
    type: str
    queue: str
    #: The tick of its latest firing (None: not fired yet).
    last_tick: float | None
    next_tick: float | None
    inflight: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "schedule": self.schedule,
            "type": self.type,
            "queue": self.queue,
            "last_tick": self.last_tick,
            "next_tick": self.next_tick,
            "inflight": self.inflight,
        }


def entry_from_description(data: dict[str, Any]) -> Periodic | None:
    """The entry a leader described (to compute its next tick), or None if unreadable."""
    try:
        return Periodic(
            data["name"],
            TaskSpec(data["type"], None, {"queue": data["queue"]}),
            cron=data.get("cron"),
            every=data.get("every"),
            tz=data.get("tz"),
        )
    except (KeyError, TypeError, ConfigError):
        return None


def cron_status(backend: Backend) -> tuple[str | None, list[EntryStatus]]:
    """The leader's token (None: no scheduler leads) and every entry a leader published
    (and did not forget: see :attr:`Scheduler.forget_after`)."""
    keys = backend.keys.cron

    def read(client: Any) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        pipe.get(keys.leader)
        pipe.hgetall(keys.entries)
        pipe.hgetall(keys.state)
        return list(pipe.execute())

    leader, entries, state = backend.execute(keyslot(keys.base), read)
    state = {cron.text(k): cron.text(v) for k, v in state.items()}
    names = []
    for raw_name in entries:
        with contextlib.suppress(InvalidName):  # written by something else: not listed
            names.append(validate_entry_name(cron.text(raw_name)))

    def latest(client: Any) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.lindex(keys.history(name), 0)
        return list(pipe.execute())

    last_fired: dict[str, float] = {}
    for name, raw_last in zip(names, backend.execute(keyslot(keys.base), latest), strict=True):
        with contextlib.suppress(ValueError, TypeError, KeyError):
            last_fired[name] = float(json.loads(raw_last)["tick"])
    now = now_ms()
    out = []
    for raw_name, raw in entries.items():
        if cron.text(raw_name) not in names:
            continue
        try:
            data = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            continue
        name = data["name"]
        last = state.get(f"last:{name}")
        inflight = state.get(f"inflight:{name}")
        entry = entry_from_description(data)
        upcoming = entry.next_tick(max(now, int(last or 0))) if entry is not None else None
        out.append(
            EntryStatus(
                name=name,
                schedule=str(data.get("schedule", "?")),
                type=str(data.get("type", "?")),
                queue=str(data.get("queue", "?")),
                last_tick=last_fired.get(name),
                next_tick=upcoming / 1000 if upcoming is not None else None,
                inflight=int(inflight) / 1000 if inflight and inflight.isdigit() else None,
            )
        )
    return cron.text(leader), sorted(out, key=lambda e: e.name)


def cron_history(backend: Backend, entry: str, limit: int = 20) -> list[dict[str, Any]]:
    """The entry's latest firings, newest first."""
    key = backend.keys.cron.history(entry)
    raw = backend.execute_key(key, lambda c: c.lrange(key, 0, max(0, limit - 1)))
    out = []
    for item in raw:
        try:
            data = json.loads(item)
        except ValueError:
            continue
        if isinstance(data, dict):
            out.append(data)
    return out

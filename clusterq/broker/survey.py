"""survey: how several queues of one node stand, in one call (``survey.lua``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from clusterq.broker.script import LuaScript
from clusterq.keys import QueueKeys

SCRIPT = LuaScript("survey", shared=())


@dataclass(frozen=True, slots=True)
class Look:
    """One queue as the survey found it."""

    #: Whether the node could answer for the queue (False: its slot is served elsewhere
    #: now, or its keys are not clusterq's); the rest is then unknown.
    known: bool
    pending: int = 0
    paused: bool = False
    #: Unix time (s) the earliest scheduled/retry task is due; None: none.
    next_due: float | None = None
    #: The queue needs a sweep now: an active task's lease expired (its worker died
    #: holding it), a completed task's retention or a deleted id's dedup window ended,
    #: the archive is over its limits, a cancel request waits.
    sweep: bool = False

    @property
    def ready(self) -> bool:
        """Tasks are waiting to be taken now."""
        return self.pending > 0 and not self.paused


UNKNOWN = Look(known=False)


def build(
    qks: Sequence[QueueKeys], *, archive_max_size: int, archive_max_age_ms: int
) -> tuple[list[str], list[Any]]:
    """No keys declared (they span slots): the call goes to the node, not to a slot."""
    args: list[Any] = [archive_max_size, archive_max_age_ms]
    for qk in qks:
        args += (qk.pending, qk.paused, qk.scheduled, qk.retry, qk.active)
        args += (qk.completed, qk.done, qk.archived, qk.cancel, qk.fair, qk.turns)
    return [], args


def parse(reply: Sequence[Any]) -> list[Look]:
    out = []
    for i in range(1, len(reply), 4):
        pending, paused, due, sweep = (int(v) for v in reply[i : i + 4])
        if pending < 0:
            out.append(UNKNOWN)
            continue
        out.append(
            Look(
                known=True,
                pending=pending,
                paused=paused == 1,
                next_due=due / 1000.0 if due >= 0 else None,
                sweep=sweep == 1,
            )
        )
    return out

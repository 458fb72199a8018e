"""Periodic entries for the scheduler tests (``clusterq scheduler tests.cron_entries:ENTRIES``)."""

from __future__ import annotations

from clusterq import Periodic, TaskSpec

QUEUE = "cron-ticks"
ENTRIES = [Periodic("tick", TaskSpec("cron:tick", None, {"queue": QUEUE}), every=1)]

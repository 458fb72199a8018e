"""Periodic entries for `clusterq scheduler examples.periodic:ENTRIES` (handled by
examples.worker:router). Run two or three schedulers: one leads and fires each tick."""

from __future__ import annotations

from clusterq import Periodic, TaskSpec

ENTRIES = [
    # every 10 seconds, on the multiples of 10 s since the epoch
    Periodic(
        "ping-hooks",
        TaskSpec("webhooks:ping", {"url": "https://example.com"}, {"queue": "webhooks"}),
        every=10,
    ),
    # at second 30 of every minute (six fields: seconds first)
    Periodic(
        "digest",
        TaskSpec("notifications:email", {"to": "ops@example.com"}, {"queue": "notifications"}),
        cron="30 * * * * *",
    ),
    # 09:00 on weekdays, Paris time
    Periodic(
        "morning-report",
        TaskSpec("notifications:email", {"to": "team@example.com"}, {"queue": "notifications"}),
        cron="0 9 * * 1-5",
        tz="Europe/Paris",
    ),
]

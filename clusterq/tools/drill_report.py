"""A failover drill's report and its verdict: what was lost, duplicated or blocked, and
whether that passes (the rules are in :func:`verdict`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class DrillReport:
    mode: str
    queue: str
    durability: str
    master_before: str
    master_after: str
    tasks: int
    #: The queue the drill's tasks went to: one of its own on the same master as
    #: ``queue`` (so no worker of ``queue`` receives drill tasks), or ``queue`` itself
    #: with ``--use-running-workers``.
    drill_queue: str = ""
    acknowledged: int = 0
    gave_up: int = 0
    delivered: int = 0
    lost: int = 0
    still_queued: int = 0
    duplicated: int = 0
    extra_deliveries: int = 0
    in_flight_bound: int = 0
    stuck_active: int = 0
    #: Seconds from the start of production to the fault.
    fault_at: float = 0.0
    #: Seconds from the fault to the first producer error (None: none seen).
    detect: float | None = None
    #: Seconds from the fault to the replica's promotion, seen by a surviving node.
    promotion: float | None = None
    #: Seconds from the fault to the producer's first success after its first error.
    producer_resume: float | None = None
    #: The longest time one enqueue call of the producer was blocked (retries included).
    producer_stall: float = 0.0
    #: The verdict's bound on ``producer_stall`` and ``worker_resume_lag``: the promotion
    #: plus the settings' ``stall_margin`` (seconds).
    stall_bound: float | None = None
    #: Seconds from the promotion until the last drill worker fetched from the queue
    #: again (from the workers' "queue resumed" events; None if none lost it).
    worker_resume_lag: float | None = None
    #: Seconds from the promotion to the first delivery from the queue after it (bounded
    #: below by when the producer resumed, if nothing was waiting).
    first_delivery_after_promotion: float | None = None
    pickup_p50_ms: float | None = None
    pickup_p99_ms: float | None = None
    pickup_max_ms: float | None = None
    #: Tasks of a queue on another master delivered between the fault and the promotion.
    other_queue: str = ""
    other_delivered_during_outage: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    #: One message per error type, as the producer saw it.
    error_samples: dict[str, str] = field(default_factory=dict)
    healthy_after: bool = False
    duration: float = 0.0
    worker_logs: str = ""
    #: This drill's id: task ids are ``<run_id>-<n>`` (``-o<n>`` on the other queue).
    run_id: str = ""
    #: The hash where the handlers logged each delivery (``<task id>|<attempt>``), kept
    #: for an hour with ``keep_log`` (deleted at the end otherwise).
    delivery_log: str = ""
    #: Why the drill failed (empty: it passed). See :func:`verdict`.
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


#: An outage shorter than this says nothing about other shards (a manual failover takes
#: milliseconds): the "other queue kept flowing" check needs at least this long.
OTHER_QUEUE_MIN_OUTAGE = 1.0


def verdict(report: DrillReport, stall_margin: float) -> list[str]:
    """What went wrong in a drill: data first (lost, still queued, stuck), then
    availability: the queue's master must be replaced, the producer and the workers
    must not stay blocked past the promotion plus ``stall_margin`` seconds, and a queue
    on another shard must keep delivering while this one is down."""
    problems = []
    if report.lost:
        problems.append(f"{report.lost} acknowledged tasks lost")
    if report.still_queued:
        problems.append(f"{report.still_queued} acknowledged tasks still queued after settling")
    if report.stuck_active:
        problems.append(f"{report.stuck_active} tasks stuck active")
    if report.gave_up:
        problems.append(f"the producer gave up on {report.gave_up} tasks")
    if report.promotion is None:
        problems.append("no promotion seen: the queue's master was never replaced")
        return problems
    bound = report.stall_bound = round(report.promotion + stall_margin, 3)
    if report.producer_stall > bound:
        why = ""
        if "DurabilityError" in report.error_samples:
            why = ": durable enqueues were refused while the new master had no replica"
        problems.append(
            f"the producer was blocked {report.producer_stall:.1f}s "
            f"(bound: promotion {report.promotion:.1f}s + {stall_margin:g}s){why}"
        )
    if report.worker_resume_lag is not None and report.worker_resume_lag > stall_margin:
        problems.append(
            f"workers resumed {report.worker_resume_lag:.1f}s after the promotion "
            f"(bound: {stall_margin:g}s)"
        )
    if report.promotion >= OTHER_QUEUE_MIN_OUTAGE and not report.other_delivered_during_outage:
        problems.append(
            f"queue {report.other_queue} on another shard delivered nothing during the "
            f"{report.promotion:.1f}s outage"
        )
    return problems

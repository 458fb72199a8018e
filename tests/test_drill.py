"""The drill's verdict (a pure function of its report): data and availability."""

from __future__ import annotations

from clusterq.tools.drill_report import DrillReport, verdict


def _report(**fields: object) -> DrillReport:
    base = DrillReport(
        mode="kill",
        queue="images",
        durability="replica",
        master_before="127.0.0.1:7001",
        master_after="127.0.0.1:7004",
        tasks=100,
        acknowledged=100,
        delivered=100,
        promotion=5.0,
        producer_resume=5.6,
        producer_stall=5.7,
        worker_resume_lag=0.2,
        other_queue="images-drill-other-0",
        other_delivered_during_outage=300,
    )
    for name, value in fields.items():
        setattr(base, name, value)
    return base


def test_a_clean_drill_passes_and_states_its_bound() -> None:
    report = _report()
    assert verdict(report, 5.0) == []
    assert report.stall_bound == 10.0


def test_a_producer_blocked_past_the_promotion_fails_the_verdict() -> None:
    # What Valkey 8 did before the topology fix: promoted after 5.5 s, producer back at 60 s.
    report = _report(promotion=5.5, producer_stall=60.2, producer_resume=60.2)
    problems = verdict(report, 5.0)
    assert len(problems) == 1 and "blocked 60.2s" in problems[0] and "5.5s + 5s" in problems[0]
    assert verdict(_report(promotion=5.5, producer_stall=60.2), 60.0) == []  # configurable
    durable = _report(promotion=3.7, producer_stall=9.1, error_samples={"DurabilityError": "x"})
    [problem] = verdict(durable, 5.0)
    assert problem.endswith("durable enqueues were refused while the new master had no replica")


def test_no_promotion_fails_the_verdict() -> None:
    problems = verdict(_report(promotion=None, worker_resume_lag=None), 5.0)
    assert problems == ["no promotion seen: the queue's master was never replaced"]


def test_another_shard_that_delivered_nothing_during_the_outage_fails() -> None:
    problems = verdict(_report(other_delivered_during_outage=0), 5.0)
    assert len(problems) == 1 and "delivered nothing during the 5.0s outage" in problems[0]
    # A manual failover takes milliseconds: nothing delivered in that window is normal.
    manual = _report(promotion=0.01, producer_stall=0.05, other_delivered_during_outage=0)
    assert verdict(manual, 5.0) == []


def test_slow_workers_and_data_problems_are_each_named() -> None:
    problems = verdict(_report(worker_resume_lag=7.5, lost=2, still_queued=1, stuck_active=3), 5.0)
    assert problems[:3] == [
        "2 acknowledged tasks lost",
        "1 acknowledged tasks still queued after settling",
        "3 tasks stuck active",
    ]
    assert "workers resumed 7.5s after the promotion" in problems[3]
    report = _report()
    report.problems = verdict(_report(lost=1), 5.0)
    assert not report.ok and report.to_dict()["ok"] is False

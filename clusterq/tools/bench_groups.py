"""``clusterq bench limits``, its fair-group parts (``enqueue(..., group=...)``).

As in :mod:`clusterq.tools.bench_limits`, every figure comes from times the handlers
themselves record (``"<time> <group> <pid>"``, RPUSHed through redis-py beside the queue:
:data:`clusterq.tools.bench_handlers.GROUP_START_TYPE`), never from clusterq's counters,
except the cost part, which is the ``e2e`` drain:

- **backlog**: one worker supervisor of ONE process (``--concurrency`` as given) on a fresh
  queue, paused meanwhile: group A's N_A tasks (:data:`BACKLOG`, fewer if ``--tasks`` is
  smaller) are enqueued first, then, the clock read just before, group B's
  :data:`SMALL_GROUP`; then the queue is unpaused (so the backlog is whole when the
  worker starts taking tasks, and the worker is running already). B's median, p95 and
  p99 wait (its handlers' start minus that clock reading), how many of A's tasks had
  started when B's last one did, and how many of A's still waited then.
- **per-group rate**: ``rate_per_group="5/s"`` (:data:`GROUP_RATE`, its default burst) on
  a fresh queue, :data:`RATE_GROUPS` groups of K tasks (:data:`GROUP_TASKS`, fewer if
  ``--tasks`` / :data:`RATE_GROUPS` is smaller: about 5 s per group), enqueued group
  after group once the worker processes run. Per group, the most starts in any
  ``--limit-window`` seconds against ``5 x window + burst``, and in any 1 s against
  ``5 + burst`` (the worst group of each); each group's average start rate (the lowest
  and highest); how far apart the groups' first starts are, and how many distinct groups
  the first :data:`RATE_GROUPS` starts were (all making progress at once).
- **cost**: the ``e2e`` noop drain of N tasks without groups against the same tasks spread
  round robin over :data:`COST_GROUPS` groups, :data:`COST_ROUNDS` rounds taking turns;
  tasks/s of each and the ratio of the means.

Nothing here asserts anything about speed.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Sequence

from clusterq.errors import ClusterqError
from clusterq.ops.admin import Admin
from clusterq.producer import TaskSpec
from clusterq.tools.bench_handlers import GROUP_START_TYPE, NOOP_TYPE
from clusterq.tools.bench_limits import (
    _longer,
    cost_rows,
    rate_text,
    recorded,
    window_counts,
    worker_processes,
)
from clusterq.tools.bench_report import BenchRow, percentile
from clusterq.tools.bench_session import Session, drain

#: The backlog part: group A's tasks (at most; ``--tasks`` if fewer), then group B's.
BACKLOG = 10_000
SMALL_GROUP = 100
#: The per-group rate part: groups, each one's rate (tasks/s) and tasks (at most).
RATE_GROUPS = 20
GROUP_RATE = 5.0
GROUP_TASKS = 25
#: The cost part: groups the tasks are spread over, round robin; rounds taking turns.
COST_GROUPS = 10
COST_ROUNDS = 3
#: Tasks per ``enqueue_many`` call.
BATCH = 2000


def bench_groups(s: Session, shape: str) -> list[BenchRow]:
    """The fair-group parts' rows; ``shape`` describes the session's workers."""
    return [_backlog(s), _per_group_rate(s, shape), *_cost(s, shape)]


# ----------------------------------------------------------------------- recording


def _specs(
    queue: str, task_type: str, payload: object, groups: Sequence[str | None]
) -> list[TaskSpec]:
    """One task of ``task_type`` per entry of ``groups`` (None: no group)."""
    return [
        TaskSpec(task_type, payload, {"queue": queue} | ({"group": g} if g is not None else {}))
        for g in groups
    ]


def _enqueue(s: Session, specs: Sequence[TaskSpec]) -> None:
    for begin in range(0, len(specs), BATCH):
        s.client.enqueue_many(specs[begin : begin + BATCH])


def _all(samples: list[list[str]], n: int, label: str) -> list[list[str]]:
    """``samples``, checked to be one per task (``[time, group, pid]`` each)."""
    if len(samples) != n:
        raise ClusterqError(f"{label}: {len(samples)} samples recorded for {n} tasks")
    return samples


# ----------------------------------------------------------------------- the parts


def _backlog(s: Session) -> BenchRow:
    n_a, n_b = min(BACKLOG, s.settings.tasks), SMALL_GROUP
    (queue,) = s.queues(1)
    payload = {"run": s.run_id}
    admin = Admin(backend=s.backend)
    sent: list[float] = []

    def send() -> None:
        _enqueue(s, _specs(queue, GROUP_START_TYPE, payload, ["A"] * n_a))
        sent.append(time.time())
        _enqueue(s, _specs(queue, GROUP_START_TYPE, payload, ["B"] * n_b))
        admin.unpause(queue)

    label = "limits: groups, backlog"
    admin.pause(queue)  # before the worker starts: it takes nothing until both are in
    with worker_processes(s, 1):
        samples = _all(
            recorded(s, queue, n_a + n_b, send, label, s.workers([queue], 1)), n_a + n_b, label
        )
    s.drop([queue])
    starts = sorted((float(t), g) for t, g, _ in samples)
    waits = [t - sent[0] for t, g in starts if g == "B"]
    a_starts = [t for t, g in starts if g == "A"]
    if len(waits) != n_b or len(a_starts) != n_a:
        raise ClusterqError(f"{label}: {len(a_starts)} A and {len(waits)} B samples")
    last_b = sent[0] + max(waits)
    a_before = sum(1 for t in a_starts if t <= last_b)
    median, p95, p99 = (
        statistics.median(waits),
        percentile(waits, 95),
        percentile(waits, 99),
    )
    seconds = starts[-1][0] - starts[0][0]
    concurrency = s.settings.concurrency
    return BenchRow(
        "groups: backlog",
        n_a + n_b,
        round(seconds, 3),
        (len(starts) - 1) / seconds if seconds > 0 else None,
        p50_ms=round(median * 1000, 3),
        p99_ms=round(p99 * 1000, 3),
        note=(
            f"group B's {n_b} tasks enqueued after group A's {n_a:,}: B waited median "
            f"{median * 1000:,.1f} ms, p95 {p95 * 1000:,.1f} ms; when B's last started, "
            f"{a_before:,} of A's had started and {n_a - a_before:,} still waited; "
            f"1 worker x 1 process x concurrency {concurrency}"
        ),
        extra={
            "a_tasks": n_a,
            "b_tasks": n_b,
            "b_wait_median_ms": round(median * 1000, 3),
            "b_wait_p95_ms": round(p95 * 1000, 3),
            "b_wait_max_ms": round(max(waits) * 1000, 3),
            "a_started_at_last_b": a_before,
            "a_waiting_at_last_b": n_a - a_before,
            "last_a_after_last_b_s": round(a_starts[-1] - last_b, 3),
            "processes_seen": len({pid for _, _, pid in samples}),
        },
    )


def _per_group_rate(s: Session, shape: str) -> BenchRow:
    settings = s.settings
    (queue,) = s.queues(1)
    per_group = max(1, min(GROUP_TASKS, settings.tasks // RATE_GROUPS))
    n = per_group * RATE_GROUPS
    window = settings.limit_window
    limits = s.client.set_limits(queue, rate_per_group=rate_text(GROUP_RATE))
    assert limits is not None
    burst = limits.group_burst or 1
    groups = [f"g{i:02d}" for i in range(RATE_GROUPS)]
    specs = _specs(
        queue, GROUP_START_TYPE, {"run": s.run_id}, [g for g in groups for _ in range(per_group)]
    )
    label = f"limits: groups, {rate_text(GROUP_RATE)} per group"
    with _longer(s, per_group / GROUP_RATE):
        samples = _all(recorded(s, queue, n, lambda: _enqueue(s, specs), label), n, label)
    s.drop([queue])
    by_group: dict[str, list[float]] = defaultdict(list)
    for t, g, _ in samples:
        by_group[g].append(float(t))
    counts = sorted(len(by_group[g]) for g in groups)
    if set(by_group) != set(groups) or counts[0] != per_group:
        raise ClusterqError(f"{label}: tasks per group {counts}, {per_group} each expected")
    bound, bound_1s = GROUP_RATE * window + burst, GROUP_RATE + burst
    most, worst = max((window_counts(by_group[g], window)[0], g) for g in groups)
    most_1s, worst_1s = max((window_counts(by_group[g], 1.0)[0], g) for g in groups)
    rates = [_average(by_group[g]) for g in groups]
    known = [r for r in rates if r is not None]
    firsts = [min(by_group[g]) for g in groups]
    spread = max(firsts) - min(firsts)
    ordered = sorted((float(t), g) for t, g, _ in samples)
    distinct = len({g for _, g in ordered[:RATE_GROUPS]})
    seconds = ordered[-1][0] - ordered[0][0]
    low, high = (min(known), max(known)) if known else (None, None)
    average = f"{low:.2f}-{high:.2f}/s" if low is not None and high is not None else "-"
    return BenchRow(
        f"groups: per-group rate {rate_text(GROUP_RATE)}",
        n,
        round(seconds, 3),
        None,  # each group's own rate is the figure (the note), not the queue's
        note=(
            f"{RATE_GROUPS} groups x {per_group}: most starts of a group in any {window:g} s: "
            f"{most} ({worst}; bound {GROUP_RATE:g} x {window:g} + burst {burst} = "
            f"{bound:g}), in any 1 s: {most_1s} ({worst_1s}; bound {bound_1s:g}); average per "
            f"group {average}; first starts of all {RATE_GROUPS} groups within "
            f"{spread:.3f} s, the first {RATE_GROUPS} starts {distinct} distinct groups; "
            f"{shape}"
        ),
        extra={
            "groups": RATE_GROUPS,
            "tasks_per_group": per_group,
            "counts": [counts[0], counts[-1]],
            "rate_per_group": GROUP_RATE,
            "burst": burst,
            "window_s": window,
            "max_in_window": most,
            "bound": bound,
            "worst_group": worst,
            "max_in_1s": most_1s,
            "bound_1s": bound_1s,
            "worst_group_1s": worst_1s,
            "average_rate_min": round(low, 3) if low is not None else None,
            "average_rate_max": round(high, 3) if high is not None else None,
            "first_starts_spread_s": round(spread, 3),
            "distinct_in_first": distinct,
            "overall_rate": round((n - 1) / seconds, 3) if seconds > 0 else None,
            "processes_seen": len({pid for _, _, pid in samples}),
        },
    )


def _average(starts: list[float]) -> float | None:
    """Starts per second from the first to the last (None for a single start)."""
    seconds = max(starts) - min(starts)
    return (len(starts) - 1) / seconds if seconds > 0 else None


def _cost(s: Session, shape: str) -> list[BenchRow]:
    n = s.settings.tasks
    payload = {"run": s.run_id}
    runs: dict[bool, list[float]] = {False: [], True: []}
    what = {False: "no groups", True: f"{COST_GROUPS} groups"}
    for turn in range(COST_ROUNDS):
        for grouped in (False, True):
            queues = s.queues()
            # as Session.fill: batches taking the queues in turn, untimed
            for k, begin in enumerate(range(0, n, BATCH)):
                names = [
                    f"c{i % COST_GROUPS}" if grouped else None
                    for i in range(begin, min(n, begin + BATCH))
                ]
                s.client.enqueue_many(_specs(queues[k % len(queues)], NOOP_TYPE, payload, names))
                s.progress("filling queues", begin + len(names), n)
            label = f"limits: groups cost, {what[grouped]} ({turn + 1})"
            seconds, first = drain(s, queues, queues, n, label)
            s.drop(queues)
            if seconds <= 0:
                raise ClusterqError("groups cost: a drain too short to time")
            runs[grouped].append((n - first) / seconds)
    return cost_rows(
        runs,
        n,
        shape,
        (f"groups: cost, e2e noop, {what[False]}", f"groups: cost, e2e noop, {what[True]}"),
        "the mean without groups",
        {"groups": COST_GROUPS},
        lead=f"tasks spread round robin over {COST_GROUPS} groups; ",
    )

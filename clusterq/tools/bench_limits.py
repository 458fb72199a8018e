"""``clusterq bench limits``: a queue's flow control, measured by its handlers.

Every figure here comes from times the handlers themselves record (``time.time()``,
RPUSHed through redis-py onto a list beside the queue: :mod:`clusterq.tools.bench_handlers`),
never from clusterq's own counters, except the cost parts, which are the ``e2e`` drain:

- **rate**: ``set_limits(queue, rate=R, burst=B)``, then N tasks that record their start,
  served by the worker processes: the average start rate over the run (first start to
  last), the most starts in any ``window`` seconds against the bound ``R x window + B``
  (what the token bucket allows), the fewest in a whole window inside the run, and the
  average as a share of R.
- **concurrency**: ``set_limits(queue, concurrency=C)``, then tasks that sleep
  :data:`SPAN_MS` and record their start and end (at most :data:`SPAN_TASKS_PER_SLOT` per
  slot of the cap: ~20 s at full use): the most running at once (never above C), and
  the average running while a backlog remained (time-weighted over the intervals, from
  the first start to the last).
- **cost**: the ``e2e`` noop drain of N tasks with no limits against the same with a
  rate far above what is processed (:data:`COST_RATE`), :data:`COST_ROUNDS` rounds taking
  turns; tasks/s of each and the ratio of the means.
- **groups**: fair groups (``enqueue(..., group=...)``), :mod:`clusterq.tools.bench_groups`:
  a small group's wait behind a big group's backlog (one worker process), each group's
  own rate under ``rate_per_group`` with all groups making progress at once, and the
  ``e2e`` noop drain with tasks spread over groups against without.

Each part (but the groups' backlog: one process) uses ``--workers`` worker supervisors of
``--processes`` processes (default :data:`DEFAULT_PROCESSES`), ``--concurrency`` each. The
clocks compared are this machine's: the worker processes run here. Nothing here asserts
anything about speed.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import statistics
import time
from collections.abc import Callable, Iterator, Sequence

from clusterq.errors import ClusterqError, ConfigError
from clusterq.limits import InvalidLimits, Limits
from clusterq.tools.bench_handlers import NOOP_TYPE, SPAN_TYPE, START_TYPE
from clusterq.tools.bench_report import BenchRow, BenchSettings
from clusterq.tools.bench_session import Session, drain
from clusterq.tools.workerprocs import WorkerProcesses

#: Worker processes per supervisor when ``--processes`` is not given.
DEFAULT_PROCESSES = 3
#: How long each task of the concurrency part sleeps (ms).
SPAN_MS = 50
#: The concurrency part runs at most this many tasks per slot of the cap.
SPAN_TASKS_PER_SLOT = 400
#: The cost part's rate: the highest a limit may have (100 per ms), far above what a
#: queue is served at.
COST_RATE = "100000/s"
COST_ROUNDS = 3
#: Seconds between two looks at how many samples the handlers recorded.
POLL = 0.25


def rate_text(per_second: float) -> str:
    """``200.0`` -> ``"200/s"`` (a rate :func:`clusterq.limits.parse_rate` reads)."""
    return f"{per_second:.6f}".rstrip("0").rstrip(".") + "/s"


def check_settings(settings: BenchSettings) -> None:
    """Refuse limits the scenario could not declare (:class:`ConfigError`)."""
    if settings.limit_window <= 0:
        raise ConfigError("the limits window must be positive")
    try:
        Limits.of(rate_text(settings.limit_rate), settings.limit_burst)
        Limits.of(concurrency=settings.limit_concurrency)
    except InvalidLimits as exc:
        raise ConfigError(f"limits: {exc}") from exc


# ----------------------------------------------------------------------- figures


def window_counts(starts: Sequence[float], window: float) -> tuple[int, int | None]:
    """The most starts in any ``window`` seconds ``[t, t + window)``, and the fewest in
    any whole window inside the run (``(t, t + window]`` with ``t`` a start and
    ``t + window`` at most the last start; None if the run is shorter than a window)."""
    ordered = sorted(starts)
    most = 0
    for i, t in enumerate(ordered):
        most = max(most, bisect.bisect_left(ordered, t + window) - i)
    fewest: int | None = None
    if ordered:
        last = ordered[-1]
        for t in ordered:
            if t + window > last:
                break
            count = bisect.bisect_right(ordered, t + window) - bisect.bisect_right(ordered, t)
            fewest = count if fewest is None else min(fewest, count)
    return most, fewest


def overlap(spans: Sequence[tuple[float, float]]) -> tuple[int, float]:
    """The most intervals ``(start, end)`` open at once (one ending when another starts
    does not overlap it), and the time-weighted average open from the first start to
    the last (while tasks still waited)."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = most = 0
    for _, delta in events:  # at equal times the end (-1) sorts first
        running += delta
        most = max(most, running)
    if not spans:
        return 0, 0.0
    first = min(s for s, _ in spans)
    last = max(s for s, _ in spans)
    if last <= first:
        return most, float(most)
    busy = sum(max(0.0, min(e, last) - max(s, first)) for s, e in spans)
    return most, busy / (last - first)


# ----------------------------------------------------------------------- the parts


@contextlib.contextmanager
def worker_processes(s: Session, count: int | None = None) -> Iterator[int]:
    """The session's workers as supervisors of ``count`` processes (default
    ``--processes``, else :data:`DEFAULT_PROCESSES`) for the time of a scenario or part."""
    before = s.settings
    processes = count or before.processes or DEFAULT_PROCESSES
    s.settings = dataclasses.replace(before, processes=processes)
    try:
        yield processes
    finally:
        s.settings = before


def bench_limits(
    s: Session, also: Sequence[Callable[[Session, str], list[BenchRow]]] = ()
) -> list[BenchRow]:
    """The parts' rows, then those of each of ``also`` (more parts, given the session
    and a description of its workers: :func:`clusterq.tools.bench_groups.bench_groups`)."""
    with worker_processes(s) as processes:
        settings = s.settings
        shape = (
            f"{settings.workers} worker(s) x {processes} process(es) x "
            f"concurrency {settings.concurrency}"
        )
        rows = [_rate(s, shape), _concurrency(s, shape), *_cost(s, shape)]
        for part in also:
            rows += part(s, shape)
        return rows


def recorded(
    s: Session,
    queue: str,
    n: int,
    send: Callable[[], None],
    label: str,
    workers: WorkerProcesses | None = None,
) -> list[list[str]]:
    """Start ``workers`` (default: the session's) on ``queue`` (limits already set), call
    ``send`` (which enqueues ``n`` tasks whose handlers record a sample each) and wait
    until ``n`` samples are recorded; the samples, each split in its fields, in the order
    recorded."""
    key = s.keys.bench(s.run_id, queue)[1]
    if workers is None:
        workers = s.workers([queue], s.settings.workers)
    try:
        s.start_workers(workers)
        send()
        deadline = time.monotonic() + s.settings.timeout
        done = 0
        while done < n:
            if time.monotonic() > deadline:
                raise ClusterqError(f"{label}: only {done} of {n} tasks ran in time")
            workers.check_running()
            time.sleep(POLL)
            done = int(s.call(key, "LLEN", key))
            s.progress(label, min(done, n), n)
    finally:
        workers.stop()
    values = s.backend.execute_key(key, lambda c: c.lrange(key, 0, -1))
    return [(v.decode() if isinstance(v, bytes) else str(v)).split() for v in values]


def _send(s: Session, queue: str, n: int, task_type: str, payload: dict[str, object]) -> None:
    for begin in range(0, n, 2000):
        s.client.enqueue_many([(task_type, payload)] * min(2000, n - begin), queue=queue)


def _rate(s: Session, shape: str) -> BenchRow:
    settings = s.settings
    (queue,) = s.queues(1)
    per_second, window, n = settings.limit_rate, settings.limit_window, settings.tasks
    limits = s.client.set_limits(queue, rate=rate_text(per_second), burst=settings.limit_burst)
    assert limits is not None
    burst = limits.effective_burst or 1
    label = f"limits: rate {rate_text(per_second)}"
    with _longer(s, n / per_second):
        send = functools.partial(_send, s, queue, n, START_TYPE, {"run": s.run_id})
        samples = recorded(s, queue, n, send, label)
    s.drop([queue])
    starts = sorted(float(fields[0]) for fields in samples)
    seconds = starts[-1] - starts[0]
    average = (len(starts) - 1) / seconds if seconds > 0 else None
    most, fewest = window_counts(starts, window)
    bound = per_second * window + burst
    share = average / per_second if average is not None else None
    return BenchRow(
        label,
        len(starts),
        round(seconds, 3),
        average,
        note=(
            f"most starts in any {window:g} s: {most} (bound {per_second:g} x {window:g} + "
            f"burst {burst} = {bound:g}); fewest in a whole window: "
            f"{fewest if fewest is not None else '-'}; average "
            + (f"{share:.1%}" if share is not None else "-")
            + f" of the rate; {shape}, {len({f[1] for f in samples})} process(es) ran tasks"
        ),
        extra={
            "rate": per_second,
            "burst": burst,
            "window_s": window,
            "max_in_window": most,
            "bound": bound,
            "min_in_window": fewest,
            "average_rate": round(average, 3) if average is not None else None,
            "share_of_rate": round(share, 4) if share is not None else None,
            "processes_seen": len({f[1] for f in samples}),
        },
    )


@contextlib.contextmanager
def _longer(s: Session, expected: float) -> Iterator[None]:
    """The session's timeout at least ``expected`` x 2 + 60 s, for the time of a part
    that cannot go faster than its limits."""
    before = s.settings
    s.settings = dataclasses.replace(before, timeout=max(before.timeout, expected * 2 + 60))
    try:
        yield
    finally:
        s.settings = before


def _concurrency(s: Session, shape: str) -> BenchRow:
    settings = s.settings
    (queue,) = s.queues(1)
    cap = settings.limit_concurrency
    n = min(settings.tasks, cap * SPAN_TASKS_PER_SLOT)
    s.client.set_limits(queue, concurrency=cap)
    label = f"limits: concurrency {cap}"
    with _longer(s, n * SPAN_MS / 1000 / cap):
        payload: dict[str, object] = {"run": s.run_id, "ms": SPAN_MS}
        samples = recorded(
            s, queue, n, functools.partial(_send, s, queue, n, SPAN_TYPE, payload), label
        )
    s.drop([queue])
    spans = [(float(f[0]), float(f[1])) for f in samples]
    most, average = overlap(spans)
    seconds = max(e for _, e in spans) - min(b for b, _ in spans)
    return BenchRow(
        label,
        len(spans),
        round(seconds, 3),
        len(spans) / seconds if seconds > 0 else None,
        note=(
            f"most running at once: {most} (cap {cap}); on average {average:.2f} while a "
            f"backlog remained ({average / cap:.1%} of the cap); handlers sleep {SPAN_MS} ms; "
            f"{shape}, {len({f[2] for f in samples})} process(es) ran tasks"
        ),
        extra={
            "cap": cap,
            "max_running": most,
            "average_running": round(average, 3),
            "share_of_cap": round(average / cap, 4),
            "handler_ms": SPAN_MS,
            "shortest_ms": round(min(e - b for b, e in spans) * 1000, 3),
            "processes_seen": len({f[2] for f in samples}),
        },
    )


def _cost(s: Session, shape: str) -> list[BenchRow]:
    n = s.settings.tasks
    runs: dict[bool, list[float]] = {False: [], True: []}
    for turn in range(COST_ROUNDS):
        for limited in (False, True):
            queues = s.queues()
            if limited:
                for queue in queues:
                    s.client.set_limits(queue, rate=COST_RATE)
            s.fill(queues, n, NOOP_TYPE)
            what = f"rate {COST_RATE}" if limited else "no limits"
            seconds, first = drain(s, queues, queues, n, f"limits cost, {what} ({turn + 1})")
            s.drop(queues)
            if seconds <= 0:
                raise ClusterqError("limits cost: a drain too short to time")
            runs[limited].append((n - first) / seconds)
    return cost_rows(
        runs,
        n,
        shape,
        ("limits cost: e2e noop, no limits", f"limits cost: e2e noop, rate {COST_RATE}"),
        "the unlimited mean",
        {"rate_limit": COST_RATE},
    )


def cost_rows(
    runs: dict[bool, list[float]],
    n: int,
    shape: str,
    labels: tuple[str, str],
    versus: str,
    extra: dict[str, object],
    lead: str = "",
) -> list[BenchRow]:
    """The two rows of a cost part from its interleaved runs' tasks/s (False: the plain
    runs, True: the others): each mean with every run's figure, and the others' mean as
    a share of the plain one (``versus`` names it; ``extra`` and ``lead``, a note's
    beginning, are the others' only)."""
    plain, other = statistics.fmean(runs[False]), statistics.fmean(runs[True])
    ratio = other / plain
    rows = []
    for which, mean in ((False, plain), (True, other)):
        each = ", ".join(f"{r:,.0f}" for r in runs[which])
        rows.append(
            BenchRow(
                labels[which],
                n,
                0.0,
                mean,
                note=(lead if which else "")
                + f"mean of {len(runs[which])} runs taking turns ({each} tasks/s); {shape}"
                + (f"; {ratio:.1%} of {versus}" if which else ""),
                extra={"runs": [round(r, 1) for r in runs[which]]}
                | ({**extra, "ratio": round(ratio, 4)} if which else {}),
            )
        )
    return rows

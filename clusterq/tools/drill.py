"""Failover drills: fail the master that owns a queue, under load, and count the damage.

A drill checks that the cluster is healthy, starts worker processes (or uses the ones
already running ``clusterq.tools.drill:router``), produces N tasks into the queue at a steady
rate, and at a random moment in the middle fails the queue's master:

- ``kill``: SIGKILL, then start the process again so it rejoins as a replica;
- ``stop``: SIGSTOP until the replica is promoted (longer than cluster-node-timeout),
  then SIGCONT: the old master wakes up, steps down and drops what it did not replicate;
- ``manual`` / ``takeover``: ``CLUSTER FAILOVER`` [``TAKEOVER``] on the replica.

It keeps its own log of the tasks whose enqueue was acknowledged, and the handlers log
every delivery in a hash on *another* master. Lost = acknowledged, never delivered, not
still queued. Duplicated = delivered more than once (at-least-once allows it for tasks in
flight at the fault). Signals only go to local processes (pid from ``INFO server``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import redis

from clusterq.aclient import AsyncClient
from clusterq.cluster import topology as topo
from clusterq.cluster.abackend import AsyncBackend
from clusterq.cluster.connection import Addr, RedisURL, acommand, redact_url
from clusterq.durability import Durability
from clusterq.errors import ClusterqError
from clusterq.events import QueueResumed
from clusterq.keys import DEFAULT_PREFIX, KeySchema
from clusterq.retry import SkipRetry
from clusterq.router import Router
from clusterq.serialization import reply_text
from clusterq.slots import keyslot
from clusterq.task import Task
from clusterq.tools.drill_report import DrillReport, verdict
from clusterq.tools.servers import LocalProcess, local_process, restart_process
from clusterq.tools.workerprocs import WorkerProcesses
from clusterq.worker import current_worker
from clusterq.worker.announce import ANNOUNCE_INTERVAL, read_announcements

FaultMode = Literal["kill", "stop", "manual", "takeover"]
MODES: tuple[FaultMode, ...] = ("kill", "stop", "manual", "takeover")
DRILL_TYPE = "clusterq:drill"

router = Router()


@router.task(DRILL_TYPE)
async def record_delivery(task: Task) -> None:
    """Log one delivery of a drill task (on a master the drill does not fail).

    Keyed by (task id, attempt), so a write retried after a lost reply counts once."""
    payload = task.payload
    if not isinstance(payload, dict) or not all(
        isinstance(payload.get(k), str) for k in ("run", "log")
    ):
        raise SkipRetry("not a drill payload")
    backend = current_worker().backend
    assert backend is not None
    deliveries, first = backend.keys.drill(payload["run"], payload["log"])
    now_ms = int(time.time() * 1000)

    async def write(client: Any) -> Any:
        pipe = client.pipeline(transaction=False)
        pipe.hset(deliveries, f"{task.id}|{task.attempt}", 1)
        pipe.hsetnx(first, task.id, now_ms)
        pipe.expire(deliveries, 3600)
        pipe.expire(first, 3600)
        return await pipe.execute()

    await backend.execute_key(deliveries, write)


@dataclass
class DrillSettings:
    url: str
    queue: str
    mode: FaultMode
    tasks: int = 2000
    rate: float = 500.0
    durability: Durability = "replica"
    workers: int = 2
    concurrency: int = 16
    prefix: str = DEFAULT_PREFIX
    use_running_workers: bool = False
    settle_timeout: float = 90.0
    seed: int | None = None
    #: Seconds past the promotion that the producer and the workers may stay blocked
    #: before the drill fails its verdict.
    stall_margin: float = 5.0
    #: Keep the delivery log (an hour) for an independent count.
    keep_log: bool = False
    #: Each worker a supervisor of this many processes (``--processes``), if set.
    processes: int | None = None


async def replication_problems(backend: AsyncBackend) -> list[str]:
    """Why the cluster cannot be drilled right now (empty when every master has a
    replica whose link is up)."""
    await backend.refresh_topology()
    problems = []
    for shard in backend.topology.shards:
        if not shard.master.online:
            problems.append(f"master {shard.master.addr} is {shard.master.health}")
        if not shard.replicas:
            problems.append(f"master {shard.master.addr} has no replica")
        for replica in shard.replicas:
            try:
                info = await backend.node(replica.address).info("replication")
            except (redis.RedisError, OSError) as exc:
                problems.append(f"replica {replica.addr}: {exc}")
                continue
            if info.get("master_link_status") != "up":
                problems.append(f"replica {replica.addr}: link {info.get('master_link_status')}")
    return problems


async def wait_healthy(backend: AsyncBackend, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            problems = await replication_problems(backend)
        except ClusterqError as exc:
            problems = [str(exc)]
        if not problems or time.monotonic() > deadline:
            return problems
        await asyncio.sleep(0.2)


def same_master_queue_name(topology: topo.Topology, queue: str, master_id: str) -> str:
    """A queue name of the drill's own whose slot lives on the master ``master_id``
    (where ``queue`` lives)."""
    for n in range(100_000):
        name = f"{queue}-drill-{n}"
        master = topology.master_for_slot(keyslot(name))
        if master is not None and master.id == master_id:
            return name
    raise ClusterqError(f"no queue name found on master {master_id}")


def other_queue_name(topology: topo.Topology, queue: str, avoid_master: str) -> str:
    """A queue name whose slot lives on another master than ``avoid_master`` (an id)."""
    for n in range(10_000):
        name = f"{queue}-drill-other-{n}"
        master = topology.master_for_slot(keyslot(name))
        if master is not None and master.id != avoid_master:
            return name
    raise ClusterqError("no other master found: a drill needs at least two masters")


async def wait_promotion(
    replica: topo.NodeInfo, url: RedisURL, slot: int, old_master: str, timeout: float
) -> float | None:
    """Poll the replica's own view until another node than ``old_master`` owns ``slot``."""
    client = url.async_node_client(replica.address, socket_timeout=1.0)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError, OSError):
                view = await topo.afetch(client, "cluster", replica.address, tls=url.ssl)
                master = view.master_for_slot(slot)
                if master is not None and master.id != old_master:
                    return time.time()
            await asyncio.sleep(0.05)
        return None
    finally:
        await client.aclose()


# ----------------------------------------------------------------------- the drill


async def resumed_at(
    backend: AsyncBackend,
    queue: str,
    since: float,
    workers: set[str] | None,
    timeout: float = 2 * ANNOUNCE_INTERVAL + 1,
) -> list[float]:
    """When each worker (of ``workers``, or every live one serving ``queue``) last said
    it fetched from ``queue`` again after ``since``, from the queue events in their
    announcements. Waits (bounded) for announcements written after this call began, so
    that the latest events are in."""
    asked = time.time()
    deadline = time.monotonic() + timeout
    while True:
        chosen = [
            a
            for a in await read_announcements(backend)
            if (
                a.id in workers or a.supervisor in workers
                if workers is not None
                else queue in a.queues
            )
        ]
        fresh = all(a.at >= asked for a in chosen)
        if fresh or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    times = []
    for announcement in chosen:
        resumed = [
            float(e["at"])
            for e in announcement.events
            if e.get("event") == QueueResumed.kind and e.get("queue") == queue
        ]
        resumed = [t for t in resumed if t >= since]
        if resumed:
            times.append(max(resumed))
    return times


async def _still_there(backend: AsyncBackend, slot: int, tasks_key: str, ids: list[str]) -> int:
    """How many of ``ids`` still have a record in the queue (not yet done)."""
    left = 0
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]

        async def read(client: Any, chunk: list[str] = chunk) -> list[Any]:
            return list(await client.hmget(tasks_key, chunk))

        left += sum(1 for value in await backend.execute(slot, read) if value is not None)
    return left


async def _serving(backend: AsyncBackend, queue: str) -> int:
    return sum(1 for a in await read_announcements(backend) if queue in a.queues)


async def check_failover_allowed(backend: AsyncBackend, master: Addr) -> None:
    """Refuse before anything starts if the user may not run CLUSTER FAILOVER (a master
    refuses it after the ACL check: only a replica fails over, so this changes nothing)."""
    try:
        await acommand(backend.node(master), "CLUSTER", "FAILOVER")
    except redis.exceptions.NoPermissionError as exc:
        raise ClusterqError(
            f"the drill cannot fail over: {exc} (a manual or takeover drill needs a user "
            "allowed CLUSTER FAILOVER, e.g. an admin's URL)"
        ) from None
    except redis.ResponseError:
        pass  # "send CLUSTER FAILOVER to a replica": allowed


async def run_drill(
    settings: DrillSettings, progress: Callable[[str], None] = lambda _msg: None
) -> DrillReport:
    """Run one failover drill and return its report (see the module docstring)."""
    if settings.mode not in MODES:
        raise ClusterqError(f"unknown drill mode {settings.mode!r}: one of {', '.join(MODES)}")
    if settings.tasks < 10 or settings.rate <= 0:
        raise ClusterqError("a drill needs at least 10 tasks and a positive rate")
    rng = random.Random(settings.seed)
    backend = await AsyncBackend.connect(settings.url, prefix=settings.prefix, retry_timeout=5)
    workers: WorkerProcesses | None = None
    client: AsyncClient | None = None
    try:
        if backend.mode != "cluster":
            raise ClusterqError(
                f"{redact_url(settings.url)} is a standalone server: a failover drill "
                "needs a cluster"
            )
        backend.start_watching(0.2)
        progress("waiting until every master has a linked replica")
        problems = await wait_healthy(backend, 60)
        if problems:
            raise ClusterqError("cluster not ready for a drill: " + "; ".join(problems[:4]))
        keys = KeySchema(settings.prefix)
        location = backend.topology.locate(settings.queue)
        if location.master is None or not location.replicas:
            raise ClusterqError(f"queue {settings.queue!r} has no master with a replica")
        master, replica = location.master, location.replicas[0]
        proc: LocalProcess | None = None
        if settings.mode in ("kill", "stop"):
            info = await backend.node(master.address).info("server")
            proc = local_process(master.host, master.port, info)
        else:
            await check_failover_allowed(backend, master.address)
        other = other_queue_name(backend.topology, settings.queue, master.id)
        # The drill's tasks go to a queue of its own on the same master, never into the
        # named queue, where the application's workers would receive them; unless the
        # drill uses workers the operator started for it on that queue.
        target = (
            settings.queue
            if settings.use_running_workers
            else same_master_queue_name(backend.topology, settings.queue, master.id)
        )
        qk = keys.queue(target)
        run_id = secrets.token_hex(4)
        log_tag = other  # the delivery log lives beside the other queue, off the failed master
        deliveries_key, first_key = keys.drill(run_id, log_tag)
        report = DrillReport(
            mode=settings.mode,
            queue=settings.queue,
            drill_queue=target,
            durability=settings.durability,
            master_before=master.addr,
            master_after="",
            tasks=settings.tasks,
            other_queue=other,
            run_id=run_id,
            delivery_log=deliveries_key,
        )
        if settings.use_running_workers:
            if not await _serving(backend, settings.queue):
                raise ClusterqError(
                    f"no live worker serves queue {settings.queue!r}; start one running "
                    "clusterq.tools.drill:router, or let the drill start its own"
                )
            report.in_flight_bound = 0
        else:
            workers = WorkerProcesses(
                url=settings.url,
                prefix=settings.prefix,
                router="clusterq.tools.drill:router",
                queues=f"{target}=1,{other}=1",
                count=settings.workers,
                concurrency=settings.concurrency,
                name=f"drill-{run_id}",
                processes=settings.processes,
            )
            progress(f"starting {settings.workers} workers (logs in {workers.dir})")
            workers.start()
            await workers.announced(backend, 60)
            report.worker_logs = str(workers.dir)
            report.in_flight_bound = (
                settings.workers * settings.concurrency * (settings.processes or 1)
            )

        client = producer = await AsyncClient.connect(
            settings.url,
            prefix=settings.prefix,
            durability=settings.durability,
            retry_timeout=5,
            watch_interval=0.2,
        )
        payload = {"run": run_id, "log": log_tag}
        acked: dict[str, float] = {}
        other_acked: dict[str, float] = {}
        errors: Counter[str] = Counter()
        marks: dict[str, float] = {}
        fault_index = rng.randint(int(settings.tasks * 0.3), int(settings.tasks * 0.6))
        producing = True

        async def enqueue(
            queue: str, task_id: str, record: dict[str, float], patient: bool
        ) -> None:
            began = time.monotonic()
            try:
                await attempt_enqueue(queue, task_id, record, patient)
            finally:
                if patient:
                    stall = time.monotonic() - began
                    report.producer_stall = round(max(report.producer_stall, stall), 3)

        async def attempt_enqueue(
            queue: str, task_id: str, record: dict[str, float], patient: bool
        ) -> None:
            deadline = time.monotonic() + (60 if patient else 1)
            # Stamped before the first send: a worker may take the task before the
            # enqueue (and its WAIT) returns, and an earlier attempt may have written it.
            first_sent = time.time()
            while True:
                try:
                    await producer.enqueue(
                        DRILL_TYPE,
                        payload,
                        queue=queue,
                        task_id=task_id,
                        max_retry=100,
                        durability=settings.durability if patient else "none",
                    )
                except (ClusterqError, redis.RedisError, OSError) as exc:
                    if patient:
                        errors[type(exc).__name__] += 1
                        report.error_samples.setdefault(type(exc).__name__, str(exc)[:200])
                        if "fault" in marks and "first_error" not in marks:
                            marks["first_error"] = time.time()
                    if time.monotonic() > deadline or "broken" in marks:
                        if patient:
                            report.gave_up += 1
                        return
                    await asyncio.sleep(0.02)
                    continue
                record[task_id] = first_sent
                if patient and "first_error" in marks and "producer_resumed" not in marks:
                    marks["producer_resumed"] = time.time()
                return

        async def inject() -> None:
            marks["fault"] = time.time()
            progress(f"fault: {settings.mode} on master {master.addr}")
            if settings.mode == "kill":
                assert proc is not None
                os.kill(proc.pid, signal.SIGKILL)
            elif settings.mode == "stop":
                assert proc is not None
                os.kill(proc.pid, signal.SIGSTOP)
            else:
                args = ["CLUSTER", "FAILOVER"] + (
                    ["TAKEOVER"] if settings.mode == "takeover" else []
                )
                await acommand(backend.node(replica.address), *args)
            promoted = await wait_promotion(replica, backend.url, qk.slot, master.id, 60)
            if promoted is not None:
                marks["promoted"] = promoted
                progress(f"promoted after {promoted - marks['fault']:.2f}s")
            if settings.mode == "stop":
                await asyncio.sleep(1.0)
                assert proc is not None
                os.kill(proc.pid, signal.SIGCONT)
            elif settings.mode == "kill":
                assert proc is not None
                try:
                    await asyncio.to_thread(restart_process, proc)  # checks it started
                except BaseException:
                    marks["broken"] = time.time()  # no more patient retries
                    raise
                progress(f"restarted {master.addr}; it rejoins as a replica")

        async def trickle() -> None:
            n = 0
            while producing:
                await enqueue(other, f"{run_id}-o{n}", other_acked, patient=False)
                n += 1
                await asyncio.sleep(0.01)

        progress(
            f"producing {settings.tasks} tasks into {target} (on the master of "
            f"{settings.queue}) at {settings.rate:g}/s"
        )
        started = time.monotonic()
        start_wall = time.time()
        side = asyncio.create_task(trickle())
        fault: asyncio.Task[None] | None = None
        for i in range(settings.tasks):
            delay = started + i / settings.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if i == fault_index:
                fault = asyncio.create_task(inject())
            if "broken" in marks:
                break  # the fault could not be undone (a node not restarted): stop now
            await enqueue(target, f"{run_id}-{i}", acked, patient=True)
        if fault is not None:
            await fault
        producing = False
        await side
        report.acknowledged = len(acked)
        report.fault_at = marks.get("fault", start_wall) - start_wall

        progress("waiting for every acknowledged task to be delivered")
        wanted = set(acked) | set(other_acked)
        deadline = time.monotonic() + settings.settle_timeout
        counts: Counter[str] = Counter()
        ids = list(acked)
        while True:
            # Settled: every acknowledged task delivered and gone from the queue (done
            # and deleted). A task whose ack the failed master took and lost is still
            # there, active or waiting for its retry: it runs again first.
            raw = await backend.execute_key(deliveries_key, lambda c: c.hkeys(deliveries_key))
            counts = Counter(reply_text(k).split("|", 1)[0] for k in raw)
            left = await _still_there(backend, qk.slot, qk.tasks, ids)
            if (wanted <= counts.keys() and not left) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
        firsts_raw = await backend.execute_key(first_key, lambda c: c.hgetall(first_key))
        firsts = {reply_text(k): int(v) / 1000 for k, v in firsts_raw.items()}

        missing = [i for i in acked if i not in counts]
        if missing:
            present = await backend.execute(qk.slot, lambda c: c.hmget(qk.tasks, missing))
            report.still_queued = sum(1 for v in present if v is not None)
            report.lost = len(missing) - report.still_queued
        report.delivered = sum(1 for i in acked if i in counts)
        report.duplicated = sum(1 for i in acked if counts.get(i, 0) > 1)
        report.extra_deliveries = sum(max(0, counts.get(i, 0) - 1) for i in acked)
        pickups = sorted((firsts[i] - t) * 1000 for i, t in acked.items() if i in firsts)
        if pickups:
            report.pickup_p50_ms = round(pickups[len(pickups) // 2], 2)
            report.pickup_p99_ms = round(
                pickups[min(len(pickups) - 1, int(len(pickups) * 0.99))], 2
            )
            report.pickup_max_ms = round(pickups[-1], 2)
        fault_t = marks.get("fault")
        if fault_t is not None:
            if "first_error" in marks:
                report.detect = round(marks["first_error"] - fault_t, 3)
            if "producer_resumed" in marks:
                report.producer_resume = round(marks["producer_resumed"] - fault_t, 3)
            promoted_t = marks.get("promoted")
            if promoted_t is not None:
                report.promotion = round(promoted_t - fault_t, 3)
                after = [t for i, t in firsts.items() if i in acked and t >= promoted_t]
                if after:
                    report.first_delivery_after_promotion = round(min(after) - promoted_t, 3)
                ours = set(workers.names()) if workers is not None else None
                resumed = await resumed_at(backend, target, fault_t, ours)
                if resumed:
                    report.worker_resume_lag = round(max(resumed) - promoted_t, 3)
                report.other_delivered_during_outage = sum(
                    1 for i, t in firsts.items() if i in other_acked and fault_t <= t < promoted_t
                )
        report.errors = dict(errors)
        report.stuck_active = int(await backend.execute(qk.slot, lambda c: c.zcard(qk.active)))

        progress("waiting for the cluster to heal (every replica linked)")
        report.healthy_after = not await wait_healthy(backend, 60)
        after_loc = backend.topology.locate(target)
        report.master_after = after_loc.master.addr if after_loc.master else ""
        report.duration = round(time.monotonic() - started, 2)
        report.problems = verdict(report, settings.stall_margin)
        if not settings.keep_log:
            await backend.execute_key(deliveries_key, lambda c: c.delete(deliveries_key, first_key))
        return report
    finally:
        if workers is not None:
            workers.stop()
        if client is not None:
            await client.aclose()
        await backend.aclose()

"""The key schema: the one module that spells Redis key names.

Every key of a queue carries the queue name as its hash tag::

    <prefix>:{<queue>}:pending        list of task ids ready to run
    <prefix>:{<queue>}:tasks          hash: task id -> task record

so all of a queue's keys hash to one slot, and every script that works on a queue
touches that one slot only. Task records live in one hash per queue (not one key per
task): a script that pops an id it could not know in advance still touches only keys it
was given in KEYS, and a small task costs no per-key overhead.

Keys that are not about one queue (the registry of queue names, the live workers) have
no hash tag and are written off the hot path with single-key commands.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

from clusterq.errors import InvalidName
from clusterq.slots import keyslot

DEFAULT_PREFIX = "clusterq"
MAX_QUEUE_NAME_LENGTH = 128
MAX_PREFIX_LENGTH = 64
MAX_TASK_ID_LENGTH = 128


def _check_name(kind: str, value: object, max_length: int) -> str:
    if not isinstance(value, str):
        raise InvalidName(f"invalid {kind} {value!r}: must be a string")
    if not value:
        raise InvalidName(f"invalid {kind} '': must not be empty")
    if len(value) > max_length:
        raise InvalidName(
            f"invalid {kind} {value[:20]!r}...: {len(value)} characters, at most {max_length}"
        )
    for ch in value:
        if ch in "{}":
            raise InvalidName(
                f"invalid {kind} {value!r}: must not contain '{{' or '}}' "
                "(clusterq uses braces as the cluster hash tag)"
            )
        if ch.isspace() or not ch.isprintable():
            raise InvalidName(
                f"invalid {kind} {value!r}: must not contain whitespace or control characters"
            )
    return value


def validate_queue_name(name: object) -> str:
    """Return ``name`` if it can be a queue name, else raise :class:`InvalidName`."""
    return _check_name("queue name", name, MAX_QUEUE_NAME_LENGTH)


def validate_prefix(prefix: object) -> str:
    """Return ``prefix`` if it can be a key prefix, else raise :class:`InvalidName`."""
    return _check_name("key prefix", prefix, MAX_PREFIX_LENGTH)


def validate_entry_name(name: object) -> str:
    """Return ``name`` if it can name a periodic entry, else raise :class:`InvalidName`."""
    return _check_name("periodic entry name", name, MAX_QUEUE_NAME_LENGTH)


def validate_group_name(name: object) -> str:
    """Return ``name`` if it can name a fair group, else raise :class:`InvalidName`."""
    return _check_name("group name", name, MAX_QUEUE_NAME_LENGTH)


def validate_task_id(task_id: object) -> str:
    """Return ``task_id`` if it can be a task id, else raise :class:`InvalidName`."""
    return _check_name("task id", task_id, MAX_TASK_ID_LENGTH)


def parse_fair_member(member: bytes | str) -> tuple[str, int, str] | None:
    """(group, enqueued ms, task id) of a member of a queue's ``fair`` set
    (``<group>\\0<ms, 15 digits>\\0<id>``, see :attr:`QueueKeys.fair`); None for one
    that is not such a member."""
    raw = member.encode() if isinstance(member, str) else bytes(member)
    parts = raw.split(b"\0")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return (
        parts[0].decode(errors="replace"),
        int(parts[1]),
        parts[2].decode(errors="replace"),
    )


@dataclass(frozen=True)
class QueueKeys:
    """All key names of one queue; they share the hash tag ``{queue}``."""

    prefix: str
    queue: str

    @cached_property
    def base(self) -> str:
        return f"{self.prefix}:{{{self.queue}}}"

    @cached_property
    def slot(self) -> int:
        return keyslot(self.base)

    @cached_property
    def pending(self) -> str:
        """List of ids ready to run; producers push on the left, workers take from the right."""
        return f"{self.base}:pending"

    @cached_property
    def scheduled(self) -> str:
        """Sorted set: id -> time (ms) at which the task becomes pending."""
        return f"{self.base}:scheduled"

    @cached_property
    def retry(self) -> str:
        """Sorted set: id -> time (ms) of the next attempt after a failure."""
        return f"{self.base}:retry"

    @cached_property
    def active(self) -> str:
        """Sorted set: id -> lease expiry (ms) of tasks that a worker holds."""
        return f"{self.base}:active"

    @cached_property
    def archived(self) -> str:
        """Sorted set (dead letters): id -> time (ms) the task was archived."""
        return f"{self.base}:archived"

    @cached_property
    def completed(self) -> str:
        """Sorted set: id -> time (ms) until which a completed task is kept."""
        return f"{self.base}:completed"

    @cached_property
    def done(self) -> str:
        """Sorted set: ids of tasks deleted on success -> until when (ms) an enqueue with
        the same id is still answered "already enqueued" (retried enqueues stay safe)."""
        return f"{self.base}:done"

    @cached_property
    def tasks(self) -> str:
        """Hash: task id -> record (see :mod:`clusterq.task`)."""
        return f"{self.base}:tasks"

    @cached_property
    def leases(self) -> str:
        """Hash: task id -> fencing token of the worker that holds it (active tasks only)."""
        return f"{self.base}:leases"

    @cached_property
    def results(self) -> str:
        """Hash: task id -> encoded result of a completed task kept for its retention."""
        return f"{self.base}:results"

    @cached_property
    def paused(self) -> str:
        """Present while the queue is paused."""
        return f"{self.base}:paused"

    @cached_property
    def cancel(self) -> str:
        """Hash: id of an active task -> when (ms) an operator asked to cancel it; the
        worker that holds it reads it with its lease renewal."""
        return f"{self.base}:cancel"

    @cached_property
    def stats(self) -> str:
        """Hash of counters: processed, failed."""
        return f"{self.base}:stats"

    @cached_property
    def limits(self) -> str:
        """Hash: the queue's rate limit and concurrency cap, and the rate limiter's state
        (see :mod:`clusterq.limits`)."""
        return f"{self.base}:limits"

    @cached_property
    def fair(self) -> str:
        """Sorted set (all scores 0, ordered by member): the pending tasks of a queue that
        uses fair groups (a grouped task goes in when enqueued, others are moved in from
        ``pending`` by ``dequeue.lua``); member
        ``<group>\\0<enqueued ms, 15 digits>\\0<id>``, so one group's tasks are a range
        in enqueue order (ungrouped tasks: group ``""``)."""
        return f"{self.base}:fair"

    @cached_property
    def turns(self) -> str:
        """Sorted set: fair group -> when (ms) it may start a task next; the groups with
        tasks in ``fair`` (or limiter state still in force) take turns in this order."""
        return f"{self.base}:turns"

    @cached_property
    def groups(self) -> str:
        """Hash: each fair group's limiter state (``r:<group>`` rate, ``h:<group>`` hold,
        ``a:<group>`` ids it runs) and the turn clock ``clk``."""
        return f"{self.base}:groups"

    @cached_property
    def wake(self) -> str:
        """A shard channel, not a key: a message on it wakes the workers waiting for the
        queue (sent when its pending list turns non-empty, or a scheduled/retry task
        becomes the earliest due). In the queue's slot, like its keys."""
        return f"{self.base}:wake"

    @cached_property
    def evcfg(self) -> str:
        """String: the cap (entries) of the queue's lifecycle-event stream while events
        are on (absent: off). Read once by each script that changes a task's state (see
        :mod:`clusterq.taskevents`)."""
        return f"{self.base}:evcfg"

    @cached_property
    def events(self) -> str:
        """Stream of the queue's task lifecycle events (enqueued, started, ...), capped
        (``XADD MAXLEN ~``) at the cap in :attr:`evcfg`; written only while it is set."""
        return f"{self.base}:events"

    def unique(self, digest: str) -> str:
        """The lock that keeps a unique task from being enqueued twice in its window."""
        return f"{self.base}:u:{digest}"

    def progress(self, task_id: str) -> str:
        """String: the latest progress an active task reported (``task.progress()``), with
        the lease token it was written under; expires an hour after its last write."""
        return f"{self.base}:p:{task_id}"

    def all_keys(self) -> tuple[str, ...]:
        """Every fixed key of the queue (unique locks and progress reports aside)."""
        return (
            self.pending,
            self.scheduled,
            self.retry,
            self.active,
            self.archived,
            self.completed,
            self.done,
            self.tasks,
            self.leases,
            self.results,
            self.paused,
            self.cancel,
            self.stats,
            self.limits,
            self.fair,
            self.turns,
            self.groups,
            self.evcfg,
            self.events,
        )


@dataclass(frozen=True)
class KeySchema:
    """Key names for one prefix (default ``clusterq``)."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        validate_prefix(self.prefix)

    def queue(self, name: str) -> QueueKeys:
        """Keys of queue ``name``; raises :class:`InvalidName` for a bad name."""
        return _queue_keys(self.prefix, validate_queue_name(name))

    @property
    def queues(self) -> str:
        """Set of the names of every queue ever used (the registry)."""
        return f"{self.prefix}:queues"

    @property
    def streams(self) -> str:
        """Hash: stream name -> JSON declaration of its partitions (see
        :mod:`clusterq.streams`)."""
        return f"{self.prefix}:streams"

    def stream(self, partition: str) -> StreamKeys:
        """Keys of one partition of a stream (hash tag: the partition's name)."""
        return StreamKeys(self.prefix, validate_queue_name(partition))

    def stream_consumers(self, stream: str, group: str) -> str:
        """Hash: consumer name -> until when (ms) it is alive, for the ordered consumers
        of ``group`` on ``stream`` (how they share the partitions)."""
        validate_queue_name(stream)
        validate_queue_name(group)
        return f"{self.prefix}:stream-consumers:{stream}:{group}"

    @property
    def layouts(self) -> str:
        """Hash: logical queue name -> JSON declaration of its partitions (see
        :mod:`clusterq.partitions`)."""
        return f"{self.prefix}:layouts"

    def drill(self, run_id: str, tag: str) -> tuple[str, str]:
        """A failover drill's delivery log: (id -> deliveries hash, id -> first delivery
        time hash). ``tag`` picks the slot, so the log can live on a master other than
        the one the drill fails."""
        validate_task_id(run_id)
        validate_queue_name(tag)
        base = f"{self.prefix}:drill:{{{tag}}}:{run_id}"
        return f"{base}:deliveries", f"{base}:first"

    def bench(self, run_id: str, queue: str) -> tuple[str, str]:
        """A benchmark run's (counter, latency list) beside queue ``queue`` (same slot,
        so a handler's write goes to the queue's own master)."""
        validate_task_id(run_id)
        validate_queue_name(queue)
        base = f"{self.prefix}:bench:{{{queue}}}:{run_id}"
        return f"{base}:count", f"{base}:latency"

    def doctor(self, run_id: str) -> tuple[str, str]:
        """Two keys in one slot for ``clusterq doctor``'s permission probes (a string it
        writes with a 30 s expiry, and one it never writes)."""
        validate_task_id(run_id)
        base = f"{self.prefix}:doctor:{{probe}}:{run_id}"
        return f"{base}:a", f"{base}:b"

    def workflow(self, workflow_id: str) -> str:
        """Hash: the whole state of one workflow, under its own hash tag (one slot per
        workflow, so its steps may live on any queue and master)."""
        return f"{self.prefix}:{{wf:{validate_task_id(workflow_id)}}}"

    def workflow_staging(self, workflow_id: str) -> str:
        """Hash: a large workflow's state while it is written in parts (same slot as
        :meth:`workflow`; renamed to it when complete, expires if never completed)."""
        return f"{self.workflow(workflow_id)}:staging"

    @property
    def cron(self) -> CronKeys:
        """Keys of the periodic scheduler (one slot: hash tag ``{cron}``)."""
        return CronKeys(self.prefix)

    @property
    def workers(self) -> str:
        """Hash: worker id -> JSON announcement (with its own expiry); the key has a TTL."""
        return f"{self.prefix}:workers"

    @property
    def timeline(self) -> tuple[str, str]:
        """The failover timeline: a capped stream of the topology and queue events the
        workers saw (``<prefix>:{timeline}:events``), and a zset of each recorded event's
        signature by when it was recorded (``:seen``), which keeps the copies out that
        other workers saw too. Both in one slot (hash tag ``{timeline}``)."""
        base = f"{self.prefix}:{{timeline}}"
        return f"{base}:events", f"{base}:seen"


@dataclass(frozen=True)
class StreamKeys:
    """Keys of one stream partition, all tagged with the partition's name."""

    prefix: str
    partition: str

    @property
    def events(self) -> str:
        """The Redis stream of the partition's events."""
        return f"{self.prefix}:stream:{{{self.partition}}}"

    @property
    def slot(self) -> int:
        return keyslot(self.events)

    @property
    def dead(self) -> str:
        """Stream of the events that used up their deliveries (dead letters)."""
        return f"{self.events}:dead"

    def owner(self, group: str) -> str:
        """Ordered consumption: the fencing token of the consumer of ``group`` that owns
        the partition (with a TTL, the lease)."""
        return f"{self.events}:owner:{group}"

    def epoch(self, group: str) -> str:
        """Counter: incremented by each new owner (the ``n`` of its token)."""
        return f"{self.events}:epoch:{group}"


@dataclass(frozen=True)
class CronKeys:
    """The periodic scheduler's keys, all tagged ``{cron}`` (one slot, so its scripts
    touch one slot): the leader lease, the counter that makes fencing tokens, the state
    of each entry (last tick fired, tick claimed and not yet enqueued), the entries the
    leader runs (for ``cron ls``), and one history list per entry."""

    prefix: str

    @property
    def base(self) -> str:
        return f"{self.prefix}:{{cron}}"

    @property
    def leader(self) -> str:
        """String: the fencing token (``<scheduler id>:<n>``) of the leader, with a TTL."""
        return f"{self.base}:leader"

    @property
    def epoch(self) -> str:
        """Counter: incremented by each new leader (the ``n`` of its token)."""
        return f"{self.base}:epoch"

    @property
    def state(self) -> str:
        """Hash: ``last:<entry>`` -> last tick fired (ms), ``inflight:<entry>`` -> tick
        claimed whose task may not be enqueued yet, ``seen:<entry>`` -> when a leader
        last declared the entry (ms; an entry unseen for long is forgotten)."""
        return f"{self.base}:state"

    @property
    def entries(self) -> str:
        """Hash: entry name -> JSON description written by the leader."""
        return f"{self.base}:entries"

    def history(self, entry: str) -> str:
        """List: the entry's latest firings, newest first (JSON)."""
        return f"{self.base}:history:{validate_entry_name(entry)}"


@lru_cache(maxsize=4096)
def _queue_keys(prefix: str, queue: str) -> QueueKeys:
    return QueueKeys(prefix, queue)

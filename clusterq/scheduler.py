"""Periodic tasks: :class:`Periodic` entries fired by a :class:`Scheduler` (the
``scheduler`` extra: ``croniter``).

Run several schedulers for availability; one leads at a time and fires:

- **Leader lease with a fencing token.** ``<prefix>:{cron}:leader`` holds the leader's
  token (``<scheduler id>:<n>``, ``n`` from a counter each new leader increments) with
  a TTL of ``lease`` seconds, renewed every third of it. A standby takes over when it
  expires: within ``lease`` of the leader's death.
- **Each tick claimed before it is enqueued.** ``cron.lua`` claims tick T of an entry
  only for the current token and only if the entry's last fired tick is before T, so a
  stale leader (frozen, its lease expired) is refused and never enqueues; the claim is
  confirmed by a replica (``WAIT``) where the scheduler's slot has one.
- **Deterministic task ids** ``cron:<entry>:<tick ms>``: a tick claimed by a leader that
  died before enqueueing it is enqueued again by the next leader (it re-drives the
  claims left in flight), and the enqueue of an id already there is answered "already
  enqueued" — once, either way.
- **Catch-up.** A new leader fires the ticks the old one missed, if they are at most
  ``catch_up`` seconds old; older ones are skipped (and said so in the log). An entry
  seen for the first time fires from its next tick.
- **Entries checked when made**: each one's enqueue is prepared (queue, options, payload,
  the id of its longest tick); one that could never be enqueued is refused in one line.
- **A failing entry fails alone**: an enqueue that raises all the same (foreign data in
  a queue key, a shard down) is logged with its traceback (once a minute), its tick kept
  in flight and retried on the next pass; the other entries go on firing.
- **Ghosts forgotten**: the leader marks its entries seen every ``forget_after / 4`` (at
  most a minute); an entry no leader declared for ``forget_after`` (default a day) loses
  its description, state and history.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from clusterq.aclient import AsyncClient
from clusterq.broker import cron
from clusterq.broker.script import arun_pipelined
from clusterq.cluster.abackend import AsyncBackend
from clusterq.cluster.connection import DEFAULT_URL, Mode, RedisURL
from clusterq.durability import durability_commands
from clusterq.errors import ConfigError, InvalidName
from clusterq.keys import (
    DEFAULT_PREFIX,
    MAX_TASK_ID_LENGTH,
    CronKeys,
    KeySchema,
    validate_entry_name,
)
from clusterq.producer import MAX_SECONDS, EnqueueOptions, Producer, TaskSpec, new_task_id
from clusterq.serialization import DEFAULT_MAX_PAYLOAD_BYTES
from clusterq.slots import keyslot

croniter: Any
try:
    from croniter import croniter
except ImportError:  # pragma: no cover - the extra is not installed
    croniter = None

log = logging.getLogger("clusterq.scheduler")

DEFAULT_LEASE = 5.0
DEFAULT_CATCH_UP = 60.0
#: Firings kept per entry for ``clusterq cron history``.
HISTORY_KEEP = 100
#: The most ticks one entry fires in one pass (a catch-up after a long outage).
MAX_TICKS_PER_PASS = 1000
#: Entries no leader declared for this long are forgotten (:attr:`Scheduler.forget_after`).
DEFAULT_FORGET_AFTER = 24 * 3600.0
#: A failing entry's traceback is logged at most this often (seconds).
FAILURE_REPORT_EVERY = 60.0
#: The ghosts one leader forgets in one script call at most (the rest on the next).
MAX_FORGET_PER_CALL = 500
#: Ticks are ms since the epoch: 13 digits until the year 2286 (and ``every`` is at most
#: 100 years, so no tick is further).
LONGEST_TICK_MS = 10**13 - 1
#: The longest entry name: its task ids ``cron:<name>:<tick ms>`` must be valid ids.
MAX_ENTRY_NAME_LENGTH = MAX_TASK_ID_LENGTH - len(f"cron::{LONGEST_TICK_MS}")
#: The options an entry's task may have (those of ``AsyncClient.enqueue``).
TASK_OPTIONS = frozenset(EnqueueOptions.__optional_keys__) | {"durability"}

#: Prepares an entry's enqueue without sending it (the scheduler's client has the same
#: codec and payload limit).
_CHECKER = Producer(KeySchema(DEFAULT_PREFIX), "json", DEFAULT_MAX_PAYLOAD_BYTES)


def _require_croniter() -> Any:
    if croniter is None:
        raise ConfigError("cron schedules need croniter: pip install 'clusterq[scheduler]'")
    return croniter


@dataclass(frozen=True)
class Periodic:
    """One periodic entry: ``task`` is enqueued at each tick of ``cron`` (five fields,
    or six with seconds first: ``"*/10 * * * * *"``) in time zone ``tz`` (default UTC),
    or every ``every`` seconds (ticks at multiples of it since the epoch, so every
    scheduler agrees on them)."""

    name: str
    task: TaskSpec
    cron: str | None = None
    every: float | None = None
    tz: str | None = None

    def __post_init__(self) -> None:
        try:
            validate_entry_name(self.name)
        except InvalidName as exc:
            raise ConfigError(str(exc)) from None
        if len(self.name) > MAX_ENTRY_NAME_LENGTH:
            raise ConfigError(
                f"periodic entry name {self.name[:20]!r}...: {len(self.name)} characters, at "
                f"most {MAX_ENTRY_NAME_LENGTH} (its task ids are cron:<name>:<tick ms>, at most "
                f"{MAX_TASK_ID_LENGTH} characters)"
            )
        if not isinstance(self.task, TaskSpec):
            raise ConfigError(f"periodic entry {self.name!r}: task must be a TaskSpec")
        if (self.cron is None) == (self.every is None):
            raise ConfigError(f"periodic entry {self.name!r}: give cron= or every=, not both")
        if self.every is not None:
            every = self.every
            if (
                isinstance(every, bool)
                or not isinstance(every, int | float)
                or not 0.001 <= every <= MAX_SECONDS
            ):
                raise ConfigError(
                    f"periodic entry {self.name!r}: every must be a number of seconds from "
                    f"0.001 to {MAX_SECONDS:.0f} (100 years), got {every!r}"
                )
        if self.cron is not None:
            checker = _require_croniter()
            if not isinstance(self.cron, str) or not checker.is_valid(
                self.cron, second_at_beginning=self._seconds
            ):
                raise ConfigError(
                    f"periodic entry {self.name!r}: invalid cron expression {self.cron!r} "
                    "(five fields, or six with seconds first)"
                )
        try:
            self.zone  # noqa: B018 - validates
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigError(
                f"periodic entry {self.name!r}: unknown time zone {self.tz!r}"
            ) from exc
        if "task_id" in self.task.options:
            raise ConfigError(
                f"periodic entry {self.name!r}: the scheduler chooses the task id of each tick"
            )
        self._check_enqueue()

    def _check_enqueue(self) -> None:
        """Prepare the enqueue of the longest tick as the scheduler will (nothing sent):
        an entry that could never be enqueued is refused now, not at each tick."""
        options = dict(self.task.options)
        unknown = sorted(str(k) for k in set(options) - TASK_OPTIONS)
        if unknown:
            raise ConfigError(
                f"periodic entry {self.name!r}: unknown task option(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted(TASK_OPTIONS))})"
            )
        durability = options.pop("durability", None)
        try:
            if durability is not None:
                durability_commands(durability, None)
            _CHECKER.prepare(
                self.task.type,
                self.task.payload,
                task_id=self.task_id(LONGEST_TICK_MS),
                **options,
            )
        except (ValueError, TypeError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"periodic entry {self.name!r}: {reason}") from None

    @property
    def _seconds(self) -> bool:
        return self.cron is not None and len(self.cron.split()) == 6

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.tz or "UTC")

    @property
    def schedule(self) -> str:
        if self.cron is not None:
            return f"cron {self.cron}" + (f" ({self.tz})" if self.tz else "")
        return f"every {self.every:g}s"

    def ticks(self, after_ms: int, until_ms: int, most: int = MAX_TICKS_PER_PASS) -> list[int]:
        """The ticks (ms since the epoch) in ``(after_ms, until_ms]``, at most ``most``."""
        out: list[int] = []
        tick = self.next_tick(after_ms)
        while tick <= until_ms and len(out) < most:
            out.append(tick)
            tick = self.next_tick(tick)
        return out

    def next_tick(self, after_ms: int) -> int:
        """The first tick after ``after_ms``."""
        if self.every is not None:
            step = max(1, round(self.every * 1000))
            return (after_ms // step + 1) * step
        base = datetime.fromtimestamp(after_ms / 1000, self.zone)
        itr = _require_croniter()(self.cron, base, second_at_beginning=self._seconds)
        value: float = itr.get_next(float)
        return round(value * 1000)

    def task_id(self, tick_ms: int) -> str:
        return f"cron:{self.name}:{tick_ms}"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "schedule": self.schedule,
            "cron": self.cron,
            "every": self.every,
            "tz": self.tz,
            "type": self.task.type,
            "queue": self.task.options.get("queue", "default"),
        }


@dataclass
class SchedulerStats:
    fired: int = 0
    #: Ticks whose task id was already enqueued (a claim re-driven after a takeover).
    repeated: int = 0
    skipped: int = 0
    leaderships: int = 0
    #: Enqueues that raised (the entry retried on the next pass).
    failed: int = 0
    #: Entries forgotten: no leader declared them for ``forget_after``.
    forgotten: int = 0


@dataclass
class _Failing:
    """An entry whose enqueue raised: when its traceback was last logged, and how many
    failures since."""

    reported_at: float
    since: int = 0


@dataclass
class Scheduler:
    """Fires ``entries`` while it leads; stands by otherwise."""

    url: str | RedisURL = DEFAULT_URL
    entries: Sequence[Periodic] = ()
    prefix: str = DEFAULT_PREFIX
    mode: Mode | None = None
    lease: float = DEFAULT_LEASE
    catch_up: float = DEFAULT_CATCH_UP
    name: str | None = None
    #: Seconds after which an entry that no leader declares is forgotten.
    forget_after: float = DEFAULT_FORGET_AFTER
    stats: SchedulerStats = field(default_factory=SchedulerStats)

    def __post_init__(self) -> None:
        if not all(isinstance(e, Periodic) for e in self.entries):
            raise ConfigError("a scheduler's entries must be clusterq.Periodic")
        names = [e.name for e in self.entries]
        if not names:
            raise ConfigError("a scheduler needs at least one Periodic entry")
        if len(set(names)) != len(names):
            raise ConfigError(f"periodic entry names must be unique: {names}")
        if not (math.isfinite(self.lease) and self.lease >= 0.5):
            raise ConfigError(f"lease must be at least 0.5 seconds, got {self.lease!r}")
        if not (math.isfinite(self.catch_up) and self.catch_up >= 0):
            raise ConfigError(f"catch_up must be 0 or more seconds, got {self.catch_up!r}")
        if not (math.isfinite(self.forget_after) and self.forget_after > 0):
            raise ConfigError(f"forget_after must be over 0 seconds, got {self.forget_after!r}")
        self.id = self.name or f"{socket.gethostname()}:{os.getpid()}:{new_task_id()[:6]}"
        self.token: str | None = None
        self._stopping = asyncio.Event()
        self._backend: AsyncBackend | None = None
        self._client: AsyncClient | None = None
        #: Per entry: the last tick claimed (or fired before this leader).
        self._last: dict[str, int] = {}
        #: Per entry: the tick claimed and not yet enqueued (its enqueue failed, or a
        #: previous leader left it in flight); re-driven before new ticks are claimed.
        self._inflight: dict[str, int] = {}
        self._failing: dict[str, _Failing] = {}
        self._publish_at = 0.0

    @property
    def leading(self) -> bool:
        return self.token is not None

    # ------------------------------------------------------------------ running

    def run(self) -> None:
        """Run until SIGTERM/SIGINT (the command line's ``clusterq scheduler``)."""

        async def main() -> None:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError):
                    loop.add_signal_handler(sig, self.stop)
            await self.serve()

        asyncio.run(main())

    def stop(self) -> None:
        self._stopping.set()

    async def serve(self) -> None:
        """Lead or stand by until :meth:`stop`; gives up the lease on the way out."""
        async with self._connected() as keys:
            log.info(
                "scheduler %s: %d entries, lease %.3gs", self.id, len(self.entries), self.lease
            )
            while not self._stopping.is_set():
                try:
                    await self._round(keys)
                except Exception:
                    log.exception("scheduler %s: round failed; trying again", self.id)
                    self.token = None
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self._pause())

    @contextlib.asynccontextmanager
    async def _connected(self) -> AsyncIterator[CronKeys]:
        """The backend and client of :meth:`serve`; on the way out, the lease given up."""
        self._backend = backend = await AsyncBackend.connect(
            self.url, mode=self.mode, prefix=self.prefix, retry_timeout=self.lease / 2
        )
        if backend.mode == "cluster":
            backend.start_watching(0.5)
        self._client = AsyncClient(backend)
        keys = backend.keys.cron
        try:
            yield keys
        finally:
            if self.token is not None:
                with contextlib.suppress(Exception):
                    await self._script(keys, cron.release(keys, self.token))
                self.token = None
            await backend.aclose()

    def _pause(self) -> float:
        """Until the next renewal, or the next tick if sooner (an entry with a tick in
        flight is retried at the renewals)."""
        wait = self.lease / 3
        if self.token is not None:
            now = now_ms()
            upcoming = [
                e.next_tick(self._last.get(e.name, now))
                for e in self.entries
                if e.name not in self._inflight
            ]
            if upcoming:
                wait = min(wait, max(0.0, (min(upcoming) - now) / 1000))
        return max(0.005, wait)

    async def _script(
        self, keys: CronKeys, built: tuple[list[str], list[Any]], *, durable: bool = False
    ) -> Any:
        """Run ``cron.lua``; ``durable``: confirmed by a replica (``WAIT``) where the
        slot's master has a live one."""
        assert self._backend is not None
        script_keys, args = built
        slot = keyslot(keys.base)
        if not durable or not self._backend.topology.live_replicas(slot):
            return await self._backend.run_script(cron.SCRIPT, slot, script_keys, args)
        steps = [(cron.SCRIPT, script_keys, args)]

        async def call(client: Any) -> Any:
            replies, _tail = await arun_pipelined(client, steps, after=[("WAIT", 1, 200)])
            if isinstance(replies[0], Exception):
                raise replies[0]
            return replies[0]

        return await self._backend.execute(slot, call)

    async def _round(self, keys: CronKeys) -> None:
        lease_ms = int(self.lease * 1000)
        if self.token is None:
            token = cron.text(await self._script(keys, cron.acquire(keys, self.id, lease_ms)))
            if token is None:
                return
            self.token = token
            self.stats.leaderships += 1
            log.warning("scheduler %s leads (token %s)", self.id, token)
            await self._take_over(keys)
        elif not int(await self._script(keys, cron.renew(keys, self.token, lease_ms))):
            log.warning("scheduler %s lost the lead (token %s)", self.id, self.token)
            self.token = None
            return
        elif time.monotonic() >= self._publish_at:
            await self._publish(keys)
        await self._fire_due(keys)

    async def _take_over(self, keys: CronKeys) -> None:
        """Publish the entries, learn where each stands, and note the ticks a previous
        leader claimed but may not have enqueued (re-driven by :meth:`_fire_due`)."""
        assert self.token is not None
        self._last.clear()
        self._inflight.clear()
        state = await self._publish(keys)
        now = now_ms()
        for entry in self.entries:
            if self.token is None:
                return
            inflight = state.get(f"inflight:{entry.name}")
            if inflight is not None and inflight.isdigit():
                self._inflight[entry.name] = int(inflight)
            last = await self._script(keys, cron.start(keys, self.token, entry.name, now))
            if int(last) < 0:
                self.token = None
                return
            self._last[entry.name] = int(last)

    async def _publish(self, keys: CronKeys) -> dict[str, str]:
        """Describe the entries and mark them seen; forget the entries no leader declared
        for ``forget_after``. Returns the state read before."""
        assert self._backend is not None and self.token is not None

        async def read(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            pipe.hgetall(keys.state)
            pipe.hgetall(keys.entries)
            return list(await pipe.execute())

        raw_state, raw_entries = await self._backend.execute(keyslot(keys.base), read)
        state = {str(cron.text(k)): str(cron.text(v)) for k, v in raw_state.items()}
        now = now_ms()
        cutoff = now - int(self.forget_after * 1000)
        declared = {e.name: json.dumps(e.describe()) for e in self.entries}
        known = {str(cron.text(k)) for k in raw_entries}
        for name in state:
            kind, _, entry = name.partition(":")
            if kind in ("last", "inflight", "seen"):
                known.add(entry)
        ghosts = []
        for name in sorted(known - declared.keys()):
            seen = state.get(f"seen:{name}", "")
            if seen.isdigit() and int(seen) >= cutoff:
                continue
            with contextlib.suppress(InvalidName):  # not a name clusterq writes
                ghosts.append(validate_entry_name(name))
        built = cron.publish(keys, self.token, now, cutoff, declared, ghosts[:MAX_FORGET_PER_CALL])
        forgotten = int(await self._script(keys, built))
        if forgotten < 0:
            self.token = None
            return state
        if forgotten:
            self.stats.forgotten += forgotten
            log.warning(
                "scheduler %s: forgot %d entries no scheduler declared for %gs",
                self.id,
                forgotten,
                self.forget_after,
            )
        self._publish_at = time.monotonic() + min(60.0, self.forget_after / 4)
        return state

    async def _fire_due(self, keys: CronKeys) -> None:
        now = now_ms()
        oldest = now - int(self.catch_up * 1000)
        for entry in self.entries:
            if self.token is None:
                return
            if entry.name in self._inflight and not await self._redrive(keys, entry):
                continue  # set aside for this pass
            last = self._last.get(entry.name, now)
            if last < oldest - 1:
                missed = entry.ticks(last, oldest - 1)
                if missed:
                    self.stats.skipped += len(missed)
                    log.warning(
                        "scheduler %s: entry %s: %d ticks older than the catch-up window "
                        "(%gs) skipped",
                        self.id,
                        entry.name,
                        len(missed),
                        self.catch_up,
                    )
                last = oldest - 1
            for tick in entry.ticks(last, now):
                claimed = int(
                    await self._script(
                        keys, cron.claim(keys, self.token, entry.name, tick), durable=True
                    )
                )
                if claimed < 0:
                    log.warning("scheduler %s: no longer the leader", self.id)
                    self.token = None
                    return
                self._last[entry.name] = tick
                if claimed == 1:
                    self._inflight[entry.name] = tick
                    if not await self._enqueue(keys, entry, tick):
                        break  # set aside: its tick stays in flight

    async def _redrive(self, keys: CronKeys, entry: Periodic) -> bool:
        """Enqueue the entry's tick in flight, if it still is and this scheduler still
        leads; True when the entry may claim new ticks."""
        assert self.token is not None
        tick = self._inflight[entry.name]
        still = int(await self._script(keys, cron.redrive(keys, self.token, entry.name, tick)))
        if still < 0:
            log.warning("scheduler %s: no longer the leader", self.id)
            self.token = None
            return False
        if still == 0:  # enqueued meanwhile, or the entry was forgotten
            del self._inflight[entry.name]
            return True
        return await self._enqueue(keys, entry, tick, redriven=True)

    async def _enqueue(
        self, keys: CronKeys, entry: Periodic, tick: int, *, redriven: bool = False
    ) -> bool:
        """Enqueue the tick's task and record it; False (logged) if that raised."""
        try:
            await self._send(keys, entry, tick, redriven=redriven)
        except Exception as exc:
            self._failed(entry, tick, exc)
            return False
        self._inflight.pop(entry.name, None)
        failing = self._failing.pop(entry.name, None)
        if failing is not None:
            log.warning(
                "scheduler %s: entry %s enqueues again (tick %d, after %d failures)",
                self.id,
                entry.name,
                tick,
                failing.since + 1,
            )
        return True

    def _failed(self, entry: Periodic, tick: int, exc: Exception) -> None:
        self.stats.failed += 1
        now = time.monotonic()
        failing = self._failing.get(entry.name)
        if failing is not None and now - failing.reported_at < FAILURE_REPORT_EVERY:
            failing.since += 1
            return
        since = failing.since if failing is not None else 0
        self._failing[entry.name] = _Failing(now)
        log.error(
            "scheduler %s: entry %s: the task of tick %d could not be enqueued (%d more "
            "failures since the last report); retried on the next pass, the other entries "
            "go on: %s",
            self.id,
            entry.name,
            tick,
            since,
            exc,
            exc_info=exc,
        )

    async def _send(
        self, keys: CronKeys, entry: Periodic, tick: int, *, redriven: bool = False
    ) -> None:
        assert self._client is not None
        spec = entry.task
        info = await self._client.enqueue(
            spec.type, spec.payload, task_id=entry.task_id(tick), **spec.options
        )
        if info.already_enqueued:
            self.stats.repeated += 1
        else:
            self.stats.fired += 1
        record = json.dumps(
            {
                "tick": tick / 1000,
                "task_id": info.id,
                "queue": info.queue,
                "fired_at": time.time(),
                "scheduler": self.id,
                "already_enqueued": info.already_enqueued,
                "redriven": redriven,
            }
        )
        await self._script(keys, cron.done(keys, entry.name, tick, record, HISTORY_KEEP))


def now_ms() -> int:
    return int(time.time() * 1000)

"""The worker's one door to the lifecycle scripts: each transition is one call that
builds the script's KEYS and ARGV (in the script's own wrapper), runs it on the queue's
master through the backend (retries, NOSCRIPT, failover), and returns a typed result.
The worker never assembles a script call itself."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from clusterq.broker import ack, dequeue, extend, fail, requeue, survey, sweep
from clusterq.broker.script import LuaScript
from clusterq.cluster.abackend import AsyncBackend
from clusterq.keys import QueueKeys


class Broker:
    """Lifecycle transitions of any queue, over one :class:`AsyncBackend`."""

    def __init__(self, backend: AsyncBackend) -> None:
        self.backend = backend

    async def _run(
        self,
        script: LuaScript,
        qk: QueueKeys,
        built: tuple[list[str], list[Any]],
        timeout: float | None = None,
    ) -> Any:
        keys, args = built
        return await self.backend.run_script(script, qk.slot, keys, args, timeout=timeout)

    async def dequeue(
        self, qk: QueueKeys, count: int, lease_ms: int, token: str, *, timeout: float = 0
    ) -> dequeue.Dequeued:
        """Forward due scheduled/retry tasks, then take up to ``count`` pending tasks
        under ``token`` (one attempt by default: the fetch loop has its own backoff)."""
        built = dequeue.build(qk, count, lease_ms, token)
        return dequeue.parse(await self._run(dequeue.SCRIPT, qk, built, timeout))

    async def ack(self, qk: QueueKeys, acks: Sequence[ack.Ack], *, remember_ms: int) -> list[int]:
        """Per ack: applied, refused because the caller no longer held the lease, or the
        task is gone (see :func:`clusterq.broker.ack.parse`)."""
        built = ack.build(qk, acks, remember_ms=remember_ms)
        return ack.parse(await self._run(ack.SCRIPT, qk, built))

    async def fail(
        self,
        qk: QueueKeys,
        task_id: str,
        token: str,
        meta: bytes,
        *,
        retry_in_ms: int | None,
        only_if_expired: bool = False,
        count_failure: bool = True,
        hold_ms: int = 0,
        hold_scope: str = "queue",
    ) -> fail.FailOutcome:
        """To retry (after ``retry_in_ms``) or, with None, to the archive; "stale" when
        the lease is not the caller's (or, ``only_if_expired``, still valid).
        ``count_failure=False``: not counted as failed (a rate-limited attempt);
        ``hold_ms``: nothing of the queue (``hold_scope="group"``: of the task's fair
        group) starts for that long."""
        built = fail.build(
            qk,
            task_id,
            token,
            meta,
            retry_in_ms=retry_in_ms,
            only_if_expired=only_if_expired,
            count_failure=count_failure,
            hold_ms=hold_ms,
            hold_scope=hold_scope,
        )
        return fail.parse(await self._run(fail.SCRIPT, qk, built))

    async def extend(
        self, qk: QueueKeys, lease_ms: int, held: Sequence[tuple[str, str]], *, timeout: float
    ) -> extend.Renewed:
        """Renew the leases of ``held`` (id, token) pairs; says which leases were lost
        (taken over, or expired and recovered) and which tasks to cancel."""
        built = extend.build(qk, lease_ms, held)
        return extend.parse(await self._run(extend.SCRIPT, qk, built, timeout))

    async def requeue(self, qk: QueueKeys, held: Sequence[tuple[str, str]]) -> int:
        """Return unfinished tasks to pending without using a retry; returns how many."""
        built = requeue.build(qk, held)
        return requeue.parse(await self._run(requeue.SCRIPT, qk, built))

    async def sweep(
        self, qk: QueueKeys, *, archive_max_size: int, archive_max_age_ms: int, timeout: float
    ) -> sweep.Swept:
        """Retention, archive trimming, dedup window; lists expired leases."""
        built = sweep.build(
            qk, archive_max_size=archive_max_size, archive_max_age_ms=archive_max_age_ms
        )
        return sweep.parse(await self._run(sweep.SCRIPT, qk, built, timeout))

    async def survey(
        self,
        qks: Sequence[QueueKeys],
        *,
        archive_max_size: int,
        archive_max_age_ms: int,
        timeout: float,
    ) -> list[survey.Look]:
        """How ``qks`` stand, in one call to the node that serves the first of them (no
        retry: the caller looks again soon); a queue whose slot is served elsewhere now
        comes back unknown. The archive limits are the sweep's (see :meth:`sweep`)."""
        keys, args = survey.build(
            qks, archive_max_size=archive_max_size, archive_max_age_ms=archive_max_age_ms
        )
        reply = await self.backend.run_script(
            survey.SCRIPT, qks[0].slot, keys, args, timeout=timeout
        )
        return survey.parse(reply)

    async def probe(self, qk: QueueKeys) -> None:
        """One PING to the queue's master, no retry: is it back?"""
        await self.backend.execute(qk.slot, lambda c: c.ping(), timeout=0)

    async def wait_for_pending(self, qk: QueueKeys, seconds: float) -> None:
        """Block on the server until the pending list has an id, for ``seconds`` at most
        (``BLMOVE`` of the list onto itself: it waits without taking anything)."""
        pending = qk.pending

        async def block(client: Any) -> Any:
            return await client.blmove(pending, pending, round(seconds, 3), "RIGHT", "RIGHT")

        await self.backend.execute(qk.slot, block, timeout=0)

"""Ordered stream consumption: one owner per partition and group at a time (see
:mod:`clusterq.worker.consumer` for the shared parts).

A membership loop keeps this consumer listed in the group's member hash and works out
which partitions are its own (partition i goes to the i-th live member, in name order);
while that hash's master is unreachable the partitions stay as they were. Each held
lease is renewed by a loop of its partition's own (a dead master holds up only the
leases it holds). One loop per partition acquires the partition's lease
when it is this consumer's, takes over the events the previous owner left pending, then
handles events one at a time in stream order, each acked with the lease's fencing token
(refused once another consumer owns the partition). A failing event is tried again in
place (the partition waits: order first) until ``max_deliveries``, then dead-lettered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from clusterq.broker import stream as stream_script
from clusterq.serialization import reply_text
from clusterq.worker.consumer import BLOCK_MS, StreamConsumer

log = logging.getLogger("clusterq.worker")

#: An owner handles events only while less than this share of its lease has passed since
#: it last acquired or renewed it: a paused or starved owner stops before anyone else may
#: take over (the fencing token stops its late acks; this stops its late handling).
SAFE_SHARE = 0.8


class OrderedConsumer(StreamConsumer):
    """Events with the same key handled one at a time, in publish order."""

    async def side_loop(self) -> None:
        """Membership rounds, and beside them (a slow partition's lag check must not
        delay them) the lag checks."""
        loops = [asyncio.ensure_future(self._membership_loop()),
                 asyncio.ensure_future(super().side_loop())]  # fmt: skip
        try:
            await asyncio.gather(*loops)
        finally:
            for loop in loops:
                loop.cancel()

    async def _membership_loop(self) -> None:
        while self._running():
            try:
                await self._rebalance()
            except Exception as exc:
                log.warning("%s: membership round failed: %s", self.label, exc)
            await asyncio.sleep(self.lease / 4)

    async def partition_side_loop(self, index: int) -> None:
        """Renew partition ``index``'s lease while this consumer holds it."""
        failing = False
        while self._running():
            token = self.tokens.get(index)
            if token is not None:
                try:
                    await self._renew(index, token)
                    if failing:
                        log.info("%s: lease of partition %d renewed again", self.label, index)
                    failing = False
                except Exception as exc:
                    if not failing:
                        log.warning("%s: cannot renew the lease of partition %d: %s",
                                    self.label, index, exc)  # fmt: skip
                    failing = True
            await asyncio.sleep(self.lease / 4)

    async def _renew(self, index: int, token: str) -> None:
        sent = time.monotonic()
        renewed = await self._script(self.parts[index], stream_script.renew, token, self.lease_ms)
        if self.tokens.get(index) != token:
            return  # released or replaced meanwhile
        if int(renewed):
            self.valid_until[index] = sent + self.lease * SAFE_SHARE
        else:
            log.warning("%s: lost partition %d (token %s)", self.label, index, token)
            self.tokens.pop(index, None)

    async def _rebalance(self) -> None:
        """List ourselves, read the live members, work out our partitions."""
        key, now = self.members_key, int(time.time() * 1000)
        until, lease_ms = now + self.lease_ms, self.lease_ms

        async def round_trip(client: Any) -> Any:
            pipe = client.pipeline(transaction=False)
            pipe.hset(key, self.name, until)
            pipe.pexpire(key, max(60_000, 10 * lease_ms))
            pipe.hgetall(key)
            return await pipe.execute()

        members = (await self.backend.execute_key(key, round_trip))[-1]
        live = sorted(reply_text(m) for m, t in members.items() if int(t) > now)
        gone = [m for m, t in members.items() if int(t) <= now]
        if gone:
            await self.backend.execute_key(key, lambda c: c.hdel(key, *gone))
        me = live.index(self.name) if self.name in live else 0
        self.assigned = {i for i in range(len(self.parts)) if i % max(1, len(live)) == me}

    async def partition_loop(self, index: int) -> None:
        sk = self.parts[index]
        backlog = True
        failures = 0
        while self._running():
            token = self.tokens.get(index)
            if index not in self.assigned:
                if token is not None:  # someone else's now: hand it over
                    await self._script(sk, stream_script.release, token, quiet=True)
                    self.tokens.pop(index, None)
                    log.info("%s: released partition %d", self.label, index)
                await asyncio.sleep(self.lease / 8)
                continue
            if token is not None and not self._owned(index, token):
                await asyncio.sleep(self.lease / 8)  # not renewed in time: renewed, or lost
                continue
            try:
                if token is None:
                    sent = time.monotonic()
                    token = stream_script.text(
                        await self._script(sk, stream_script.acquire, self.name, self.lease_ms)
                    )
                    if token is None:
                        await asyncio.sleep(self.lease / 8)
                        continue
                    self.tokens[index] = token
                    self.valid_until[index] = sent + self.lease * SAFE_SHARE
                    taken = await self._take_over(index)
                    log.warning("%s: owns partition %d (token %s; took over %d pending events)",
                                self.label, index, token, taken)  # fmt: skip
                    backlog = True
                entries = await self._read(
                    sk, "0" if backlog else ">", None if backlog else BLOCK_MS
                )
            except Exception as exc:
                failures = await self._unavailable(index, failures, exc)
                continue
            failures = 0
            if backlog and not entries:
                backlog = False
            try:
                delivered = await self._delivered(index, entries) if backlog else {}
            except Exception as exc:
                failures = await self._unavailable(index, failures, exc)
                continue
            for eid, fields in entries:
                if not self._owned(index, token) or not await self._handle_in_order(
                    index, token, eid, fields, delivered.get(reply_text(eid), 1)
                ):
                    backlog = True  # what is left of the batch is ours to read again first
                    break

    def _owned(self, index: int, token: str) -> bool:
        """Whether ``token`` surely still owns the partition: ours, and its lease renewed
        less than SAFE_SHARE of a lease ago (counted from before the renewal was sent, so
        this ends before the server's lease does, and no other owner can have started)."""
        return self.tokens.get(index) == token and time.monotonic() < self.valid_until.get(
            index, 0.0
        )

    async def _take_over(self, index: int) -> int:
        """Make the events the partition's previous owners left pending our own."""
        sk = self.parts[index]
        moved = 0
        while True:

            async def pending(client: Any) -> Any:
                return await client.xpending_range(
                    sk.events, self.group, min="-", max="+", count=500
                )

            left = [
                reply_text(e["message_id"])
                for e in await self.backend.execute(sk.slot, pending)
                if reply_text(e["consumer"]) != self.name
            ]
            if not left:
                return moved

            async def claim(client: Any, ids: list[str] = left) -> Any:
                return await client.xclaim(sk.events, self.group, self.name, 0, ids, justid=True)

            await self.backend.execute(sk.slot, claim)
            moved += len(left)

    async def _delivered(self, index: int, entries: list[Any]) -> dict[str, int]:
        """How many times the group delivered each of ``entries`` (read again from this
        consumer's pending entries), by event id: a previous owner's deliveries count
        (taken over with ``XCLAIM JUSTID``, which leaves the counter alone; reading them
        again adds one)."""
        if not entries:
            return {}
        sk = self.parts[index]
        first, last = reply_text(entries[0][0]), reply_text(entries[-1][0])

        async def pending(client: Any) -> Any:
            return await client.xpending_range(
                sk.events, self.group, min=first, max=last, count=len(entries),
                consumername=self.name,
            )  # fmt: skip

        return {
            reply_text(e["message_id"]): int(e["times_delivered"])
            for e in await self.backend.execute(sk.slot, pending)
        }

    async def _handle_in_order(
        self, index: int, token: str, event_id: Any, fields: Any, delivered: int
    ) -> bool:
        """Handle one event until it succeeds (or is dead-lettered), then ack it with
        ``token``; False when the partition is no longer ours. ``delivered``: how many
        times the group delivered it so far, this delivery included (each retry in place
        is one more, as the handler sees it in ``Event.deliveries``)."""
        sk = self.parts[index]
        eid = reply_text(event_id)
        attempt = 1
        while not await self._handle(index, event_id, fields, delivered + attempt - 1):
            deliveries = delivered + attempt - 1
            if deliveries >= self.spec.max_deliveries:
                reason = self._errors.pop(eid, None) or "no success"
                await self._dead(index, eid, f"delivered {deliveries} times: {reason}")
                return self.tokens.get(index) == token
            if not self._owned(index, token) or not self._running():
                return False
            attempt += 1
            await asyncio.sleep(min(self.lease / 4, 0.05 * 2**attempt))
        acked = await self._script(sk, stream_script.ack, token, [eid])
        if int(acked) < 0:
            log.warning("%s: partition %d was taken over; event %s not acked", self.label,
                        index, eid)  # fmt: skip
            self.tokens.pop(index, None)
            return False
        return True

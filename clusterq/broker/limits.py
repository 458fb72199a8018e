"""limits: replace a queue's declared limits (``limits.lua``); reading them back."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from clusterq.broker.script import LuaScript
from clusterq.cluster.abackend import AsyncBackend
from clusterq.cluster.backend import Backend
from clusterq.keys import QueueKeys
from clusterq.limits import Limits, text_fields
from clusterq.partitions import Layout
from clusterq.slots import keyslot

SCRIPT = LuaScript("limits")


def put(qk: QueueKeys, fields: dict[str, str] | None) -> tuple[list[str], list[Any]]:
    """Store ``fields`` (one share of :meth:`Limits.shares`) as ``qk``'s limits; None
    clears them (and any hold)."""
    args: list[Any] = ["1" if fields is None else "0"]
    for name, value in (fields or {}).items():
        args += [name, value]
    return [qk.limits, qk.wake, qk.groups, qk.turns], args


def read(raw: Any) -> Limits | None:
    """The declaration in a limits hash as ``HGETALL`` returns it."""
    return Limits.from_fields(text_fields(raw))


def store(
    backend: Backend, members: Sequence[str], limits: Limits | None, partitions: int = 1
) -> None:
    """Write ``limits`` (None: clear them) over a queue's ``members``: one plain queue,
    or a partitioned queue's ``partitions`` current partitions (each with its share),
    then its draining partitions and plain queue (each with the smallest share: they
    hold only stray tasks; see :func:`shares_for`)."""
    shares = shares_for(members, limits, partitions)
    for member, fields in zip(members, shares, strict=True):
        keys, args = put(backend.keys.queue(member), fields)
        backend.execute_key(keys[0], functools.partial(SCRIPT.call, keys=keys, args=args))


async def astore(
    backend: AsyncBackend, members: Sequence[str], limits: Limits | None, partitions: int = 1
) -> None:
    """:func:`store` on an asyncio backend."""
    shares = shares_for(members, limits, partitions)
    for member, fields in zip(members, shares, strict=True):
        keys, args = put(backend.keys.queue(member), fields)
        await backend.run_script(SCRIPT, keyslot(keys[0]), keys, args)


def load(backend: Backend, queue: str) -> Limits | None:
    """The declared limits of ``queue`` (a plain queue or one partition)."""
    key = backend.keys.queue(queue).limits
    return read(backend.execute_key(key, lambda c: c.hgetall(key)))


async def aload(backend: AsyncBackend, queue: str) -> Limits | None:
    """:func:`load` on an asyncio backend."""
    key = backend.keys.queue(queue).limits
    return read(await backend.execute_key(key, lambda c: c.hgetall(key)))


def carry(backend: Backend, old: Layout | None, new: Layout) -> None:
    """After a queue's partitions were declared again (``new`` in force, ``old`` the
    layout before, None: it was a plain queue): the limits declared before, spread over
    the new members, so that a new partition does not start without them."""
    limits = load(backend, old.queues[0] if old is not None else new.name)
    if limits is not None:
        store(backend, new.members, limits, len(new.queues))


async def acarry(backend: AsyncBackend, old: Layout | None, new: Layout) -> None:
    """:func:`carry` on an asyncio backend."""
    limits = await aload(backend, old.queues[0] if old is not None else new.name)
    if limits is not None:
        await astore(backend, new.members, limits, len(new.queues))


def shares_for(
    members: Sequence[str], limits: Limits | None, partitions: int
) -> list[dict[str, str] | None]:
    """What each of ``members`` stores: the first ``partitions`` (the current ones) an
    even share each; the others (draining partitions, the plain queue of a partitioned
    queue's name) the last share again, so that their stray tasks are limited too."""
    if limits is None or limits.empty:
        return [None] * len(members)
    shares: list[dict[str, str] | None] = list(limits.shares(partitions))
    return (shares + [shares[-1]] * len(members))[: len(members)]

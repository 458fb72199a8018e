"""Loading and calling the Lua scripts that live beside their wrappers in this package.

Calls go over the node clients' fast path (:mod:`clusterq.cluster.wire`): hiredis packing, no
redis-py per-command layer, and on asyncio one multiplexed connection per node. A call
followed by blocking commands (``WAIT``) uses a pooled connection of its own instead, so
that the ``WAIT`` covers the call's writes and holds up nothing else.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, TypeAlias

import redis

from clusterq.cluster.wire import AsyncNodeClient, NodeClient


def _read(name: str) -> str:
    return resources.files("clusterq.broker").joinpath(name).read_text(encoding="utf-8")


class LuaScript:
    """One Lua script: its source and SHA1. The source is the ``shared`` parts, then the
    script's own: by default the prelude and the lifecycle events' functions; fewer for a
    script small enough that defining the prelude's functions would be a good part of its
    cost, none for one that starts with flags (``#!lua flags=...``).

    A promoted replica or a restarted node has an empty script cache: on ``NOSCRIPT`` the
    script is loaded on that one node and called again (never on all masters, which
    fails while any of them is down).
    """

    def __init__(self, name: str, *, shared: tuple[str, ...] = ("_prelude", "_events")) -> None:
        self.name = name
        parts = [_read(f"{part}.lua") for part in shared] + [_read(f"{name}.lua")]
        self.source = "\n".join(parts)
        self.sha = hashlib.sha1(self.source.encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"LuaScript({self.name!r})"

    def command(self, keys: Sequence[Any], args: Sequence[Any]) -> tuple[Any, ...]:
        return ("EVALSHA", self.sha, len(keys), *keys, *args)

    def call(self, client: NodeClient, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        command = self.command(keys, args)
        try:
            return client.fast(*command)
        except redis.exceptions.NoScriptError:
            client.fast("SCRIPT", "LOAD", self.source)
            return client.fast(*command)

    async def acall(self, client: AsyncNodeClient, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        command = self.command(keys, args)
        try:
            return await client.fast(*command)
        except redis.exceptions.NoScriptError:
            await client.fast("SCRIPT", "LOAD", self.source)
            return await client.fast(*command)


Call = tuple[LuaScript, Sequence[Any], Sequence[Any]]


#: What one pipelined step is: a script call.
Step: TypeAlias = Call


def _commands(step: Step) -> list[Sequence[Any]]:
    script, keys, args = step
    return [script.command(keys, args)]


def _reply(step: Step, answers: Sequence[Any]) -> Any:
    """The reply of ``step`` from the answers to its commands (an error in its place)."""
    return answers[0]


def run_one(client: NodeClient, step: Step) -> Any:
    """Run one step; an error reply is raised."""
    return step[0].call(client, step[1], step[2])


async def arun_one(client: AsyncNodeClient, step: Step) -> Any:
    """Asynchronous :func:`run_one` (over the node's lane)."""
    return await step[0].acall(client, step[1], step[2])


class _Rounds:
    """The rounds of a pipelined run, without I/O: what to send next, what to load after
    a ``NOSCRIPT``, and the replies. At most two rounds: a script loaded after NOSCRIPT
    is there for the second."""

    def __init__(self, steps: Sequence[Step], after: Sequence[Sequence[Any]]) -> None:
        self.steps = steps
        self.after = after
        self.replies: list[Any] = [None] * len(steps)
        self.tail: list[Any] = []
        self.todo: list[int] = list(range(len(steps)))
        self.rounds = 0
        self._sent: list[list[Sequence[Any]]] = []

    def next_round(self) -> list[Sequence[Any]] | None:
        """The commands of the next round (the steps' commands, then ``after``), or None
        when done."""
        if not self.todo or self.rounds == 2:
            return None
        self.rounds += 1
        self._sent = [_commands(self.steps[i]) for i in self.todo]
        return [*(c for commands in self._sent for c in commands), *self.after]

    def feed(self, answers: Sequence[Any]) -> set[LuaScript]:
        """Store a round's answers; returns the scripts to load before the next round."""
        sent = sum(len(commands) for commands in self._sent)
        self.tail = list(answers[sent:])
        missing = _settle(self.steps, self.todo, self._sent, answers, self.replies)
        self.todo = missing
        return _scripts(self.steps, missing) if self.rounds < 2 else set()


def run_pipelined(
    client: NodeClient,
    steps: Sequence[Step],
    after: Sequence[Sequence[Any]] = (),
    *,
    meanwhile: Callable[[], object] | None = None,
) -> tuple[list[Any], list[Any]]:
    """Run several steps on one node in one round trip (no transaction around them), then
    the commands in ``after`` (``WAIT``...) on the same connection.

    Script calls answered ``NOSCRIPT`` did not run; their scripts are loaded on that node
    and just those calls are sent again, followed by ``after`` again. Other errors are
    returned in place of replies. Returns (step replies, replies to ``after`` from the
    last round). ``meanwhile`` is called once the commands are sent, before the replies
    are read: the caller's own work, done while the server runs them.
    """
    rounds = _Rounds(steps, after)
    while (commands := rounds.next_round()) is not None:
        for script in rounds.feed(client.fast_pipeline(commands, meanwhile=meanwhile)):
            client.fast("SCRIPT", "LOAD", script.source)
    return rounds.replies, rounds.tail


async def arun_pipelined(
    client: AsyncNodeClient, steps: Sequence[Step], after: Sequence[Sequence[Any]] = ()
) -> tuple[list[Any], list[Any]]:
    """Asynchronous :func:`run_pipelined`. Without ``after`` the steps share the node's
    lane; with it they take a pooled connection of their own (``WAIT`` blocks)."""
    rounds = _Rounds(steps, after)
    while (commands := rounds.next_round()) is not None:
        if after:
            pipe = client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            answers = await pipe.execute(raise_on_error=False)
        else:
            answers = await client.fast_pipeline(commands)
        for script in rounds.feed(answers):
            await client.fast("SCRIPT", "LOAD", script.source)
    return rounds.replies, rounds.tail


def _scripts(steps: Sequence[Step], indexes: list[int]) -> set[LuaScript]:
    """The scripts of those steps (to load where they met NOSCRIPT)."""
    return {steps[i][0] for i in indexes}


def _settle(
    steps: Sequence[Step],
    todo: list[int],
    sent: list[list[Sequence[Any]]],
    answers: Sequence[Any],
    replies: list[Any],
) -> list[int]:
    """Store the replies; return the steps that met NOSCRIPT."""
    missing = []
    at = 0
    for index, commands in zip(todo, sent, strict=True):
        reply = _reply(steps[index], answers[at : at + len(commands)])
        at += len(commands)
        if isinstance(reply, redis.exceptions.NoScriptError):
            missing.append(index)
        replies[index] = reply
    return missing


def first_error(replies: Sequence[Any]) -> Exception | None:
    for reply in replies:
        if isinstance(reply, Exception):
            return reply
    return None

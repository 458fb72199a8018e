"""Loading and calling the Lua scripts that live beside their wrappers in this package.

Calls go over the node clients' fast path (:mod:`clusterq.wire`): hiredis packing, no
redis-py per-command layer, and on asyncio one multiplexed connection per node. A call
followed by blocking commands (``WAIT``) uses a pooled connection of its own instead, so
that the ``WAIT`` covers the call's writes and holds up nothing else.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import redis

from clusterq.wire import AsyncNodeClient, NodeClient


def _read(name: str) -> str:
    return resources.files("clusterq.broker").joinpath(name).read_text(encoding="utf-8")


class LuaScript:
    """One Lua script: its source (with the shared prelude) and SHA1.

    A promoted replica or a restarted node has an empty script cache: on ``NOSCRIPT`` the
    script is loaded on that one node and called again (never on all masters, which
    fails while any of them is down).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = _read("_prelude.lua") + "\n" + _read(f"{name}.lua")
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


def run_pipelined(
    client: NodeClient,
    calls: Sequence[Call],
    after: Sequence[Sequence[Any]] = (),
    *,
    meanwhile: Callable[[], object] | None = None,
) -> tuple[list[Any], list[Any]]:
    """Run several script calls on one node in one round trip (no transaction), then the
    commands in ``after`` (``WAIT``...) on the same connection.

    Calls answered ``NOSCRIPT`` did not run; their scripts are loaded on that node and
    just those calls are sent again, followed by ``after`` again. Other errors are
    returned in place of replies. Returns (script replies, replies to ``after`` from the
    last round). ``meanwhile`` is called once the commands are sent, before the replies
    are read: the caller's own work, done while the server runs the scripts.
    """
    replies: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    tail: list[Any] = []
    for _ in range(2):
        commands = [calls[i][0].command(calls[i][1], calls[i][2]) for i in todo]
        answers = client.fast_pipeline([*commands, *after], meanwhile=meanwhile)
        tail = answers[len(todo) :]
        missing = _settle(todo, answers, replies)
        if not missing:
            break
        for script in {calls[i][0] for i in missing}:
            client.fast("SCRIPT", "LOAD", script.source)
        todo = missing
    return replies, tail


async def arun_pipelined(
    client: AsyncNodeClient, calls: Sequence[Call], after: Sequence[Sequence[Any]] = ()
) -> tuple[list[Any], list[Any]]:
    """Asynchronous :func:`run_pipelined`. Without ``after`` the calls share the node's
    lane; with it they take a pooled connection of their own (``WAIT`` blocks)."""
    replies: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    tail: list[Any] = []
    for _ in range(2):
        commands = [calls[i][0].command(calls[i][1], calls[i][2]) for i in todo]
        if after:
            pipe = client.pipeline(transaction=False)
            for command in [*commands, *after]:
                pipe.execute_command(*command)
            answers = await pipe.execute(raise_on_error=False)
        else:
            answers = await client.fast_pipeline(commands)
        tail = answers[len(todo) :]
        missing = _settle(todo, answers, replies)
        if not missing:
            break
        for script in {calls[i][0] for i in missing}:
            await client.fast("SCRIPT", "LOAD", script.source)
        todo = missing
    return replies, tail


def _settle(todo: list[int], answers: Sequence[Any], replies: list[Any]) -> list[int]:
    """Store the answers; return the calls that met NOSCRIPT."""
    missing = []
    for index, answer in zip(todo, answers, strict=False):
        if isinstance(answer, redis.exceptions.NoScriptError):
            missing.append(index)
        replies[index] = answer
    return missing


def first_error(replies: Sequence[Any]) -> Exception | None:
    for reply in replies:
        if isinstance(reply, Exception):
            return reply
    return None

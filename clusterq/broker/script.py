"""Loading and calling the Lua scripts that live beside their wrappers in this package."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis
import redis.asyncio
from redis.client import Pipeline


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

    def call(self, client: redis.Redis, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            client.script_load(self.source)
            return client.evalsha(self.sha, len(keys), *keys, *args)

    async def acall(
        self, client: redis.asyncio.Redis, keys: Sequence[Any], args: Sequence[Any]
    ) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)

    def queue_in(self, pipe: Pipeline, keys: Sequence[Any], args: Sequence[Any]) -> None:
        """Add a call to a (non-transactional) pipeline; see :func:`run_pipelined`."""
        pipe.evalsha(self.sha, len(keys), *keys, *args)


Call = tuple[LuaScript, Sequence[Any], Sequence[Any]]


def run_pipelined(
    client: redis.Redis, calls: Sequence[Call], after: Sequence[Sequence[Any]] = ()
) -> tuple[list[Any], list[Any]]:
    """Run several script calls on one node in one round trip (no transaction), then the
    commands in ``after`` (``WAIT``...) on the same connection.

    Calls answered ``NOSCRIPT`` did not run; their scripts are loaded on that node and
    just those calls are sent again, followed by ``after`` again. Other errors are
    returned in place of replies. Returns (script replies, replies to ``after`` from the
    last round).
    """
    replies: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    tail: list[Any] = []
    for _ in range(2):
        pipe = client.pipeline(transaction=False)
        for index in todo:
            script, keys, args = calls[index]
            script.queue_in(pipe, keys, args)
        for command in after:
            pipe.execute_command(*command)  # type: ignore[no-untyped-call]
        answers = pipe.execute(raise_on_error=False)
        tail = answers[len(todo) :]
        missing = _settle(todo, answers, replies)
        if not missing:
            break
        for script in {calls[i][0] for i in missing}:
            client.script_load(script.source)
        todo = missing
    return replies, tail


async def arun_pipelined(
    client: redis.asyncio.Redis, calls: Sequence[Call], after: Sequence[Sequence[Any]] = ()
) -> tuple[list[Any], list[Any]]:
    """Asynchronous :func:`run_pipelined`."""
    replies: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    tail: list[Any] = []
    for _ in range(2):
        pipe = client.pipeline(transaction=False)
        for index in todo:
            script, keys, args = calls[index]
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        for command in after:
            pipe.execute_command(*command)
        answers = await pipe.execute(raise_on_error=False)
        tail = answers[len(todo) :]
        missing = _settle(todo, answers, replies)
        if not missing:
            break
        for script in {calls[i][0] for i in missing}:
            await client.script_load(script.source)
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

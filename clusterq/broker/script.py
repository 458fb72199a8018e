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
        """Add a call to a (non-transactional) pipeline; see :func:`run_pipeline`."""
        pipe.evalsha(self.sha, len(keys), *keys, *args)


def ensure_loaded(client: redis.Redis, scripts: Sequence[LuaScript]) -> None:
    """Load ``scripts`` on the node behind ``client`` where they are missing."""
    present = client.script_exists(*[s.sha for s in scripts])
    for script, ok in zip(scripts, present, strict=True):
        if not ok:
            client.script_load(script.source)


async def aensure_loaded(client: redis.asyncio.Redis, scripts: Sequence[LuaScript]) -> None:
    present = await client.script_exists(*[s.sha for s in scripts])
    for script, ok in zip(scripts, present, strict=True):
        if not ok:
            await client.script_load(script.source)

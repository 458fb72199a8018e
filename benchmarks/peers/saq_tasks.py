"""The peers' benchmark task for SAQ: one INCR through ``redis.asyncio`` (its worker's
settings are ``saq_tasks.settings``, given to the ``saq`` CLI)."""

import os

import redis.asyncio
from saq import Queue

URL = os.environ["PEER_URL"]
COUNTER = os.environ["PEER_COUNTER"]
#: Jobs run at once by the one worker process (SAQ's default is 10).
CONCURRENCY = 50
queue = Queue.from_url(URL, name="clusterq-peer")


async def startup(ctx: dict) -> None:
    """One client per worker process, made once (not per task)."""
    ctx["counter"] = redis.asyncio.Redis.from_url(URL)


async def incr(ctx: dict) -> None:
    await ctx["counter"].incr(COUNTER)


settings = {
    "queue": queue,
    "functions": [incr],
    "concurrency": CONCURRENCY,
    "startup": startup,
}

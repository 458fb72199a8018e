"""The peers' benchmark task for arq: one INCR through ``redis.asyncio`` (its worker's
settings are ``arq_tasks.WorkerSettings``, given to the ``arq`` CLI)."""

import os

import redis.asyncio
from arq.connections import RedisSettings

URL = os.environ["PEER_URL"]
COUNTER = os.environ["PEER_COUNTER"]
QUEUE = "clusterq-peer"
REDIS_SETTINGS = RedisSettings.from_dsn(URL)


async def startup(ctx: dict) -> None:
    """One client per worker process, made once (not per task); ``ctx["redis"]`` is arq's
    own pool, left to arq."""
    ctx["counter"] = redis.asyncio.Redis.from_url(URL)


async def incr(ctx: dict) -> None:
    await ctx["counter"].incr(COUNTER)


class WorkerSettings:
    functions = [incr]
    on_startup = startup
    redis_settings = REDIS_SETTINGS
    queue_name = QUEUE
    #: Jobs run at once by the one worker process (arq's default is 10).
    max_jobs = 50
    #: arq polls its queue (a sorted set) for up to max(5 x max_jobs, 100) jobs, then
    #: sleeps what is left of poll_delay: its default 0.5 s held it to ~200/s here
    #: (~530/s with max_jobs 50); 0.05 s is what one would set for throughput.
    poll_delay = 0.05

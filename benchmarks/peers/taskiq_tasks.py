"""The peers' benchmark task for taskiq-redis: one INCR through ``redis.asyncio``
(imported by ``taskiq worker``). The broker is ``RedisStreamBroker``, the one taskiq-redis
recommends (acknowledged deliveries); no result backend, as the task returns nothing."""

import os

import redis.asyncio
from taskiq import TaskiqEvents, TaskiqState
from taskiq_redis import RedisStreamBroker

URL = os.environ["PEER_URL"]
COUNTER = os.environ["PEER_COUNTER"]
broker = RedisStreamBroker(url=URL, queue_name="clusterq-peer")
_redis: redis.asyncio.Redis | None = None


@broker.on_event(TaskiqEvents.WORKER_STARTUP)
async def startup(_state: TaskiqState) -> None:
    """One client per worker process, made once (not per task)."""
    global _redis
    _redis = redis.asyncio.Redis.from_url(URL)


@broker.task
async def incr() -> None:
    assert _redis is not None
    await _redis.incr(COUNTER)

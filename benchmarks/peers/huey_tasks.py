"""The peers' benchmark task for Huey: one INCR (imported by ``huey_consumer``)."""

import os

import redis
from huey import RedisHuey

URL = os.environ["PEER_URL"]
COUNTER = os.environ["PEER_COUNTER"]
huey = RedisHuey("clusterq-peer", url=URL)
_redis = redis.Redis.from_url(URL)


@huey.task()
def incr() -> None:
    _redis.incr(COUNTER)

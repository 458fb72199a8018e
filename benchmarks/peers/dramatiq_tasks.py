"""The peers' benchmark task for Dramatiq: one INCR (imported by the ``dramatiq`` CLI)."""

import os

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

URL = os.environ["PEER_URL"]
COUNTER = os.environ["PEER_COUNTER"]
dramatiq.set_broker(RedisBroker(url=URL, namespace="clusterq-peer"))
_redis = redis.Redis.from_url(URL)


@dramatiq.actor(queue_name="clusterq-peer", max_retries=0)
def incr() -> None:
    _redis.incr(COUNTER)

"""The peers' benchmark task for RQ: one INCR (imported by ``rq worker``)."""

import os

import redis

_redis = redis.Redis.from_url(os.environ["PEER_URL"])


def incr() -> None:
    _redis.incr(os.environ["PEER_COUNTER"])

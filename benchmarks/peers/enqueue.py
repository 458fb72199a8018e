"""N enqueues of a peer's benchmark task, one call per task, timed; run by ``run.py`` with
the Python of the peer's own virtual environment (``.venv-peers/<env>``).

``python enqueue.py SYSTEM N`` prints ``{"enqueue": tasks/s, "version": ..., "redis_py": ...}``. The
peer's module (``<system>_tasks``) reads PEER_URL and PEER_COUNTER when imported. The
asyncio peers' calls are awaited one after the other, each finished before the next.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import version

QUEUE = "clusterq-peer"
#: The distribution whose version is shown for each system.
DISTRIBUTIONS = {
    "huey": "huey",
    "dramatiq": "dramatiq",
    "rq": "rq",
    "taskiq": "taskiq-redis",
    "saq": "saq",
    "arq": "arq",
}


def sync_sender(system: str) -> Callable[[], object]:
    if system == "huey":
        import huey_tasks

        return huey_tasks.incr
    if system == "dramatiq":
        import dramatiq_tasks

        return dramatiq_tasks.incr.send
    if system == "rq":
        import redis
        import rq_tasks
        from rq import Queue

        queue = Queue(QUEUE, connection=redis.Redis.from_url(os.environ["PEER_URL"]))
        return lambda: queue.enqueue(rq_tasks.incr)
    raise ValueError(system)


async def async_rate(system: str, n: int) -> float:
    send: Callable[[], Awaitable[object]]
    if system == "taskiq":
        import taskiq_tasks

        broker = taskiq_tasks.broker
        await broker.startup()  # as taskiq's docs say a producer must (it makes the group)
        send, close = taskiq_tasks.incr.kiq, broker.shutdown
    elif system == "saq":
        import saq_tasks

        queue = saq_tasks.queue
        await queue.connect()
        send, close = (lambda: queue.enqueue("incr")), queue.disconnect
    elif system == "arq":
        import arq_tasks
        from arq import create_pool

        pool = await create_pool(arq_tasks.REDIS_SETTINGS, default_queue_name=arq_tasks.QUEUE)
        send, close = (lambda: pool.enqueue_job("incr")), pool.aclose
    else:
        raise ValueError(system)
    try:
        started = time.perf_counter()
        for _ in range(n):
            await send()
        return n / (time.perf_counter() - started)
    finally:
        await close()


def main() -> None:
    system, n = sys.argv[1], int(sys.argv[2])
    if system in ("taskiq", "saq", "arq"):
        rate = asyncio.run(async_rate(system, n))
    else:
        send = sync_sender(system)
        started = time.perf_counter()
        for _ in range(n):
            send()
        rate = n / (time.perf_counter() - started)
    shown = version(DISTRIBUTIONS[system])
    if system == "taskiq":
        shown += f" (taskiq {version('taskiq')})"
    print(json.dumps({"enqueue": rate, "version": shown, "redis_py": version("redis")}))


if __name__ == "__main__":
    main()

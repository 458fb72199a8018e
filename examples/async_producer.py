"""An asyncio producer: a batch, one task whose result it awaits, a partitioned queue.

python examples/async_producer.py      (with `python examples/worker.py` running)
"""

import asyncio
import os

from clusterq import AsyncClient


async def main(url: str, prefix: str = "clusterq") -> object:
    async with await AsyncClient.connect(url, prefix=prefix) as client:
        batch = await client.enqueue_many(
            [("images:resize", {"src": f"{n}.png"}) for n in range(100)], queue="images"
        )
        info = await client.enqueue(
            "images:resize", {"src": "cat.png"}, queue="images", retention=300
        )
        result = await client.result(info, timeout=30)
        print(f"enqueued {len(batch) + 1} tasks; {info.id} returned {result}")
        return result


if __name__ == "__main__":
    asyncio.run(
        main(
            os.environ.get("CLUSTERQ_URL", "redis://127.0.0.1:7000"),
            os.environ.get("CLUSTERQ_PREFIX", "clusterq"),
        )
    )

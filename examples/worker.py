"""A small worker. Run it with the CLI or directly:

clusterq worker examples.worker:router --queues images=3,webhooks=2,notifications=1
python examples/worker.py
"""

import asyncio
import os

from clusterq import Router, Task, Worker

router = Router()


@router.task("images:resize")
async def resize(task: Task) -> dict[str, object]:
    await asyncio.sleep(0.01)  # pretend to work
    return {"src": task.payload["src"], "width": 128}


@router.task("webhooks:")  # every webhooks:* type
def deliver(task: Task) -> None:
    print(f"POST {task.payload['url']} (attempt {task.retry_count + 1})")


@router.task("notifications:email")
async def email(task: Task) -> None:
    print(f"mail to {task.payload['to']}")


if __name__ == "__main__":
    url = os.environ.get("CLUSTERQ_URL", "redis://127.0.0.1:7000")
    Worker(url, router, queues={"images": 3, "webhooks": 2, "notifications": 1}).run()

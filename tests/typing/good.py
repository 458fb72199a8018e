"""A user's script that type-checks: typed payloads, options and results."""

from __future__ import annotations

from dataclasses import dataclass

from clusterq import Client, Router, Task, chain

router = Router()


@dataclass
class Resize:
    src: str
    width: int


@router.task("images:resize", payload=Resize)
async def resize(task: Task) -> dict[str, int]:
    job: Resize = task.payload
    return {"width": job.width}


@router.task("reports:count")
def count(task: Task) -> int:
    return len(task.parent_results or [])


def main(client: Client) -> int:
    info = resize.enqueue(client, Resize("a.png", 128), queue="images", process_in=5.0)
    size: dict[str, int] = resize.result(client, info, timeout=10)
    client.enqueue("images:resize", {"src": "b.png", "width": 64}, queue="images", max_retry=3)
    client.enqueue(chain(resize.spec(Resize("c.png", 32), queue="images"), count.spec(None)))
    return size["width"]

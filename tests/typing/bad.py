"""A user's script with the mistakes the typed API must catch (one per line marked)."""

from __future__ import annotations

from dataclasses import dataclass

from clusterq import Client, Router, Task

router = Router()


@dataclass
class Resize:
    src: str
    width: int


@router.task("images:resize", payload=Resize)
async def resize(task: Task) -> dict[str, int]:
    return {"width": task.payload.width}


def main(client: Client) -> None:
    client.enqueue("images:resize", {}, queu="images")  # E: misspelled option
    client.enqueue("images:resize", {}, process_in="soon")  # E: wrong option type
    resize.enqueue(client, {"src": "a.png"}, queue="images")  # E: not a Resize
    resize.enqueue(client, Resize("a.png", 1), retentoin=60)  # E: misspelled option
    width: str = resize.result(client, "some-id")  # E: the result is a dict
    print(width)

"""A small producer: enqueue three tasks and wait for one result."""

import os

from clusterq import Client

with Client(os.environ.get("CLUSTERQ_URL", "redis://127.0.0.1:7000")) as client:
    info = client.enqueue("images:resize", {"src": "cat.png"}, queue="images", retention=300)
    client.enqueue("webhooks:deliver", {"url": "https://example.com/hook"}, queue="webhooks")
    client.enqueue(
        "notifications:email", {"to": "ada@example.com"}, queue="notifications", process_in=2
    )
    print(f"enqueued {info.id} into {info.queue}; result: {client.result(info, timeout=30)}")

"""The demo's producer: a burst of tasks over three queues, then wait for the workers."""

import os
import time

from clusterq import Client, Inspector, TaskSpec

URL = os.environ.get("CLUSTERQ_URL", "redis://127.0.0.1:7000")
QUEUES = {
    "images": "images:resize",
    "webhooks": "webhooks:deliver",
    "notifications": "notifications:email",
}
PAYLOADS = {
    "images": {"src": "cat.png"},
    "webhooks": {"url": "https://example.com/hook"},
    "notifications": {"to": "ada@example.com"},
}

with Client(URL) as client:
    started = time.monotonic()
    specs = [TaskSpec(QUEUES[q], PAYLOADS[q], {"queue": q}) for q in QUEUES for _ in range(1000)]
    client.enqueue_many(specs)
    print(f"enqueued {len(specs)} tasks into {', '.join(QUEUES)}")
    first = client.enqueue("images:resize", {"src": "dog.png"}, queue="images", retention=60)
    print(f"result of {first.id}: {client.result(first, timeout=60)}")

with Inspector(URL) as inspector:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        queues = inspector.queues(QUEUES)
        if all(q.pending == 0 and q.active == 0 for q in queues):
            break
        time.sleep(0.2)
    print(f"all queues drained in {time.monotonic() - started:.1f}s")
    # Workers announce their counts every few seconds: wait until they announced every
    # task they processed, so that `clusterq worker ls` (next) shows the whole burst.
    total = len(specs) + 1
    deadline = time.monotonic() + 60
    workers = inspector.workers()
    while time.monotonic() < deadline and sum(w.processed for w in workers) < total:
        time.sleep(0.2)
        workers = inspector.workers()
    print(f"workers announced {sum(w.processed for w in workers)} of {total} tasks processed")

"""What shape (b) of ``--processes`` would add per task: a fetching parent handing each
task's record to a child over a pipe and reading the result back (bytes both ways, no
pickle), the way Celery's prefork pool works. Measures the round trip and the parent's
CPU per task, pipelined ``--window`` deep. Run: ``.venv/bin/python benchmarks/handoff.py``.
"""

from __future__ import annotations

import argparse
import os
import time
from multiprocessing import Pipe, get_context
from multiprocessing.connection import Connection

RECORD = b'{"t":"clusterq:bench:incr","p":{"run":"abcdef"},"r":0,"m":25}' * 3


def child(conn: Connection) -> None:
    while True:
        data = conn.recv_bytes()
        if not data:
            return
        conn.send_bytes(b'{"ok":true,"r":null}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=50_000)
    parser.add_argument("--window", type=int, default=10, help="tasks in flight at once")
    args = parser.parse_args()
    parent, theirs = Pipe()
    proc = get_context("fork").Process(target=child, args=(theirs,))
    proc.start()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    sent = received = 0
    while received < args.tasks:
        while sent < args.tasks and sent - received < args.window:
            parent.send_bytes(RECORD)
            sent += 1
        parent.recv_bytes()
        received += 1
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    parent.send_bytes(b"")
    proc.join()
    print(
        f"{args.tasks} hand-offs, window {args.window}: {args.tasks / wall:,.0f}/s, "
        f"parent CPU {cpu / args.tasks * 1e6:.1f} µs per task, "
        f"wall {wall / args.tasks * 1e6:.1f} µs per task (pid {os.getpid()})"
    )


if __name__ == "__main__":
    main()

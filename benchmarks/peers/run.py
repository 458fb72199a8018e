"""clusterq and the Python peers side by side: one run, one machine, one fresh server.

Run it with ``scripts/peers.sh`` (it makes ``.venv-peers`` with clusterq and the peers
pinned in ``requirements.txt``; none of them is a clusterq dependency). It starts its own
standalone server on a free loopback port, and for each system, in turn:

- enqueue: N tasks, one call per task, timed in this process;
- processed: N tasks enqueued first, then one worker process started; the rate counts
  from the first task counted to the last, as ``clusterq bench e2e`` does. Every task
  sends one INCR (the counter tells when all have run): the peers' with redis-py.

clusterq's figures come from ``clusterq bench enqueue e2e`` on the same server, its
handler's INCR sent over the worker's own connection (``--work incr``), and again through
redis-py's asyncio client (``--work incr-redis-py``), shown on a row of its own. With
``--rounds R`` every system runs R times, interleaved, and the median is shown. The
server is emptied (FLUSHALL: it is this script's own) between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis
from rich.console import Console
from rich.table import Table

from clusterq.tools.devcluster import LocalServer
from clusterq.tools.servers import find_free_ports, find_server_binary, server_version

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
COUNTER = "peer:count"
#: Worker settings as in the figures of the performance issue.
WORKERS = {
    "huey": (
        [str(BIN / "huey_consumer"), "huey_tasks.huey", "-w", "1", "-k", "thread"],
        "1 thread",
    ),
    "dramatiq": (
        [str(BIN / "dramatiq"), "dramatiq_tasks", "--processes", "1", "--threads", "8"],
        "8 threads",
    ),
    "rq": ([str(BIN / "rq"), "worker", "--burst", "-w", "rq.worker.SimpleWorker"], "SimpleWorker"),
}


def enqueuer(system: str, url: str) -> Callable[[], object]:
    """One enqueue of the benchmark task (the module reads PEER_URL when imported)."""
    if system == "huey":
        import huey_tasks

        return huey_tasks.incr
    if system == "dramatiq":
        import dramatiq_tasks

        return dramatiq_tasks.incr.send
    if system == "rq":
        import rq_tasks
        from rq import Queue

        queue = Queue("clusterq-peer", connection=redis.Redis.from_url(url))
        return lambda: queue.enqueue(rq_tasks.incr)
    raise ValueError(system)


def run_peer(system: str, url: str, n: int, timeout: float, logs: Path) -> dict[str, float]:
    r = redis.Redis.from_url(url)
    send = enqueuer(system, url)
    started = time.perf_counter()
    for _ in range(n):
        send()
    enqueue_rate = n / (time.perf_counter() - started)

    command, _ = WORKERS[system]
    if system == "rq":
        command = [*command, "--url", url, "clusterq-peer"]
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    with open(logs / f"{system}.log", "ab") as log:
        worker = subprocess.Popen(command, cwd=HERE, env=env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + timeout
            first_at, first_count, done = None, 0, 0
            while done < n:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{system}: only {done} of {n} tasks ran in {timeout}s")
                if worker.poll() is not None and system != "rq":
                    raise RuntimeError(f"{system}: the worker exited ({logs / system}.log)")
                done = int(r.get(COUNTER) or 0)
                now = time.perf_counter()
                if first_at is None and done:
                    first_at, first_count = now, done
                time.sleep(0.002)
            assert first_at is not None
            seconds = time.perf_counter() - first_at
        finally:
            worker.terminate()
            try:
                worker.wait(10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
    return {"enqueue": enqueue_rate, "processed": (n - first_count) / seconds}


def run_clusterq(url: str, n: int) -> dict[str, float]:
    """``processed``: the handler's INCR over the worker's own connection (``backend.call``);
    ``processed_redis_py``: the same INCR through redis-py's asyncio client."""
    command = [sys.executable, "-m", "clusterq", "--url", url, "bench", "--json", "--no-baseline"]
    rates: dict[str, float] = {}
    for work, scenarios in (("incr", ["enqueue", "e2e"]), ("incr-redis-py", ["e2e"])):
        out = subprocess.run(
            [*command, "--tasks", str(n), "--work", work, *scenarios],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        rates.update({row["scenario"]: row["rate"] for row in json.loads(out)["rows"]})
    return {
        "enqueue": rates["enqueue"],
        "processed": rates["e2e incr"],
        "processed_redis_py": rates["e2e incr-redis-py"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", default="huey,dramatiq,rq", help="peers, comma-separated")
    parser.add_argument("--timeout", type=float, default=300.0, help="per drain, seconds")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    peers = [p for p in args.only.split(",") if p]
    unknown = set(peers) - set(WORKERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; known: {sorted(WORKERS)}")

    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="clusterq-peers-") as tmp:
        logs = Path(tmp)
        port = find_free_ports(1, with_bus=False)
        server = LocalServer(port, logs / "server", die_with_parent=True)
        server.start()
        url = f"redis://127.0.0.1:{port}"
        os.environ.update(PEER_URL=url, PEER_COUNTER=COUNTER)
        sys.path.insert(0, str(HERE))
        r = redis.Redis.from_url(url)
        results: dict[str, list[dict[str, float]]] = {s: [] for s in ["clusterq", *peers]}
        try:
            for round_ in range(args.rounds):
                for system in results:
                    console.print(f"round {round_ + 1}/{args.rounds}: {system}...")
                    r.flushall()
                    if system == "clusterq":
                        results[system].append(run_clusterq(url, args.tasks))
                    else:
                        results[system].append(
                            run_peer(system, url, args.tasks, args.timeout, logs)
                        )
        finally:
            server.stop()
        version = server_version(find_server_binary())

    median = {
        system: {k: statistics.median(run[k] for run in runs) for k in runs[0]}
        for system, runs in results.items()
    }
    best = {
        k: max(((median[p][k], p) for p in peers), default=(0.0, "-"))
        for k in ("enqueue", "processed")
    }
    ratio = {k: median["clusterq"][k] / v if v else None for k, (v, _) in best.items()}
    ratio["processed_redis_py"] = (
        median["clusterq"]["processed_redis_py"] / best["processed"][0]
        if best["processed"][0]
        else None
    )
    if args.json:
        print(
            json.dumps(
                {
                    "tasks": args.tasks,
                    "rounds": args.rounds,
                    "cores": os.cpu_count(),
                    "median": median,
                    "runs": results,
                    "vs_fastest_peer": ratio,
                },
                indent=2,
            )
        )
        return
    table = Table(title=f"{args.tasks} tasks, one INCR each, {args.rounds} round(s), median")
    for column in ("system", "worker", "enqueue/s", "processed/s"):
        table.add_column(column, justify="left" if column in ("system", "worker") else "right")
    table.add_row("clusterq", "1 process", *(f"{median['clusterq'][k]:,.0f}" for k in best))
    table.add_row(
        "clusterq, INCR via redis-py",
        "1 process",
        "",
        f"{median['clusterq']['processed_redis_py']:,.0f}",
    )
    for peer in peers:
        table.add_row(peer, WORKERS[peer][1], *(f"{median[peer][k]:,.0f}" for k in best))
    console.print(table)
    for k, (v, peer) in best.items():
        if v:
            console.print(f"clusterq {k}: {ratio[k]:.2f}x the fastest peer ({peer})")
    if ratio["processed_redis_py"]:
        console.print(
            f"clusterq processed, INCR via redis-py: {ratio['processed_redis_py']:.2f}x "
            f"({best['processed'][1]})"
        )
    console.print(f"server: {version}, {os.cpu_count()} cores")


if __name__ == "__main__":
    main()

"""clusterq and the Python peers side by side: one run, one machine, one fresh server.

Run it with ``scripts/peers.sh``: it makes the virtual environments under ``.venv-peers``
with clusterq and the peers pinned in ``requirements*.txt`` (none of them is a clusterq
dependency). The peers' redis-py pins exclude each other (taskiq-redis 1.2.4 needs
redis-py 8, SAQ 0.26.4 below 8, arq 0.28.0 below 6), so SAQ and arq have environments of
their own: ``.venv-peers/saq`` and ``.venv-peers/arq``; clusterq, Huey, Dramatiq,
taskiq-redis and RQ share ``.venv-peers/main``, which runs this script.

It starts its own standalone server on a free loopback port, and for each system, in
turn (the peers: Huey, Dramatiq, taskiq-redis, SAQ, RQ, arq):

- enqueue: N tasks, one call per task (the asyncio peers' calls awaited one after the
  other), timed in a process of the peer's own environment (``enqueue.py``);
- processed: N tasks enqueued first, then one worker process started with the peer's own
  worker command (settings in ``PEERS``); this script polls the counter, and the rate
  counts from the first task counted to the last, as ``clusterq bench e2e`` does. Every
  task sends one INCR of that counter through redis-py: the sync peers (Huey, Dramatiq,
  RQ) with ``redis.Redis``, the asyncio ones (taskiq, SAQ, arq) with ``redis.asyncio``,
  one client made once per worker process.

clusterq's figures come from ``clusterq bench enqueue e2e`` on the same server: its
handler's INCR sent over the worker's own connection (``--work incr``), again through
redis-py's asyncio client (``--work incr-redis-py``), and from a plain ``def`` handler
through sync redis-py (``--work incr-sync``; skipped, said on stderr, where this
clusterq's bench does not know it yet), each on a row of its own. Each clusterq row is
also given as a ratio to the fastest peer's figure of the same run. With ``--rounds R``
every system runs R times, interleaved, and the median is shown. The server is emptied
(FLUSHALL: it is this script's own) between runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from rich.console import Console
from rich.table import Table

from clusterq.tools.devcluster import LocalServer
from clusterq.tools.servers import find_free_ports, find_server_binary, server_version

HERE = Path(__file__).resolve().parent
#: Where scripts/peers.sh makes the peers' virtual environments.
VENVS = Path(os.environ.get("PEERS_VENVS") or HERE.parents[1] / ".venv-peers")
COUNTER = "peer:count"
QUEUE = "clusterq-peer"


@dataclass(frozen=True)
class Peer:
    name: str
    #: The virtual environment under VENVS whose Python and scripts run this peer.
    venv: str
    #: The worker command: a script of that environment and its arguments ({url}: the server).
    worker: tuple[str, ...]
    settings: str


#: One worker process each, with what a new user would pick for throughput.
PEERS = {
    "huey": Peer(
        "Huey", "main", ("huey_consumer", "huey_tasks.huey", "-w", "1", "-k", "thread"), "1 thread"
    ),
    "dramatiq": Peer(
        "Dramatiq",
        "main",
        ("dramatiq", "dramatiq_tasks", "--processes", "1", "--threads", "8"),
        "8 threads",
    ),
    "taskiq": Peer(
        "taskiq-redis",
        "main",
        ("taskiq", "worker", "taskiq_tasks:broker", "--workers", "1"),
        "--workers 1 (max 100 async tasks, default), RedisStreamBroker",
    ),
    "saq": Peer(
        "SAQ", "saq", ("saq", "saq_tasks.settings", "--workers", "1"), "--workers 1, concurrency 50"
    ),
    "rq": Peer(
        "RQ",
        "main",
        ("rq", "worker", "--burst", "-w", "rq.worker.SimpleWorker", "--url", "{url}", QUEUE),
        "SimpleWorker, --burst",
    ),
    "arq": Peer(
        "arq", "arq", ("arq", "arq_tasks.WorkerSettings"), "max_jobs 50, poll_delay 0.05 s"
    ),
}
#: clusterq's rows: (key in the results, bench --work, label, handler, more options).
CLUSTERQ_ROWS: tuple[tuple[str, str, str, str, tuple[str, ...]], ...] = (
    ("processed", "incr", "clusterq", "async def, INCR over the worker's connection", ()),
    ("processed_redis_py", "incr-redis-py", "clusterq, redis-py asyncio", "async def", ()),
    ("processed_sync", "incr-sync", "clusterq, sync handler", "def, sync redis-py", ()),
    (
        "processed_sync_pinned",
        "incr-sync",
        "clusterq, sync handler, --cpus",
        "def, sync redis-py; the worker pinned to one CPU (worker run --cpus)",
        ("--cpus", "last"),
    ),
)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(HERE)}


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _stop(worker: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the worker's whole process group (taskiq and SAQ fork children), then
    SIGKILL to what is left after 10 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        worker.wait(10)
    with contextlib.suppress(ProcessLookupError):  # the leader, or children left behind
        os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()


def run_peer(system: str, url: str, n: int, timeout: float, logs: Path) -> dict[str, object]:
    peer = PEERS[system]
    bin_dir = VENVS / peer.venv / "bin"
    enqueued = subprocess.run(
        [str(bin_dir / "python"), str(HERE / "enqueue.py"), system, str(n)],
        cwd=HERE,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if enqueued.returncode:
        raise RuntimeError(f"{system}: the enqueues failed:\n{enqueued.stderr[-2000:]}")
    result = json.loads(enqueued.stdout.splitlines()[-1])

    r = redis.Redis.from_url(url)
    command = [str(bin_dir / peer.worker[0]), *(a.format(url=url) for a in peer.worker[1:])]
    log_path = logs / f"{system}.log"
    with open(log_path, "ab") as log:
        worker = subprocess.Popen(
            command, cwd=HERE, env=_env(), stdout=log, stderr=log, start_new_session=True
        )
        try:
            deadline = time.monotonic() + timeout
            first_at, first_count, done = None, 0, 0
            while done < n:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{system}: only {done} of {n} tasks ran in {timeout}s")
                exited = worker.poll() is not None
                done = int(r.get(COUNTER) or 0)
                now = time.perf_counter()
                if first_at is None and done:
                    first_at, first_count = now, done
                if exited and done < n:  # (the counter read after the exit was seen)
                    raise RuntimeError(f"{system}: the worker exited after {done} of {n} tasks")
                time.sleep(0.002)
            assert first_at is not None
            seconds = time.perf_counter() - first_at
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n{log_path.name}, last lines:\n{_tail(log_path)}") from e
        finally:
            _stop(worker)
    return {
        "enqueue": result["enqueue"],
        "processed": (n - first_count) / seconds,
        "version": result["version"],
        "redis_py": result["redis_py"],
    }


def run_clusterq(url: str, n: int, skip: set[str], console: Console) -> dict[str, float]:
    """``processed``: the handler's INCR over the worker's own connection (``backend.call``);
    ``processed_redis_py``: the same INCR through redis-py's asyncio client;
    ``processed_sync``: a ``def`` handler's INCR through sync redis-py. A work kind that
    this clusterq's bench refuses as unknown is added to ``skip`` and said once."""
    command = [sys.executable, "-m", "clusterq", "--url", url, "bench", "--json", "--no-baseline"]
    rates: dict[str, float] = {}
    for key, work, _, _, options in CLUSTERQ_ROWS:
        if work in skip or key in skip:
            continue
        scenarios = ["enqueue", "e2e"] if work == "incr" else ["e2e"]
        if options == ("--cpus", "last"):  # the last CPU this script may use
            options = ("--cpus", str(max(os.sched_getaffinity(0))))
        done = subprocess.run(
            [*command, "--tasks", str(n), "--work", work, *options, *scenarios],
            capture_output=True,
            text=True,
        )
        unknown = None
        if done.returncode == 2 and "Invalid value for '--work'" in done.stderr:
            unknown, skipped = f"--work {work}", work
        elif done.returncode == 2 and "No such option" in done.stderr:
            unknown, skipped = " ".join(options), key
        if unknown is not None:
            skip.add(skipped)
            console.print(
                f"[yellow]clusterq bench does not know {unknown}: its row is skipped "
                f"({done.stderr.strip().splitlines()[-1]})[/]"
            )
            continue
        if done.returncode:
            raise RuntimeError(f"clusterq bench --work {work} failed:\n{done.stderr[-2000:]}")
        rows = {row["scenario"]: row for row in json.loads(done.stdout)["rows"]}
        if work == "incr":
            rates["enqueue"] = rows["enqueue"]["rate"]
        rates[key] = rows[f"e2e {work}"]["rate"]
        rates[f"{key}_concurrency"] = rows[f"e2e {work}"].get("extra", {}).get("concurrency")
    return rates


def _median(runs: list[dict[str, object]]) -> dict[str, float]:
    keys = {k for run in runs for k, v in run.items() if isinstance(v, int | float)}
    return {
        k: statistics.median(float(run[k]) for run in runs if isinstance(run.get(k), int | float))  # type: ignore[arg-type]
        for k in keys
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", default=",".join(PEERS), help="peers, comma-separated")
    parser.add_argument("--timeout", type=float, default=300.0, help="per drain, seconds")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    peers = [p for p in args.only.split(",") if p]
    unknown = set(peers) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; known: {sorted(PEERS)}")
    missing = {PEERS[p].venv for p in peers if not (VENVS / PEERS[p].venv / "bin").is_dir()}
    if missing:
        parser.error(f"no environment {sorted(missing)} under {VENVS}: run scripts/peers.sh")

    console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)
    skip: set[str] = set()
    failures: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="clusterq-peers-") as tmp:
        logs = Path(tmp)
        port = find_free_ports(1, with_bus=False)
        server = LocalServer(port, logs / "server", die_with_parent=True)
        server.start()
        url = f"redis://127.0.0.1:{port}"
        os.environ.update(PEER_URL=url, PEER_COUNTER=COUNTER)
        r = redis.Redis.from_url(url)
        results: dict[str, list[dict[str, object]]] = {s: [] for s in ["clusterq", *peers]}
        try:
            for round_ in range(args.rounds):
                for system in results:
                    console.print(f"round {round_ + 1}/{args.rounds}: {system}...")
                    r.flushall()
                    try:
                        if system == "clusterq":
                            run = run_clusterq(url, args.tasks, skip, console)
                        else:
                            run = run_peer(system, url, args.tasks, args.timeout, logs)
                    except (RuntimeError, subprocess.TimeoutExpired) as e:
                        console.print(f"[red]{system} failed, round {round_ + 1}:[/] {e}")
                        failures.setdefault(system, []).append(str(e))
                        continue
                    results[system].append(run)
        finally:
            server.stop()
        version = server_version(find_server_binary())

    median = {system: _median(runs) for system, runs in results.items()}
    cq = median["clusterq"]
    about = {p: results[p][-1] for p in peers if results[p]}
    best = {
        k: max(((median[p][k], p) for p in peers if k in median[p]), default=(0.0, "-"))
        for k in ("enqueue", "processed")
    }
    ratio: dict[str, float | None] = {
        key: cq[key] / best[base][0] if key in cq and best[base][0] else None
        for key, base in (("enqueue", "enqueue"), *((k, "processed") for k, *_ in CLUSTERQ_ROWS))
    }
    if args.json:
        print(
            json.dumps(
                {
                    "tasks": args.tasks,
                    "rounds": args.rounds,
                    "cores": os.cpu_count(),
                    "server": version,
                    "median": median,
                    "runs": results,
                    "settings": {p: PEERS[p].settings for p in peers},
                    "fastest_peer": {k: p for k, (_, p) in best.items()},
                    "vs_fastest_peer": ratio,
                    "skipped": sorted(skip),
                    "failures": failures,
                },
                indent=2,
            )
        )
        return

    def rate(v: float | None) -> str:
        return f"{v:,.0f}" if v else ""

    def times(v: float | None) -> str:
        return f"{v:.2f}x" if v else ""

    table = Table(title=f"{args.tasks} tasks, one INCR each, {args.rounds} round(s), median")
    columns = ("system", "settings", "enqueue/s", "processed/s", "enqueue vs", "processed vs")
    for column in columns:
        table.add_column(column, justify="left" if column in columns[:2] else "right")
    for key, _, label, handler, _ in CLUSTERQ_ROWS:
        if key not in cq:
            continue
        concurrency = cq.get(f"{key}_concurrency")
        settings = (
            f"1 process, concurrency {concurrency:.0f}; {handler}" if concurrency else handler
        )
        first = key == "processed"
        table.add_row(
            label,
            settings,
            rate(cq.get("enqueue")) if first else "",
            rate(cq.get(key)),
            times(ratio["enqueue"]) if first else "",
            times(ratio[key]),
        )
    for peer in peers:
        name = f"{PEERS[peer].name} {about[peer]['version']}" if peer in about else PEERS[peer].name
        m = median[peer]
        if not m:
            table.add_row(name, PEERS[peer].settings, "failed", "failed", "", "")
            continue
        table.add_row(name, PEERS[peer].settings, rate(m["enqueue"]), rate(m["processed"]), "", "")
    console.print(table)
    console.print(
        "vs: clusterq's figure over the fastest peer's (median), enqueue: "
        f"{PEERS[best['enqueue'][1]].name if best['enqueue'][0] else '-'}, processed: "
        f"{PEERS[best['processed'][1]].name if best['processed'][0] else '-'}"
    )
    by_redis_py: dict[str, list[str]] = {}
    for peer, run in about.items():
        by_redis_py.setdefault(str(run["redis_py"]), []).append(PEERS[peer].name)
    console.print(
        f"redis-py: {redis.__version__} (this script, clusterq)"
        + "".join(f"; {v} ({', '.join(names)})" for v, names in by_redis_py.items())
    )
    console.print(f"server: {version}, {os.cpu_count()} cores")
    if skip:
        console.print(f"skipped: clusterq --work {', '.join(sorted(skip))} (unknown to its bench)")
    for system, errors in failures.items():
        console.print(f"[red]{system}: {len(errors)} of {args.rounds} round(s) failed[/]")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()

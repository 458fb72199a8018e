"""Worker processes started by clusterq itself (failover drills, benchmarks).

Each runs ``python -m clusterq worker MODULE:ROUTER`` under a known name, with its log
in a temporary directory; :func:`announced` waits until all of them have registered.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from clusterq.cluster.abackend import AsyncBackend
from clusterq.errors import ClusterqError
from clusterq.worker.announce import read_announcements


class WorkerProcesses:
    """``count`` worker processes named ``<name>-<n>``, serving ``queues`` (CLI syntax)."""

    def __init__(
        self,
        *,
        url: str,
        prefix: str,
        router: str,
        queues: str,
        count: int,
        concurrency: int,
        name: str,
        streams: str = "none",
        extra: Sequence[str] = (),
        processes: int | None = None,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.router = router
        self.queues = queues
        self.count = count
        self.concurrency = concurrency
        self.name = name
        self.streams = streams
        #: More `clusterq worker run` options (e.g. --no-wakeups).
        self.extra = list(extra)
        #: Each a supervisor of this many worker processes (``--processes``), if set.
        self.processes = processes
        if processes is not None:
            self.extra += ["--processes", str(processes)]
        self.dir = Path(tempfile.mkdtemp(prefix=f"clusterq-{name}-"))
        self.procs: list[subprocess.Popen[bytes]] = []

    def names(self) -> list[str]:
        return [f"{self.name}-{n}" for n in range(self.count)]

    def start(self) -> None:
        for name in self.names():
            log = open(self.dir / f"{name}.log", "wb")  # noqa: SIM115 - closed below
            command = [
                sys.executable,
                "-m",
                "clusterq",
                "--prefix",
                self.prefix,
                "worker",
                self.router,
                "--queues",
                self.queues,
                "--concurrency",
                str(self.concurrency),
                "--name",
                name,
                "--streams",
                self.streams,
                *self.extra,
            ]
            # The URL (and its password) goes through the environment, never the command
            # line: `ps` shows command lines to every user of the machine.
            env = {**os.environ, "CLUSTERQ_URL": self.url}
            try:
                self.procs.append(
                    subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
                )
            finally:
                log.close()

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) the processes used so far; None where ``/proc`` does
        not say (not Linux)."""
        total = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        for proc in self.procs:
            for pid in [proc.pid, *_children(proc.pid)]:  # a supervisor's processes too
                try:
                    stat = Path(f"/proc/{pid}/stat").read_text()
                    fields = stat.rsplit(")", 1)[1].split()
                except (OSError, IndexError):
                    return None
                total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        return total

    def logs(self) -> list[Path]:
        return sorted(self.dir.glob("*.log"))

    def stop(self) -> None:
        """SIGTERM (graceful), then SIGKILL whatever has not exited within 20 s."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def check_running(self) -> None:
        """Raise if a process has exited already (a bad router, an unreachable server)."""
        for proc, name in zip(self.procs, self.names(), strict=False):
            if proc.poll() is not None:
                tail = (self.dir / f"{name}.log").read_text(errors="replace")[-500:]
                raise ClusterqError(
                    f"worker {name} exited with status {proc.returncode}: {tail.strip()}"
                )

    async def announced(self, backend: AsyncBackend, timeout: float = 60.0) -> None:
        """Wait until every process has announced itself in the workers registry."""
        names = set(self.names())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = await read_announcements(backend)
            if self.processes is None:
                if names <= {a.id for a in live}:
                    return
            elif all(
                sum(1 for a in live if a.supervisor == name) >= self.processes for name in names
            ):
                return
            self.check_running()
            await asyncio.sleep(0.1)
        raise ClusterqError(f"{self.name}: workers did not start within {timeout:.0f}s")


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux), none where ``/proc`` does not say."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []

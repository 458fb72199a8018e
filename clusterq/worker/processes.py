"""Worker processes under a supervisor: ``clusterq worker run --processes N``.

The shape: N complete workers — each with its own connections, leases, wake-ups and
fetch loops, exactly the worker that runs alone — forked by a supervisor that holds no
connection to Redis and runs no task. The supervisor:

- starts the N processes and replaces one that exits: at once when it stopped to be
  replaced (:mod:`clusterq.worker.recycle`: it said so before it began to finish its
  work, so the replacement starts while it drains), and at once too when it died (kill
  -9, the OOM killer), with a growing pause only for a process that keeps dying within
  seconds of its start (a router that raises on import, a refused password);
- kills a process that outlives the time it announced for leaving, and one that gives no
  sign of life for ``stall_after`` seconds (a handler holding the GIL in C code: its
  leases have expired by then and its tasks run elsewhere);
- on SIGTERM/SIGINT asks every process to stop gracefully; on a second signal, at once;
- serves the processes' Prometheus metrics summed (``--metrics-port``).

A process's tasks never cross to the supervisor: what it reports are counters and
events, as JSON lines over a socket pair (a process whose supervisor died sees the
socket close and stops gracefully). Processes are forked, so the router and everything
imported before are shared, and a replacement starts in milliseconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from clusterq.errors import ClusterqError, ConfigError
from clusterq.producer import new_task_id
from clusterq.worker.recycle import EXIT_REPLACE, ProcessLimits
from clusterq.worker.state import DEFAULT_LEASE

log = logging.getLogger("clusterq.worker")

#: A process that exits this soon after its start, not asked to, is restarted after a
#: pause that doubles each time (up to MAX_RESTART_DELAY).
EARLY_EXIT = 5.0
MAX_RESTART_DELAY = 10.0
#: A process or socket already gone is no error here.
_gone_ok = contextlib.suppress(ProcessLookupError, KeyError, ValueError)
#: After a second signal, or once a leaving process's time is up: seconds before SIGKILL.
KILL_MARGIN = 5.0


@dataclass
class _Process:
    index: int
    pid: int
    sock: socket.socket
    started: float
    seen: float
    buffer: bytearray = field(default_factory=bytearray)
    #: Why it stops to be replaced, once it said so (and the kind of reason).
    leaving: str | None = None
    cause: str = ""
    #: Why the supervisor killed it, if it did.
    killed: str | None = None
    #: Its replacement was started (when it said it was leaving).
    replaced: bool = False
    #: It ran: its worker started and sent a beat.
    ran: bool = False
    #: When it is killed if it has not exited (monotonic), if set.
    kill_at: float | None = None
    #: Its latest Prometheus exposition text (with ``--metrics-port``).
    metrics: str = ""
    worker_id: str = ""
    #: What it said when it stopped: processed, failed, returned (handed back).
    bye: dict[str, Any] = field(default_factory=dict)


class WorkerPool:
    """``processes`` worker processes, each ``start_child(index, sock)`` after the fork
    (it runs a worker and returns its exit status; see :func:`clusterq.worker.child.run_child`).
    """

    def __init__(
        self,
        start_child: Callable[[int, socket.socket, str], int],
        processes: int,
        *,
        supervisor_id: str,
        stall_after: float = 60.0,
        leave_within: float = 30.0,
    ) -> None:
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ConfigError(f"processes must be an integer of at least 1, got {processes!r}")
        if not hasattr(os, "fork"):
            raise ConfigError("worker processes need os.fork (Linux, macOS)")
        self.start_child = start_child
        self.processes = processes
        self.id = supervisor_id
        self.stall_after = stall_after
        self.leave_within = leave_within
        #: Live processes by pid.
        self.children: dict[int, _Process] = {}
        #: Processes started after the first N, by why the one before ended.
        self.replaced: dict[str, int] = {}
        self._selector = selectors.DefaultSelector()
        self._signals = 0
        self._handled_signals = 0
        self._stopping = False
        self._restart_at: dict[int, float] = {}
        #: Why the pool gave up: no process ever started (a wrong URL, a refused password).
        self.failed: str | None = None
        self._ever_ran = False
        self._delays: dict[int, float] = {}

    # ------------------------------------------------------------------ running

    def run(self) -> None:
        """Start the processes and supervise them until a signal stops them all."""
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            log.info(
                "supervisor %s: starting %d worker processes",
                self.id,
                self.processes,
                extra={"event": {"event": "supervisor_started", "processes": self.processes}},
            )
            for index in range(self.processes):
                self._spawn(index)
            while self.children or (self._restart_at and not self._stopping):
                self._step()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._selector.close()
        if self.failed is not None:
            raise ClusterqError(self.failed)
        log.info(
            "supervisor %s: all worker processes stopped (replaced: %s)",
            self.id,
            self.replaced or "none",
            extra={"event": {"event": "supervisor_stopped", "replaced": self.replaced}},
        )

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signals += 1  # acted on by the loop (a handler does no more than this)

    def _step(self) -> None:
        for key, _ in self._selector.select(timeout=0.1):
            self._read(key.data)
        now = time.monotonic()
        while self._handled_signals < self._signals:
            self._handled_signals += 1
            self._stop(now, at_once=self._handled_signals > 1)
        self._reap(now)
        for index, when in list(self._restart_at.items()):
            if now >= when:
                del self._restart_at[index]
                if not self._stopping:
                    self._spawn(index)
        for child in list(self.children.values()):
            if child.kill_at is not None and now >= child.kill_at:
                self._kill(child, "it did not exit in time")
            elif child.leaving is None and now - child.seen > self.stall_after:
                self._kill(child, f"no sign of life for {now - child.seen:.0f}s")

    def _stop(self, now: float, *, at_once: bool) -> None:
        self._stopping = True
        self._restart_at.clear()
        how = "at once" if at_once else "gracefully (again to stop at once)"
        log.info("supervisor %s: stopping %d processes %s", self.id, len(self.children), how)
        for child in self.children.values():
            # The worker's own handler: the first SIGTERM stops it gracefully, a second
            # at once; a process that ignores both is killed.
            with _gone_ok:
                os.kill(child.pid, signal.SIGTERM)
            limit = KILL_MARGIN if at_once else self.leave_within + KILL_MARGIN
            child.kill_at = min(child.kill_at or now + limit, now + limit)

    def _kill(self, child: _Process, why: str) -> None:
        log.warning(
            "supervisor %s: killing process %d (pid %d): %s",
            self.id,
            child.index,
            child.pid,
            why,
            extra={"event": {"event": "process_killed", "pid": child.pid, "reason": why}},
        )
        with _gone_ok:
            os.kill(child.pid, signal.SIGKILL)
        child.kill_at = None
        child.killed = child.killed or why

    # ------------------------------------------------------------------ processes

    def _spawn(self, index: int) -> None:
        mine, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the new process: it never returns from here
            status = 1
            try:
                mine.close()
                for child in self.children.values():
                    child.sock.close()
                self._selector.close()
                for signum in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(signum, signal.SIG_DFL)
                os.setpgrp()  # a terminal's Ctrl-C reaches the supervisor only
                status = self.start_child(index, theirs, self.id)
            except ClusterqError as exc:  # said in one line, as a worker alone says it
                log.error("worker process %d: %s", index, exc)
            except BaseException:
                log.exception("worker process %d failed", index)
            finally:
                logging.shutdown()
                os._exit(status)
        theirs.close()
        mine.setblocking(False)
        now = time.monotonic()
        child = _Process(index, pid, mine, now, now)
        self.children[pid] = child
        self._selector.register(mine, selectors.EVENT_READ, child)
        log.info(
            "supervisor %s: started process %d (pid %d)",
            self.id,
            index,
            pid,
            extra={"event": {"event": "process_started", "index": index, "pid": pid}},
        )

    def _read(self, child: _Process) -> bool:
        """Read what ``child`` sent; False once nothing more is there."""
        try:
            data = child.sock.recv(1 << 16)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:  # it exited or closed its end: reaped below
            with _gone_ok:
                self._selector.unregister(child.sock)
            return False
        child.seen = time.monotonic()
        child.buffer += data
        *lines, rest = child.buffer.split(b"\n")
        child.buffer = bytearray(rest)
        for line in lines:
            try:
                message = json.loads(line)
                self._message(child, message)
            except Exception:
                log.exception("supervisor %s: bad message from pid %d", self.id, child.pid)
        return True

    def _message(self, child: _Process, message: dict[str, Any]) -> None:
        kind = message.get("t")
        if kind == "beat":
            child.ran = self._ever_ran = True
            child.metrics = str(message.get("metrics") or "")
            child.worker_id = str(message.get("id") or child.worker_id)
        elif kind == "bye":
            child.bye = {k: message.get(k) for k in ("processed", "failed", "returned")}
        elif kind == "leaving" and child.leaving is None:
            child.leaving = str(message.get("reason"))
            child.cause = str(message.get("cause") or "other")
            child.kill_at = time.monotonic() + float(message.get("within", 0)) + KILL_MARGIN
            if not self._stopping:  # its replacement starts while it finishes its work
                child.replaced = True
                self._replace(child.index, child.cause, child.leaving, child.pid, early=False)

    def _reap(self, now: float) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            while self._read(child):  # its last words (the bye) may still be unread
                pass
            with _gone_ok:
                self._selector.unregister(child.sock)
            child.sock.close()
            code = os.waitstatus_to_exitcode(status)
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
            died = f"killed by the supervisor ({child.killed})" if child.killed else "it died"
            reason = child.leaving or ("stopped" if self._stopping else f"{died}: {how}")
            log.log(
                logging.INFO if child.leaving or self._stopping else logging.WARNING,
                "supervisor %s: process %d (pid %d) exited with %s: %s",
                self.id,
                child.index,
                pid,
                how,
                reason,
                extra={
                    "event": {
                        "event": "process_exited",
                        "index": child.index,
                        "pid": pid,
                        "code": code,
                        "reason": reason,
                        **child.bye,
                    }
                },
            )
            if not child.ran and not self._ever_ran and not self._stopping:
                # The first processes cannot start at all: a supervisor restarting them
                # for ever would hide a wrong URL or password behind a loop of errors.
                self.failed = (
                    f"worker process {child.index} exited ({how}) before its worker started "
                    "(its error is logged above); stopping"
                )
                self._stop(now, at_once=True)
            if not child.replaced and not self._stopping:
                early = now - child.started < EARLY_EXIT and code != EXIT_REPLACE
                cause = child.cause or ("killed" if child.killed else "died")
                self._replace(child.index, cause, reason, pid, early=early)

    def _replace(self, index: int, cause: str, reason: str, pid: int, *, early: bool) -> None:
        self.replaced[cause] = self.replaced.get(cause, 0) + 1
        if early:  # dying at start again and again: do not spin (the first: at once)
            delay = self._delays.get(index, 0.0)
            self._delays[index] = min(MAX_RESTART_DELAY, max(0.25, delay * 2))
        else:
            delay = 0.0
            self._delays.pop(index, None)
        log.info(
            "supervisor %s: replacing process %d (pid %d)%s: %s",
            self.id,
            index,
            pid,
            f" in {delay:g}s" if delay else "",
            reason,
            extra={
                "event": {
                    "event": "process_replaced",
                    "index": index,
                    "pid": pid,
                    "cause": cause,
                    "reason": reason,
                }
            },
        )
        if delay:
            self._restart_at[index] = time.monotonic() + delay
        else:
            self._spawn(index)

    def metrics_texts(self) -> list[str]:
        """The live processes' latest metrics (exposition text)."""
        return [c.metrics for c in list(self.children.values()) if c.metrics]


def parse_cpus(spec: str) -> list[int]:
    """``"1"``, ``"0-3"`` or ``"0,2,4-5"``: CPU numbers this process may run on, in order;
    a :class:`ConfigError` naming the problem otherwise."""
    cpus: list[int] = []
    try:
        for part in spec.split(","):
            first, dash, last = part.strip().partition("-")
            cpus.extend(range(int(first), int(last if dash else first) + 1))
    except ValueError:
        raise ConfigError(
            f"--cpus: expected CPU numbers like 1, 0-3 or 0,2,4-5, got {spec!r}"
        ) from None
    if not hasattr(os, "sched_setaffinity"):
        raise ConfigError("--cpus: this system cannot pin a process to CPUs (Linux only)")
    allowed = os.sched_getaffinity(0)
    outside = sorted(set(cpus) - allowed)
    if not cpus or outside:
        raise ConfigError(
            f"--cpus {spec!r}: CPU(s) {outside or spec} not available here "
            f"(this process may use {_ranges(sorted(allowed))})"
        )
    return cpus


def _ranges(cpus: list[int]) -> str:
    return ",".join(str(c) for c in cpus)


def pin(cpus: list[int] | None, index: int = 0) -> None:
    """Pin this process to one CPU: ``cpus[index % len(cpus)]`` (nothing when None).
    One process of sync handlers pinned to one CPU stops the GIL moving between CPUs
    with its threads (benchmarks/README.md, "Sync handlers: profile"); it gives up
    running C code that releases the GIL on several CPUs at once."""
    if cpus:
        os.sched_setaffinity(0, {cpus[index % len(cpus)]})


def run_processes(
    url: Any,
    router: Any,
    processes: int,
    *,
    limits: ProcessLimits | None = None,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    name: str | None = None,
    cpus: list[int] | None = None,
    **worker_options: Any,
) -> None:
    """Run ``processes`` workers — ``Worker(url, router, **worker_options)`` each, with
    ``limits`` — under a supervisor until SIGTERM/SIGINT (what ``clusterq worker run
    --processes N`` does). With ``metrics_port``, the supervisor serves their metrics
    summed. ``name`` names the supervisor; its processes are ``<name>/<n>:<pid>``.
    ``cpus``: process ``n`` is pinned to ``cpus[n % len(cpus)]`` (see :func:`pin`)."""
    from clusterq.worker.child import LEAVE_MARGIN, run_child
    from clusterq.worker.worker import Worker

    Worker(url, router, name=name, **worker_options)  # the options checked here, once
    limits = limits or ProcessLimits()
    supervisor_id = name or f"{socket.gethostname()}:{os.getpid()}:{new_task_id()[:6]}"
    server: Any = None

    def start_child(index: int, sock: socket.socket, supervisor: str) -> int:
        if server is not None:
            server.socket.close()  # the supervisor's, inherited by the fork
        pin(cpus, index)
        options = dict(worker_options, name=f"{name}/{index}:{os.getpid()}" if name else None)
        if metrics_port is not None:
            from clusterq.ops.metrics import WorkerMetrics

            options["metrics"] = WorkerMetrics()
        worker = Worker(url, router, **options)
        worker.limits = limits
        return run_child(worker, sock, supervisor, index)

    lease = float(worker_options.get("lease", DEFAULT_LEASE))
    grace = float(worker_options.get("shutdown_timeout", 10.0))
    pool = WorkerPool(
        start_child,
        processes,
        supervisor_id=supervisor_id,
        stall_after=max(30.0, 3 * lease),
        leave_within=grace + LEAVE_MARGIN,
    )
    if metrics_port is not None:
        from clusterq.ops.metrics import SummedCollector, serve_summed

        collector = SummedCollector(pool.metrics_texts, lambda: len(pool.children), pool.replaced)
        server = serve_summed(collector, metrics_port, metrics_host)
    pool.run()

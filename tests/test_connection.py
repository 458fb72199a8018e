"""URL parsing (pure) and cluster/standalone detection (real servers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clusterq.cluster.backend import detect_mode
from clusterq.cluster.connection import RedisURL, parse_addr
from clusterq.errors import AuthFailed, ConfigError, ConnectionFailed, ModeMismatch
from clusterq.tools.devcluster import LocalCluster, LocalServer


def test_parse_plain_url() -> None:
    url = RedisURL.parse("redis://127.0.0.1:7000")
    assert url.seeds == (("127.0.0.1", 7000),)
    assert (url.username, url.password, url.ssl, url.db) == (None, None, False, 0)


def test_parse_acl_tls_seeds_db_and_options() -> None:
    url = RedisURL.parse(
        "rediss://alice:s%40cret@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002/2?socket_timeout=1.5&connect_timeout=0.5"
    )
    assert url.seeds == (("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002))
    assert (url.username, url.password, url.ssl, url.db) == ("alice", "s@cret", True, 2)
    assert (url.socket_timeout, url.connect_timeout) == (1.5, 0.5)
    assert "s@cret" not in url.redacted() and "alice" in url.redacted()


def test_password_only_url() -> None:
    url = RedisURL.parse("redis://:pw@host")
    assert (url.username, url.password, url.seeds) == (None, "pw", (("host", 6379),))


@pytest.mark.parametrize(
    "bad",
    [
        "http://x",
        "127.0.0.1:7000",
        "redis://",
        "redis://h:notaport",
        "redis://h:99999",
        "redis://h/x",
        "redis://h?bogus=1",
    ],
)
def test_bad_urls(bad: str) -> None:
    with pytest.raises(ConfigError):
        RedisURL.parse(bad)


def test_tls_client_certificate_options(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "c.key"
    cert.write_text("x")
    key.write_text("x")
    url = RedisURL.parse(
        f"rediss://h:1?ssl_certfile={cert}&ssl_keyfile={key}&ssl_check_hostname=false"
    )
    kwargs = url.node_kwargs()
    assert (kwargs["ssl_certfile"], kwargs["ssl_keyfile"]) == (str(cert), str(key))
    assert kwargs["ssl_check_hostname"] is False
    assert RedisURL.parse("rediss://h:1").node_kwargs()["ssl_check_hostname"] is True
    assert "ssl_certfile" not in RedisURL.parse("redis://h:1").node_kwargs()
    with pytest.raises(ConfigError, match=r"ssl_certfile='/nope\.pem': no such file"):
        RedisURL.parse("rediss://h:1?ssl_certfile=/nope.pem")
    with pytest.raises(ConfigError, match=r"ssl_check_hostname='maybe': true\|false"):
        RedisURL.parse("rediss://h:1?ssl_check_hostname=maybe")


def test_parse_addr() -> None:
    assert parse_addr("[::1]:7000") == ("::1", 7000)
    assert parse_addr("host") == ("host", 6379)


def test_detects_cluster_and_standalone(cluster: LocalCluster, standalone: LocalServer) -> None:
    assert detect_mode(RedisURL.parse(cluster.seed_url))[0] == "cluster"
    assert detect_mode(RedisURL.parse(standalone.seed_url))[0] == "standalone"


def test_mode_mismatch_both_ways(cluster: LocalCluster, standalone: LocalServer) -> None:
    with pytest.raises(ModeMismatch, match=r"standalone server .* but a cluster was expected"):
        detect_mode(RedisURL.parse(standalone.seed_url), "cluster")
    with pytest.raises(ModeMismatch, match=r"cluster node .* but a standalone server was expected"):
        detect_mode(RedisURL.parse(cluster.seed_url), "standalone")


def test_unreachable_seed_then_live_seed(cluster: LocalCluster, dead_port: int) -> None:
    dead = dead_port
    url = RedisURL.parse(f"redis://127.0.0.1:{dead},127.0.0.1:{cluster.base_port}")
    mode, addr = detect_mode(url)
    assert (mode, addr) == ("cluster", ("127.0.0.1", cluster.base_port))
    with pytest.raises(ConnectionFailed, match=f"127.0.0.1:{dead}"):
        detect_mode(RedisURL.parse(f"redis://127.0.0.1:{dead}"))


def test_wrong_password(standalone: LocalServer) -> None:
    client = standalone.client()
    client.execute_command("ACL", "SETUSER", "conn_test", "on", ">right", "~*", "+@all")
    try:
        ok = RedisURL.parse(f"redis://conn_test:right@127.0.0.1:{standalone.port}")
        assert detect_mode(ok)[0] == "standalone"
        with pytest.raises(AuthFailed, match="authentication refused"):
            detect_mode(RedisURL.parse(f"redis://conn_test:wrong@127.0.0.1:{standalone.port}"))
    finally:
        client.execute_command("ACL", "DELUSER", "conn_test")
        client.close()


def test_db_in_cluster_is_refused(cluster: LocalCluster) -> None:
    with pytest.raises(ConfigError, match="only has database 0"):
        detect_mode(RedisURL.parse(cluster.seed_url + "/3"))


def test_remap_host_reaches_every_node_at_one_host_on_its_announced_port() -> None:
    url = RedisURL.parse("redis://127.0.0.1:7100?remap_host=127.0.0.1")
    assert url.reach(("node-3", 7103)) == ("127.0.0.1", 7103)
    client = url.node_client(("node-3", 7103))
    assert client.connection_pool.connection_kwargs["host"] == "127.0.0.1"
    client.close()
    assert RedisURL.parse("redis://h:1?remap_host=[::1]").reach(("n", 5)) == ("::1", 5)
    assert RedisURL.parse("redis://h:1").reach(("n", 5)) == ("n", 5)
    for bad in ("", "h:7000", "a,b", "u@h"):
        with pytest.raises(ConfigError, match="remap_host"):
            RedisURL.parse(f"redis://h:1?remap_host={bad}")

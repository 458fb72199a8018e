"""keyslot() against Redis's own CLUSTER KEYSLOT, on a real cluster node."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clusterq.slots import SLOT_COUNT, hash_tag, keyslot
from clusterq.tools.devcluster import LocalCluster

TRICKY = [
    b"",
    b"{}",
    b"{}{a}",
    b"{{a}}",
    b"{a}}",
    b"a{b}c{d}",
    b"}{",
    b"}{a}",
    b"{",
    b"}",
    b"{a",
    b"a}",
    b"foo{}{bar}",
    b"foo{{bar}}zap",
    b"foo{bar}{zap}",
    "{é}".encode(),
    "ключ{очередь}".encode(),
    b"\x00{\xff\x00}\x01",
    b"\xff\xfe{}\x80",
    b"clusterq:{images}:pending",
]

# Keys built from pieces that exercise the hash-tag rule, plus arbitrary bytes and text.
_pieces = st.sampled_from(
    [b"{", b"}", b"a", b"b", b"{}", b"}{", b"\x00", b"\xff", "é".encode(), b":"]
)
KEYS = st.one_of(
    st.lists(_pieces, max_size=12).map(b"".join),
    st.binary(max_size=48),
    st.text(max_size=24).map(lambda s: s.encode("utf-8")),
)


def _server_slots(cluster: LocalCluster, keys: list[bytes]) -> list[int]:
    client = cluster.client(cluster.base_port)
    try:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.execute_command("CLUSTER", "KEYSLOT", key)
        return [int(v) for v in pipe.execute()]
    finally:
        client.close()


def test_known_values() -> None:
    # Values from the asynq-on-cluster article and the Redis cluster specification.
    assert keyslot("images") == 9450
    assert keyslot("webhooks") == 4418
    assert keyslot("notifications") == 16340
    assert keyslot("123456789") == 0x31C3 % SLOT_COUNT
    assert keyslot("clusterq:{images}:pending") == keyslot("images")


def test_hash_tag_rule() -> None:
    assert hash_tag(b"a{b}c{d}") == b"b"
    assert hash_tag(b"{}x") == b"{}x"  # empty tag: the whole key
    assert hash_tag(b"{{a}}") == b"{a"  # first '{', first '}' after it
    assert hash_tag(b"}{") == b"}{"
    assert keyslot("é") == keyslot("é".encode())


def test_tricky_keys_match_server(cluster: LocalCluster) -> None:
    assert [keyslot(k) for k in TRICKY] == _server_slots(cluster, TRICKY)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(keys=st.lists(KEYS, min_size=50, max_size=50))
def test_generated_keys_match_server(cluster: LocalCluster, keys: list[bytes]) -> None:
    # 100 examples x 50 keys: 5,000 generated keys per run.
    assert [keyslot(k) for k in keys] == _server_slots(cluster, keys)


@pytest.mark.parametrize("key", ["x", b"x"])
def test_str_and_bytes(key: str | bytes) -> None:
    assert keyslot(key) == keyslot("x")

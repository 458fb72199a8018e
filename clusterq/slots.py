"""Redis Cluster key slots: CRC16/XMODEM of the key's hash tag, modulo 16384.

The hash-tag rule is Redis's own: if the key holds a ``{`` and, somewhere after it, a
``}``, and at least one byte lies between the two, only those bytes are hashed. Any other
key (no ``{``, no ``}`` after the first ``{``, or an empty tag ``{}``) is hashed whole.
Only the *first* ``{`` counts, and the first ``}`` after it.
"""

from __future__ import annotations

import crcmod.predefined

SLOT_COUNT = 16384

_crc16 = crcmod.predefined.mkCrcFun("xmodem")


def hash_tag(key: bytes) -> bytes:
    """The part of ``key`` that decides its slot."""
    start = key.find(b"{")
    if start == -1:
        return key
    end = key.find(b"}", start + 1)
    if end == -1 or end == start + 1:
        return key
    return key[start + 1 : end]


def keyslot(key: str | bytes) -> int:
    """The cluster slot (0..16383) that Redis assigns to ``key``.

    ``str`` keys are encoded as UTF-8, as redis-py sends them.
    """
    raw = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    return int(_crc16(hash_tag(raw))) % SLOT_COUNT

"""Payload and result encoding: JSON by default, msgpack optional. Never pickle.

Decoding only builds plain data (dicts, lists, strings, numbers, booleans, None), so no
payload can make a worker run code.
"""

from __future__ import annotations

import dataclasses
import json
import json.encoder
from typing import Any, Protocol

from clusterq.errors import ClusterqError

#: Default upper bound for an encoded payload (and a stored result).
DEFAULT_MAX_PAYLOAD_BYTES = 512 * 1024


class PayloadError(ClusterqError, ValueError):
    """A payload or result that cannot be encoded or decoded, or that is too large."""


class Codec(Protocol):
    name: str

    def encode(self, value: Any) -> bytes: ...

    def decode(self, data: bytes) -> Any: ...


#: Built once: json.dumps() with options builds an encoder per call.
_JSON_ENCODER = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=lambda v: json_default(v)
)
_JSON_DECODE = json.JSONDecoder().decode


def json_default(value: Any) -> Any:
    """JSON for what the encoder does not know: a dataclass instance (its fields), a
    pydantic model (``model_dump(mode="json")``); anything else is refused."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    raise TypeError(f"Object of type {value.__class__.__name__} is not JSON serializable")


_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
if _c_make_encoder is not None:
    # CPython's C encoder, made once (JSONEncoder.encode makes one per call, which costs
    # more than encoding a small payload). No cycle markers: a shared table would keep
    # stale entries after an error; a cyclic value ends in RecursionError instead.
    _C_ENCODE = _c_make_encoder(
        None, json_default, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )

    def _json_text(value: Any) -> str:
        return "".join(_C_ENCODE(value, 0))

else:  # pragma: no cover - other Pythons

    def _json_text(value: Any) -> str:
        return _JSON_ENCODER.encode(value)


def json_bytes(value: Any) -> bytes:
    """Compact UTF-8 JSON (no NaN or infinities). Raises TypeError or ValueError for
    what JSON cannot hold, ValueError for a cyclic value."""
    try:
        return _json_text(value).encode()
    except RecursionError:
        raise ValueError("value is nested too deeply or contains itself") from None


def json_value(data: bytes | str) -> Any:
    """Parse UTF-8 JSON (what :func:`json_bytes` writes). Raises ValueError for what is
    not JSON, or is nested deeper than the stack allows."""
    try:
        return _JSON_DECODE(data.decode() if isinstance(data, bytes) else data)
    except RecursionError:
        raise ValueError("JSON nested too deeply to be read") from None


class JSONCodec:
    name = "json"

    def encode(self, value: Any) -> bytes:
        try:  # json_bytes() inline, no call in between: once per task
            if _c_make_encoder is not None:
                return "".join(_C_ENCODE(value, 0)).encode()
            return _json_text(value).encode()  # pragma: no cover - other Pythons
        except RecursionError:
            raise PayloadError("payload is nested too deeply or contains itself") from None
        except (TypeError, ValueError) as exc:
            raise PayloadError(f"payload is not JSON-serialisable: {exc}") from None

    def decode(self, data: bytes) -> Any:
        try:
            return json_value(data)
        except (UnicodeDecodeError, ValueError) as exc:
            # (nested deeper than this process's stack allows: json_value says so)
            raise PayloadError(f"payload is not valid JSON: {exc}") from None


class MsgpackCodec:
    name = "msgpack"

    def __init__(self) -> None:
        try:
            import msgpack
        except ImportError:
            raise PayloadError("msgpack codec needs: pip install 'clusterq[msgpack]'") from None
        self._msgpack = msgpack

    def encode(self, value: Any) -> bytes:
        try:
            return bytes(self._msgpack.packb(value, use_bin_type=True))
        except (TypeError, ValueError, OverflowError) as exc:
            raise PayloadError(f"payload is not msgpack-serialisable: {exc}") from None

    def decode(self, data: bytes) -> Any:
        try:
            return self._msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as exc:
            raise PayloadError(f"payload is not valid msgpack: {exc}") from None


_CODECS: dict[str, Codec] = {}


def get_codec(name: str) -> Codec:
    """The codec called ``name`` ("json" or "msgpack")."""
    codec = _CODECS.get(name)
    if codec is None:
        if name == "json":
            codec = JSONCodec()
        elif name == "msgpack":
            codec = MsgpackCodec()
        else:
            raise PayloadError(f"unknown codec {name!r}: expected 'json' or 'msgpack'")
        _CODECS[name] = codec
    return codec


def encode_limited(codec: Codec, value: Any, limit: int, what: str = "payload") -> bytes:
    data = codec.encode(value)
    if len(data) > limit:
        raise too_large(len(data), limit, what)
    return data


def too_large(size: int, limit: int, what: str = "payload") -> PayloadError:
    return PayloadError(f"{what} is {size} bytes encoded, more than the limit of {limit} bytes")


def reply_text(value: Any) -> str:
    """A server reply (bytes, or already a str) as text; bytes that are not UTF-8 are
    shown with replacement characters rather than raising."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
